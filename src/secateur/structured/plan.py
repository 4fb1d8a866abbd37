"""What a structural plan is: the groups chosen and their channels (``Plan``), what ``prune_channels`` returns
(``StructuredResult``), and where a pruned model keeps its structure record (``STRUCTURE_ATTR``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateur.graph.groups import Group, NormSite


STRUCTURE_ATTR = "_secateur_structure"



@dataclass
class Plan:
    """What will be removed: ``removed[(module, tensor)][dim] = positions``; ``choices`` pairs each group with the
    channels (0..size-1) chosen in it. ``notes`` say where removal is not the same as zeroing (kept channels)."""
    groups: list[Group]
    choices: list[tuple[Group, torch.Tensor]]
    notes: list[str] = field(default_factory=list)
    heads: str = "heads"  # "head_dim": attention units are per-head dims (size attributes follow that)
    norms: list[NormSite] = field(default_factory=list)
    # sizes the model keeps in its own attributes, set after slicing: {module: {attr: value}}; only values the
    # dry run proved (graph/size_attrs.py), each one written in ``notes``
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def removed(self) -> dict[tuple[str, str], dict[int, torch.Tensor]]:
        out: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {}
        for g, chans in self.choices:
            pick = torch.zeros(g.size, dtype=torch.bool)
            pick[chans] = True
            same: dict[tuple[bytes, bytes], torch.Tensor] = {}  # a group's members mostly hold the same positions
            for m in g.members:  # (a conv's rows, its norm's four vectors, the next conv's columns): one gather each
                key = (m.index.numpy().tobytes(), m.channel.numpy().tobytes())
                pos = same.get(key)
                if pos is None:
                    pos = same[key] = m.index[pick[m.channel]]
                if pos.numel():
                    out.setdefault((m.module, m.name), {}).setdefault(m.dim, []).append(pos)
        # one piece (the common case: one group per tensor dim) is sorted and unique already (Member.index is)
        return {k: {d: v[0] if len(v) == 1 else torch.unique(torch.cat(v)) for d, v in dims.items()}
                for k, dims in out.items()}

    @property
    def channels(self) -> int:
        return sum(int(c.numel()) for _, c in self.choices)

    def zero_consumers(self, model: nn.Module) -> None:
        """The pruning oracle's reference: zero the chosen channels where they enter their consumers. A grouped
        conv's input (a, j) is read only by group a's rows of weight[:, j]; a unit holds (a, j) for every group a,
        so zeroing weight[:, j] (the member's dim-1 slice) zeroes exactly those inputs."""
        with torch.no_grad():
            for g, chans in self.choices:
                pick = torch.zeros(g.size, dtype=torch.bool)
                pick[chans] = True
                for m in g.members:
                    if m.consumer:
                        t = m.tensor(model)
                        t.index_fill_(m.dim, m.index[pick[m.channel]].to(t.device), 0)

    def apply(self, model: nn.Module) -> dict[str, Any]:
        from secateur.structured.apply import _apply
        return _apply(model, self)

    def _norm_keeps(self) -> list[tuple[NormSite, torch.Tensor]]:
        """(site, kept positions) for every normalisation that loses channels under this plan."""
        picks = {id(g): chans for g, chans in self.choices}
        out = []
        for site in self.norms:
            drop = torch.zeros(site.size, dtype=torch.bool)
            for g, idx, chan in site.parts:
                if id(g) in picks:
                    pick = torch.zeros(g.size, dtype=torch.bool)
                    pick[picks[id(g)]] = True
                    drop[idx[pick[chan]]] = True
            if drop.any():
                out.append((site, (~drop).nonzero().flatten()))
        return out

    def norm_notes(self) -> list[str]:
        """One note per normalisation whose statistics change (removal is not zeroing there)."""
        seen = dict.fromkeys(f"{s.where}: {s.op} normalises over pruned channels; its statistics now cover the "
                             f"kept channels only (removal is not zeroing there; reference: Plan.kept_norms)"
                             for s, _ in self._norm_keeps())
        return list(seen)

    def kept_norms(self, model: nn.Module):
        """Context manager for the oracle where removal is not zeroing: inside it, ``model`` (an unpruned copy,
        usually after ``zero_consumers``) computes every normalisation this plan shrinks over the kept channels
        only. ``with plan.kept_norms(ref): want = ref(x)`` then equals the pruned model's output."""
        from secateur.graph.reference import kept_norms
        return kept_norms(model, self._norm_keeps())


@dataclass
class StructuredResult:
    description: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups_pruned: int
    channels_pruned: int
    plans: list[Plan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # target_latency only, as fractions of the dense model: the table's estimate of the applied plan, its
    # measured latency (None unless verify measured it), and every allocation round (secateur.latency_target)
    latency_estimate: float | None = None
    latency_measured: float | None = None
    latency_rounds: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        return self.description


# ---------------------------------------------------------------- choosing
