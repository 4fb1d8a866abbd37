"""Per-ATen-op channel rules: a registry keyed by op (overload packet), plus the op tags torch provides.

Each rule reads the labels of its inputs and sets the labels of its outputs, unioning atoms that must be removed
together. Categories: identity copies, pointwise (``torch.Tag.pointwise``), pure data movement (view, permute,
cat, split, index...: the same op is run on the int64 labels, which gives an exact index map), reductions,
per-channel spatial ops (pooling, upsampling), matmuls, attention, normalisations. Ops that only read a shape
produce unlabelled tensors. Anything else reached by a labelled tensor is a PruningError."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import torch

from secateur.graph.capture import Tracer
from secateur.graph.labels import full
from secateur.graph.splits import open_cut

aten = torch.ops.aten
RULES: dict[Any, Callable] = {}
BY_NAME: dict[str, Callable] = {}  # ops of optional libraries ("torchvision::roi_align"), never imported here


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _outs(out):
    return list(_tensors(out))


def _pad(lab: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    if lab is None:
        return None
    return lab.reshape((1,) * (ndim - lab.dim()) + tuple(lab.shape))


def apply_rule(tr: Tracer, func, args, kwargs, out) -> None:
    labelled = any(tr.get(t) is not None for a in (*args, *kwargs.values()) for t in _tensors(a))
    packet = func.overloadpacket
    if not labelled and packet in _TRANSPOSES and _weight_view(tr, func, args, out):
        return
    if not labelled and packet is aten.index and _gathered_table(tr, args):
        labelled = True
    if not labelled and packet in _OWN_WEIGHT:
        labelled = True  # a conv / embedding reached at op level produces channels even from the model's input
    if not labelled and packet in _SPATIAL and _resampled_param(tr, args[0]):
        labelled = True
    if not labelled and (RULES.get(packet) is move or _free_pointwise(func, packet)):
        # a free parameter entering a view/cat (cls token, pos emb), or a pointwise op of its own (see below)
        for t in _tensors(args):
            if id(t) in tr.owner and tr.param_label(t) is not None:
                labelled = True
    if not labelled:
        if func._schema.is_mutable and out is not None:
            for t in _outs(out):
                if id(t) in tr.labels and tr.labels[id(t)] is not None:
                    tr.set(t, None)
        return
    fn = RULES.get(packet) or BY_NAME.get(packet._qualified_op_name)
    if fn is None and (torch.Tag.pointwise in func.tags or _inplace_of_pointwise(packet)
                       or packet in _POINTWISE_UNTAGGED):
        fn = pointwise
    if fn is None:
        fn = not_understood
    inplace_view = func._schema.is_mutable and isinstance(args[0], torch.Tensor) and args[0]._is_view()
    before = tr.get(args[0]) if inplace_view else None
    fn(tr, func, args, kwargs, out)
    if inplace_view:
        after = tr.get(args[0])
        if not (before is None and after is None) and (before is None or after is None or
                                                        not torch.equal(before, after)):
            # the base's labels are not rewritten through the view: keep every channel on either side of the
            # write (before and after), so nothing there changes under any plan (noted)
            tr.atoms.block(before)
            tr.atoms.block(after)
            note = (f"{tr.where()}: in-place {packet._qualified_op_name} writes channels into a view of another "
                    "tensor; the channels on both sides of the write are kept")
            if note not in tr.notes:
                tr.notes.append(note)


_POINTWISE_UNTAGGED = {aten.hardswish, aten.hardswish_, aten.mish, aten.mish_, aten.silu, aten.gelu_,
                       aten.elu, aten.elu_, aten.selu, aten.selu_, aten.celu, aten.celu_, aten.softplus,
                       aten.hardsigmoid, aten.threshold, aten.threshold_, aten.rrelu, aten.glu,
                       # elementwise, untagged in torch: masked_fill with a 0-d tensor value (cpmant's attention:
                       # 0.548 -> 0.259 of its MACs at ratio 0.5), integer floor division (MoE routing indices)
                       aten.masked_fill, aten.masked_fill_, aten.floor_divide, aten.floor_divide_}


def _free_pointwise(func, packet) -> bool:
    """An out-of-place pointwise op, which may read a free parameter and nothing labelled: Swin V2's per-head
    ``torch.clamp(self.logit_scale, max=...).exp()`` [heads, 1, 1]. The parameter gets its atoms there (as on
    entering a view) and the result carries them, so it is sliced with the heads it then scales; left a constant,
    it varied along the heads dim and made every head one unit (timm swinv2_tiny_window8_256: 0.69 of dense MACs).
    Only a parameter with one non-1 dim is labelled (``Tracer.param_label``); other constants stay constants."""
    if func._schema.is_mutable:
        return False
    return (RULES.get(packet) is pointwise or torch.Tag.pointwise in func.tags or packet in _POINTWISE_UNTAGGED)


def _inplace_of_pointwise(packet) -> bool:
    name = packet.__name__
    if not name.endswith("_"):
        return False
    base = getattr(aten, name[:-1], None)
    return base is not None and any(torch.Tag.pointwise in getattr(base, o).tags for o in base.overloads())


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


@rule(aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.allclose)
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
        if lab is None and id(t) in tr.owner and id(t) not in shared:
            lab = tr.param_label(t)
        if lab is None:
            if t.dim() > 0 and t.numel() > 1:
                consts.append(t)
        else:
            held.append((t, _pad(lab, nd)))
    for t, lab in held:
        if len(held) > 1 and _broadcast_gate(t, lab, [o for u, o in held if u is not t], shape):
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
        if d is not None:  # a free parameter (position embedding [1, tokens, C]) is sliced with its channels
            res = tr.atoms.collapse(res, [e for e in dims if e != d])  # the other dims: the same channels
            res = _join(tr, res, _pad(tr.param_label_along(c, d - (nd - c.dim())), nd))
            continue
        if dims:
            res = tr.atoms.collapse(res, dims)
    for t in outs:
        tr.set(t, res if t.dim() == nd else None)


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


def _shared_params(tr, tens, nd) -> set[int]:
    """Free 1-d parameters (one non-1 dim) that meet channels varying along another dim as well, where the parameter
    broadcasts: a qk-norm weight [head_dim] on q viewed [B, N, heads, head_dim] (gemma4_vit's RmsNorm, reached op by
    op). Slicing it with the channels would union dim d of every head with the weight's d, linking every head into
    one group, which the per-head statistic then made all-or-nothing (gemma4_vit_167m kept all its heads). In heads
    mode such a parameter is a constant instead: the channels are collapsed along its dim (a head is whole there,
    so the weight is never cut) and the heads stay separate. With ``heads="head_dim"`` the old union stays (it is
    what lets the same dim go from every head). Only for a weight over the last dim: a per-head scale broadcast over
    its head's dims (XCA's temperature [heads, 1, 1]) joins one head only, and keeps the union (edgenext_small
    went 0.38 -> 0.52 when it did not)."""
    if tr.head_dim:
        return set()
    labs = [_pad(tr.get(t), nd) for t in tens if tr.get(t) is not None]
    out = set()
    for t in tens:
        if tr.get(t) is not None or id(t) not in tr.owner or not tr.owner[id(t)][2] or id(t) in tr.labels:
            continue
        big = [nd - t.dim() + d for d in range(t.dim()) if t.size(d) > 1]
        if big != [nd - 1]:  # a weight over the last dim (a norm's affine weight); not a per-head scale
            continue  # [heads, 1, 1] (edgenext's XCA temperature), whose union with its head is right
        if any(lab.size(big[0]) > 1 and any(_distinct_along(lab, e) for e in range(nd) if e != big[0])
               for lab in labs):
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
    if not dims or id(c) not in tr.owner or not tr.owner[id(c)][2] or id(c) in tr.labels:
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


# ---------------------------------------------------------------- data movement: run the op on the labels
_INDEX_ARGS = {aten.index: (1,), aten.index_select: (2,), aten.gather: (2,), aten.take_along_dim: (1,)}


@rule(aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.permute, aten.transpose, aten.t,
      aten.expand, aten.unsqueeze, aten.squeeze, aten.slice, aten.select, aten.split, aten.split_with_sizes,
      aten.unbind, aten.cat, aten.stack, aten.roll, aten.flip, aten.repeat, aten.constant_pad_nd, aten.narrow,
      aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.index, aten.index_select,
      aten.gather, aten.movedim, aten.unfold, aten.diagonal, aten.unsafe_split, aten.tensor_split,
      aten.unsafe_split_with_sizes, aten.expand_copy, aten.view_copy, aten.permute_copy, aten.transpose_copy,
      aten.slice_copy, aten.select_copy, aten.unsqueeze_copy, aten.squeeze_copy, aten.split_copy,
      aten.split_with_sizes_copy, aten.alias_copy, aten.hstack, aten.vstack, aten.concat, aten.concatenate,
      aten.take_along_dim, aten.swapaxes, aten.swapdims, aten.tile, aten.reflection_pad1d,
      aten.reflection_pad2d, aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d,
      aten.reflection_pad3d, aten.im2col, aten.col2im)
def move(tr, func, args, kwargs, out):
    packet = func.overloadpacket
    index_pos = _INDEX_ARGS.get(packet, ())

    def sub(x, pos):
        if pos in index_pos:
            if any(t.device.type == "meta" for t in _tensors(x)):
                raise tr.error(f"{packet._qualified_op_name} with tensor indices on the meta device: labels need "
                               "real indices", hint="capture with real (small) inputs")
            return x.cpu() if isinstance(x, torch.Tensor) else [None if y is None else y.cpu() for y in x]
        if isinstance(x, torch.Tensor):
            return full(_pad(_lab(x), x.dim()), x.shape)
        if isinstance(x, (list, tuple)) and x and all(isinstance(y, torch.Tensor) for y in x):
            return [full(_pad(_lab(y), y.dim()), y.shape) for y in x]
        return x

    def _lab(t):
        lab = tr.get(t)
        return tr.param_label(t) if lab is None and id(t) in tr.owner else lab

    if packet in (aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
                  aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d):
        x, lab = args[0], _pad(tr.get(args[0]), args[0].dim())
        pads = list(args[1])
        padded = [x.dim() - 1 - i // 2 for i in range(len(pads)) if pads[i] != 0]
        if all(lab.size(d) == 1 for d in padded):  # padding spatial dims: padded cells belong to the channel
            tr.set(out, lab)
            return
        if packet is not aten.constant_pad_nd:
            raise tr.error(f"{packet._qualified_op_name} along a channel dim is not supported", x)

    if _compressed_move(tr, func, args, out):
        return
    largs = [sub(a, i) for i, a in enumerate(args)]
    if packet is aten.constant_pad_nd:
        largs = largs[:2] + [-1]
    if packet is aten.col2im:  # [N, C * kh * kw, L] -> [N, C, H, W]: channel c sums its kh * kw cells
        x, lab = args[0], _pad(tr.get(args[0]), args[0].dim())
        cdim, k = x.dim() - 2, math.prod(args[2])
        if any(lab.size(d) > 1 for d in range(lab.dim()) if d != cdim) or lab.size(cdim) % k:
            not_understood(tr, func, args, kwargs, out)
            return
        chan = tr.atoms.collapse(lab.reshape(-1, k), [1]).reshape(-1)  # a channel's cells are one unit
        tr.set(out, chan.reshape((1,) * cdim + (chan.numel(), 1, 1)))
        return
    if packet is aten.im2col:  # [N, C, H, W] -> [N, C * kh * kw, L], channel-major: c * kh * kw + kernel cell
        x, lab = args[0], _pad(tr.get(args[0]), args[0].dim())
        cdim = x.dim() - 3
        if any(lab.size(d) > 1 for d in range(lab.dim()) if d != cdim):  # channels mixed with space: kept
            not_understood(tr, func, args, kwargs, out)
            return
        k = math.prod(args[1])
        new = lab.reshape(-1).repeat_interleave(k)
        tr.set(out, new.reshape((1,) * cdim + (new.numel(), 1)))
        return
    lout = func(*largs, **kwargs)
    outs, louts = _outs(out), _outs(lout)
    check = _CHECKS.get(packet)
    if check is not None:
        check(tr, args, largs, louts)
    for t, lab in zip(outs, louts):
        tr.set(t, lab)


def _compressed_move(tr, func, args, out) -> bool:
    """Fast path on broadcast (compressed) labels for ops that only rearrange dims, or cut / join along a dim
    the labels do not vary on: no full-size label is materialised (densenet's concatenations at 224 px)."""
    packet = func.overloadpacket
    x = args[0]
    if packet in (aten.permute, aten.transpose, aten.t, aten.unsqueeze) and isinstance(x, torch.Tensor):
        lab = tr.get(x)
        if lab is None:
            return False
        tr.set(out, func(_pad(lab, x.dim()), *args[1:]))
        return True
    if packet is aten.expand and isinstance(x, torch.Tensor) and tr.get(x) is not None:
        tr.set(out, _pad(tr.get(x), out.dim()))  # broadcasting is what a label of size 1 already means
        return True
    if packet in (aten.slice, aten.select) and isinstance(x, torch.Tensor) and tr.get(x) is not None:
        lab = _pad(tr.get(x), x.dim())
        d = (args[1] if len(args) > 1 else 0) % x.dim()
        if lab.size(d) != 1:
            return False
        tr.set(out, lab.select(d, 0) if packet is aten.select else lab)
        return True
    if packet is aten.cat and isinstance(x, (list, tuple)):
        ts = [t for t in x if t.numel() or t.dim() > 1]
        if not ts:
            return False
        nd = out.dim()
        d = (args[1] if len(args) > 1 else 0) % nd
        labs = [_pad(tr.get(t) if tr.get(t) is not None or id(t) not in tr.owner  # a zero k bias buffer too
                     else tr.param_label(t, buffers=True), nd) for t in ts]
        keep = [j == d or any(lab is not None and lab.size(j) > 1 for lab in labs) for j in range(nd)]
        parts = []
        for t, lab in zip(ts, labs):
            shape = [t.size(j) if keep[j] else 1 for j in range(nd)]
            parts.append(torch.full(shape, -1, dtype=torch.long) if lab is None else lab.expand(shape))
        tr.set(out, torch.cat(parts, d))
        return True
    if packet in _RESHAPES and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
        return _compressed_reshape(tr, args, out)
    return False


_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.view_copy)


