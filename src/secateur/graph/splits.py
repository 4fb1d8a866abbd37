"""Cuts of a channel dim at positions the model keeps in its own attributes (issue #3): prune within each section.

Model code often cuts a channel dim where its constructor said: ``torch.split(x, [self.dim_conv3,
self.dim_untouched])`` (FasterNet's partial conv), ``split([self.key_dim, self.key_dim, self.val_dim])`` (q / k / v
in EfficientViT, LeViT, TinyViT), ``torch.split(x, self.split_indices)`` (MambaOut), ``x[:, 0:self.in_channels] +
shortcut`` (ReXNet's partial residual), ``x[:, :self.num_1x1_c]`` (DPN's dual path). The engine used to keep such a
dim whole (unequal sections: one all-or-nothing unit), since removing a channel inside a section moves every later
boundary, and the model's code would still cut at the old one. Yet the labels of the cut already say which position
belongs to which section: each section can lose its own channels (they join whatever groups read them, a slice
added to a shortcut is one group with the shortcut), provided every boundary then moves to the number of channels
kept before it. That is an attribute update, and the engine makes it only with proof:

* at capture (``open_cut``), a cut is opened only where the module running it holds an int attribute naming every
  section (its size, or where it ends), or an int list equal to the sizes; otherwise it stays all-or-nothing, as
  before (a size written in the code, or computed from the input's shape, cannot be updated by the engine);
* after choosing, ``proposals`` says, per module, the new value of every attribute equal to an old section size or
  boundary (a size maps to the section's kept count, a boundary to the kept count before it; an attribute two cuts
  would move to different values is left out), and the attribute search (size_attrs.py) tries them first, keeps
  only those the dry run needs (an attribute equal to a size but used as a number is never changed) and the plan
  is taken only where every op shape equals the plan's and the pruned model computes the oracle's reference
  (structured/proof.py ``_verified``, which runs the search first where the graph has cuts);
* a cut whose update is not proven leaves the dry run failing there (a failing ``split_with_sizes`` names the
  groups of its stale sections, verify.py ``split_failed``), and the verify loop keeps those groups whole (noted):
  never a silently wrong model. Shapes are enough evidence for the cut itself: a section whose shape is the
  plan's holds exactly the kept channels of that section, in order (slicing keeps the order).

Measured (benchmarks/bench_zoo_depth.py, ratio 0.5, MACs after / dense): fasternet_s 0.511 -> 0.252, dpn68
0.481 -> 0.251, mambaout_tiny 0.484 -> 0.258, rexnet_100 0.478 -> 0.283, efficientvit_m0 0.771 -> 0.294,
shvit_s1 0.440 -> 0.300, every plan passing the oracle.

Sections that must keep equal sizes need no rule of their own: q and k meet in ``q @ k^T``, which unions their
channels one to one (rules/matmul.py ``_matmul``), and equal sections of a split stay position-aligned
(``_check_split``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from secateur.graph.labels import compress


@dataclass
class Cut:
    """One cut op: module ``where`` cuts dim ``dim`` (``size`` positions) at ``bounds`` (ascending, 0 and ``size``
    included for a split; a slice's start and end). ``sizes``: the sections' old sizes (a split) or the slice's
    length; ``slice``: a slice (start / end are the named values) rather than a split (sizes are). ``rows``: the
    atoms at each position along the dim (over the other dims), ``[size, k]``; resolved into ``parts`` (group,
    positions in ``rows.flatten()``, group channel of each) when groups are built."""
    where: str
    op: str
    dim: int
    size: int
    bounds: tuple[int, ...]
    sizes: tuple[int, ...]
    slice: bool
    rows: torch.Tensor
    parts: list = field(default_factory=list)
    unnamed: tuple[int, ...] = ()  # sections no attribute names: allowed only while they hold no prunable channel


def _module(tr: Any) -> tuple[str, nn.Module]:
    name = tr.stack[-1]
    return name, (tr.model.get_submodule(name) if name else tr.model)


def _ints(mod: nn.Module) -> tuple[set[int], list[tuple[int, ...]]]:
    """The int values and int lists a module keeps (public attributes only, bools left out)."""
    vals, lists = set(), []
    for k, v in vars(mod).items():
        if k.startswith("_"):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:  # 0 / 1: flags and strides, not sizes
            vals.add(v)
        elif isinstance(v, (tuple, list)) and v and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
            lists.append(tuple(v))
    return vals, lists


def _rows(lab: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    lab = compress(lab)
    if lab is None:
        return torch.full((size, 1), -1, dtype=torch.long)
    rows = lab.movedim(dim, 0)
    return rows.expand(size, *rows.shape[1:]).reshape(size, -1)


def open_cut(tr: Any, op: str, x_lab: torch.Tensor, dim: int, bounds: list[int], is_slice: bool) -> bool:
    """Record a cut of the labelled dim ``dim`` of ``x_lab`` (full labels of the input) at ``bounds`` if the module
    running it names every section (see the module docstring); False where it does not (the caller keeps the dim
    whole). A split that names some sections and not others is recorded with those in ``Cut.unnamed``: valid only
    while they keep every channel, which ``settle_unnamed`` decides once the components are known."""
    size = x_lab.size(dim)
    where, mod = _module(tr)
    vals, lists = _ints(mod)
    named = True
    if is_slice:
        start, end = bounds
        named = (start == 0 or start in vals) and (end >= size or end in vals)
        sizes = (min(end, size) - start,)
        bounds = [start, min(end, size)]
    unnamed: tuple[int, ...] = ()
    if not is_slice:
        sizes = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        unnamed = () if sizes in lists else tuple(i for i, (s, b) in enumerate(zip(sizes, bounds[1:]))
                                                   if s not in vals and b not in vals)
        named = len(unnamed) < len(sizes)
    if not named or size <= 1:
        return False
    tr.cuts.append(Cut(where, op, dim, size, tuple(bounds), sizes, is_slice, _rows(x_lab, dim, size), unnamed=unnamed))
    return True


def settle_unnamed(tr: Any, root: torch.Tensor) -> bool:
    """A cut with sections no attribute names (``Cut.unnamed``: a size computed in the code, such as a Mamba-2
    mixer's ``n_groups * ssm_state_size`` for its B and C) is valid only while those sections keep every channel:
    where one of them holds a channel that may go, the whole dim is made all-or-nothing, as a cut that names no
    section is at capture (``_check_split``), and the cut is dropped. Decided here, once the components are known
    (the B / C channels are kept whole by a rule that runs after the split). True when something was unioned."""
    added, keep = False, []
    for cut in tr.cuts:
        if cut.unnamed:
            pos = torch.cat([torch.arange(cut.bounds[i], cut.bounds[i + 1]) for i in cut.unnamed])
            atoms = cut.rows[pos].reshape(-1)
            atoms = atoms[atoms >= 0]
            if bool((root[atoms] != root[0]).any()):
                tr.atoms.collapse(cut.rows, [0])
                added = True
                continue
        keep.append(cut)
    tr.cuts = keep
    return added


def resolve(cuts: list[Cut], root: torch.Tensor, gid: torch.Tensor, local: torch.Tensor, groups: list) -> list[Cut]:
    """``Cut.parts`` from the components (called by groups.py, like the norm sites); cuts with no prunable channel
    are dropped (nothing there can move)."""
    out = []
    for cut in cuts:
        cut = replace(cut, parts=[])  # groups may be built again from the same capture
        flat = cut.rows.reshape(-1)
        ok = flat >= 0
        c = torch.where(ok, root[flat.clamp_min(0)], torch.full_like(flat, -1))
        g = torch.where(c >= 0, gid[c.clamp_min(0)], torch.full_like(c, -1))
        for G in torch.unique(g[g >= 0]).tolist():
            idx = (g == G).nonzero().flatten()
            cut.parts.append((groups[G], idx, local[c[idx]]))
        if cut.parts:
            out.append(cut)
    return out


def new_bounds(cut: Cut, picks: dict[int, torch.Tensor]) -> list[int]:
    """The cut's bounds after removing ``picks`` ({id(group): chosen channels}): a position goes when every atom
    along it goes (a whole slice), and a bound moves to the positions kept before it."""
    gone = torch.zeros(cut.rows.numel(), dtype=torch.bool)
    for g, idx, chan in cut.parts:
        if id(g) in picks:
            pick = torch.zeros(g.size, dtype=torch.bool)
            pick[picks[id(g)]] = True
            gone[idx[pick[chan]]] = True
    gone = gone.reshape(cut.rows.shape).all(dim=1)
    before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(gone.long(), 0)])
    return [b - int(before[min(b, cut.size)]) for b in cut.bounds]


def proposals(model: nn.Module, cuts: list[Cut], choices: list) -> dict[str, dict[str, Any]]:
    """{module: {attribute: new value}} for the attributes that name a section of a cut whose bounds move under
    ``choices``: a split's sizes first (then its bounds), a slice's start and end first (then its length); an
    int list equal to a split's sizes becomes the new sizes. An attribute that would get two different values
    is left out (the dry run decides without it)."""
    picks = {id(g): c for g, c in choices}
    seen: dict[tuple[str, str], list] = {}
    for cut in cuts:
        nb = new_bounds(cut, picks)
        if cut.slice:
            first = dict(zip(cut.bounds, nb))
            second = {cut.sizes[0]: nb[1] - nb[0]}
        else:
            nsizes = [b - a for a, b in zip(nb, nb[1:])]
            first, second = _unique(zip(cut.sizes, nsizes)), _unique(zip(cut.bounds[1:], nb[1:]))
        mod = model.get_submodule(cut.where) if cut.where else model
        for k, v in vars(mod).items():
            if k.startswith("_") or isinstance(v, bool):
                continue
            if isinstance(v, int):
                new = first.get(v, second.get(v)) if v in first or v in second else None
                if new is not None:  # unchanged values count too: another cut may not move them
                    seen.setdefault((cut.where, k), []).append(new)
            elif not cut.slice and isinstance(v, (tuple, list)) and tuple(v) == cut.sizes:
                seen.setdefault((cut.where, k), []).append(type(v)(nsizes))
    out: dict[str, dict[str, Any]] = {}
    for (where, k), news in seen.items():
        if all(n == news[0] for n in news) and news[0] != getattr(model.get_submodule(where) if where else model, k):
            out.setdefault(where, {})[k] = news[0]
    return out


def _unique(pairs) -> dict[int, int]:
    """old -> new where every occurrence of old maps to one new value."""
    out: dict[int, int | None] = {}
    for a, b in pairs:
        out[a] = b if out.get(a, b) == b else None
    return {a: b for a, b in out.items() if b is not None and a != 0}
