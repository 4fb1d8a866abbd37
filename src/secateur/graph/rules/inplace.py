"""In-place writes into views: ``out[:, :, i] = y``, ``x[:, t] = y``, ``state.copy_(y)`` through a view.

The write changes the *base* tensor's values at the view's positions, so the base's labels must change there too,
or readers of the base see channels that are no longer there (and miss those that are). Labels are keyed by tensor,
so the write is mapped through memory: every element of the base and of the view has a storage position (offset and
strides), which gives each view element its position in the base exactly, whatever chain of views made it
(select, slice, transpose, a base that is itself not contiguous: recurrent_gemma's scan output). The view's labels
after the op are written at those positions of the base's labels, and a view of the base made earlier is read again
from them when it is next used.

Exact only when the pruned model writes the same region: along a dim the write does not cover whole (time in a
per-step loop), the written labels must be one atom per line (no channel is cut by the region's fixed bounds);
``x[..., :n] = y`` with channels along the cut dim is not exact (``n`` stays fixed in the code while the dims
shrink): the caller keeps the channels on both sides (noted). A write into a model parameter or buffer, a view of
another dtype, or a base whose elements overlap in memory is not mapped either."""
from __future__ import annotations

import weakref

import torch

from secateur.graph.capture import Tracer
from secateur.graph.labels import full
from secateur.graph.rules.registry import _pad
from secateur.graph.splits import open_cut

aten = torch.ops.aten
# ops that make new memory from sizes alone (the model's code or its input's shape): a buffer a loop then fills
FACTORIES = {aten.zeros, aten.ones, aten.full, aten.empty, aten.empty_strided, aten.zeros_like, aten.ones_like,
             aten.full_like, aten.empty_like, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty,
             aten.new_empty_strided}


def made(tr: Tracer, out: torch.Tensor) -> None:
    """Remember which trace step made ``out``: once writes label it, that step's expected shape follows (the
    pruned code must allocate the pruned size; ``_relabel_origin``)."""
    tr.made[id(out)] = (len(tr.trace), weakref.ref(out))


def write_through(tr: Tracer, view: torch.Tensor, fresh: bool = False) -> bool:
    """The view ``view`` of a base has just been written in place and holds its new labels: write them into the
    base's labels at the view's positions. False (nothing changed) when the write cannot be mapped exactly.
    ``fresh``: the base held one value everywhere until now (``torch.zeros_like``): along the dims the write does
    not cover, the rest of each line it writes takes the written label (``_fill``)."""
    base = view._base
    if base is None or id(base) in tr.owner or base.dtype != view.dtype or base.numel() == 0:
        return False
    pos = _positions(base, view)
    if pos is None:
        return False
    lab = full(_pad(tr.get(base), base.dim()), base.shape).reshape(-1).clone()
    written = full(_pad(tr.get(view), view.dim()), view.shape).reshape(-1)
    lab[pos.reshape(-1)] = written
    lab = lab.reshape(base.shape)
    region = torch.zeros(base.numel(), dtype=torch.bool)
    region[pos.reshape(-1)] = True
    region = region.reshape(base.shape)
    cut = _exact(lab, region)
    if cut is False or (cut is not True and not _named_slice(tr, lab, region, cut, base.device.type == "meta")):
        return False
    if fresh and tr.get(base) is None:
        lab = _fill(lab, region, None if cut is True else cut)
    tr.set(base, lab)
    _relabel_origin(tr, base)
    written_to(tr, base)
    tr.read_at[id(view)] = tr.writes[id(base)]
    return True


def _relabel_origin(tr: Tracer, base: torch.Tensor) -> None:
    """The trace step that allocated ``base`` now expects its labels' shape: a buffer sized by an attribute
    (``new_empty(..., self.width)``) must shrink with what is written into it, and the dry run must see that
    (verify.py compares every step's shape; the attribute search takes its old -> new sizes from there)."""
    step = tr.made.get(id(base))
    if step is not None and step[1]() is base:
        op, shapes, _ = tr.trace[step[0]]
        tr.trace[step[0]] = (op, shapes, (tr.labels.get(id(base)),))


def written_to(tr: Tracer, base: torch.Tensor) -> None:
    """``base``'s labels changed in place: views of it made earlier are read again when next used."""
    if id(base) not in tr.owner:
        tr.writes[id(base)] = tr.writes.get(id(base), 0) + 1
        tr.alive.append(base)  # its id stays its own while the capture runs


