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

Detection is by hypothesis and proof, not by reading code: when a plan's dry run fails inside a module, the groups
pruned wholly inside that module (and every module of its class: the same code) are tied to the groups that carry
the module's input from outside (the stream), the plan is re-chosen, and the tie is kept only if the dry run then
no longer fails in that class. Where no common width below the full one exists (a one-head attention with whole
heads), the tied groups keep every channel, which is what the dry run's fallback did before."""
from __future__ import annotations

import torch

from secateur.graph.groups import Group


class Ties:
    """Union-find over groups (by id): every class must keep the same width (kept channels x ``width``)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.groups: dict[int, Group] = {}
        self.where: dict[int, str] = {}  # root id -> the module class whose dry run showed the tie

    def find(self, g: int) -> int:
        while self.parent.get(g, g) != g:
            g = self.parent[g]
        return g

    def tie(self, a: Group, b: Group, where: str) -> None:
        self.groups[id(a)], self.groups[id(b)] = a, b
        ra, rb = self.find(id(a)), self.find(id(b))
        if ra != rb:
            self.parent[rb] = ra
            self.where[ra] = self.where.get(ra) or self.where.pop(rb, None) or where

    def classes(self) -> list[list[Group]]:
        out: dict[int, list[Group]] = {}
        for i, g in self.groups.items():
            out.setdefault(self.find(i), []).append(g)
        return [v for v in out.values() if len(v) > 1]

    def copy(self) -> "Ties":
        new = Ties()
        new.parent, new.groups, new.where = dict(self.parent), dict(self.groups), dict(self.where)
        return new

    def __bool__(self) -> bool:
        return bool(self.parent)


def width(g: Group) -> int | None:
    """Positions per channel in the narrowest member (a whole head: head_dim columns of the output projection; a
    stream or head-dim channel: 1); None where the members do not say one width (then the tie is not met)."""
    best = None
    for m in g.members:
        per = torch.bincount(m.channel, minlength=g.size)
        if bool((per == per[0]).all()) and int(per[0]) > 0:
            best = int(per[0]) if best is None else min(best, int(per[0]))
    return best


def _inside(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def candidates(groups: list[Group], chosen: set[int], scope: str) -> list[tuple[Group, Group]]:
    """(inner, stream) pairs to tie for one module ``scope``. Stream groups enter the module (a consumer inside)
    and have members outside it. Inner groups are pruned in the plan (``chosen`` ids), live wholly inside the
    module, and are read by a layer there that writes a group leaving the module (the output projection: what
    ``reshape(B, N, C)`` feeds); a group read only inside (a position-bias MLP's hidden units, a reduction conv
    feeding k/v) is not what the input's shape sizes. Empty where either is missing."""
    inner, stream, leaving = [], [], set()
    for g in groups:
        ins = [_inside(m.module, scope) for m in g.members]
        if all(ins):
            if id(g) in chosen and any(m.kind == "out" for m in g.members):
                inner.append(g)
        else:
            if any(i and m.consumer for i, m in zip(ins, g.members)):
                stream.append(g)
            leaving |= {m.module for i, m in zip(ins, g.members) if i and m.kind == "out"}
    inner = [g for g in inner if any(m.consumer and m.module in leaving for m in g.members)]
    return [(a, s) for a in inner for s in stream]
