"""Groups: sets of channels that are removed the same way, with every tensor slice they own."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateur.graph.capture import Tracer, capture


@dataclass
class Member:
    """One tensor dimension touched by a group.

    module: qualified name of the owning module ("" for the root); name: parameter/buffer attribute on it;
    dim: the dimension sliced; kind: "out" (a producer's output rows: Linear/Conv out channels, Embedding dims),
    "in" (a consumer's input columns: zeroing these is what the pruning oracle does), or "param" (rides along:
    norm affine and running stats, free parameters such as layer scales or cls tokens);
    index: positions along ``dim`` owned by the group; channel: for each position, which of the group's channels
    (0..size-1) it belongs to (one channel can own several positions, e.g. after a flatten or for a whole head);
    consumer: the slice is read as an input somewhere (kind "in", or a tied weight that is also a producer)."""
    module: str
    name: str
    dim: int
    kind: str
    index: torch.Tensor
    channel: torch.Tensor
    consumer: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name

    def tensor(self, model: nn.Module) -> torch.Tensor:
        """The live parameter/buffer (read or write its ``index`` slices along ``dim``)."""
        return getattr(model.get_submodule(self.module), self.name)


@dataclass
class Group:
    """Channels coupled by the model's computation: removing channel ``c`` removes, in every member, the
    positions whose ``channel == c``. ``size`` is the number of channels; ``name`` the first producer's module."""
    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)  # normalisations over these channels ("where: op")

    def modules(self) -> set[str]:
        return {m.module for m in self.members}

    def __repr__(self) -> str:
        mem = ", ".join(f"{m.qualname}[{m.dim}]:{m.kind}" for m in self.members[:4])
        more = f", +{len(self.members) - 4}" if len(self.members) > 4 else ""
        return f"Group({self.name!r}, size={self.size}, members=[{mem}{more}])"


@dataclass
class NormSite:
    """One call of a normalisation over prunable channels (LayerNorm / RMSNorm over the last dim): removing a
    channel changes its statistics, so the pruning reference recomputes it over the kept channels. ``kind``:
    "module" (``key`` = module name) or "op" (``key`` = ATen op packet); ``call``: which call of that key, in
    the order the model runs; ``parts``: (group, positions along the normalised dim, group channel of each)."""
    kind: str
    key: Any
    call: int
    where: str
    op: str
    size: int
    parts: list[tuple[Group, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class Graph:
    groups: list[Group]
    notes: list[str]
    tracer: Any = None
    norms: list[NormSite] = field(default_factory=list)


def _settle(tr: Tracer) -> torch.Tensor:
    """Components, after making every view-split channel dim prunable only by whole slices along one dim (the
    one already whole, e.g. heads; else the largest, e.g. channels-per-group in a channel shuffle)."""
    root = tr.atoms.components()
    for _ in range(8):
        added = False
        for lab, dims in tr.constraints:
            r = torch.where(lab >= 0, root[lab.clamp_min(0)], lab)
            ok = False
            for i in dims:
                others = [d for d in dims if d != i]
                m = r.amax(dim=others, keepdim=True)
                if bool(((r == m) | (r < 0)).all()):
                    ok = True
                    break
            if not ok:
                i = max(dims, key=lambda d: (lab.size(d), d))
                tr.atoms.collapse(lab, [d for d in dims if d != i])
                added = True
        if not added:
            return root
        root = tr.atoms.components()
    return root


def groups_from(tr: Tracer) -> Graph:
    root = _settle(tr)
    blocked = root[0]
    slots = list(tr.slots.values())
    n = tr.atoms.count
    comps = [root[s["atoms"]] for s in slots]
    prunable = torch.zeros(n, dtype=torch.bool)
    for s, c in zip(slots, comps):
        if s["kind"] == "out":
            prunable[c] = True
    prunable[blocked] = False
    prunable &= root == torch.arange(n)  # index by root id only
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(-(2 ** 62), 2 ** 62, (len(slots),), generator=gen, dtype=torch.long)
    sig = torch.zeros(n, dtype=torch.long)
    for i, c in enumerate(comps):
        sig.index_add_(0, torch.unique(c), weights[i].expand(torch.unique(c).numel()).contiguous())
    roots = prunable.nonzero().flatten()
    if roots.numel() == 0:
        return Graph([], tr.notes, tr)
    keys, gid_of_root = torch.unique(sig[roots], return_inverse=True)
    gid = torch.full((n,), -1, dtype=torch.long)
    gid[roots] = gid_of_root
    order = torch.argsort(gid_of_root, stable=True)
    counts = torch.bincount(gid_of_root, minlength=keys.numel())
    starts = torch.cumsum(counts, 0) - counts
    local = torch.full((n,), -1, dtype=torch.long)
    local[roots[order]] = torch.arange(roots.numel()) - starts[gid_of_root[order]]
    groups = [Group(name="", size=int(c)) for c in counts]
    for s, c in zip(slots, comps):
        g = gid[c]
        for G in torch.unique(g[g >= 0]).tolist():
            idx = (g == G).nonzero().flatten()
            groups[G].members.append(Member(s["module"], s["name"], s["dim"], s["kind"], idx, local[c[idx]],
                                            s["consumer"]))
    for g in groups:
        g.members.sort(key=lambda m: (m.kind != "out", m.kind != "param"))
        g.name = g.members[0].module
    norms = []
    for site in tr.norms:
        c = root[site["atoms"]]
        ns = NormSite(site["kind"], site["key"], site["call"], site["where"], site["op"], c.numel())
        g = gid[c]
        for G in torch.unique(g[g >= 0]).tolist():
            idx = (g == G).nonzero().flatten()
            ns.parts.append((groups[G], idx, local[c[idx]]))
            groups[G].norms.append(f"{site['where']}: {site['op']}")
        if ns.parts:
            norms.append(ns)
    groups.sort(key=lambda g: g.name)
    return Graph(groups, tr.notes, tr, norms)


def build_graph(model: nn.Module, example_inputs: Any) -> Graph:
    return groups_from(capture(model, example_inputs))


def build_groups(model: nn.Module, example_inputs: Any) -> list[Group]:
    """The dependency groups of ``model`` for ``example_inputs`` (the model is run once, not changed)."""
    return build_graph(model, example_inputs).groups
