"""Channel labels: which *atom* (prunable unit) each element of a tensor belongs to.

A label is an int64 tensor with the same number of dims as the tensor it describes, each dim either full size
or 1 (broadcast: the same atom all along that dim). ``-1`` means "no atom". Atoms are created by producers
(output channels of Linear/Conv/Embedding, free 1-d parameters) and *unioned* whenever two atoms must be removed
together (residual adds, q/k contraction, a constant that cannot be sliced, ...). Unions are recorded as edge
tensors and solved once at the end (vectorised union-find), so capture cost is one small tensor op per model op.

Atom 0 is BLOCKED: anything unioned with it can never be pruned (model outputs, normalisations over the channel
dim reached by a fused kernel, an initial recurrent state from outside...)."""
from __future__ import annotations

import math

import torch

BLOCKED = 0
_RUNS = 4096  # labels larger than this have their repeated union pairs folded as they arrive (Atoms.union)


class Atoms:
    """Atom allocator + union edges."""

    def __init__(self) -> None:
        self.count = 1  # atom 0 is BLOCKED
        self.edges: list[torch.Tensor] = []
        # why channels are kept, for the plan's notes (graph/kept.py): what ran (``site``, set by the tracer: (module
        # name, op or module type), or None) at each ``block`` ("block", the atoms kept) and at each ``collapse``
        # that made several atoms one unit ("tie", one atom of each unit made, and how many atoms its first row
        # joined)
        self.site: tuple[str, str] | None = None
        self.reasons: list[tuple] = []
        # when each edge arrived (``edge_sites[t]``: the site of union call ``t``), parallel to ``edges``: an int per
        # fresh batch, a tensor per edge once deduped (the first time) -- which op joined a unit (graph/kept.py)
        self.times: list[int | torch.Tensor] = []
        self.edge_sites: list[tuple[str, str] | None] = []

    def new(self, n: int) -> torch.Tensor:
        out = torch.arange(self.count, self.count + n, dtype=torch.long)
        self.count += n
        return out

    def own(self, chan: torch.Tensor) -> torch.Tensor:
        """``chan`` with the positions no producer labels (-1: channels straight from the model's input) given atoms
        of their own, which nothing produces, so they are never pruned; the labelled ones stay as they are."""
        if chan.numel() and int(chan.min()) < 0:
            chan = torch.where(chan < 0, self.new(chan.numel()).view_as(chan), chan)
        return chan

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union a[i] with b[i] elementwise (broadcast), ignoring -1."""
        a, b = torch.broadcast_tensors(a, b)
        if a.dim() < 2 or a.numel() <= _RUNS:
            self._pairs(a, b, (torch.minimum(a, b) >= 0) & (a != b))
            return
        # a big label repeats its pairs along some dim (a token stream: every token holds the same channels): keep
        # each run of one pair once, in whichever of two orders leaves fewer (no sort; the edge *set* is the same,
        # and the components with it). beit_base: 31 M edges to sort in components() without this, 2.2 s.
        # A pair is kept when lo >= 0 (so both are atoms) and lo != hi, tested after the runs are folded
        key = torch.minimum(a, b) * self.count + torch.maximum(a, b)
        runs = min((torch.unique_consecutive(k.reshape(-1)) for k in (key, key.permute(*range(key.dim() - 1, -1, -1)))),
                   key=lambda k: k.numel())
        lo, hi = runs.div(self.count, rounding_mode="floor"), runs.remainder(self.count)
        keep = (lo >= 0) & (lo != hi)
        if keep.any():
            self._add(torch.stack([lo[keep], hi[keep]]))

    def _pairs(self, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> None:
        """Add the pairs (a[i], b[i]) where ``keep`` (a, b, keep of one shape), in order, as one batch."""
        if bool(keep.all()):  # every pair is an edge (the common case): the same edges, no masked copies
            if keep.numel():
                self._add(torch.stack([a.reshape(-1), b.reshape(-1)]))
        elif bool(keep.any()):
            self._add(torch.stack([a[keep], b[keep]]))

    def _add(self, e: torch.Tensor) -> None:
        self.edges.append(e)
        self.times.append(len(self.edge_sites))
        self.edge_sites.append(self.site)

    def block(self, lab: torch.Tensor | None) -> None:
        if lab is not None:
            lab = lab[lab >= 0]
            if lab.numel():
                self.union(lab, torch.zeros_like(lab))
                if self.site is not None:
                    self.reasons.append((self.site, "block", lab, 0))

    def collapse(self, lab: torch.Tensor, dims) -> torch.Tensor:
        """Union every atom along ``dims`` (per position of the other dims); returns lab with those dims size 1."""
        dims = sorted({d % lab.dim() for d in dims if lab.size(d % lab.dim()) > 1})
        if not dims:
            return lab
        other = [d for d in range(lab.dim()) if d not in dims]
        shape = [1 if d in dims else lab.size(d) for d in range(lab.dim())]
        lab = _constant_dims_to_one(lab, other)  # the same unions, each once (the result is expanded back)
        perm = lab.permute(*other, *dims)
        flat = perm.reshape(-1, math.prod(lab.size(d) for d in dims))
        lo, rep = flat.aminmax(dim=1, keepdim=True) if flat.numel() else (flat[:, :1], flat[:, :1])
        # rep: any real atom of the row (or -1); clean: no -1 anywhere (the common case), so that a pair (atom, rep)
        # is an edge exactly where the atom is not the row's largest: the edges ``union(flat, rep)`` adds, fewer ops
        clean = flat.numel() > 0 and int(lo.min()) >= 0
        if clean and flat.numel() <= _RUNS:
            a, b = torch.broadcast_tensors(flat, rep)
            self._pairs(a, b, a < b)
        else:
            self.union(flat, rep)
        if self.site is not None and flat.size(1) > 1:
            if clean:  # (every rep is an atom)
                tied = lo < rep  # rows that held two atoms or more: one unit now
            else:
                low = flat.masked_fill(flat < 0, self.count).min(dim=1, keepdim=True).values
                tied = (low < rep) & (rep >= 0)
            if tied.any():  # how many atoms one row joined: a statistic over the channels joins them all
                row = flat[int(tied.flatten().nonzero()[0])]
                row = row if clean else row[row >= 0]
                self.reasons.append((self.site, "tie", rep[tied], int(row.unique().numel())))
        if not clean:
            mixed = (flat < 0).any(dim=1, keepdim=True) & (rep >= 0)
            if mixed.any():  # an unsliceable element shares the slice: the whole slice is kept
                self.block(rep[mixed])
        small = [1 if d in dims else lab.size(d) for d in range(lab.dim())]
        return rep.reshape(small) if small == shape else rep.reshape(small).expand(shape).contiguous()

    def components(self) -> torch.Tensor:
        """root[atom] for every atom: vectorised min-label propagation with pointer jumping."""
        if not self.edges:
            return torch.arange(self.count, dtype=torch.long)
        self._dedupe()
        return components(self.count, self.edges[0])

    def _dedupe(self) -> None:
        """``edges`` as one tensor, each edge once, ``times`` the first time it arrived."""
        if not self.edges:
            self.edges, self.times = [torch.empty(2, 0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
        if len(self.edges) > 1 or isinstance(self.times[0], int):
            e = torch.cat(self.edges, dim=1)
            t = torch.cat([x if isinstance(x, torch.Tensor) else torch.full((b.size(1),), x, dtype=torch.long)
                           for b, x in zip(self.edges, self.times)])
            # the same edge arrives many times (a view split with spatial dims: 742k edges, 1.5k distinct on
            # shufflenet_v2): keep each once, so every propagation round below scans only distinct edges; with the
            # time it first arrived (the batches are in time order, and a stable sort keeps it within a key)
            lo, hi = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
            key, order = torch.sort(lo * self.count + hi, stable=True)
            first = torch.ones_like(key, dtype=torch.bool)
            first[1:] = key[1:] != key[:-1]
            key = key[first]
            self.edges = [torch.stack([key // self.count, key % self.count])]
            self.times = [t[order[first]]]

    def joined_at(self, atoms: torch.Tensor, root: torch.Tensor) -> tuple[str, str] | None:
        """The site of the union call after which ``atoms`` (one component of ``root`` now) were first all one
        component: that component's edges replayed in arrival order through a union-find (a few thousand edges:
        milliseconds; a binary search over ``components`` took 0.5 s per group on inkling2_text)."""
        self._dedupe()
        e, t = self.edges[0], self.times[0]
        mask = root[e[0]] == root[atoms[0]]
        order = torch.argsort(t[mask], stable=True)
        e = e[:, mask][:, order]
        pairs, times = zip(e[0].tolist(), e[1].tolist()), t[mask][order].tolist()
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent.get(a, a) != a:
                parent[a] = parent.get(parent[a], parent[a])
                a = parent[a]
            return a

        want = set(atoms.unique().tolist())
        marked = {a: 1 for a in want}  # root -> how many of ``atoms`` its set holds
        left = len(want)
        for (a, b), when in zip(pairs, times):
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            parent[ra] = rb
            ma, mb = marked.pop(ra, 0), marked.get(rb, 0)
            if ma and mb:
                left -= 1
            if ma:
                marked[rb] = ma + mb
            if left <= 1:
                return self.edge_sites[when]
        return None

    def unblocked(self, root: torch.Tensor) -> torch.Tensor:
        """The components (``root``: the current ones) as if nothing were blocked: the blocked component split by
        its edges other than those to atom 0, so that each block's channels are units of their own (graph/kept.py
        names the op that kept them). Only that component's edges are walked, relabelled to its atoms."""
        self._dedupe()
        e = self.edges[0]
        e = e[:, (e[0] != BLOCKED) & (root[e[0]] == root[BLOCKED])]  # lo first: an edge to 0 has 0 there
        free = root.clone()
        inside = (root == root[BLOCKED]).nonzero().flatten()
        free[inside] = inside
        if e.numel():
            nodes = torch.unique(e)
            free[nodes] = nodes[components(nodes.numel(), torch.searchsorted(nodes, e))]
        return free


