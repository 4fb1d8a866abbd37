"""Choose how many channels each group keeps so the model meets a target cost with the least importance lost.

Why an allocator: a uniform ratio ("50 % of every layer") ignores that layers differ in how much
time a channel costs and in how much a channel matters. HALP (Shen et al., NVIDIA) frames channel
pruning as a knapsack: keep the channels whose importance per unit of latency is highest, under a
latency budget. The cost is a black box over the vector of keep counts, so the same allocator serves a
latency target (`secateur.latency_model.LatencyTable.cost_fn`), a MACs target or a parameter target.

The solver is greedy with lazy re-evaluation: repeatedly take the step (one group down to one of its
next few allowed counts that save cost) that loses the least importance per unit of cost saved. Steps are evaluated
with the *whole* count vector, so couplings (a producer's output count is the consumer's input count)
are priced correctly. Allowed counts come from the latency staircase (`LatencyTable.candidates`), a
rounding multiple, or all counts; flat parts of the cost are walked past, never taken.

Everything here is a pure function of its inputs: no model is touched."""
from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from secateur.errors import fail

__all__ = ["channel_counts", "group_counts", "latency_choices", "separable", "as_ratios", "round_candidates",
           "NORMALIZERS"]

CostFn = Callable[[Sequence[int]], float]

NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda s: s,
    "mean": lambda s: s / s.mean().clamp_min(1e-12),   # groups of different scale become comparable
    "max": lambda s: s / s.max().clamp_min(1e-12),
    "sum": lambda s: s / s.sum().clamp_min(1e-12),
}


BUDGET_SLACK = 1e-9  # relative: costs within this of the budget count as within it


def separable(per_group: Sequence[Callable[[int], float]]) -> CostFn:
    """A total cost that is a sum of independent per-group costs ``f_g(k_g)``."""
    fns = list(per_group)
    return lambda counts: float(sum(f(k) for f, k in zip(fns, counts)))


def round_candidates(channels: int, multiple: int) -> list[int]:
    """Counts that are multiples of ``multiple`` (and the full count): Torch-Pruning's ``round_to``."""
    if multiple < 1:
        raise fail("rounding multiple must be positive", value=multiple)
    return sorted({c for c in range(multiple, channels + 1, multiple)} | {channels})


def as_ratios(names: Sequence[str], counts: Sequence[int], channels: Sequence[int]) -> dict[str, float]:
    """Per-group pruning ratios ``1 - kept / channels``, the form the structural engine consumes."""
    return {n: 1.0 - k / c for n, k, c in zip(names, counts, channels)}


def _label(group: Any, i: int) -> str:
    name = getattr(group, "name", None)
    return str(name) if name is not None else (group if isinstance(group, str) else f"group {i}")


def _floor(min_keep: int | float, channels: int, where: str) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or min_keep <= 0:
        raise fail("min_keep must be a positive count or a fraction in (0, 1]", where=where, value=min_keep)
    if isinstance(min_keep, float):
        if min_keep > 1:
            raise fail("a fractional min_keep must be in (0, 1]", where=where, value=min_keep)
        return max(1, math.ceil(min_keep * channels))
    return min(min_keep, channels)


class _Group:
    """One group's state: sorted importance prefix sums and allowed counts."""

    def __init__(self, label: str, scores: torch.Tensor, allowed: Sequence[int], floor: int):
        self.label = label
        self.channels = scores.numel()
        s = torch.sort(scores.double().flatten()).values
        self.prefix = [0.0] + torch.cumsum(s, 0).tolist()   # prefix[r]: loss of removing the r lowest
        full = self.channels
        self.allowed = sorted({c for c in allowed if floor <= c <= full} | {full})

    def loss(self, keep_from: int, keep_to: int) -> float:
        """Importance removed when going from ``keep_from`` to ``keep_to`` channels (lowest go first)."""
        return self.prefix[self.channels - keep_to] - self.prefix[self.channels - keep_from]

    def below(self, k: int) -> list[int]:
        """Allowed counts under ``k``, nearest first."""
        return self.allowed[:self.allowed.index(k)][::-1]


