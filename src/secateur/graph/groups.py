"""Groups: sets of channels that are removed the same way, with every tensor slice they own."""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateur.graph.capture import Tracer, capture
from secateur.modes import keeps_statistics


@dataclass
class Member:
    """One tensor dimension touched by a group.

    module: qualified name of the owning module ("" for the root); name: parameter/buffer attribute on it;
    dim: the dimension sliced; kind: "out" (a producer's output rows: Linear/Conv out channels, Embedding dims),
    "in" (a consumer's input columns: zeroing these is what the pruning oracle does), or "param" (rides along:
    norm affine and running stats, free parameters such as layer scales or cls tokens);
    index: positions along ``dim`` owned by the group; channel: for each position, which of the group's channels
    (0..size-1) it belongs to (one channel can own several positions, e.g. after a flatten or for a whole head);
    consumer: the slice is read as an input somewhere (kind "in", or a tied weight that is also a producer);
    extent: the tensor's size along ``dim`` when the graph was built (-1: unknown), so that a plan applied to another
    model of the same layout but other widths is refused instead of slicing it at the wrong positions."""
    module: str
    name: str
    dim: int
    kind: str
    index: torch.Tensor
    channel: torch.Tensor
    consumer: bool = False
    extent: int = -1

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
    block: torch.Tensor | None = None  # heads="head_dim": head of each channel; every head loses the same count
    norms: list[str] = field(default_factory=list)  # normalisations over these channels ("where: op")
    # grouped convolutions among the members -> how they lose channels ("channels" or "groups", see
    # modules.grouped_mode); the size updater reads it from here
    grouped: dict[str, str] = field(default_factory=dict)
    # channels of a layer per group channel: 1, the group count of a "channels"-mode grouped conv whose channel
    # j of every group is one unit here, or in "groups" mode the gcd of the member layers' group widths
    # (``round_to`` counts a layer's channels, so it needs this)
    unit: int = 1
    # q/k units of an SDPA call whose scale follows the head size: their q rows are scaled on removal
    # (graph/scale_fold.py); None elsewhere
    scale_fold: Any = None
    # > 0: fused mixture-of-experts channels (graph/moe.py): every member is batched over this many experts along
    # its dim 0 and each expert keeps its own channels, the same count in each; a choice is then ``[experts, n]``
    # (channel positions per expert). A 1-d choice still means one set for all experts (exact too).
    experts: int = 0
    # kept channels must be a multiple of this (a kernel's alignment, ``Tracer.aligned``); the chooser rounds to
    # lcm(round_to, align)
    align: int = 1

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
    "module" (``key`` = module name), "op" (``key`` = ATen op packet), "reduce" (a statistic such as a mean
    over the channel dim, ``key`` = its ATen op packet, ``dim`` = the reduced dim), "wstd" (a weight-standardised
    conv); ``call``: which call of that key, in
    the order the model runs; ``parts``: (group, positions along the normalised dim, group channel of each)."""
    kind: str
    key: Any
    call: int
    where: str
    op: str
    size: int
    parts: list[tuple[Group, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    dim: int = -1  # the normalised dim of the op's input (a "reduce" site: the dim its statistic runs over)


@dataclass
class Graph:
    groups: list[Group]
    notes: list[str]
    tracer: Any = None
    links: list[tuple[Group, Group]] = field(default_factory=list)  # must lose the same count per head
    root: Any = None  # root[atom]: its component
    where: Any = None  # where[root] = (group index, channel), -1 where not prunable
    norms: list[NormSite] = field(default_factory=list)
    ties: Any = None  # graph/ties.py Ties: groups whose kept counts must agree (found by the dry run)
    cuts: list = field(default_factory=list)  # graph/splits.py Cut: splits / slices at positions the model names


def _block_rows(tr: Tracer, root: torch.Tensor) -> set[frozenset]:
    """Root sets of the registered heads (heads="head_dim") whose dims are still distinct units."""
    rows = set()
    for b in tr.blocks:
        for row in root[b].tolist():
            if len(set(row)) == len(row):
                rows.add(frozenset(row))
    return rows


def _equal_count(r: torch.Tensor, dims: list[int], rows: set[frozenset]) -> bool:
    """[E] viewed as [heads, head_dim] where every head is a registered block: removing the same number of
    units from every head keeps the view valid."""
    if len(dims) != 2 or not rows:
        return False
    other = [d for d in range(r.dim()) if d not in dims]
    m = r.permute(*other, *dims).reshape(-1, r.size(dims[1]))
    return all(frozenset(row) in rows for row in torch.unique(m, dim=0).tolist())


def _settle(tr: Tracer) -> torch.Tensor:
    """Components, after making every view-split channel dim prunable only by whole slices along one dim (the
    one already whole, e.g. heads; else the largest, e.g. channels-per-group in a channel shuffle), or by the
    same count from every head (heads="head_dim")."""
    root = tr.atoms.components()
    from secateur.graph.splits import settle_unnamed
    for _ in range(8):
        added = settle_unnamed(tr, root)
        rows = _block_rows(tr, root)
        for lab, dims in tr.constraints:
            r = torch.where(lab >= 0, root[lab.clamp_min(0)], lab)
            ok = _equal_count(r, dims, rows)
            for i in ([] if ok else dims):
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
    """The groups of a capture, with a note for every producer whose channels it keeps (graph/kept.py)."""
    graph = _settled_groups(tr)
    from secateur.graph.kept import explain
    tr.notes.extend(n for n in explain(tr, graph) if n not in tr.notes)
    return graph


def _settled_groups(tr: Tracer) -> Graph:
    from secateur.graph import scale_fold
    for _ in range(4):
        graph = _groups(tr)
        bad = _assign_blocks(tr, graph)
        if not bad:
            if scale_fold.resolve(tr, graph):  # a fold refused: its q/k dims kept, groups recomputed
                continue
            _assign_experts(tr, graph)
            _assign_align(tr, graph)
            return graph
        for b in bad:  # heads whose dims do not form one group each: whole heads there (always valid)
            tr.atoms.collapse(b, [1])
        tr.blocks = [b for b in tr.blocks if not any(b is x for x in bad)]
    for fold in tr.folds:  # not settled in four rounds: no fold is trusted
        scale_fold._refuse(tr, fold, "the groups did not settle")
    tr.folds = []
    graph = _groups(tr)
    _assign_align(tr, graph)
    return graph


def _assign_blocks(tr: Tracer, graph: Graph) -> list[torch.Tensor]:
    """Set ``Group.block`` from the registered heads; return the registered heads that do not fit (a group
    mixing head units with other channels, or heads of unequal sizes)."""
    if not tr.blocks:
        return []
    root, where = graph.root, graph.where
    bad, blocks = [], {}
    for b in tr.blocks:
        r = root[b]
        gl = where[r]  # (group index, local channel) per unit, or -1
        if bool((gl[..., 0] < 0).all()):
            continue  # blocked or never produced: nothing to prune there
        if bool((gl[..., 0] < 0).any()) or any(len(set(row)) != len(row) for row in r.tolist()):
            bad.append(b)
            continue
        for row in gl.tolist():
            gi = {g for g, _ in row}
            if len(gi) != 1:
                bad.append(b)
                break
            blocks.setdefault(gi.pop(), set()).add(tuple(sorted(c for _, c in row)))
    for gi, rows in blocks.items():
        g = graph.groups[gi]
        sizes = {len(r) for r in rows}
        cover = sorted(c for r in rows for c in r)
        if len(sizes) != 1 or cover != list(range(g.size)):
            bad += [b for b in tr.blocks if bool((graph.where[root[b]][..., 0] == gi).any())]
            continue
        block = torch.empty(g.size, dtype=torch.long)
        for i, r in enumerate(sorted(rows)):
            block[list(r)] = i
        g.block = block
    for a, b in tr.links:
        ga, gb = where[root[a]][0], where[root[b]][0]
        if ga >= 0 and gb >= 0 and ga != gb:
            graph.links.append((graph.groups[int(ga)], graph.groups[int(gb)]))
    return bad


def _assign_experts(tr: Tracer, graph: Graph) -> None:
    """Set ``Group.experts`` where a registered experts channel set (``Tracer.experts``) is exactly one group's
    channels and that group's members are only the experts module's tensors, along dims other than the expert dim
    (0). Anything else (the channels met another module) leaves the group one channel set for all experts."""
    for atoms, count, names in tr.experts:
        gl = graph.where[graph.root[atoms]]
        gi = gl[:, 0]
        if bool((gi < 0).any()) or bool((gi != gi[0]).any()):
            continue
        g = graph.groups[int(gi[0])]
        if (g.size != atoms.numel() or sorted(gl[:, 1].tolist()) != list(range(g.size)) or g.block is not None
                or any(m.qualname not in names or m.dim == 0 for m in g.members)):
            continue
        g.experts = count


def _assign_align(tr: Tracer, graph: Graph) -> None:
    """Every group that holds atoms of a ``Tracer.aligned`` entry keeps a multiple of its n channels."""
    for atoms, n in tr.aligned:
        gi = graph.where[graph.root[atoms]][:, 0]
        for i in gi[gi >= 0].unique().tolist():
            g = graph.groups[i]
            g.align = math.lcm(g.align, n)


def _groups(tr: Tracer) -> Graph:
    root = _settle(tr)
    blocked = root[0]
    slots = list(tr.slots.values())
    n = tr.atoms.count
    # every slot's components at once (one gather, then views per slot): a gather, a reduction and a mask per slot
    # were most of this pass on small CNNs (efficientnet_b0: 376 slots)
    sizes = [s["atoms"].numel() for s in slots]
    flat = root[torch.cat([s["atoms"] for s in slots])] if slots else torch.empty(0, dtype=torch.long)
    comps = list(flat.split(sizes))
    sid = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(sizes, dtype=torch.long))
    prunable = torch.zeros(n, dtype=torch.bool)
    outs = torch.tensor([s["kind"] == "out" for s in slots], dtype=torch.bool)
    prunable[flat[outs[sid]]] = True
    prunable[blocked] = False
    prunable &= root == torch.arange(n)  # index by root id only
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(-(2 ** 62), 2 ** 62, (len(slots),), generator=gen, dtype=torch.long)
    sig = torch.zeros(n, dtype=torch.long)  # sum of the weights of the slots a component appears in, each once
    if slots:
        pairs = torch.unique(sid * n + flat)  # (slot, component), once each: one op, not one per slot
        sig.index_add_(0, pairs % n, weights[pairs // n])
    roots = prunable.nonzero().flatten()
    if roots.numel() == 0:
        return Graph([], tr.notes, tr, root=root, where=torch.full((n, 2), -1, dtype=torch.long))
    keys, gid_of_root = torch.unique(sig[roots], return_inverse=True)
    gid = torch.full((n,), -1, dtype=torch.long)
    gid[roots] = gid_of_root
    order = torch.argsort(gid_of_root, stable=True)
    counts = torch.bincount(gid_of_root, minlength=keys.numel())
    starts = torch.cumsum(counts, 0) - counts
    local = torch.full((n,), -1, dtype=torch.long)
    local[roots[order]] = torch.arange(roots.numel()) - starts[gid_of_root[order]]
    contracted = torch.zeros(n, dtype=torch.bool)
    for a in tr.contracted:
        contracted[root[a]] = True
    groups = [Group(name="", size=c) for c in counts.tolist()]
    # per slot: the lowest and highest group of its positions, and whether it holds a contracted channel (q.k)
    gflat = gid[flat]
    big = torch.iinfo(torch.long).max
    lows = torch.full((len(slots),), big, dtype=torch.long).scatter_reduce(0, sid, gflat, "amin").tolist()
    highs = torch.full((len(slots),), -1, dtype=torch.long).scatter_reduce(0, sid, gflat, "amax").tolist()
    held = (torch.zeros(len(slots), dtype=torch.long).scatter_reduce(0, sid, contracted[flat].long(), "amax").tolist()
            if tr.contracted else [0] * len(slots))
    lflat = list(local[flat].split(sizes))
    span = torch.arange(max(sizes, default=0))
    for s, c, lo, hi, con, lc in zip(slots, comps, lows, highs, held, lflat):
        if not c.numel() or hi < 0:
            continue
        if lo == hi:  # one group owns the whole dim (common)
            parts = [(hi, span[:c.numel()], lc, bool(con))]
        else:
            g = gid[c]
            parts = [(G, idx, local[c[idx]], bool(contracted[c[idx]].any())) for G in torch.unique(g[g >= 0]).tolist()
                     for idx in [(g == G).nonzero().flatten()]]
        for G, idx, ch, part_held in parts:
            # a contracted channel (q.k) is zeroed at its producer, norm affine included: then it is exactly 0
            consumer = s["consumer"] or (s["kind"] in ("out", "param") and part_held)
            groups[G].members.append(Member(s["module"], s["name"], s["dim"], s["kind"], idx, ch, consumer,
                                            c.numel()))
    for g in groups:
        g.members.sort(key=lambda m: (m.kind != "out", m.kind != "param"))
        g.name = g.members[0].module
        g.grouped = {m.module: tr.convs[m.module] for m in g.members if m.module in tr.convs}
        if g.grouped:  # channels per unit where a layer's channels are indexed whole (j of every group, a group)
            g.unit = math.gcd(*(int(torch.bincount(m.channel).max()) for m in g.members if m.kind in ("out", "param")))
    norms = []
    for site in tr.norms:
        c = root[site["atoms"]]
        ns = NormSite(site["kind"], site["key"], site["call"], site["where"], site["op"], c.numel(),
                      dim=site.get("dim", -1))
        g = gid[c]
        for G in torch.unique(g[g >= 0]).tolist():
            idx = (g == G).nonzero().flatten()
            ns.parts.append((groups[G], idx, local[c[idx]]))
            groups[G].norms.append(f"{site['where']}: {site['op']}")
        if ns.parts:
            norms.append(ns)
    from secateur.graph.splits import resolve
    cuts = resolve(tr.cuts, root, gid, local, groups)
    order = sorted(range(len(groups)), key=lambda i: groups[i].name)
    rank = torch.empty(len(groups), dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(len(groups))
    where = torch.full((n, 2), -1, dtype=torch.long)
    where[roots, 0] = rank[gid[roots]]
    where[roots, 1] = local[roots]
    return Graph([groups[i] for i in order], tr.notes, tr, root=root, where=where, norms=norms, cuts=cuts)


@keeps_statistics
def build_graph(model: nn.Module, example_inputs: Any, heads: str = "heads", grouped: str = "channels") -> Graph:
    graph = groups_from(capture(model, example_inputs, heads, grouped))
    from secateur.graph.ties import declared
    graph.ties = declared(model, graph.groups)  # counts the model's classes tie (graph/ties.py ``COUNTED_BY``)
    return graph


def build_groups(model: nn.Module, example_inputs: Any, heads: str = "heads", grouped: str = "channels"
                 ) -> list[Group]:
    """The dependency groups of ``model`` for ``example_inputs`` (the model is run once, not changed).
    ``heads="head_dim"``: attention units are per-head dims instead of whole heads. ``grouped``: grouped
    convolutions lose the same local channels in every group ("channels") or whole groups ("groups"); depthwise
    convolutions always lose whole groups (see ``modules.grouped_mode``)."""
    return build_graph(model, example_inputs, heads, grouped).groups
