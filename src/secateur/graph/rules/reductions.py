"""Reductions over channel dims (statistics become norm sites) and per-channel spatial ops (pooling,
upsampling, resampled position embeddings)."""
from __future__ import annotations

import torch

from secateur.graph.rules.registry import _outs, _pad, aten, rule


# ---------------------------------------------------------------- reductions
def _dims(d, nd):
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(nd))
    if isinstance(d, int):
        return [d % nd]
    return [x % nd for x in d]


_RED = {  # op -> (position of dim arg, position of keepdim arg or None, keeps shape)
    aten.sum: (1, 2, False), aten.mean: (1, 2, False), aten.amax: (1, 2, False), aten.amin: (1, 2, False),
    aten.max: (1, 2, False), aten.min: (1, 2, False), aten.prod: (1, 2, False), aten.any: (1, 2, False),
    aten.all: (1, 2, False), aten.argmax: (1, 2, False), aten.argmin: (1, 2, False), aten.logsumexp: (1, 2, False),
    aten.var: (1, None, False), aten.std: (1, None, False), aten.var_mean: (1, None, False),
    aten.std_mean: (1, None, False), aten.linalg_vector_norm: (2, 3, False), aten.norm: (2, 3, False),
    aten.nansum: (1, 2, False), aten.count_nonzero: (1, None, False),
    aten._softmax: (1, None, True), aten._log_softmax: (1, None, True), aten.softmax: (1, None, True),
    aten.log_softmax: (1, None, True), aten.cumsum: (1, None, True), aten.cumprod: (1, None, True),
    aten.sort: (1, None, True), aten.topk: (2, None, True), aten.argsort: (1, None, True),
    aten._safe_softmax: (1, None, True), aten.special_logsumexp: (1, 2, False),
}


# statistics whose value over the kept channels is what a pruned model computes (a mean, a variance, an L2 norm,
# a max), and whose result holds no channel position: see _statistic_site. Not aten.max / min / argmax / sort:
# they return channel positions (indices), which removal renumbers
_STATS = {aten.mean, aten.var, aten.std, aten.var_mean, aten.std_mean, aten.linalg_vector_norm, aten.norm,
          aten.amax, aten.amin}


def _statistic_site(tr, func, lab, dims, out) -> bool:
    """A statistic over the channel dim (timm's RmsNorm2d: ``x.pow(2).mean(1)``; GlobalResponseNorm: the mean over
    channels of a spatial L2 norm; a hand-written LayerNorm2d: mean and variance over dim 1; CBAM-style spatial
    attention: mean and amax over channels, csatv2). Collapsing the
    channels (the generic reduction) keeps them all-or-nothing, which kept whole models dense (mobilenetv5 1.0,
    csatv2 0.85 of their MACs at ratio 0.5). Removing a channel there is not zeroing it (the count and the values
    in the statistic change), exactly as in a LayerNorm, so it is recorded the same way: a norm site ("reduce")
    whose reference (graph/reference.py) reruns the op on the kept channels only, which is what the pruned model
    computes. Only when the channels vary along one dim, that dim is reduced, and every position is an atom:
    the result then carries no channel position (its shape does not depend on how many are kept)."""
    if func.overloadpacket not in _STATS or lab is None:
        return False
    big = [d for d in range(lab.dim()) if lab.size(d) > 1]
    if len(big) == 2 and len(dims) == 1 and big[1] in dims and _grouped_norm(tr, lab, big):
        lab = tr.atoms.collapse(lab, [big[0]])  # position s of every group: one unit (see _grouped_norm)
        big = big[1:]
    if len(big) != 1 or big[0] not in dims or bool((lab < 0).any()):
        return False
    tr.norm_site("reduce", func.overloadpacket, func.overloadpacket._qualified_op_name, lab.reshape(-1), dim=big[0])
    for t in _outs(out):
        tr.set(t, None)
    return True


def _grouped_norm(tr, lab, big) -> bool:
    """A statistic over groups of channels viewed ``[..., groups, group_size]`` and reduced over the last (a Mamba-2
    mixer's gated RMSNorm, ``MambaRMSNormGated``), in a module that says so: its ``group_size`` is the reduced
    dim's size, or its ``n_groups`` the other's. Each group's statistic stays over as many channels when every
    group loses the same positions, so position ``s`` of every group is made one unit and the site is recorded
    along the group dim (the reference reruns it on the kept positions, the same in every group). Collapsing each
    group instead (the generic reduction) joined every channel of the mixer. Elsewhere (a per-head norm over head
    dims: whole heads there) the generic rule stays."""
    if tr.where() == "<root>":
        return False
    mod = tr.model.get_submodule(tr.where())
    return getattr(mod, "group_size", None) == lab.size(big[1]) or getattr(mod, "n_groups", None) == lab.size(big[0])


