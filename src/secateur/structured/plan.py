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
    channels (0..size-1) chosen in it. ``notes`` say where removal is not the same as zeroing (kept channels).

    A fused-experts group (``Group.experts`` = E) may choose per expert: its choice is ``[E, n]`` (each row one
    expert's channels), and its members' positions are then ``[E, k]`` too, batched over the tensor's dim 0 (row
    ``e`` along ``dim`` of slice ``e``): sliced by one gather (structured/apply.py ``_take_per_slice``)."""
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
            if chans.dim() == 2:  # per expert
                for m in g.members:
                    pos = per_slice_positions(m, chans, g.size)
                    out.setdefault((m.module, m.name), {}).setdefault(m.dim, []).append(pos)
                continue
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
        return {k: {d: v[0] if len(v) == 1 else _merge(v) for d, v in dims.items()} for k, dims in out.items()}

    def __repr__(self) -> str:
        """A summary, not the index tensors (printing the plan of a small LLaMA used to fill screens)."""
        pruned = sum(1 for _, c in self.choices if c.numel())
        attrs = f", size attributes of {len(self.attrs)} modules" if self.attrs else ""
        return (f"Plan({pruned} of {len(self.groups)} groups pruned, {self.channels:,} channels removed, "
                f"heads={self.heads!r}{attrs}, {len(self.notes)} notes)")

    @property
    def channels(self) -> int:
        return sum(int(c.numel()) for _, c in self.choices)

    def zero_consumers(self, model: nn.Module) -> None:
        """The pruning oracle's reference: zero the chosen channels where they enter their consumers. A grouped
        conv's input (a, j) is read only by group a's rows of weight[:, j]; a unit holds (a, j) for every group a,
        so zeroing weight[:, j] (the member's dim-1 slice) zeroes exactly those inputs."""
        with torch.no_grad():
            for g, chans in self.choices:
                if chans.dim() == 2:  # per expert: each expert's own positions along the member's dim
                    for m in g.members:
                        if m.consumer:
                            _zero_per_slice(m.tensor(model), m.dim, per_slice_positions(m, chans, g.size))
                    continue
                pick = torch.zeros(g.size, dtype=torch.bool)
                pick[chans] = True
                for m in g.members:
                    if m.consumer:
                        t = m.tensor(model)
                        t.index_fill_(m.dim, m.index[pick[m.channel]].to(t.device), 0)

    def apply(self, model: nn.Module) -> dict[str, Any]:
        """Remove the plan's channels from ``model`` (the model it was made for, or a fresh copy of it); a model that
        differs, or holds masks, gets a PruningError and is left as it was."""
        from secateur.structured.apply import _apply, check_extents
        _applicable(model, "Plan.apply")
        check_extents(model, self)
        return _apply(model, self)

    def apply_checked(self, model: nn.Module, example_inputs: Any) -> float:
        """Apply the plan to ``model`` and return the pruning oracle's relative error on ``example_inputs``: the
        pruned model's first output against an unpruned copy with the chosen channels zeroed at their consumers
        (``zero_consumers``) and shrunk normalisations computed over the kept channels (``kept_norms``),
        ``max|got - want| / max|want|``. Both forwards run in eval mode without gradients (the model's mode is
        restored). The proof costs one copy of the model and two forwards; it is vacuous, and NaN is returned,
        when the reference output is all zeros (a zero-initialised head, as torchvision's ViT has)."""
        import copy

        from secateur.errors import check_model_inputs, inputs_rejected
        from secateur.graph.capture import _flat_tensors, call
        from secateur.modes import statistics_kept
        check_model_inputs(model, example_inputs, "Plan.apply_checked")
        _applicable(model, "Plan.apply_checked")
        from secateur.structured.apply import check_fits
        check_fits(model, self)
        ref = copy.deepcopy(model).eval()
        self.zero_consumers(ref)
        with torch.no_grad(), self.kept_norms(ref), inputs_rejected(model, example_inputs):
            want = _flat_tensors(call(ref, example_inputs))[0]
        del ref
        with statistics_kept(model, eval=True):
            self.apply(model)
            with torch.no_grad():
                got = _flat_tensors(call(model, example_inputs))[0]
        scale = want.abs().max()
        if got.shape != want.shape:
            from secateur.errors import fail
            raise fail("the pruned model's output shape differs from the original's (value: the original's)",
                       where="Plan.apply_checked", shape=tuple(got.shape), value=tuple(want.shape))
        return float("nan") if not scale else float((got - want).abs().max() / scale)

    def _norm_keeps(self) -> list[tuple[NormSite, torch.Tensor]]:
        # (an experts group never has a norm over its channels: graph/moe.py refuses has_post_expert_norm)
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


def _applicable(model: Any, where: str) -> None:
    from secateur.errors import fail
    if not isinstance(model, nn.Module):
        raise fail("model must be an nn.Module", where=where, value=type(model).__name__)
    from secateur.structured.choose import _refuse_masked
    _refuse_masked(model)


def per_slice_positions(m, chans: torch.Tensor, size: int) -> torch.Tensor:
    """Member ``m``'s positions of per-expert channels ``chans [E, n]``: ``[E, k]``, each row sorted (``m.index``
    is), the same count in every row (``m.channel`` gives each channel as many positions in every expert)."""
    pick = torch.zeros(chans.size(0), size, dtype=torch.bool)
    pick.scatter_(1, chans, True)
    sel = pick[:, m.channel]  # [E, len(index)]
    return m.index.expand(chans.size(0), -1)[sel].reshape(chans.size(0), -1)


def _zero_per_slice(t: torch.Tensor, dim: int, pos: torch.Tensor) -> None:
    """Zero positions ``pos[e]`` along ``dim`` of slice ``t[e]`` (dim 0 indexes the experts), in place."""
    keep = torch.ones(t.size(0), t.size(dim), dtype=torch.bool, device=t.device)
    keep.scatter_(1, pos.to(t.device), False)
    shape = [t.size(d) if d in (0, dim) else 1 for d in range(t.dim())]
    t.masked_fill_(~keep.reshape(shape), 0)


def _merge(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Positions of several groups along one dim: 1-d pieces unite; with a per-expert ``[E, k]`` piece, each 1-d
    piece is removed from every expert and rows unite (groups own disjoint positions)."""
    if all(p.dim() == 1 for p in pieces):
        return torch.unique(torch.cat(pieces))
    e = next(p.size(0) for p in pieces if p.dim() == 2)
    return torch.cat([p if p.dim() == 2 else p.expand(e, -1) for p in pieces], 1).sort(1).values


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