def _compressed_reshape(tr, args, out) -> bool:
    """A reshape of a broadcast label, block by block of the factorisation (``_blocks``): a block whose input
    dims the label does not vary on stays size 1, the others are reshaped in full. A token stream [B, N, C]
    split into heads [B, N, 3, H, d] then moves C labels, not N x C (cait_xs24_384: 577 tokens, every layer).
    The label the plain path would store is this one with its constant dims expanded (``Tracer.set`` compresses
    both to the same), and the view check gets it expanded (a view: the same label, no copy)."""
    x, lab = args[0], tr.get(args[0])
    if lab is None or x.dim() == 0 or out.dim() == 0 or x.numel() == 0:
        return False
    lab = _pad(lab, x.dim())
    blocks = _blocks(list(x.shape), list(out.shape))
    if ([d for ins, _ in blocks for d in ins] != list(range(x.dim()))
            or [d for _, outs in blocks for d in outs] != list(range(out.dim()))):
        return False  # dims left over (trailing size-1 dims): the plain path
    full, new = [], []
    for ins, outs in blocks:
        if math.prod(x.size(d) for d in ins) != math.prod(out.size(d) for d in outs):
            return False
        varies = any(lab.size(d) > 1 for d in ins)
        full += [x.size(d) if varies else 1 for d in ins]
        new += [out.size(d) if varies else 1 for d in outs]
    if full == list(x.shape):
        return False  # nothing broadcast: the plain path
    lout = lab.expand(full).reshape(new)
    tr.set(out, lout)
    _check_view(tr, args, None, [lout.expand(out.shape)])  # it reads the output's shape from the label
    return True