@rule(*_RED)
def reduction(tr, func, args, kwargs, out):
    x = args[0]
    lab = _pad(tr.get(x), x.dim())
    dpos, kpos, keeps = _RED[func.overloadpacket]
    names = [a.name for a in func._schema.arguments]
    dim = args[dpos] if len(args) > dpos else kwargs.get("dim", None)
    if "dim" not in names:
        dim = None
    dims = _dims(dim, x.dim()) if x.dim() else []
    if _statistic_site(tr, func, lab, dims, out):
        return
    red = tr.atoms.collapse(lab, dims)
    for t in _outs(out):
        if t.dim() == x.dim():
            tr.set(t, red.expand(*[1 if red.size(d) == 1 else t.size(d) for d in range(t.dim())])
                   if not keeps else red)
        else:
            r = red
            for d in sorted(dims, reverse=True):
                r = r.squeeze(d) if r.dim() > t.dim() else r
            tr.set(t, r if r.dim() == t.dim() else None)


# ---------------------------------------------------------------- per-channel spatial ops
_SPATIAL = {
    aten.max_pool2d_with_indices: 2, aten.max_pool3d_with_indices: 3, aten.avg_pool2d: 2, aten.avg_pool3d: 3,
    aten.avg_pool1d: 1, aten.max_pool1d: 1, aten.max_pool2d: 2, aten._adaptive_avg_pool2d: 2,
    aten.adaptive_avg_pool2d: 2, aten._adaptive_avg_pool3d: 3, aten.adaptive_max_pool2d: 2,
    aten.adaptive_avg_pool1d: 1, aten.adaptive_max_pool1d: 1,
    aten.upsample_nearest2d: 2, aten.upsample_bilinear2d: 2, aten.upsample_bicubic2d: 2,
    aten._upsample_bilinear2d_aa: 2, aten._upsample_nearest_exact2d: 2, aten.upsample_nearest1d: 1,
    aten.upsample_linear1d: 1, aten.upsample_nearest3d: 3, aten.upsample_trilinear3d: 3,
    aten._upsample_nearest_exact1d: 1, aten._upsample_bicubic2d_aa: 2, aten.max_pool3d: 3,
}


def _resampled_param(tr, x) -> bool:
    """A position embedding resampled to the input's grid (timm's ``resample_abs_pos_embed_nhwc``: a [1, H, W, C]
    parameter viewed [1, C, H, W], then ``F.interpolate``): the parameter has several non-1 dims, so it got no label
    on the way, and the interpolated constant, varying along the channels it is then added to, made the whole
    stream all-or-nothing (samvit_base_patch16 at 64x64 kept the stream; built for that input size it prunes to
    0.27 of its MACs). Interpolation and pooling treat dim 1 as channels, each computed on its own, so a view of a
    free parameter entering one is labelled along the parameter dim that is the view's dim 1 (same storage, size
    and stride): that dim is then sliced with whatever channels the result meets, exactly. Not on meta tensors
    (no storage to match)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.size(1) < 2 or x.device.type == "meta":
        return False
    ptr = x.untyped_storage().data_ptr()
    for p in tr.model.parameters():
        if p.untyped_storage().data_ptr() != ptr or p.numel() != x.numel() or id(p) in tr.labels:
            continue
        dims = [k for k in range(p.dim()) if p.size(k) == x.size(1) and p.stride(k) == x.stride(1)]
        lab = tr.param_label_along(p, dims[0]) if len(dims) == 1 else None
        if lab is None:
            return False
        shape = [1] * x.dim()
        shape[1] = x.size(1)
        tr.set(x, lab.reshape(-1).reshape(shape))
        return True
    return False


@rule(*_SPATIAL)
def spatial(tr, func, args, kwargs, out):
    x = args[0]
    k = _SPATIAL[func.overloadpacket]
    lab = tr.atoms.collapse(_pad(tr.get(x), x.dim()), range(x.dim() - k, x.dim()))
    for t in _outs(out):
        tr.set(t, lab if t.dim() == x.dim() else None)
