"""What the engine knows about unlabelled tensors that meet channels: memory a filling factory wrote (one value
everywhere), and tensors computed from one parameter or buffer by elementwise ops, views and gathers that keep
some of its dims whole. Either would otherwise be a constant that varies along the channels and make them
all-or-nothing (elementwise.py ``pointwise``)."""
from __future__ import annotations

import math
from typing import Any

import torch

from secateur.graph.capture import Tracer
from secateur.graph.rules.registry import _pad, _tensors, aten, op_facts


_FILLS = {aten.zeros, aten.ones, aten.full, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros,
          aten.new_ones, aten.new_full, aten.scalar_tensor}


def track_uniform(tr: Tracer, func, args, out) -> None:
    """Remember the memory a filling factory wrote (one value everywhere: Mamba's scan state
    ``torch.zeros(batch, intermediate_size, state)``, sized from the input's shape), and forget it as soon as an
    op may write into it (any mutating op on a tensor sharing its storage, a view's write included). A constant
    that varies along a channel dim makes those channels all-or-nothing (elementwise.py ``pointwise``); a uniform one
    does not vary, and where the pruned code makes it at a fixed size the dry run fails on the shape. Keyed by
    storage, not tensor id: the tensor a factory hands the model can be another Python object than the one the
    dispatch mode saw (and every view of uniform memory is uniform)."""
    packet = func.overloadpacket
    mutable = op_facts(func)[0]
    if mutable:  # ``was_uniform``: what this write found uniform (rules/scatter.py reads it)
        tr.was_uniform = [k for a in args for t in _tensors(a) for k in [_storage(t)]
                          if tr.uniform.pop(k, None) is not None] if tr.uniform else []
    if isinstance(out, torch.Tensor) and not mutable and (
            packet in _FILLS or (tr.uniform and _uniform_pointwise(tr, func, args))):
        key = _storage(out)
        if key != -1:
            tr.uniform[key] = out  # held: a storage's address is only its own while it lives


def _uniform_pointwise(tr: Tracer, func, args) -> bool:
    """A pointwise op of uniform memory and numbers is uniform too: RWKV's ``torch.zeros_like(k) - 1e38`` (its
    running maximum's start). Not tracked, it was a constant varying along the channels it meets in
    ``torch.maximum``, and every attention channel of RWKV was one all-or-nothing unit."""
    if not op_facts(func)[1]:
        return False
    ts = [t for a in args for t in _tensors(a)]
    return bool(ts) and all(tr.get(t) is None and id(t) not in tr.owner and (t.dim() == 0 or is_uniform(tr, t))
                            for t in ts)


def is_uniform(tr: Tracer, t: torch.Tensor) -> bool:
    return bool(tr.uniform) and _storage(t) in tr.uniform


def was_uniform(tr: Tracer, t: torch.Tensor) -> bool:
    """``t`` held one value everywhere before the op now running (an in-place write into a ``torch.zeros``)."""
    return is_uniform(tr, t) or _storage(t) in tr.was_uniform


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): never uniform
        return -1


_SAME_ORDER = {aten.unsqueeze, aten.squeeze, aten.select, aten.expand, aten.view, aten._unsafe_view, aten.reshape,
               aten.slice, aten.alias, aten.clone, aten._to_copy, aten.detach, aten.contiguous, aten.lift_fresh_copy}


_GATHERS = {aten.index_select, aten.index}
_RESHAPES = {aten.view, aten._unsafe_view, aten.reshape}


def _root(tr: Tracer, src: Any) -> tuple[torch.Tensor, dict[int, int]] | None:
    if not isinstance(src, torch.Tensor):
        return None
    if id(src) in tr.derived:
        return tr.derived[id(src)][1:]
    if id(src) in tr.owner:
        return src, {d: d for d in range(src.dim()) if src.size(d) > 1}
    return None