def channel_counts(groups: Sequence[Any], importance: Sequence[torch.Tensor] | Mapping[Any, torch.Tensor],
                   cost_fn: CostFn, target: float | None = None, *, budget: float | None = None,
                   candidates: Sequence[Sequence[int] | None] | None = None, min_keep: int | float = 1,
                   normalize: str = "mean", lookahead: int = 4, rank_fn: CostFn | None = None) -> list[int]:
    """Keep counts per group (aligned with ``groups``) such that ``cost_fn(counts) <= budget``.

    ``importance[g]`` holds one score per channel of group ``g`` (higher = more important; its length
    is the group's channel count). ``target`` is a reduction factor of the dense cost (2.0 = half the
    latency / MACs / params); ``budget`` is an absolute cost instead; give exactly one. ``candidates[g]``
    lists the counts group ``g`` may keep (None: any count); ``min_keep`` is a floor per group (a count,
    or a fraction of its channels) so that no layer collapses. ``normalize`` rescales each group's
    scores (see `NORMALIZERS`) so that scores of different layers can be compared.

    ``rank_fn`` (default ``cost_fn``) is the cost whose savings rank the steps while ``cost_fn`` only
    decides when to stop: ``cost_fn`` = MACs and ``rank_fn`` = latency meets a MACs target with the
    channels that buy the most time (steps that save MACs but no time come last).

    Raises `PruningError` if the budget cannot be met within the floors and allowed counts."""
    groups = list(groups)
    scores = [importance[g] for g in groups] if isinstance(importance, Mapping) else list(importance)
    if len(scores) != len(groups):
        raise fail("need one importance vector per group", value=(len(groups), len(scores)))
    if normalize not in NORMALIZERS:
        raise fail("unknown importance normalizer", value=normalize, hint=f"use one of {sorted(NORMALIZERS)}")
    if (target is None) == (budget is None):
        raise fail("give exactly one of target (a reduction factor) and budget (an absolute cost)",
                   value={"target": target, "budget": budget})
    if target is not None and not (isinstance(target, (int, float)) and target >= 1):
        raise fail("target is a reduction factor and must be >= 1 (2.0 = twice as fast / small)", value=target)
    if not isinstance(lookahead, int) or lookahead < 1:
        raise fail("lookahead must be a positive integer", value=lookahead)
    if candidates is not None and len(candidates) != len(groups):
        raise fail("need one candidate list (or None) per group", value=(len(groups), len(candidates)))

    state = []
    for i, (g, s) in enumerate(zip(groups, scores)):
        label = _label(g, i)
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise fail("importance must be a non-empty 1-D tensor per group", where=label,
                       shape=getattr(s, "shape", None))
        if not torch.isfinite(s).all():
            raise fail("importance has NaN or infinite scores", where=label, shape=s.shape)
        expect = getattr(g, "channels", g if isinstance(g, int) and not isinstance(g, bool) else None)
        if expect is not None and expect != s.numel():
            raise fail("importance length differs from the group's channel count", where=label,
                       shape=s.shape, value=expect)
        allowed = candidates[i] if candidates is not None and candidates[i] is not None else range(1, s.numel() + 1)
        state.append(_Group(label, NORMALIZERS[normalize](s.detach().float()), list(allowed),
                            _floor(min_keep, s.numel(), label)))

    counts = [st.channels for st in state]
    current = float(cost_fn(counts))
    limit = current / target if budget is None else float(budget)
    limit *= 1 + BUDGET_SLACK  # a budget met to rounding is met (target 1 + 1 ulp must not demand a removal)
    return _greedy(state, counts, current, limit, _Costs(cost_fn, rank_fn), lookahead)


class _Costs:
    """The budget cost and the ranking cost of a count vector (one call when they are the same)."""

    def __init__(self, budget: CostFn, rank: CostFn | None):
        self.budget, self.rank = budget, rank

    def __call__(self, counts: Sequence[int]) -> tuple[float, float]:
        b = float(self.budget(counts))
        return b, (b if self.rank is None else float(self.rank(counts)))