# ---- after pruning, the model's own code re-splits / re-slices a shrunken dim: keep that valid
def _varying(tr, x, dim):
    lab = tr.get(x)
    return lab is not None and _pad(lab, x.dim()).size(dim % x.dim()) > 1


def _check_split(tr, args, largs, louts):
    """Equal parts (chunk, q/k/v split) must shrink alike: align position j of every part. Unequal parts whose
    sizes the module names in its attributes are pruned within each part (graph/splits.py: the sizes follow, proven
    by the dry run); other unequal parts come from sizes the engine cannot update: keep those channels. An explicit
    size list (``split_with_sizes``) is recorded as a cut even when equal, so its size attributes follow too."""
    x = args[0]
    dim = (args[2] if len(args) > 2 else 0) % x.dim()
    if not _varying(tr, x, dim):
        return
    sizes = [o.size(dim) for o in louts]
    bounds = [0, *itertools.accumulate(sizes)]
    if len(set(sizes)) == 1:
        for o in louts[1:]:
            tr.atoms.union(louts[0], o)
        if isinstance(args[1], (list, tuple)):
            open_cut(tr, "split_with_sizes", largs[0], dim, bounds, False)
    elif not open_cut(tr, "split", largs[0], dim, bounds, False):
        tr.atoms.collapse(largs[0], [dim])


