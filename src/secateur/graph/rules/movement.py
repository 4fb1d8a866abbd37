"""Pure data movement (view, permute, cat, split, index...): the same op runs on the int64 labels, which gives an
exact index map; and the checks that keep the model's own re-splits valid after pruning."""
from __future__ import annotations

import itertools
import math

import torch

from secateur.graph.labels import constant_along, full
from secateur.graph.meta_values import value_of
from secateur.graph.rules.constants import label_free_inputs, uniform_inputs
from secateur.graph.rules.registry import _outs, _pad, _tensors, aten, not_understood, rule
from secateur.graph.splits import open_cut


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
    if index_pos:  # channels read at fixed positions are kept (rules/scatter.py)
        from secateur.graph.rules.scatter import keep_indexed_channels
        keep_indexed_channels(tr, func, args)

    def sub(x, pos):
        if pos in index_pos:  # on meta: indices computed from constants only have known values (meta_values.py)
            got = [value_of(tr, t) for t in _tensors(x)]
            if any(t is None for t in got):
                raise tr.error(f"{packet._qualified_op_name} with tensor indices on the meta device: labels need "
                               "real indices", hint="capture with real (small) inputs")
            if isinstance(x, torch.Tensor):
                return got[0].cpu()
            got.reverse()
            return [None if y is None else got.pop().cpu() for y in x]
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

    if packet in (aten.cat, aten.concat, aten.concatenate) and isinstance(args[0], (list, tuple)):
        label_free_inputs(tr, list(args[0]), args[1] if len(args) > 1 else kwargs.get("dim", 0))
        uniform_inputs(tr, list(args[0]), args[1] if len(args) > 1 else kwargs.get("dim", 0))
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
        if _repeat_to_heads(tr, x, out):
            return True
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


