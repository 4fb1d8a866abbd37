"""Writes at positions an index names: ``scatter`` / ``scatter_add`` / ``scatter_reduce`` along one dim, and
``index_put`` (``result[idx] = values``) on leading dims. A channel that is not a dim written along rides along
exactly: element c of every written row lands in element c of its target row, so removing channel c removes it on
both sides, whatever the positions. Where the positions depend on channel values (an index computed from them:
Reformer's hash buckets) or a channel dim is itself written along, the channels are kept, with a note."""
from __future__ import annotations

import torch

from secateur.graph.rules.constants import was_uniform
from secateur.graph.rules.matmul import _join
from secateur.graph.rules.registry import _outs, _pad, aten, not_understood, rule


def _varying(lab: torch.Tensor | None) -> set[int]:
    return set() if lab is None else {d for d in range(lab.dim()) if lab.size(d) > 1}


def _constant_target(tr, target: torch.Tensor, lab: torch.Tensor | None, chans: set[int]) -> bool:
    """The positions nothing writes keep the target's values: fine where it carries channels itself, or held one
    value everywhere (``torch.zeros``); an unlabelled tensor varying along the channels could not be sliced."""
    return lab is not None or not chans or was_uniform(tr, target)


def _constant_values(tr, values, lab: torch.Tensor | None, chans: set[int]) -> bool:
    """Unlabelled values that vary along the channels they are written into (a fixed table): not sliceable."""
    if lab is not None or not isinstance(values, torch.Tensor) or was_uniform(tr, values):
        return False
    return any(0 <= d < values.dim() and values.size(d) > 1 and values.stride(d) != 0 for d in chans)


def _set_all(tr, out, lab) -> None:
    for t in _outs(out):
        tr.set(t, lab if lab is not None and t.dim() == lab.dim() else None)


@rule(aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce, aten.scatter_reduce_)
def scatter(tr, func, args, kwargs, out):
    """``target.scatter(dim, index, src)``: ``out[..., index[i], ...] = src[..., i, ...]`` along ``dim``. Channels
    along the other dims ride along when the index is no channel data and covers every channel with the same
    positions (expanded along them: BLT's ``patch_ids.unsqueeze(-1).expand(..., C)``, its size then read from the
    data, so the pruned model builds it at the kept width). Along ``dim`` positions are reordered: channels that vary
    there too are made one unit along it (the same channel at every position)."""
    target, dim, index = args[0], args[1], args[2]
    src = args[3] if len(args) > 3 else kwargs.get("src", kwargs.get("value"))
    nd = target.dim()
    if tr.get(index) is not None:
        return not_understood(tr, func, args, kwargs, out, "writes at positions computed from channel values")
    if nd == 0:
        return not_understood(tr, func, args, kwargs, out)
    dim %= nd
    lt = _pad(tr.get(target), nd)
    ls = _pad(tr.get(src), nd) if isinstance(src, torch.Tensor) and src.dim() == nd else None
    if isinstance(src, torch.Tensor) and src.dim() != nd and tr.get(src) is not None:
        return not_understood(tr, func, args, kwargs, out)
    chans = (_varying(lt) | _varying(ls)) - {dim}
    for d in chans:
        whole = index.size(d) == target.size(d) and (ls is None or src.size(d) == index.size(d))
        if not whole or (index.size(d) > 1 and index.stride(d) != 0):
            return not_understood(tr, func, args, kwargs, out, f"writes channel dim {d} at positions of its own")
    if dim in (_varying(lt) | _varying(ls)) and not chans:
        return not_understood(tr, func, args, kwargs, out, f"writes along its channel dim {dim}")
    if not _constant_target(tr, target, lt, chans) or _constant_values(tr, src, ls, chans):
        return not_understood(tr, func, args, kwargs, out, "writes channels into a constant that varies along them")
    lt = None if lt is None else tr.atoms.collapse(lt, [dim])
    ls = None if ls is None else tr.atoms.collapse(ls, [dim])
    _set_all(tr, out, _join(tr, lt, ls))


