"""In-place writes into views: ``out[:, :, i] = y``, ``x[:, t] = y``, ``state.copy_(y)`` through a view.

The write changes the *base* tensor's values at the view's positions, so the base's labels must change there too,
or readers of the base see channels that are no longer there (and miss those that are). Labels are keyed by tensor,
so the write is mapped through memory: every element of the base and of the view has a storage position (offset and
strides), which gives each view element its position in the base exactly, whatever chain of views made it
(select, slice, transpose, a base that is itself not contiguous: recurrent_gemma's scan output). The view's labels
after the op are written at those positions of the base's labels, and every other live view of the base is read
again from them.

Exact only when the pruned model writes the same region: along a dim the write does not cover whole (time in a
per-step loop), the written labels must be one atom per line (no channel is cut by the region's fixed bounds);
``x[..., :n] = y`` with channels along the cut dim is not exact (``n`` stays fixed in the code while the dims
shrink): the caller keeps the channels on both sides (noted). A write into a model parameter or buffer, a view of
another dtype, or a base whose elements overlap in memory is not mapped either."""
from __future__ import annotations

import torch

from secateur.graph.capture import Tracer
from secateur.graph.labels import full
from secateur.graph.rules.registry import _pad


def register_view(tr: Tracer, t: torch.Tensor) -> None:
    """Remember a labelled view of a base, so a later write into the base (through another view or directly)
    updates its labels too (``refresh_views``). Only labelled tensors: those the tracer already holds alive."""
    base = t._base
    if base is not None:
        tr.views.setdefault(id(base), []).append(t)


def write_through(tr: Tracer, view: torch.Tensor) -> bool:
    """The view ``view`` of a base has just been written in place and holds its new labels: write them into the
    base's labels at the view's positions. False (nothing changed) when the write cannot be mapped exactly."""
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
    if not _exact(lab, region.reshape(base.shape)):
        return False
    tr.set(base, lab)
    refresh_views(tr, base, skip=view)
    return True


def refresh_views(tr: Tracer, base: torch.Tensor, skip: torch.Tensor | None = None) -> None:
    """Read every registered view of ``base`` again from the base's labels (a write made them stale)."""
    views = tr.views.get(id(base))
    if not views:
        return
    lab = full(_pad(tr.get(base), base.dim()), base.shape).reshape(-1)
    for v in views:
        if v is skip or id(v) not in tr.labels:
            continue
        pos = _positions(base, v)
        if pos is None:  # not mappable: nothing the view holds may change under any plan
            tr.atoms.block(tr.get(v))
            continue
        tr.set(v, lab[pos])


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


def _exact(lab: torch.Tensor, region: torch.Tensor) -> bool:
    """Along every dim the written ``region`` does not cover whole, each line of it holds one label: the region's
    fixed bounds cut no channel dim (a per-step write at time ``t`` covers whole channel rows; ``x[..., :n]`` with
    channels along the last dim does not)."""
    for d in range(lab.dim()):
        if lab.size(d) == 1 or bool(region.all(dim=d).eq(region.any(dim=d)).all()):
            continue  # the region covers every line along d that it touches
        big = torch.iinfo(torch.long).max
        lo = torch.where(region, lab, big).amin(dim=d)
        hi = torch.where(region, lab, -big).amax(dim=d)
        if not bool(((lo == hi) | ~region.any(dim=d)).all()):
            return False
    return True