def components(count: int, e: torch.Tensor) -> torch.Tensor:
    """root[atom] for ``count`` atoms joined by edges ``e`` [2, E]: min-label propagation with pointer jumping."""
    root = torch.arange(count, dtype=torch.long)
    if not e.numel():
        return root
    src = torch.cat([e[0], e[1]])
    dst = torch.cat([e[1], e[0]])
    while True:
        new = root.clone()
        new.scatter_reduce_(0, dst, root[src], reduce="amin")
        new = new[new]
        new = new[new]
        if torch.equal(new, root):
            return root
        root = new


def constant_along(lab: torch.Tensor, dim: int) -> bool:
    """Is ``lab`` the same all along ``dim``? ``torch.equal`` with the first slice expanded: no boolean tensor, and
    it stops at the first difference (cait_xs24_384's capture made 1,578 such tests on labels of up to 500,000
    elements: 0.27 s as ``(lab == first).all()``)."""
    return torch.equal(lab, lab.narrow(dim, 0, 1).expand_as(lab))


def _constant_dims_to_one(lab: torch.Tensor, dims) -> torch.Tensor:
    """``lab`` narrowed to size 1 along each of ``dims`` where it is the same all along (a token stream's label
    materialised for a slice: every token holds the same channels). A union over such a label repeats each pair
    once per position: cait_xs24_384's q/k/v selects gave 36 M edges, 2/3 of its plan time in their sort."""
    for d in dims:
        if lab.size(d) > 1 and constant_along(lab, d):
            lab = lab.narrow(d, 0, 1)
    return lab