def _repeat_to_heads(tr, x, out) -> bool:
    """``x[:, :, :, None].expand(..., G, k, ...)`` with ``G * k`` the running module's ``num_heads``: a source copied
    to every head, then merged into a heads dim (``repeat_interleave(num_heads // n_groups, output_size=num_heads)``
    in a Mamba-2 mixer's scan, ``repeat_kv`` of multi-query attention). Each copy belongs to its head: where it meets
    a head's channels (``B * decay`` per head, ``G * L``, ``C @ states``) they are joined position by position. Left
    with the source's labels, the copies carried the source channels along the heads dim: an outer product of
    state x heads (the heads kept whole, fewer atoms) or, past the B.C contraction, a computed constant varying
    along the heads (every head collapsed into one unit: transformers' Mamba-2 family kept its inner width). So the
    source's channels are kept whole (blocked) and copy ``j`` gets a fresh atom, the same in every group: exact for
    any plan, since the copies of one group hold the same values, the pruned forward makes ``num_heads // G`` of
    them per group, and head ``j`` of every group goes together, so each group keeps its heads in their places (the
    dry run checks the sizes). With several sources (``G > 1``) only where the module names them its ``n_groups``
    (a Mamba-2 mixer's B / C groups); grouped-query attention's key / value heads stay the attention rules'.
    ``[B, 1, ...] -> [B, heads, ...]`` (the heads dim right after the batch, no group dim: multi-head latent
    attention's rotary key ``k_rot.expand(-1, heads, -1, -1)``, shared by every head) the same way, in heads mode:
    before, the q.k contraction tied every head to the shared key, so all heads were one unit (deepseek_v3 kept
    every head at ratio 0.5)."""
    lab = _pad(tr.get(x), out.dim())
    grown = [d for d in range(out.dim()) if lab.size(d) == 1 and x.dim() == out.dim() and x.size(d) == 1
             and out.size(d) > 1]
    if len(grown) != 1 or grown[0] < 1 or tr.where() == "<root>":  # dim 0: the batch
        return False
    d = grown[0]
    mod = tr.model.get_submodule(tr.where())
    heads = getattr(mod, "num_heads", None)
    if not isinstance(heads, int) or heads < 2:
        return False
    if d == 1:  # [B, 1, ...] -> [B, heads, ...]: one source, no group dim (MLA's shared rotary key); in heads mode
        if out.size(1) != heads or tr.head_dim:  # (head dims: dim j of every copy stays the source's dim j)
            return False
    elif heads != out.size(d - 1) * out.size(d):
        return False
    elif out.size(d - 1) != 1 and getattr(mod, "n_groups", None) != out.size(d - 1):
        return False  # several key / value heads (grouped-query attention): the attention rules' business
    tr.atoms.block(lab)
    shape = [1] * out.dim()
    shape[d] = out.size(d)  # the same atoms in every group: head j of each group is one unit
    tr.set(out, tr.atoms.new(out.size(d)).reshape(shape))
    return True


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
    (a full-range slice is a no-op and is fine). Positions counted from the end: see ``_from_end``."""
    x = args[0]
    if isinstance(args[1], (list, tuple)):  # aten.index: a list of index tensors, None = whole dim
        dims = [d for d, i in enumerate(args[1]) if i is not None]
    else:
        dims = [args[1] if len(args) > 1 and isinstance(args[1], int) else 0]
    if louts and louts[0].shape == x.shape and torch.equal(louts[0], largs[0]):
        return  # a full-range slice
    if len(dims) == 1 and _varying(tr, x, dims[0]) and _from_end(tr, largs[0], dims[0], _end_offset(tr, args, dims[0])):
        return
    for d in dims:  # the dim must never shrink: its atoms go all together (whole heads survive a
        if _varying(tr, x, d):  # rotate_half over head_dim; conv channels sliced at [:, :8] are kept)
            tr.atoms.collapse(largs[0], [d])


def _end_offset(tr, args, d: int) -> int | None:
    """How far from the end of dim ``d`` the positions an ``index`` / ``select`` reads start, where every one of
    them is written as a negative number (``qkv[..., [-2], :]``, ``x.select(d, -1)``); None otherwise."""
    if isinstance(args[1], (list, tuple)):
        idx = value_of(tr, args[1][d]) if d < len(args[1]) else None  # on meta: its known value
        if (not isinstance(idx, torch.Tensor) or idx.dtype in (torch.bool, torch.uint8) or idx.numel() == 0
                or idx.device.type == "meta"):
            return None
        lo, hi = int(idx.min()), int(idx.max())
        return -lo if hi < 0 else None
    pos = args[2] if len(args) > 2 else None
    return -pos if isinstance(pos, int) and pos < 0 else None


def _from_end(tr, lab, d: int, k: int | None) -> bool:
    """Positions the model's code counts from the end of a channel dim (Falcon's multi-query ``qkv[..., :-2, :]``
    and ``qkv[..., [-2], :]``: the query heads, then the one key and value head) stay the same positions whatever is
    removed *before* them: the last ``k`` positions are kept (blocked), and the others stay free, each with its own
    atoms. Exact for any plan: after pruning, ``-j`` still names the same row and ``:-k`` every kept row before the
    tail. Before, the dim was one unit (every query head of Falcon all-or-nothing). ``k`` None: not this case. Only
    where every position along ``d`` holds atoms of its own (heads, each its channels): along a token dim (a class
    or register token beside the patches, which share the stream's atoms) the tail would be the whole stream. Heads
    mode only: with head dims the dim stays one unit per position of the others (dim j of every head), as before."""
    if tr.head_dim or k is None or k <= 0 or k >= lab.size(d) or not _own_atoms(lab, d):
        return False
    tr.atoms.block(lab.narrow(d, lab.size(d) - k, k))
    return True


def _own_atoms(lab: torch.Tensor, d: int) -> bool:
    """No atom at two positions along ``d``, and no position without one."""
    rows = lab.movedim(d, 0).reshape(lab.size(d), -1)
    if bool((rows < 0).any()):
        return False
    per = sum(int(r.unique().numel()) for r in rows)
    return per == int(rows.unique().numel())


def _check_slice_cut(tr, args, largs, louts):
    """``aten.slice(x, dim, start, end, 1)`` along a channel dim at positions the module names: the slice keeps its
    own channels and graph/splits.py moves the positions with the pruning; bounds counted from the end
    (``x[..., :-2]``, ``x[..., -2:]``): ``_from_end``; any other slice: ``_check_slice``."""
    x = args[0]
    if len(args) > 1 and isinstance(args[1], int) and x.dim() and _varying(tr, x, args[1]):
        d = args[1] % x.dim()
        start, end = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
        step = args[4] if len(args) > 4 else 1
        neg = [b for b in (start, end) if isinstance(b, int) and b < 0]
        if step == 1 and neg and (start is None or start == 0 or start < 0) and _from_end(tr, largs[0], d, -min(neg)):
            return
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
            varying = [d for d in outs if lab.size(d) > 1 and not constant_along(lab, d)]
            if len(varying) >= 2:
                tr.constraints.append((lab.clone(), outs))


_CHECKS = {aten.split: _check_split, aten.split_with_sizes: _check_split, aten.unsafe_split: _check_split,
           aten.unsafe_split_with_sizes: _check_split, aten.split_copy: _check_split,
           aten.split_with_sizes_copy: _check_split, aten.tensor_split: _check_split,
           aten.slice: _check_slice_cut, aten.select: _check_slice, aten.narrow: _check_slice,
           aten.index: _check_slice, aten.slice_copy: _check_slice_cut, aten.select_copy: _check_slice,
           aten.roll: _check_roll, aten.view: _check_view, aten._unsafe_view: _check_view,
           aten.reshape: _check_view, aten.view_copy: _check_view, aten._reshape_alias: _check_view}


# ---------------------------------------------------------------- complex views (RoPE written with complex numbers)
@rule(aten.view_as_complex)
def view_as_complex(tr, func, args, kwargs, out):
    """``[..., n, 2]`` reals viewed as ``[..., n]`` complex (Llama 4's RoPE): the two reals of a pair are one
    number, so they are one unit (unioned) and the number carries their label. Before, an op without a rule:
    every channel reaching it was kept (llama4_text stayed at 1.0 of its MACs)."""
    lab = _pad(tr.get(args[0]), args[0].dim())
    if lab.size(-1) == 2:
        tr.atoms.union(lab[..., 0], lab[..., 1])
    tr.set(out, lab[..., 0])


@rule(aten.view_as_real)
def view_as_real(tr, func, args, kwargs, out):
    """``[..., n]`` complex viewed as ``[..., n, 2]`` reals: both reals of a number carry its label."""
    lab = _pad(tr.get(args[0]), args[0].dim())
    tr.set(out, lab.unsqueeze(-1).expand(*lab.shape, 2) if lab is not None else None)
