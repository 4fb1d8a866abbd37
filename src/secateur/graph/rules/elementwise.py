"""Identity copies, shape-only ops and pointwise (broadcasting) ops: labels flow through unchanged or are unioned
across operands."""
from __future__ import annotations

import torch

from secateur.graph.rules.constants import channel_buffer, const_label, is_uniform
from secateur.graph.rules.matmul import _join, _outer_side
from secateur.graph.rules.registry import _outs, _pad, _tensors, aten, rule


# ---------------------------------------------------------------- identity and shape-only
@rule(aten.as_strided_, aten.as_strided)
def restride(tr, func, args, kwargs, out):
    """Kernels restride their own outputs (channels-last pooling): fine while the shape is unchanged."""
    if tuple(out.shape) != tuple(args[0].shape):
        raise tr.error("as_strided changing the shape of a channel-carrying tensor is not supported", args[0])
    tr.set(out, tr.get(args[0]))


@rule(aten.clone, aten._to_copy, aten.detach, aten.alias, aten.lift_fresh_copy, aten.contiguous, aten.positive,
      aten._conj, aten.resolve_conj, aten.resolve_neg, aten.native_dropout, aten.dropout, aten.feature_dropout,
      aten.alpha_dropout)
def identity(tr, func, args, kwargs, out):
    for t in _outs(out):
        tr.set(t, _pad(tr.get(args[0]), t.dim()) if t.shape == args[0].shape else None)


@rule(aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
      aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.sym_size, aten.sym_numel,
      aten.sym_stride, aten.is_same_size, aten.new_empty_strided, aten.randint_like)
def shape_only(tr, func, args, kwargs, out):
    for t in _outs(out):
        tr.set(t, None)


@rule(aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.allclose, aten._is_all_true, aten._is_any_true)
def data_dependent(tr, func, args, kwargs, out):
    for t in _tensors(args):  # a Python decision on channel values: removal would change it
        tr.atoms.block(tr.get(t))


@rule(aten.copy_)
def copy_(tr, func, args, kwargs, out):
    dst, src = args[0], args[1]
    tr.set(dst, _pad(tr.get(src), dst.dim()).expand(dst.shape) if tr.get(src) is not None else None)


# ---------------------------------------------------------------- pointwise
def pointwise(tr, func, args, kwargs, out):
    outs = _outs(out)
    shape = outs[0].shape
    nd = len(shape)
    tens = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
    labs = []
    consts = []
    shared = _shared_params(tr, tens, nd)
    held = []
    for t in tens:
        lab = tr.get(t)
        if lab is not None and id(t) in shared:  # computed from a shared parameter (``Tracer.of_param``): a constant
            tr.atoms.block(lab)  # (its parameter's atoms, which nothing else holds: never sliced)
            consts.append(t)
            continue
        if lab is None and id(t) in tr.owner and id(t) not in shared:
            lab = tr.param_label(t)
        if lab is None:
            if t.dim() > 0 and t.numel() > 1 and not is_uniform(tr, t):  # a uniform fill varies along nothing
                consts.append(t)
        else:
            held.append((t, _pad(lab, nd)))
    for k, (t, lab) in enumerate(held):
        others = [o for u, o in held if u is not t]
        if len(held) > 1 and (_broadcast_gate(t, lab, others, shape) or _outer_side(k, lab, [o for _, o in held])
                              or _shared_by_heads(tr, lab, others)):
            tr.atoms.block(lab)
            consts.append(t)
        else:
            labs.append(lab)
    if not labs:
        for t in outs:
            tr.set(t, None)
        return
    res = labs[0]
    for lab in labs[1:]:
        tr.atoms.union(res, lab)
        a, b = torch.broadcast_tensors(res, lab)
        tr.atoms.block(torch.where(a >= 0, a, b)[(a >= 0) != (b >= 0)])  # meets an unsliceable element
        res = torch.where(a >= 0, a, b)
    for c in consts:  # a constant that varies along a channel dim cannot be sliced: all-or-nothing there
        # (a dim with stride 0 is an ``expand``: one value all along it, which does not vary; F.normalize divides
        # by its norm over channels expanded back to the input's shape)
        csh = (1,) * (nd - c.dim()) + tuple(1 if c.stride(i) == 0 else c.size(i) for i in range(c.dim()))
        dims = [d for d in range(nd) if csh[d] > 1 and res.size(d) > 1]
        d = None if id(c) in shared else _param_dim(tr, c, res, dims)
        lab = None if d is None else const_label(tr, c, d - (nd - c.dim()))
        if lab is not None:  # a free parameter (position embedding [1, tokens, C]) is sliced with its channels
            res = tr.atoms.collapse(res, [e for e in dims if e != d])  # the other dims: the same channels
            res = _join(tr, res, _pad(lab, nd))
            continue
        if dims:
            res = tr.atoms.collapse(res, dims)
    passed = any(res is lab for lab in labs)  # an operand's stored label as it is (relu_, silu_): compressed already
    for t in outs:
        tr.set(t, res if t.dim() == nd else None, compressed=passed)