def _track_gather(tr: Tracer, packet, args, out) -> None:
    """Rows gathered from a parameter or buffer by unlabelled indices (``table.index_select(0, positions)``,
    ``table[positions, :]``): the dims not indexed are the table's, whole."""
    if packet is aten.index_select:
        src, lead, gone = args[0], None, args[1] % args[0].dim()
    else:  # aten.index: one index tensor, on the first dim
        idx = args[1]
        if len(idx) != 1 or idx[0] is None or idx[0].dtype == torch.bool:
            return
        src, lead, gone = args[0], idx[0].dim(), 0
    root = _root(tr, src)
    if root is None or tr.get(src) is not None:
        return
    table, dims = root
    if lead is None:  # index_select keeps the other dims where they are
        out_map = {d: dims[d] for d in dims if d != gone}
    else:  # the index's dims first, then the table's others
        out_map = {lead + d - 1: dims[d] for d in dims if d > gone}
    if out_map:
        tr.derived[id(out)] = (out, table, out_map)


def track_derived(tr: Tracer, func, args, kwargs, out) -> None:
    """Remember an unlabelled tensor computed from one model parameter or buffer by elementwise ops and by ops that
    keep some of its dims whole: views adding or dropping size-1 dims (``-torch.exp(self.A_log)[None, :, None,
    :]``), ``expand``, a part along one dim (select, slice), a reshape that leaves a dim intact, rows gathered by
    index. Each mapped dim is one of the root's, whole. Where the tensor meets channels along such a dim
    (elementwise.py ``pointwise``) the root is sliced along its own dim instead of the channels being made
    all-or-nothing: slicing commutes with all of these. Any other operand must be a scalar; a permute, a
    reduction or a second tensor ends the chain."""
    packet = func.overloadpacket
    mutable, tagged, _ = op_facts(func)
    if mutable or not isinstance(out, torch.Tensor):
        return
    if packet in _GATHERS:
        _track_gather(tr, packet, args, out)
        return
    if packet not in _SAME_ORDER and not tagged:
        return
    big = [t for a in (*args, *kwargs.values()) for t in _tensors(a) if t.numel() > 1]
    if len(big) != 1:
        return
    src = big[0]
    found = _root(tr, src)
    if found is None:
        return
    root, dims = found
    if packet is aten.expand and args[0] is src:  # size-1 dims broadcast (a register token per batch entry)
        lead = out.dim() - src.dim()
        tr.derived[id(out)] = (out, root, {lead + d: r for d, r in dims.items()})
        return
    if packet in (aten.select, aten.slice) and args[0] is src:  # a part along one dim: the others stay whole
        e = (args[1] if len(args) > 1 else 0) % src.dim()
        same = [d for d in range(src.dim()) if d != e]
        kept = {d: dims[d] for d in same if d in dims}
        if packet is aten.slice:
            out_map = {d: p for d, p in kept.items() if out.size(d) == src.size(d)}
        else:
            out_map = {same.index(d): p for d, p in kept.items()}
        if out_map:
            tr.derived[id(out)] = (out, root, out_map)
        return
    if packet in _RESHAPES:  # a dim survives a row-major reshape where its size and everything before it match
        out_map = {}
        for s, r in dims.items():
            before = math.prod(src.shape[:s])
            hit = [o for o in range(out.dim()) if out.size(o) == src.size(s) and math.prod(out.shape[:o]) == before]
            if hit:
                out_map[hit[0]] = r
        if out_map:
            tr.derived[id(out)] = (out, root, out_map)
        return
    s_nd = [d for d in range(src.dim()) if src.size(d) > 1]
    o_nd = [d for d in range(out.dim()) if out.size(d) > 1]
    if [src.size(d) for d in s_nd] != [out.size(d) for d in o_nd]:
        return
    out_map = {o: dims[s] for o, s in zip(o_nd, s_nd) if s in dims}  # dims of its own (gathered rows) map nowhere
    if out_map:
        tr.derived[id(out)] = (out, root, out_map)


