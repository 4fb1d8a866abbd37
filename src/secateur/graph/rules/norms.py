"""Normalisation reached at op level (module subclasses, functional calls): affine params follow channels; a norm
over a pruned dim is a site the oracle recomputes over kept channels."""
from __future__ import annotations

import torch

from secateur.graph.rules.registry import _outs, _pad, _tensors, aten, rule


# ---------------------------------------------------------------- normalisation at op level (module subclasses)
@rule(aten.native_batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
      aten._native_batch_norm_legit_functional, aten.batch_norm, aten.instance_norm)
def batch_norm(tr, func, args, kwargs, out):
    x = args[0]
    lab = _pad(tr.get(x), x.dim())
    if lab is not None:
        lab = tr.atoms.collapse(lab, [0, *range(2, x.dim())])
    chan = None if lab is None else lab.reshape(-1)
    for p in list(args[1:5]):
        if isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() == x.size(1):
            pl = tr.get(p)
            if pl is None:
                pl = tr.param_label(p, buffers=True)
            if pl is None:  # an unsliceable per-channel constant
                if chan is not None:
                    chan = tr.atoms.collapse(chan, [0])
                continue
            if chan is None:
                chan = pl.reshape(-1)
            else:
                tr.atoms.union(chan, pl.reshape(-1))
    if chan is None:
        return
    for i, t in enumerate(_outs(out)):
        if t.dim() == x.dim():
            shape = [1] * x.dim()
            shape[1] = -1
            tr.set(t, chan.expand(x.size(1)).reshape(shape) if chan.numel() == 1 else chan.reshape(shape))
        elif t.dim() == 1 and t.numel() == x.size(1):
            tr.set(t, chan.expand(x.size(1)).clone())
        else:
            tr.set(t, None)


def _affine(tr, chan, p):
    """A norm's per-channel weight/bias met at op level: sliced with the channels when it is a free parameter;
    an unsliceable constant makes the channels all-or-nothing."""
    if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() != chan.numel():
        return chan
    pl = tr.get(p)
    if pl is None:
        pl = tr.param_label(p)
    if pl is None:
        return tr.atoms.collapse(chan, [0]).expand(chan.numel()).clone()
    tr.atoms.union(chan, pl.reshape(-1))
    return chan


@rule(aten.native_layer_norm, aten.layer_norm)
def layer_norm(tr, func, args, kwargs, out):
    """LayerNorm over the last dim reached at op level (ConvNeXt's LayerNorm2d permutes, then calls it): the
    channels are pruned with the affine parameters and the site is recorded (removal is not zeroing there)."""
    x, shape = args[0], list(args[1])
    lab = _pad(tr.get(x), x.dim())
    outs = _outs(out)
    if lab is not None and all(lab.size(-1 - d) == 1 for d in range(len(shape))):
        tr.set(outs[0], lab)  # channels on other dims only: each one is normalised on its own
        for t in outs[1:]:
            tr.set(t, None)
        return
    if lab is None or len(shape) != 1:
        return norm_over_channels(tr, func, args, kwargs, out)
    chan = tr.atoms.collapse(lab, range(x.dim() - 1)).reshape(-1)
    for p in args[2:4]:
        chan = _affine(tr, chan, p)
    tr.norm_site("op", func.overloadpacket, func.overloadpacket._qualified_op_name, chan)
    tr.set(outs[0], chan.reshape((1,) * (x.dim() - 1) + (-1,)))
    for t in outs[1:]:
        tr.set(t, None)  # per-row statistics


@rule(aten.native_group_norm, aten.group_norm)
def group_norm(tr, func, args, kwargs, out):
    """GroupNorm at op level: whole groups only (then removal is exactly zeroing), and only inside an
    nn.GroupNorm (subclass) with that group count, whose ``num_groups`` the engine updates: a count written in
    the model's code would stay and silently regroup the channels."""
    x = args[0]
    groups = args[6] if func.overloadpacket is aten.native_group_norm else args[1]
    lab = _pad(tr.get(x), x.dim())
    outs = _outs(out)
    owner = tr.model.get_submodule(tr.where()) if tr.where() != "<root>" else tr.model
    if lab is None or x.dim() < 2 or not (isinstance(owner, torch.nn.GroupNorm) and owner.num_groups == groups):
        return norm_over_channels(tr, func, args, kwargs, out)
    if groups == 1:  # the owner's own forward (timm's GroupNorm1): one group is a LayerNorm over C and positions
        from secateur.graph.modules import one_group_norm
        one_group_norm(tr, owner, x, outs[0])
        for t in outs[1:]:
            tr.set(t, None)
        return
    chan = tr.atoms.collapse(lab, [0, *range(2, x.dim())]).reshape(-1).expand(x.size(1))
    chan = tr.atoms.collapse(chan.reshape(groups, -1), [1]).expand(groups, x.size(1) // groups).reshape(-1)
    weights = args[1:3] if func.overloadpacket is aten.native_group_norm else args[2:4]
    for p in weights:
        chan = _affine(tr, chan, p)
    tr.set(outs[0], chan.reshape((1, -1) + (1,) * (x.dim() - 2)))
    for t in outs[1:]:
        tr.set(t, None)


@rule(aten.rms_norm, aten._fused_rms_norm)
def norm_over_channels(tr, func, args, kwargs, out):
    """A normalisation the engine cannot slice (several normalised dims, a fused kernel): its channels are kept
    (the plan says so)."""
    for t in [*_tensors(args)]:
        tr.atoms.block(tr.get(t))
        if id(t) in tr.owner:
            tr.atoms.block(tr.param_label(t))
    tr.notes.append(f"{tr.where()}: {func.overloadpacket._qualified_op_name} normalises over channels; "
                    "its channels are kept")
    for t in _outs(out):
        tr.set(t, None)