def _broadcast_gate(t, lab, others, shape) -> bool:
    """``t`` holds one channel (one atom in all) broadcast across another operand's channels (CBAM's spatial gate,
    a conv with one output channel, multiplies every channel: csatv2). Unioning would tie every channel to that one
    channel, making them all-or-nothing; but each output channel reads its own input channel and the same gate
    value, so the gate's channel is kept (blocked) and the channels stay separate: exact for any plan. Not when the
    gate's atom is among the other's along that dim (a statistic collapsed from the same channels): then they are
    one unit already, and the union stays; nor when ``t`` has several channels of its own."""
    nd = len(shape)
    tsh = (1,) * (nd - t.dim()) + tuple(t.shape)
    for d in range(nd):
        if tsh[d] != 1 or shape[d] == 1:
            continue
        for o in others:
            if o.size(d) > 1:
                mine = lab[lab >= 0].unique()
                if mine.numel() != 1:  # several channels of its own (a [B, 1, C] conditioning added to tokens):
                    return False  # they pair with the other's channels, the union stays
                return not bool(torch.isin(mine, o[o >= 0].unique()).any())
    return False


_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _shared_by_heads(tr, lab: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Channels of a table shared by every head (RoFormer's sinusoidal rotary positions ``[tokens, head_dim]``, an
    embedding of their own) meeting per-head channels (q ``[b, heads, tokens, head_dim]``) in heads mode: unioned,
    dim j of every head was tied to the table's dim j, so every head was all-or-nothing. The table is kept whole
    instead (blocked, a constant here; the heads' dims then collapse into one unit per head): exact for any plan,
    as keeping one side of an elementwise product always is. Only where the dim the table broadcasts over is the
    running attention module's heads dim (its size the module's head count, each position other atoms) and the
    table's atoms are not the other's: a gate broadcast over other dims (SK-ResNet's path attention over its paths)
    keeps the union, which was what a rule without the heads test broke (skresnet18 left unpruned)."""
    if tr.head_dim or tr.where() == "<root>":
        return False
    mod = tr.model.get_submodule(tr.where())
    from secateur.graph.mamba2 import is_mixer
    if is_mixer(mod):  # a Mamba-2 mixer's B / C state meets its heads: the repeat-to-heads rule's business
        return False
    counts = {getattr(mod, k) for k in _HEAD_COUNTS if isinstance(getattr(mod, k, None), int)}
    mine = {d for d in range(lab.dim()) if lab.size(d) > 1}
    if mine != {lab.dim() - 1} or not counts:  # a table over head dims (the last) only
        return False
    for o in others:
        if o.dim() != lab.dim():
            continue
        theirs = {d for d in range(o.dim()) if o.size(d) > 1}
        spread = [e for e in theirs - mine if lab.size(e) == 1 and o.size(e) in counts and o.size(e) > 1]
        if not mine <= theirs or not spread:
            continue
        if not all(_distinct_along(o, e) for e in spread):
            continue
        if bool(torch.isin(lab[lab >= 0].unique(), o[o >= 0].unique()).any()):
            continue
        return True
    return False


def _shared_params(tr, tens, nd) -> set[int]:
    """Free 1-d parameters (one non-1 dim) that meet channels varying along another dim as well, where the parameter
    broadcasts: a qk-norm weight [head_dim] on q viewed [B, N, heads, head_dim] (gemma4_vit's RmsNorm, reached op by
    op). Slicing it with the channels would union dim d of every head with the weight's d, linking every head into
    one group, which the per-head statistic then made all-or-nothing (gemma4_vit_167m kept all its heads). In heads
    mode such a parameter is a constant instead: the channels are collapsed along its dim (a head is whole there,
    so the weight is never cut) and the heads stay separate. With ``heads="head_dim"`` the old union stays (it is
    what lets the same dim go from every head). Only for a weight over the last dim: a per-head scale broadcast over
    its head's dims (XCA's temperature [heads, 1, 1]) joins one head only, and keeps the union (edgenext_small
    went 0.38 -> 0.52 when it did not). The same for a tensor computed pointwise from such a weight alone
    (``Tracer.of_param``: Gemma's and Qwen3-Next's RMSNorm multiply by ``1 + weight``): that op gave the weight its
    atoms (dispatch.py ``_free_pointwise``) and the result carries them, so it is blocked there (nothing else holds
    them: the weight is never cut) and met as a constant (gemma3_text 0.38 -> 0.29 of dense MACs at ratio 0.5;
    Qwen3-Next's gated attention kept every head)."""
    if tr.head_dim:
        return set()
    params = [t for t in tens if tr.of_param(t)  # ``1 + weight``: as the weight itself (see above)
              or (id(t) in tr.owner and tr.owner[id(t)][2] and id(t) not in tr.labels)]
    if not params:  # (most ops: no free parameter among the operands)
        return set()
    labs = [_pad(tr.get(t), nd) for t in tens if tr.get(t) is not None and not tr.of_param(t)]
    out = set()
    for t in params:
        big = [nd - t.dim() + d for d in range(t.dim()) if t.size(d) > 1]
        if big != [nd - 1]:  # a weight over the last dim (a norm's affine weight); not a per-head scale
            continue  # [heads, 1, 1] (edgenext's XCA temperature), whose union with its head is right
        if any(lab.size(big[0]) > 1 and any(_distinct_along(lab, e) for e in range(nd) if e != big[0])
               for lab in labs):
            out.add(id(t))
        elif labs and all(lab.size(big[0]) == 1 for lab in labs):
            # the channels do not vary along the weight's dim at all (a gated RMSNorm's weight [head_v_dim] on the
            # gated delta net's output [tokens * heads, head_v_dim], whole heads one unit each: Qwen3-Next): the
            # weight is sliced by no channel, a constant; labelled, it was the outer side of a product with the
            # heads and kept them all
            out.add(id(t))
    return out


def _distinct_along(lab, e) -> bool:
    """Every position along ``e`` holds other atoms (heads), not a few repeated ones (tokens: a cls token's atoms
    and the patches' atoms, which a layer-scale weight [C] must union, xcit)."""
    if lab.size(e) < 2:
        return False
    row = lab.movedim(e, 0).reshape(lab.size(e), -1)[:, 0]
    return int(row.unique().numel()) == lab.size(e)


def _param_dim(tr, c, res, dims) -> int | None:
    """For a model parameter meeting labelled channels along ``dims``: the one dim it can be sliced along (the
    dim whose slices mix the fewest distinct atoms: channels, not tokens, in a cls-token + patches stream), or
    None when it is not a free parameter, is already labelled, or cannot be sliced."""
    if not dims or id(c) in tr.labels:
        return None
    if id(c) in tr.derived:  # computed from a parameter (track_derived): only along the parameter's own dims,
        off = res.dim() - c.dim()  # and not where it is shared: channels that vary along a dim it broadcasts over
        csh = (1,) * off + tuple(c.shape)  # (a RoPE table over head dims, the same for every head) would be tied
        if any(res.size(e) > 1 and csh[e] == 1 for e in range(res.dim())):  # across it; a collapse keeps them apart
            return None
        dims = [d for d in dims if d - off in tr.derived[id(c)][2]]
    elif id(c) not in tr.owner or not (tr.owner[id(c)][2] or channel_buffer(c)):
        return None
    off = res.dim() - c.dim()
    best, cost = None, None
    for d in dims:
        if res.size(d) != c.size(d - off):
            continue
        rows = res.movedim(d, 0).reshape(res.size(d), -1).sort(dim=1).values
        k = int((rows[:, 1:] != rows[:, :-1]).sum()) if rows.size(1) > 1 else 0
        if cost is None or k < cost:
            best, cost = d, k
    return best
