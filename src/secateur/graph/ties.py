"""Count ties: groups whose *numbers* of kept channels must agree, though their channels are chosen apart.

Many attention modules (timm's ``B, N, C = x.shape; ...; x.transpose(1, 2).reshape(B, N, C)``, or
``q.reshape(B, N, self.num_heads, C // self.num_heads)``) read their inner width (heads x head_dim: the q/k/v rows,
the output projection's columns) from the *shape of their input*, the residual stream. Nothing in the captured ops
says so: ``x.shape`` is a Python int, not an op, so the capture sees two independent groups (the stream's channels,
the heads) and a plan that prunes them to different counts makes the module's own reshape fail, or, behind a ``-1``,
compute something else. The dry run (graph/verify.py) catches it. What the model needs is not that the two groups
lose the same channels (stream channels are ranked by the stream's importance, heads by the heads'), only the same
*count*: so a tie is a constraint on counts, met by choosing one kept width that every tied group can reach in its
own unit (a head is head_dim positions wide, a stream channel one) and ranking each group's channels as before.

Detection is by hypothesis and proof, not by reading code (the ints have no provenance at dispatch): when a plan's
dry run fails inside a module, the groups living inside it that its output projection reads are tied to the groups
that carry the module's input in from outside (the stream), for every module of its class (the same code), the plan
is re-chosen, and the tie is kept only if the dry run then no longer fails in that class; if it still does, every
group inside is tied (pvt's ``sr(x).reshape(B, C, -1)`` sizes a reduction conv from the input too), and failing
that the ties are undone and the dry run's fallback keeps the groups whole, as before. Evidence, at ratio 0.5
(benchmarks/bench_zoo_depth.py): davit_tiny 0.80 -> 0.28 of dense MACs, nest_tiny 0.76 -> 0.31, crossvit_18_240
0.56 -> 0.33, pvt_v2_b0 0.66 -> 0.39, every plan passing the oracle. Where no common width below the full one
exists (a one-head attention with whole heads), the tied groups keep every channel."""
from __future__ import annotations

import torch
from torch import nn

from secateur.graph.groups import Group


class Ties:
    """Union-find over groups (by id): every class keeps one width, a group's width being its kept channels times
    the positions one of its channels fills where the tie was seen (``width``)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.groups: dict[int, Group] = {}
        self.widths: dict[int, int | None] = {}

    def find(self, g: int) -> int:
        while self.parent.get(g, g) != g:
            g = self.parent[g]
        return g

    def tie(self, a: Group, b: Group, scope: str, per: int | None = None) -> bool:
        """Tie ``a`` and ``b`` as seen in module ``scope``; False if they were tied already. ``per``: the positions
        one channel counts for, where known (1 for a count of heads); else read from the members (``width``)."""
        for g in (a, b):
            self.groups[id(g)] = g
            self.widths.setdefault(id(g), per if per is not None else width(g, scope))
        ra, rb = self.find(id(a)), self.find(id(b))
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True

    def classes(self) -> list[list[Group]]:
        out: dict[int, list[Group]] = {}
        for i, g in self.groups.items():
            out.setdefault(self.find(i), []).append(g)
        return [v for v in out.values() if len(v) > 1]

    def copy(self) -> "Ties":
        new = Ties()
        new.parent, new.groups, new.widths = dict(self.parent), dict(self.groups), dict(self.widths)
        return new

    def __bool__(self) -> bool:
        return bool(self.parent)


def width(g: Group, scope: str) -> int | None:
    """Positions one channel of ``g`` fills where module ``scope`` reads it: a whole head is head_dim columns of
    the output projection, a stream channel one input column (two where a fixed split paired channels). Taken
    from the group's consumers inside ``scope`` (else its members there); None where they disagree."""
    inside = [m for m in g.members if _inside(m.module, scope)]
    best = None
    for m in [m for m in inside if m.consumer] or inside:
        per = torch.bincount(m.channel, minlength=g.size)
        if not bool((per == per[0]).all()) or int(per[0]) == 0:
            return None
        best = int(per[0]) if best is None else min(best, int(per[0]))
    return best


def _inside(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def candidates(groups: list[Group], scope: str, broad: bool = False) -> list[tuple[Group, Group]]:
    """(inner, stream) pairs to tie for one module ``scope``. Stream groups enter the module (a consumer inside)
    and have members outside it. Inner groups live wholly inside the module (pruned or not: a one-head attention's
    head, never pruned, ties its stream whole) and are read by a layer there that writes a group leaving the
    module (the output projection: what ``reshape(B, N, C)`` feeds). ``broad``: every inner group, for code that
    sizes more from the input (pvt's ``sr(x).reshape(B, C, -1)``); tried second, since it also ties groups no
    shape reads (a position-bias MLP's hidden units) and prunes them less."""
    inner, stream, leaving = [], [], set()
    for g in groups:
        ins = [_inside(m.module, scope) for m in g.members]
        if all(ins):
            if any(m.kind == "out" for m in g.members):
                inner.append(g)
        else:
            if any(i and m.consumer for i, m in zip(ins, g.members)):
                stream.append(g)
            leaving |= {m.module for i, m in zip(ins, g.members) if i and m.kind == "out"}
    if not broad:
        inner = [g for g in inner if any(m.consumer and m.module in leaving for m in g.members)]
    return [(a, s) for a in inner for s in stream]


# Module classes whose code sizes several of its groups by one attribute it keeps: "module.Class" -> (attribute,
# the children whose outputs it sizes). timm's EfficientFormerV2 ``Attention2d`` reshapes the outputs of ``q``, ``k``
# and ``v`` with ``self.num_heads``, yet its q/k heads and its v heads are two groups (the talking heads, 1x1 convs
# across heads, sit between them and pick any heads): only their counts must agree. The talking heads themselves are
# not reshaped by ``num_heads`` and stay free. Registered by class name: timm is never imported here.
COUNTED_BY: dict[str, tuple[str, tuple[str, ...]]] = {}


def declared(model: nn.Module, groups: list[Group]) -> Ties | None:
    """Count ties the model's classes state (``COUNTED_BY``): in each module of such a class, the groups living
    wholly inside it, produced by one of the named children, whose size is the attribute's value (whole heads:
    one count each) keep one count. Still proven like every tie: the dry run must match every op shape of the
    plan and the plan must compute the reference."""
    ties = Ties()
    for name, mod in model.named_modules():
        attr, children = COUNTED_BY.get(f"{type(mod).__module__}.{type(mod).__name__}", (None, ()))
        n = getattr(mod, attr, None) if attr and name else None
        if not isinstance(n, int) or n < 2:
            continue
        made = tuple(f"{name}.{c}" for c in children)
        inner = [g for g in groups if g.size == n and g.block is None
                 and all(_inside(m.module, name) for m in g.members)
                 and any(m.kind == "out" and any(_inside(m.module, c) for c in made) for m in g.members)]
        for g in inner[1:]:
            ties.tie(inner[0], g, name, per=1)
    return ties or None