def _best_step(st: _Group, g: int, counts: list[int], current: tuple[float, float], costs: _Costs,
               lookahead: int) -> tuple[tuple[int, float], int, tuple[float, float]] | None:
    """(priority, new count, new costs) of group ``g``'s best next step; priority is (0 if the ranking
    cost drops else 1, importance lost per unit of ranking cost saved), smaller first.

    Walks down the allowed counts past flat parts of both costs (no saving) and compares the first
    ``lookahead`` counts that do save something, so a staircase never traps a group on a step."""
    best = None
    k = counts[g]
    seen = 0
    for k2 in st.below(k):
        counts[g] = k2
        new = costs(counts)
        counts[g] = k
        if current[0] - new[0] <= 0:
            continue
        loss = st.loss(k, k2)
        rank_gain = current[1] - new[1]
        prio = (0, loss / rank_gain) if rank_gain > 0 else (1, loss / (current[0] - new[0]))
        if best is None or prio < best[0]:
            best = (prio, k2, new)
        if rank_gain > 0:  # flat parts of the ranking cost (a latency step) are walked past as well
            seen += 1
            if seen >= lookahead:
                break
    return best


def _scored_groups(model: Any, candidates: Sequence[Any], importance: Any, skip: Callable[[Any], bool] | None,
                   score_options: Mapping[str, Any]) -> tuple[list[Any], list[torch.Tensor]]:
    """The graph's groups that can lose channels (scored, more than one channel, not skipped)."""
    from secateur.importance import group_scores
    groups, scores = [], []
    for g in candidates:
        if g.size <= 1 or (skip is not None and skip(g)):
            continue
        s = group_scores(g, model, importance, **score_options)
        if s is not None:
            groups.append(g)
            scores.append(s)
    return groups, scores