@rule(aten.index_put_, aten.index_put, aten._index_put_impl_)
def index_put(tr, func, args, kwargs, out):
    """``target[idx] = values`` with index tensors (integer or boolean masks) on the leading dims and channels in
    the trailing ones: torchvision's multi-scale RoI pooling gathering each level's crops, X-MOD's per-language
    adapters (``new[lang_mask] = adapter(h[lang_mask])``). Every written row is a whole row of channels, so the
    result carries the values' channels (joined with the target's). Anything else keeps what it reads."""
    target, indices, values = args[0], list(args[1]), args[2]
    if any(i is None for i in indices) or any(tr.get(i) is not None for i in indices):
        return not_understood(tr, func, args, kwargs, out, "writes at positions it cannot map (or computed from "
                                                           "channel values)")
    lead = sum(i.dim() if i.dtype in (torch.bool, torch.uint8) else 1 for i in indices)
    nd, tail = target.dim(), target.dim() - lead
    lt = _pad(tr.get(target), nd)
    lv = tr.get(values)
    if lv is not None:
        if values.dim() < tail or tuple(values.shape[values.dim() - tail:]) != tuple(target.shape[lead:]):
            return not_understood(tr, func, args, kwargs, out)
        lv = _pad(lv, values.dim())
        lv = tr.atoms.collapse(lv, range(values.dim() - tail))  # the rows written: the same channels in each
        lv = lv.reshape((1,) * lead + tuple(lv.shape[values.dim() - tail:]))
    if _varying(lt) & set(range(lead)) or _varying(lv) & set(range(lead)):
        lt = None if lt is None else tr.atoms.collapse(lt, range(lead))
    if not _constant_target(tr, target, lt, _varying(lv)) or _constant_values(
            tr, values, lv, {d - (nd - values.dim()) for d in _varying(lt) if d >= lead}):
        return not_understood(tr, func, args, kwargs, out, "writes channels into a constant that varies along them")
    _set_all(tr, out, _join(tr, lt, lv))


# ---------------------------------------------------------------- reads at positions an index names
def indexed_dims(packet, args) -> list[int]:
    """The dims of ``args[0]`` that ``gather`` / ``index_select`` / ``take_along_dim`` / ``index`` read at positions
    an index tensor names."""
    x = args[0]
    if packet in (aten.gather, aten.index_select):
        return [args[1] % x.dim()] if x.dim() else []
    if packet is aten.take_along_dim:
        dim = args[2] if len(args) > 2 else None
        return list(range(x.dim())) if dim is None else [dim % x.dim()]
    dims, k = [], 0
    for i in args[1]:
        n = 1 if i is None or i.dtype not in (torch.bool, torch.uint8) else i.dim()
        if i is not None:
            dims += range(k, k + n)
        k += n
    return dims


def _all_negative(tr, indices, d: int) -> bool:
    """``x[..., idx, ...]`` whose index along ``d`` names its positions by negative numbers only (from the end);
    on meta, by its known value (graph/meta_values.py)."""
    from secateur.graph.meta_values import value_of
    if d >= len(indices) or any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
        return False
    idx = value_of(tr, indices[d])
    return (isinstance(idx, torch.Tensor) and idx.numel() > 0 and idx.device.type != "meta" and int(idx.max()) < 0)


def keep_indexed_channels(tr, func, args) -> None:
    """An index naming positions along a dim where every position is a channel of its own (ProphetNet's relative
    position rows ``[buckets x heads]`` gathered by bucket numbers computed from token positions): the index holds
    fixed numbers, so removing a channel there would renumber the others and the pruned model would read the wrong
    ones (channels never read looked free: ProphetNet's unused buckets were pruned, and its forward then failed on
    ``view(..., num_buckets, num_attn_heads)``, which kept its whole residual stream). The positions along that dim
    are made one unit per position of the other dims (a head's buckets: removable only with the head, the dim itself
    whole), so the numbers stay valid; where the channels vary along that dim only, they are all one unit (kept,
    and graph/kept.py names this op). Positions along a token dim (the same channels at every position) are not
    channels: untouched."""
    x = args[0]
    lab = _pad(tr.get(x), x.dim()) if isinstance(x, torch.Tensor) else None
    if lab is None:
        return
    for d in indexed_dims(func.overloadpacket, args):
        if lab.size(d) < 2:
            continue
        if func.overloadpacket is aten.index and _all_negative(tr, args[1], d):
            continue  # positions counted from the end: kept where they are read (movement.py ``_from_end``)
        row = lab.movedim(d, -1).reshape(-1, lab.size(d))[0]
        if bool((row >= 0).all()) and int(row.unique().numel()) == lab.size(d):
            lab = tr.atoms.collapse(lab, [d])  # unions: the op's labels (its input's atoms) follow them