def _check_slice(tr, args, largs, louts):
    """A slice/select/index along a channel dim uses positions fixed in the model's code: keep those channels
    (a full-range slice is a no-op and is fine)."""
    x = args[0]
    if isinstance(args[1], (list, tuple)):  # aten.index: a list of index tensors, None = whole dim
        dims = [d for d, i in enumerate(args[1]) if i is not None]
    else:
        dims = [args[1] if len(args) > 1 and isinstance(args[1], int) else 0]
    if louts and louts[0].shape == x.shape and torch.equal(louts[0], largs[0]):
        return  # a full-range slice
    for d in dims:  # the dim must never shrink: its atoms go all together (whole heads survive a
        if _varying(tr, x, d):  # rotate_half over head_dim; conv channels sliced at [:, :8] are kept)
            tr.atoms.collapse(largs[0], [d])


def _check_slice_cut(tr, args, largs, louts):
    """``aten.slice(x, dim, start, end, 1)`` along a channel dim at positions the module names: the slice keeps its
    own channels and graph/splits.py moves the positions with the pruning; any other slice: ``_check_slice``."""
    if not _slice_cut(tr, args, largs):
        _check_slice(tr, args, largs, louts)


def _slice_cut(tr, args, largs) -> bool:
    x = args[0]
    if len(args) < 3:
        return False
    if x.dim() == 0 or not isinstance(args[1], int):
        return False
    d = args[1] % x.dim()
    start, end = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
    step = args[4] if len(args) > 4 else 1
    if step != 1 or not _varying(tr, x, d) or not isinstance(start or 0, int) or not isinstance(end or 0, int):
        return False
    size = x.size(d)
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    if not 0 <= start < min(end, size) or (start == 0 and end >= size):
        return False  # empty, or the whole dim (a no-op, see ``_check_slice``)
    return open_cut(tr, "slice", largs[0], d, [start, end], True)


def _check_roll(tr, args, largs, louts):
    x = args[0]
    dims = args[2] if len(args) > 2 else []
    dims = [dims] if isinstance(dims, int) else list(dims)
    if tr.get(x) is not None:
        tr.atoms.collapse(largs[0], dims or range(x.dim()))