def refresh_inputs(tr: Tracer, tensors) -> None:
    """Views among an op's inputs whose base was written after their labels were set (a view made before a
    per-step loop filled its base, read after it): their labels are read again from the base's, at their
    positions. Only runs once some base was written (``Tracer.writes``)."""
    for t in tensors:
        base = t._base
        if base is None:
            continue
        version = tr.writes.get(id(base))
        if version is None or tr.read_at.get(id(t)) == version:
            continue
        pos = _positions(base, t)
        if pos is None:  # not mappable: whatever it holds stays as it is under any plan
            tr.atoms.block(tr.get(t))
            tr.atoms.block(tr.get(base))
        else:
            tr.set(t, full(_pad(tr.get(base), base.dim()), base.shape).reshape(-1)[pos])
        tr.read_at[id(t)] = version
        tr.alive.append(t)


def _positions(base: torch.Tensor, view: torch.Tensor) -> torch.Tensor | None:
    """Flat index into ``base`` of every element of ``view`` (view-shaped), from both tensors' offsets and strides;
    None if the base's elements overlap in memory or the view reaches outside it."""
    if view.dtype != base.dtype or any(s < 0 for s in (*base.stride(), *view.stride())):
        return None
    size = max(_extent(base), _extent(view))
    where = torch.full((size,), -1, dtype=torch.long)
    cells = torch.arange(size).as_strided(base.shape, base.stride(), base.storage_offset()).reshape(-1)
    where[cells] = torch.arange(base.numel())
    if not torch.equal(where[cells], torch.arange(base.numel())):  # two elements of the base share a cell
        return None
    pos = where[torch.arange(size).as_strided(view.shape, view.stride(), view.storage_offset())]
    return pos if bool((pos >= 0).all()) else None


def _extent(t: torch.Tensor) -> int:
    """Storage cells up to the last element of ``t`` (+1)."""
    if t.numel() == 0:
        return t.storage_offset()
    return t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1


def _exact(lab: torch.Tensor, region: torch.Tensor) -> bool | int:
    """Along every dim the written ``region`` does not cover whole, each line of it holds one label: the region's
    fixed bounds cut no channel dim (a per-step write at time ``t`` covers whole channel rows; ``x[..., :n]`` with
    channels along the last dim does not). Returns True, False, or the one dim whose lines hold several labels
    (a slice along a channel dim: exact only at positions the module names, ``_named_slice``)."""
    cut = True
    for d in range(lab.dim()):
        if lab.size(d) == 1 or bool(region.all(dim=d).eq(region.any(dim=d)).all()):
            continue  # the region covers every line along d that it touches
        big = torch.iinfo(torch.long).max
        lo = torch.where(region, lab, big).amin(dim=d)
        hi = torch.where(region, lab, -big).amax(dim=d)
        if not bool(((lo == hi) | ~region.any(dim=d)).all()):
            if cut is not True:
                return False
            cut = d
    return cut


def _named_slice(tr: Tracer, lab: torch.Tensor, region: torch.Tensor, d: int, meta: bool) -> bool:
    """A write into one contiguous range of channels along ``d`` (``key_states[..., :self.qk_nope_head_dim] =
    k_nope``, a concatenation written in two parts: Hunyuan-V4's attention): exact when the module names the
    range's bounds, as for a slice read there (graph/splits.py: the bounds move with the pruning, proven by the dry
    run). Opens that cut; False when the range is not contiguous or not named, or on the meta device: the sizes a
    cut moves are taken only where the pruned model computes the oracle's reference (structured/proof.py
    ``_verified``), which needs values; on meta such a write keeps its channels, as before (LongCat-Flash's MLA
    planned on meta then kept its residual stream whole where the CPU's plan pruned it)."""
    if meta:
        return False
    along = region.movedim(d, -1).reshape(-1, region.size(d)).any(dim=0)
    idx = along.nonzero().flatten()
    start, end = int(idx[0]), int(idx[-1]) + 1
    shape = [1] * region.dim()
    shape[d] = region.size(d)
    if idx.numel() != end - start or not torch.equal(region, along.reshape(shape) & region.any(dim=d, keepdim=True)):
        return False
    return open_cut(tr, "slice", lab, d, [start, end], True)


def _fill(lab: torch.Tensor, region: torch.Tensor, cut: int | None) -> torch.Tensor:
    """Label the unwritten cells of each line the write touches with the line's written label (one per line,
    ``_exact``). The memory was one value everywhere (a fill factory's): its cells hold no channel, so they may be
    sliced with any; labelled, the buffer of a per-step loop holds its channels at every step from the first write
    on, and the next step's ``buf[:, t]`` selects along a dim the labels do not vary on. Left ``-1``, that select
    cut through channels and kept them all (rules/movement.py ``_check_slice``). Not along ``cut``, the channel
    dim a named slice writes part of (the rest is other channels' place)."""
    for d in range(lab.dim()):
        if d == cut or lab.size(d) == 1 or bool(region.all(dim=d).eq(region.any(dim=d)).all()):
            continue
        line = torch.where(region, lab, -1).amax(dim=d, keepdim=True).expand_as(lab)
        lab = torch.where(region, lab, line)
        region = region.any(dim=d, keepdim=True).expand_as(region)
    return lab