def compress(lab: torch.Tensor | None) -> torch.Tensor | None:
    """Shrink dims along which the label is constant to size 1; None if no atom at all."""
    if lab is None:
        return None
    if lab.numel() == 0:
        return None
    big = [d for d in range(lab.dim()) if lab.size(d) > 1]
    if len(big) <= 1:  # the common case (channels along one dim): one reduction decides both questions
        lo, hi = lab.aminmax()
        lo, hi = int(lo), int(hi)
        if hi < 0:
            return None
        return lab.narrow(big[0], 0, 1).contiguous() if big and lo == hi else lab.contiguous()
    if bool((lab < 0).all()):
        return None
    for d in range(lab.dim()):
        if lab.size(d) > 1 and constant_along(lab, d):
            lab = lab.narrow(d, 0, 1)
    return lab.contiguous()


def full(lab: torch.Tensor | None, shape) -> torch.Tensor:
    """Materialise a label to ``shape`` (-1 everywhere when unlabelled)."""
    if lab is None:
        return torch.full(tuple(shape), -1, dtype=torch.long)
    return lab.expand(tuple(shape)).contiguous()


def varies(lab: torch.Tensor | None, dim: int) -> bool:
    return lab is not None and lab.size(dim) > 1


def along(lab: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The atoms along ``dim`` as a 1-d tensor of length ``size`` (lab must be constant along other dims)."""
    if lab.numel() == lab.size(dim):  # the others are all 1 (the common case): a view, no indexing
        flat = lab.reshape(-1)
        return flat.expand(size) if lab.size(dim) == 1 else flat
    idx = [0] * lab.dim()
    idx[dim] = slice(None)
    return lab[tuple(idx)].expand(size) if lab.size(dim) == 1 else lab[tuple(idx)]