def _blocks(a, b):
    """Reshape factorisation: [(in_dims, out_dims)] whose sizes multiply to the same number."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i); pa *= a[i]; i += 1
            elif j < len(b):
                outs.append(j); pb *= b[j]; j += 1
            else:
                break
        out.append((ins, outs))
    return out


def _check_view(tr, args, largs, louts):
    """A channel dim split into several dims ([E] -> [heads, head_dim], [C] -> [groups, C/groups]): after
    pruning, the code re-splits the smaller dim, so removals must be whole slices along one of those dims.
    Decided once all unions are known (see groups.py)."""
    x, lab = args[0], louts[0]
    if tr.get(x) is None or lab.dim() == 0:
        return
    for ins, outs in _blocks(list(x.shape), list(lab.shape)):
        if len(ins) == 1 and len(outs) >= 2 and _varying(tr, x, ins[0]):
            varying = [d for d in outs if lab.size(d) > 1 and not bool((lab == lab.narrow(d, 0, 1)).all())]
            if len(varying) >= 2:
                tr.constraints.append((lab.clone(), outs))


_CHECKS = {aten.split: _check_split, aten.split_with_sizes: _check_split, aten.unsafe_split: _check_split,
           aten.unsafe_split_with_sizes: _check_split, aten.split_copy: _check_split,
           aten.split_with_sizes_copy: _check_split, aten.tensor_split: _check_split,
           aten.slice: _check_slice_cut, aten.select: _check_slice, aten.narrow: _check_slice,
           aten.index: _check_slice, aten.slice_copy: _check_slice_cut, aten.select_copy: _check_slice,
           aten.roll: _check_roll, aten.view: _check_view, aten._unsafe_view: _check_view,
           aten.reshape: _check_view, aten.view_copy: _check_view, aten._reshape_alias: _check_view}


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
    if len(big) != 1 or big[0] not in dims or bool((lab < 0).any()):
        return False
    tr.norm_site("reduce", func.overloadpacket, func.overloadpacket._qualified_op_name, lab.reshape(-1), dim=big[0])
    for t in _outs(out):
        tr.set(t, None)
    return True


@rule(*_RED)
def reduction(tr, func, args, kwargs, out):
    x = args[0]
    lab = _pad(tr.get(x), x.dim())
    dpos, kpos, keeps = _RED[func.overloadpacket]
    names = [a.name for a in func._schema.arguments]
    dim = args[dpos] if len(args) > dpos else kwargs.get("dim", None)
    if "dim" not in names:
        dim = None
    keepdim = bool(args[kpos]) if kpos is not None and len(args) > kpos else bool(kwargs.get("keepdim", False))
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


# ---------------------------------------------------------------- matmul
def _join(tr, res, lab):
    """Labels of a result that several operands feed: their channels are one group (unioned), and
    each position takes whichever operand labels it (``-1`` means unlabelled)."""
    if res is None:
        return lab
    tr.atoms.union(res, lab)
    x, y = torch.broadcast_tensors(res, lab)
    return torch.where(x >= 0, x, y)


def _matmul(tr, a, c):
    """a [..., n, k] @ c [..., k, m] -> label of [..., n, m]."""
    nd = max(a.dim(), c.dim())
    la = _pad(tr.get(a), a.dim())
    lc = _pad(tr.get(c), c.dim())
    if a.dim() == 1 or c.dim() == 1:
        raise tr.error("matmul with a 1-d channel-carrying operand is not supported", a)
    ka = a.dim() - 1
    kc = c.dim() - 2

    def others_vary(lab, kdim):
        return any(lab.size(d) > 1 for d in range(lab.dim()) if d != kdim)

    va = la is not None and la.size(ka) > 1
    vc = lc is not None and lc.size(kc) > 1
    if va and vc and not others_vary(la, ka) and not others_vary(lc, kc):
        tr.atoms.union(la.reshape(-1), lc.reshape(-1))  # contracted pair: removing k from both drops a term
        tr.contracted.append(la.reshape(-1))  # read only here: the oracle zeroes them at their producers
        la = lc = None
    else:
        if va:
            la = tr.atoms.collapse(la, [ka])
        if vc:
            lc = tr.atoms.collapse(lc, [kc])
    res = None
    if la is not None:
        res = _pad(la, nd)  # [..., n, 1]
    if lc is not None:
        res = _join(tr, res, _pad(lc, nd))  # [..., 1, m]
    return res


_TRANSPOSES = {aten.t, aten.transpose, aten.permute, aten.numpy_T}


def _gathered_table(tr, args) -> bool:
    """A relative position bias table ``[distances, heads]`` read as ``table[index]`` (BEiT, timm Swin): its
    columns pass through the gather, so it gets atoms along them and is sliced with the heads it meets; the rows
    are positions, never channels. Only when the columns are its module's ``num_heads``: a table over head dims
    (SAM's ``rel_pos_h [distances, head_dim]``, shared by all heads) would tie every head into one unit
    (measured: samvit 0.50 -> 0.90 of dense MACs), so it stays a constant there. The head count is the owner's
    ``num_heads``, or, for a bias module that keeps none (timm's ``RelPosBias``, only ``bias_shape``), the one of
    the attention that holds it (its parent): else the table stayed a constant while the heads it is added to
    shrank, and the dry run kept every head of the model (maxvit_nano_rw_256: 0.84 of dense MACs)."""
    p, idx = args[0], args[1]
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or id(p) not in tr.owner or not tr.owner[id(p)][2]:
        return False
    if len(idx) != 1 or idx[0] is None or idx[0].dtype == torch.bool:
        return False
    name = tr.owner[id(p)][0]
    heads = getattr(tr.model.get_submodule(name), "num_heads", None)
    if heads is None and name:
        heads = getattr(tr.model.get_submodule(name.rpartition(".")[0]), "num_heads", None)
    if heads != p.size(1):
        return False
    return tr.param_label_along(p, 1) is not None


def _weight_view(tr, func, args, out) -> bool:
    """``F.linear(x, self.qkv.weight, bias)`` outside the Linear's own forward (timm BEiT / EVA attention, with a
    q/k/v bias built by concatenation): remember ``W.t()`` so the matmul reading it is handled like the Linear
    (its rows are new channels, its columns consume the input's). Only an ``nn.Linear``'s 2-d weight: its
    layout is known, and its size updater follows the sliced weight."""
    w = args[0]
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or id(w) not in tr.owner or not tr.owner[id(w)][2]:
        return False
    mname, attr, _ = tr.owner[id(w)]
    if attr != "weight" or not isinstance(tr.model.get_submodule(mname), torch.nn.Linear):
        return False
    if func.overloadpacket is aten.permute and [d % 2 for d in args[1]] != [1, 0]:
        return False
    if func.overloadpacket is aten.transpose and args[1] % 2 == args[2] % 2:
        return False
    tr.weight_views[id(out)] = w
    tr.set(out, None)  # keeps ``out`` alive, so its id stays unique
    return True


def _linear_of(tr, x, wt):
    """Label of ``x @ W.t()`` for a remembered Linear weight ``W`` [out, in] (see ``_weight_view``)."""
    w = tr.weight_views[id(wt)]
    lab = _pad(tr.get(x), x.dim())
    if lab is not None and lab.size(-1) > 1:
        chan = tr.atoms.collapse(lab, range(x.dim() - 1)).reshape(-1)
        missing = chan < 0  # positions no producer labels: atoms of their own, never pruned
        if bool(missing.any()):
            chan = torch.where(missing, tr.atoms.new(chan.numel()), chan)
        tr.slot(w, 1, chan, "in")
    elif lab is not None:
        tr.atoms.block(lab)  # channels on the token dims reaching a matmul: not a per-channel map
    atoms = tr.atoms.new(w.size(0))
    tr.slot(w, 0, atoms, "out")
    return atoms.reshape((1,) * (x.dim() - 1) + (-1,))


@rule(aten.mm, aten.bmm)
def mm(tr, func, args, kwargs, out):
    if id(args[1]) in tr.weight_views and func.overloadpacket is aten.mm:
        return tr.set(out, _linear_of(tr, args[0], args[1]))
    tr.set(out, _matmul(tr, args[0], args[1]))


@rule(aten.addmm, aten.baddbmm)
def addmm(tr, func, args, kwargs, out):
    if id(args[2]) in tr.weight_views and func.overloadpacket is aten.addmm:
        res = _linear_of(tr, args[1], args[2])
        bias = tr.get(args[0])
        if bias is None and args[0].numel() > 1:  # an unsliceable bias: the outputs are all-or-nothing
            res = tr.atoms.collapse(res, [res.dim() - 1])
        elif bias is not None:
            res = _join(tr, res, _pad(bias, out.dim()))
        return tr.set(out, res)
    res = _matmul(tr, args[1], args[2])
    bias = tr.get(args[0])
    if bias is None and args[0].numel() > 1 and res is not None:
        b = args[0]
        csh = (1,) * (out.dim() - b.dim()) + tuple(b.shape)
        dims = [d for d in range(out.dim()) if csh[d] > 1 and res.size(d) > 1]
        res = tr.atoms.collapse(res, dims)
    elif bias is not None:
        res = _join(tr, res, _pad(bias, out.dim()))
    tr.set(out, res)


# ---------------------------------------------------------------- attention
@rule(aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
      aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
      aten.scaled_dot_product_attention, aten._scaled_dot_product_fused_attention_overrideable)
def sdpa(tr, func, args, kwargs, out):
    """Whole heads: q, k, v of one head (and of one key/value group under GQA) go together."""
    q, k, v = args[:3]
    mask = kwargs.get("attn_mask")
    if mask is None and len(args) > 3 and isinstance(args[3], torch.Tensor):
        mask = args[3]
    if tr.head_dim:
        return _sdpa_dims(tr, q, k, v, mask, kwargs.get("scale"), out)
    heads = []
    for t in (q, k, v, mask):  # a per-head mask (T5's relative position bias) goes with its head
        if t is None or (t is mask and t.dim() < 3):
            heads.append(None)
            continue
        lab = _pad(tr.get(t), t.dim())
        if lab is None:
            heads.append(None)
            continue
        lab = tr.atoms.collapse(lab, [t.dim() - 2, t.dim() - 1])
        if lab.size(-3) > 1 and lab.size(-3) != q.size(-3):  # GQA: one kv head serves H/Hkv query heads
            lab = lab.repeat_interleave(q.size(-3) // lab.size(-3), dim=-3)
        heads.append(lab)
    res = None
    for lab in heads:
        if lab is not None:
            res = _join(tr, res, lab)
    for t in _outs(out):
        if t.dim() == q.dim():
            tr.set(t, res)
        elif t.dim() == q.dim() - 1 and res is not None:
            tr.set(t, res[..., 0])
        else:
            tr.set(t, None)


def _head_rows(tr, t, heads):
    """Label of q/k/v [..., H, L, D] as [H, D] (sequence and batch collapsed; kv heads repeated under GQA)."""
    lab = _pad(tr.get(t), t.dim())
    if lab is None:
        return None
    lab = tr.atoms.collapse(lab, [d for d in range(t.dim()) if d not in (t.dim() - 3, t.dim() - 1)])
    lab = lab.reshape(lab.size(-3), lab.size(-1)).expand(t.size(-3), t.size(-1))
    if t.size(-3) != heads:
        lab = lab.repeat_interleave(heads // t.size(-3), dim=0)
    return lab.contiguous()


def _kept_scale(tr, scale, head_size) -> bool:
    """Will the pruned model still use this scale? Not when derived from q's size (``scale=None``), nor when it
    equals 1/sqrt(head size) and no module on the call stack stores it (it may be recomputed from an updated
    head size); a stored attribute (HF ``scaling``) is left as it is by the engine."""
    if scale is None:
        return False
    if not math.isclose(scale, head_size ** -0.5, rel_tol=1e-9):
        return True
    for name in tr.stack[1:]:
        try:
            mod = tr.model.get_submodule(name)
        except AttributeError:
            continue
        if any(isinstance(v, float) and math.isclose(v, scale, rel_tol=1e-9) for v in vars(mod).values()):
            return True
    return False


def _sdpa_dims(tr, q, k, v, mask, scale, out):
    """heads="head_dim": q dim d and k dim d of a head are one unit (removing both drops one term of q.k), v dim d
    of a head goes to the output's dim d. The scale must not follow the new head size: a call without an
    explicit ``scale`` (derived from q's size) keeps its q/k dims (noted)."""
    heads = q.size(-3)
    lq, lk, lv = _head_rows(tr, q, heads), _head_rows(tr, k, heads), _head_rows(tr, v, heads)
    if mask is not None and mask.dim() >= 3:
        tr.atoms.block(tr.get(mask))  # a per-head bias is untouched by head dims: its heads stay
    for lab in (lq, lk, lv):  # partly unlabelled heads (a constant head): nothing there can be split
        if lab is not None and bool((lab < 0).any()):
            tr.atoms.block(lq)
            tr.atoms.block(lk)
            tr.atoms.block(lv)
            lq = lk = lv = None
            break
    if lq is not None or lk is not None:
        if lq is None or lk is None or not _kept_scale(tr, scale, q.size(-1)):
            tr.atoms.block(lq)
            tr.atoms.block(lk)
            if lq is not None and lk is not None:
                tr.notes.append(f"{tr.where()}: attention scale follows q's head size; q/k head dims are kept")
        else:
            tr.atoms.union(lq, lk)
            tr.blocks.append(lq)
            tr.contracted.append(lq.reshape(-1))
    if lv is not None:
        tr.blocks.append(lv)
        if lq is not None and lk is not None and scale is not None:
            tr.links.append((lq[0, 0], lv[0, 0]))
    for i, t in enumerate(_outs(out)):
        if i == 0 and lv is not None and t.dim() >= 3:
            shape = [1] * t.dim()
            shape[-3], shape[-1] = heads, t.size(-1)
            tr.set(t, lv.reshape(shape))
        else:
            tr.set(t, None)


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


# ---------------------------------------------------------------- convolution / embedding reached at op level
_OWN_WEIGHT = (aten.convolution, aten._convolution, aten.conv2d, aten.conv1d, aten.conv3d, aten.embedding)


@rule(aten.convolution, aten._convolution, aten.conv2d, aten.conv1d, aten.conv3d, aten.mkldnn_convolution,
      aten.convolution_overrideable, aten.embedding, aten._embedding_bag, aten.embedding_bag)
def opaque_weighted(tr, func, args, kwargs, out):
    """A weighted op outside a known module (a custom forward: timm's Conv2dSame pads, then calls F.conv2d; Gemma's
    scaled embedding multiplies F.embedding's output). When its weight (and bias) is a model parameter used as
    it is, the op is the module's own rule at op level (``weighted_op``): its channels prune. A computed weight (a
    standardised or masked one) cannot be sliced where it is made: its channels are kept (all-or-nothing, noted)."""
    if func.overloadpacket in _OWN_WEIGHT and weighted_op(tr, func, args, kwargs, out):
        return
    for t in _tensors(args):
        tr.atoms.block(tr.get(t))
    for t in _outs(out):
        tr.set(t, None)
    note = (f"{tr.where()}: {func.overloadpacket._qualified_op_name} with a weight that is not a parameter used "
            "as it is; its channels are kept")
    if note not in tr.notes:
        tr.notes.append(note)


class _Weights:
    """The attributes the module-level conv rules read, for a conv reached at op level."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
        self.weight, self.bias, self.groups = weight, bias, int(groups)
        self.out_channels, self.in_channels = weight.size(0), weight.size(1) * self.groups


def _own_param(tr: Tracer, t: Any) -> bool:
    return isinstance(t, torch.Tensor) and id(t) in tr.owner and tr.owner[id(t)][2] and id(t) not in tr.labels


def weighted_op(tr: Tracer, func, args, kwargs, out) -> bool:
    """``aten::embedding`` / ``aten::convolution`` whose weight is a model parameter: the rule of
    ``nn.Embedding`` / ``nn.Conv*d`` (graph/modules.py) with the op's own arguments. False (nothing done) when the
    weight is computed, the conv transposed, or the indices carry channels."""
    from secateur.graph.modules import _channels, _produce, _shape_for, conv_inputs
    names = [a.name for a in func._schema.arguments]
    val = {**dict(zip(names, args)), **kwargs}
    weight, res = val.get("weight"), _outs(out)
    if not _own_param(tr, weight) or len(res) != 1:
        return False
    if func.overloadpacket is aten.embedding:
        if weight.dim() != 2 or tr.get(val.get("indices")) is not None:
            return False
        atoms = tr.atoms.new(weight.size(1))
        tr.slot(weight, 1, atoms, "out")
        tr.set(res[0], _shape_for(res[0].dim(), -1, atoms))
        return True
    bias, x = val.get("bias"), val.get("input")
    if val.get("transposed", False) or not isinstance(x, torch.Tensor) or (bias is not None and not _own_param(tr, bias)):
        return False
    stub = _Weights(weight, bias, val.get("groups", 1))
    cdim = x.dim() - weight.dim() + 1
    if cdim not in (0, 1) or x.size(cdim) != stub.in_channels:
        return False
    atoms = _produce(tr, stub, stub.out_channels, 0)
    conv_inputs(tr, stub, _channels(tr, x, cdim), atoms)
    tr.set(res[0], _shape_for(res[0].dim(), cdim, atoms))
    return True


def not_understood(tr: Tracer, func, args, kwargs, out) -> None:
    """An op with no rule (``torchvision::nms``, ``aten::nonzero``, a custom kernel) that reads channels: every
    channel it reads is kept (its atoms are blocked: all-or-nothing, never pruned) and its new outputs carry no
    channels, like the model's inputs. Nothing the op sees changes under any plan, so the pruned model computes
    there what the original computes; what it returns is data the engine does not prune through. Raising instead
    (the first design) refused every detector for its post-processing (NMS, top-k, nonzero on class scores),
    whose channels are the model's outputs and kept anyway. Noted once per op and module."""
    ins = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
    if tr.dynamic is None:  # what it returns may be any size (NMS keeps a data-dependent count)
        tr.dynamic = len(tr.trace)
    for t in ins:
        tr.atoms.block(tr.get(t))
    note = (f"{tr.where()}: {func.overloadpacket._qualified_op_name} has no rule in the structural engine; the "
            "channels it reads are kept")
    if note not in tr.notes:
        tr.notes.append(note)
    alias = {id(t) for t in ins}
    for t in _outs(out):
        if id(t) not in alias:
            tr.set(t, None)


# ---------------------------------------------------------------- detection: RoI pooling, writes into a fresh tensor
def roi_pool(tr, func, args, kwargs, out):
    """``roi_align`` / ``roi_pool`` (features [N, C, H, W], boxes) -> [K, C, h, w]: each channel pooled on its own,
    so the boxes' crops carry the features' channels (position-sensitive variants mix them: not here)."""
    x = args[0]
    for t in _tensors(args[1:]):
        tr.atoms.block(tr.get(t))
    lab = _pad(tr.get(x), x.dim())
    lab = None if lab is None else tr.atoms.collapse(lab, [0, *range(2, x.dim())])
    for t in _outs(out):
        tr.set(t, lab if lab is not None and t.dim() == x.dim() else None)


BY_NAME.update({"torchvision::roi_align": roi_pool, "torchvision::roi_pool": roi_pool})


@rule(aten.index_put_, aten.index_put)
def index_put(tr, func, args, kwargs, out):
    """``result[idx] = values`` with indices on the leading dims only and channels in the trailing ones (torchvision's
    multi-scale RoI pooling gathers each level's crops so): the result carries the values' channels. Anything else
    keeps what it reads (``not_understood``)."""
    self, indices, values = args[0], list(args[1]), args[2]
    lv, ls = _pad(tr.get(values), values.dim()), _pad(tr.get(self), self.dim())
    k = len(indices)
    simple = (lv is not None and values.dim() == self.dim() and all(i is not None for i in indices)
              and all(lv.size(d) == 1 for d in range(k)) and all(tr.get(i) is None for i in indices))
    if not simple:
        not_understood(tr, func, args, kwargs, out)
        return
    lab = _join(tr, ls, lv)
    for t in _outs(out):
        tr.set(t, lab)