def channel_buffer(t: torch.Tensor) -> bool:
    """A floating buffer with one non-1 dim, a vector over channels (Falcon-H1's ``mup_vector [1, 1, C]``, a scale
    per ``in_proj`` output its mixer multiplies by): sliced with the channels it meets, like a parameter (a
    non-persistent one is rebuilt on load and checked, apply.py ``_record_unsaved``). Left a constant, it made
    every channel it meets all-or-nothing (Falcon-H1's mixers kept their whole width)."""
    return t.is_floating_point() and sum(s > 1 for s in t.shape) == 1


def const_label(tr, c, d: int) -> torch.Tensor | None:
    """Labels of parameter ``c`` (or of a tensor derived from one, ``track_derived``) along its dim ``d``,
    shaped like ``c``: the parameter's atoms along that dim, constant along the others."""
    if id(c) not in tr.derived:
        return tr.param_label_along(c, d, buffers=channel_buffer(c))
    root, dims = tr.derived[id(c)][1:]
    return _root_label(tr, c, root, dims, d)


def _root_label(tr, t: torch.Tensor, root: torch.Tensor, dims: dict[int, int], d: int) -> torch.Tensor | None:
    """The root's atoms along the root dim that ``t``'s dim ``d`` is, shaped like ``t`` (1 elsewhere)."""
    lab = tr.param_label_along(root, dims[d], buffers=True)
    if lab is None:
        return None
    shape = [1] * t.dim()
    shape[d] = t.size(d)
    return lab.reshape(shape)


def uniform_inputs(tr: Tracer, tensors: list, dim: int) -> None:
    """Before a concatenation along ``dim``: an unlabelled uniform fill (``track_uniform``; Mamba-2's scan starts
    its chunk states with ``torch.zeros_like(states[:, :1])`` concatenated before ``states``) takes the labels of the
    labelled inputs when they all carry the same channels, constant along ``dim``. One value everywhere, any slice of
    it is the same, and its size follows the pruned input it was made from (the dry run checks); left unlabelled
    it made the concatenation mix channels with an unsliceable block, and the scan's contraction over chunks then
    kept every head of the mixer."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    labs = [_pad(tr.get(t), t.dim()) for t in ts if tr.get(t) is not None]
    if not labs or len(labs) == len(ts) or any(t.dim() != ts[0].dim() for t in ts):
        return
    dim %= ts[0].dim()
    first = labs[0]
    if first.size(dim) != 1 or any(lab.shape != first.shape or not torch.equal(lab, first) for lab in labs[1:]):
        return
    for t in ts:
        if tr.get(t) is None and is_uniform(tr, t):
            tr.set(t, first)


def label_free_inputs(tr: Tracer, tensors: list, dim: int) -> None:
    """Before a concatenation along ``dim``: an unlabelled input that is a parameter (or derived from one) with
    several non-1 dims, such as timm's register tokens ``reg_token [1, 4, C]`` expanded to the batch, gets the
    root's atoms along the one dim the other inputs carry channels on, so it is sliced with them. Left
    unlabelled it was an unsliceable block in the stream, and the whole residual stream was kept (naflexvit and
    every ``*_reg4`` ViT)."""
    labs = [_pad(tr.get(t), t.dim()) for t in tensors if isinstance(t, torch.Tensor) and tr.get(t) is not None]
    if not labs:
        return
    nd = tensors[0].dim()
    dim %= nd
    chan = {e for lab in labs for e in range(nd) if e != dim and lab.size(e) > 1}
    if len(chan) != 1:
        return
    e = chan.pop()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or tr.get(t) is not None or t.dim() != nd:
            continue
        found = _root(tr, t)
        if found is None or sum(s > 1 for s in t.shape) < 2:  # one non-1 dim: Tracer.param_label does it
            continue
        root, dims = found
        lab = _root_label(tr, t, root, dims, e) if e in dims else None
        if lab is not None:
            tr.set(t, lab)