def group_counts(model: Any, example_inputs: Any, target: float, *, metric: str = "latency",
                 rank: str | None = None, table: Any = None, importance: Any = "l1",
                 round_to: int | None = None, min_keep: int | float = 1, graph: Any = None,
                 skip: Callable[[Any], bool] | None = None, score_options: Mapping[str, Any] | None = None,
                 **table_options: Any) -> list[tuple[Any, int]]:
    """Keep counts for the structural engine's groups of ``model``: the bridge from `channel_counts` to
    ``secateur.structured`` (`latency_choices` turns them into the channels to remove).

    ``metric`` ("latency", "macs" or "params") is what ``target`` reduces; ``rank`` (default: the
    same) is what the steps are ranked by, e.g. ``metric="macs", rank="latency"`` meets a MACs target
    with the channels that buy the most time. Latency needs a measured `LatencyTable` (``table``, or
    built here with ``table_options``). Returns ``[(group, keep), ...]`` for the groups with scores;
    ``skip(group)`` leaves a group out (it keeps every channel), ``score_options`` go to ``group_scores``.
    MACs and params count the Conv/Linear layers the groups touch: the rest of the model is fixed."""
    from secateur.graph import build_graph
    from secateur.latency_model import LatencyTable

    graph = graph or build_graph(model, example_inputs)
    groups, scores = _scored_groups(model, graph.groups, importance, skip, score_options or {})
    if not groups:  # nothing can lose channels: a reduction is out of reach, as channel_counts says it is
        if isinstance(target, (int, float)) and target > 1 + BUDGET_SLACK:
            raise fail("the cost target cannot be reached: no group can lose channels (the model's outputs, "
                       "ignored and skipped groups keep theirs)", value={"reached_fraction_of_dense": 1.0})
        return []
    needs_time = "latency" in (metric, rank)
    if table is None:
        table = (LatencyTable.build(model, example_inputs, **table_options) if needs_time
                 else LatencyTable.shapes_only(model, example_inputs))
    members = table.members_of(groups)
    sizes = [g.size for g in groups]
    cost = table.cost_fn(members, metric, sizes=sizes)
    rank_fn = None if rank in (None, metric) else table.cost_fn(members, rank, sizes=sizes)
    # round_to counts a layer's channels: a group channel can be several (`Group.unit`, grouped convs)
    cands = [round_candidates(g.size, round_to // math.gcd(round_to, getattr(g, "unit", 1))) for g in groups] \
        if round_to else None
    counts = channel_counts(groups, scores, cost, target, candidates=cands, min_keep=min_keep, rank_fn=rank_fn)
    return list(zip(groups, counts))


def latency_choices(model: Any, example_inputs: Any, target_latency: float, *, table: Any = None,
                    importance: Any = "l1", round_to: int | None = None, min_keep: int | float = 1,
                    graph: Any = None, skip: Callable[[Any], bool] | None = None,
                    score_options: Mapping[str, Any] | None = None) -> list[tuple[Any, torch.Tensor]]:
    """``[(group, channels to remove), ...]`` so that the table's estimated latency is at most
    ``target_latency`` times today's (0.5 = twice as fast), in the form of ``structured.Plan.choices``:
    the allocator picks the counts, each group drops its lowest-scored channels. Nothing is changed.
    Every group keeps at least ``min_keep`` (>= 1) channels; an unreachable target raises `PruningError`
    with the best estimate reached."""
    from secateur.graph import build_graph
    from secateur.latency_model import LatencyTable

    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) \
            or not 0.0 < target_latency < 1.0:
        raise fail("target_latency is a fraction of the current latency in (0, 1) (0.5 = twice as fast)",
                   where="target_latency", value=target_latency)
    if table is not None and not isinstance(table, LatencyTable):
        raise fail("latency_table must be a secateur.latency_model.LatencyTable", where="latency_table",
                   value=type(table).__name__, hint="build one with LatencyTable.build(model, example_inputs)")
    graph = graph or build_graph(model, example_inputs)
    options = dict(score_options or {})
    counts = group_counts(model, example_inputs, 1.0 / target_latency, metric="latency", table=table,
                          importance=importance, round_to=round_to, min_keep=min_keep, graph=graph, skip=skip,
                          score_options=options)
    _, scores = _scored_groups(model, [g for g, _ in counts], importance, None, options)
    return [(g, torch.argsort(s, stable=True)[: g.size - k]) for (g, k), s in zip(counts, scores) if k < g.size]


def _fresh_heap(state: list[_Group], counts: list[int], current: tuple[float, float], costs: _Costs,
                lookahead: int) -> list[tuple[tuple[int, float], int]]:
    heap = []
    for g, st in enumerate(state):
        step = _best_step(st, g, counts, current, costs, lookahead)
        if step is not None:
            heap.append((step[0], g))
    heapq.heapify(heap)
    return heap


def _greedy(state: list[_Group], counts: list[int], budget_now: float, limit: float, costs: _Costs,
            lookahead: int) -> list[int]:
    """Lazy greedy: a popped step is re-priced against the current counts and taken only if it is still
    no worse than the best stale price left in the heap (prices rarely improve as others shrink)."""
    current = costs(counts)
    heap = _fresh_heap(state, counts, current, costs, lookahead)
    while current[0] > limit:
        if not heap:  # coupled costs: a group without a saving step may have gained one meanwhile
            heap = _fresh_heap(state, counts, current, costs, lookahead)
        if not heap:
            raise fail("the cost target cannot be reached within the per-group floors and allowed counts",
                       value={"reached": current[0], "budget": limit,
                              "reached_fraction_of_dense": round(current[0] / budget_now, 4)},
                       hint="lower min_keep, allow more channel counts, or ask for a smaller reduction")
        _, g = heapq.heappop(heap)
        step = _best_step(state[g], g, counts, current, costs, lookahead)
        if step is None:
            continue
        if heap and step[0] > heap[0][0]:
            heapq.heappush(heap, (step[0], g))
            continue
        counts[g], current = step[1], step[2]
        nxt = _best_step(state[g], g, counts, current, costs, lookahead)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], g))
    return _refill(state, counts, current, limit, costs)


def _refill(state: list[_Group], counts: list[int], current: tuple[float, float], limit: float,
            costs: _Costs) -> list[int]:
    """Give back what the last (possibly large) steps overshot: while the budget allows, raise the
    group whose next allowed count regains the most importance per unit of ranking cost added."""
    while True:
        best = None
        for g, st in enumerate(state):
            k = counts[g]
            idx = st.allowed.index(k)
            if idx + 1 == len(st.allowed):
                continue
            k2 = st.allowed[idx + 1]
            counts[g] = k2
            new = costs(counts)
            counts[g] = k
            if new[0] > limit:
                continue
            added = new[1] - current[1]
            gain = st.loss(k2, k)  # importance regained
            prio = gain / added if added > 0 else math.inf
            if best is None or prio > best[0]:
                best = (prio, g, k2, new)
        if best is None:
            return counts
        _, g, k2, current = best
        counts[g] = k2
