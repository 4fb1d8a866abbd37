"""A MACs (or params) target met by the plan a latency table rates fastest.

Why: "4x fewer MACs" is met by many plans, and they do not run equally fast. The HALP-style greedy
(`secateur.allocate.channel_counts` with ``rank_fn`` = latency) removes first the channels that lose the least
importance per second saved, but it stops on MACs, and nothing in it asks for the fastest plan at that budget: on
ConvNeXt-T it cuts the residual streams to 16-32 channels, keeps every MLP hidden channel, and by its own table
that plan is slower than the uniform one (2.54x vs 3.17x at 4x). So several plans that meet the target are
built and the one with the least *estimated* latency is kept:

- ``"uniform"``: the engine's own ratio plan (``structured/targets.py _target_plan``: one ratio, or the global budget with
  ``scope="global"``), the baseline the result can never be slower than (by the table);
- ``"greedy"``: the MACs budget met removing the least importance per second saved (the HALP ranking);
- ``"latency"``: HALP proper, a latency budget met with the least importance lost, the budget bisected until
  the plan meets the MACs target (the fastest plan the allocator finds at the given importance trade-off).

Every count is the engine's exact count of the plan (`structured/targets.py _Counter`: every parameter's kept shape, and
for MACs the model's whole count, on a meta skeleton where MACs lie outside Conv/Linear leaves such as
``nn.MultiheadAttention``'s input projection), never the table's modules. Every estimate is the table's whole-model
estimate (`LatencyTable.estimate`) of the plan applied to a meta skeleton, so all options are rated alike."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from secateur.errors import PruningError, fail

__all__ = ["PlanOption", "fastest_plan", "plan_latency", "OPTIONS"]

OPTIONS = ("uniform", "greedy", "latency")
TOLERANCE = 0.02   # an allocator's budget is bisected until its plan removes at most 2 % more than asked
OVERSHOOT = 0.05   # ... and the plan is passed over if it removes more than 5 % more (or than uniform does):
                   # a plan that is faster only because it removes more is not the answer to the target
STEPS = 14         # bisection steps on an allocator's budget


@dataclass(frozen=True)
class PlanOption:
    """One plan that was considered: its name (`OPTIONS`), its exact count (MACs or params) as a fraction
    of the dense model's, and the table's estimated latency as a fraction of the dense model's."""

    name: str
    count: float
    latency: float


def plan_latency(model: nn.Module, plan: Any, table: Any) -> float:
    """The table's estimated seconds of ``model`` with ``plan`` applied (on a meta skeleton: nothing changes)."""
    from secateur.graph.verify import skeleton
    sk = skeleton(model)
    if plan.choices:
        plan.apply(sk)
    return table.estimate(sk)


def fastest_plan(model: nn.Module, example_inputs: Any, fraction: float, what: str, table: Any, opts: dict,
                 *, options: Sequence[str] = OPTIONS, measure: bool = False,
                 repeats: int = 10) -> tuple[Any, list[PlanOption]]:
    """The plan with the least estimated latency among ``options`` that keep at most ``fraction`` of the
    model's MACs (``what="macs"``) or params (``"params"``), and every option considered (the kept one first).

    ``opts`` are `structured.prune_channels`'s planning options (importance, round_to, ignore, ...). The
    uniform plan is always built (it is the fallback); an allocator option that cannot meet the target, or
    that removes more than `OVERSHOOT` beyond it and more than the uniform plan does, is passed over. Ties go
    to the uniform plan. ``measure``: every option that meets the target is applied to a copy and timed against
    the model here (interleaved, ``repeats`` rounds, `secateur.latency.compare_latency`), and the fastest
    *measured* is kept: the table ranks plans from layers timed apart, which can misorder close plans."""
    from secateur.latency_model import LatencyTable
    from secateur.structured.targets import _Counter, _target_plan

    if not isinstance(table, LatencyTable):
        raise fail("latency_table must be a secateur.latency_model.LatencyTable", where="latency_table",
                   value=type(table).__name__, hint="build one with LatencyTable.build(model, example_inputs)")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise fail("unknown plan option", where="fastest_plan", value=unknown, hint=f"use some of {OPTIONS}")
    if opts.get("heads", "heads") != "heads":
        raise fail("a latency table picks whole-head counts only; give heads='heads'", where="prune_channels",
                   value=opts["heads"])
    dense = table.estimate(model)  # every table layer is found in this model, before anything is planned
    uniform = _target_plan(model, example_inputs, fraction, what, opts)
    own = _Counter(model, example_inputs, uniform.groups, what)
    found = [(PlanOption("uniform", own.exact(uniform.choices) / max(own.total, 1),
                         plan_latency(model, uniform, table) / dense), uniform)]
    graph, counter, missing = None, own, []
    allocated = [o for o in options if o != "uniform"]
    if allocated:
        graph, alloc = _allocator(model, example_inputs, what, table, opts)
        counter = _Counter(model, example_inputs, graph.groups, what)
        goal = fraction * counter.total
        for name in allocated:
            if name == "greedy":  # from the table's own count of the target
                plan = _calibrated(alloc[name], counter, graph, goal, alloc[name][1] * fraction)
            else:
                plan = _latency_option(alloc[name], counter, graph, goal, alloc[name][1] * found[0][0].latency)
            if plan is not None:
                found.append((PlanOption(name, counter.exact(plan.choices) / max(counter.total, 1),
                                         plan_latency(model, plan, table) / dense), plan))
            else:
                missing.append(name)
    timer = (lambda plans: measured_fractions(model, example_inputs, plans, repeats)) if measure else None
    plan, options = _pick(model, example_inputs, found, fraction, counter, graph,
                          lambda p: plan_latency(model, p, table) / dense, timer)
    if missing:
        plan.notes[-1] += f"; no plan faster than uniform that meets the target from: {', '.join(missing)}"
    return plan, options


def _allocator(model: nn.Module, example_inputs: Any, what: str, table: Any, opts: dict
               ) -> tuple[Any, dict[str, tuple[Callable[[float], list], float]]]:
    """The graph and, per allocator option, (choices for a budget, the dense value of that budget's cost)."""
    from secateur.allocate import _scored_groups, channel_counts, round_candidates
    from secateur.graph.groups import build_graph
    from secateur.structured.choose import _ignored, _is_ignored

    graph = build_graph(model, example_inputs, grouped=opts["grouped"])
    ignored, ignored_in = _ignored(model, opts["ignore"]), _ignored(model, opts["ignore_inputs"])
    groups, scores = _scored_groups(model, graph.groups, opts["importance"],
                                    lambda g: _is_ignored(g, ignored, ignored_in),
                                    dict(reduce=opts["reduce"], normalize=opts["normalize"]))
    sizes = [g.size for g in groups]
    members = table.members_of(groups)
    cost = table.cost_fn(members, what, sizes=sizes)        # the table's layers: only steers, never decides
    latency = table.cost_fn(members, "latency", sizes=sizes)
    round_to = opts["round_to"]
    cands = [round_candidates(g.size, round_to // math.gcd(round_to, g.unit)) for g in groups] \
        if round_to else None

    def choices(counts: Sequence[int]) -> list:
        return [(g, torch.argsort(s, stable=True)[: g.size - k]) for g, s, k in zip(groups, scores, counts)
                if k < g.size]

    def greedy(budget: float) -> list:
        return choices(channel_counts(groups, scores, cost, budget=budget, candidates=cands, rank_fn=latency))

    def halp(budget: float) -> list:
        return choices(channel_counts(groups, scores, latency, budget=budget, candidates=cands))

    return graph, {"greedy": (greedy, cost(sizes)), "latency": (halp, latency(sizes))}


def _latency_option(alloc: tuple[Callable[[float], list], float], counter: Any, graph: Any, goal: float,
                    uniform: float) -> Any:
    """HALP's plan for the largest latency budget under the uniform plan's estimate ``uniform`` (seconds) that
    meets ``goal``; None when the plan *at* that budget meets it already: a larger budget would give a plan
    about as slow as uniform or slower (the greedy stops just under its budget), with more importance kept only
    by spending time the uniform plan does not spend."""
    fn, _ = alloc
    try:
        at_uniform = fn(uniform)
    except PruningError:
        at_uniform = None
    if at_uniform is not None and counter.exact(at_uniform) <= goal:
        return None
    return _calibrated((fn, uniform), counter, graph, goal, uniform / 2, steps=STEPS // 2 + 2)


def _calibrated(alloc: tuple[Callable[[float], list], float], counter: Any, graph: Any, goal: float,
                start: float, steps: int = STEPS) -> Any:
    """The plan of the largest budget (bisected on [0, dense], from ``start``) whose exact count meets ``goal``;
    within `TOLERANCE` of it when the steps allow. None when no budget meets it.

    Where the cheap count is only an upper bound (MACs outside Conv/Linear leaves), the bisection runs on it first
    (what it accepts meets the goal for sure) and then a few steps on the exact count (a larger budget may meet
    it too), as `structured/targets.py _target_plan` does."""
    from secateur.structured import Plan
    fn, full = alloc
    best: list = []   # [count, choices] of the largest accepted budget so far

    def search(count: Callable[[list], int], lo: float, hi: float, b: float, steps: int, close: bool
               ) -> tuple[float, float]:
        for _ in range(steps):
            try:
                choices = fn(b)
            except PruningError:  # below every group's floor: a larger budget
                lo = b
            else:
                n = count(choices)
                if n <= goal:
                    if not best or n > best[0]:
                        best[:] = [n, choices]
                    if close and n * (1 + TOLERANCE) >= goal:
                        return b, b
                    lo = b
                else:
                    hi = b
            b = (lo + hi) / 2
        return lo, hi

    exact = not counter.fixed  # the cheap count is the exact one
    lo, _ = search(counter.estimate, 0.0, full, min(max(start, 0.0), full), steps, exact)
    if not exact:
        if best:
            best[0] = counter.exact(best[1])
        search(counter.exact, lo, full, (lo + full) / 2, steps // 2, True)
    if not best:
        return None
    return Plan(graph.groups, best[1], list(graph.notes), norms=graph.norms)


def measured_fractions(model: nn.Module, example_inputs: Any, plans: Sequence[Any], repeats: int = 10
                       ) -> list[float]:
    """Measured latency of ``model`` with each plan applied (a copy each), as fractions of the model's own:
    medians of interleaved rounds, eval mode (the modes are restored)."""
    import copy
    from secateur.latency import compare_latency, paired_speedup
    variants = {"dense": model}
    for i, p in enumerate(plans):
        m = copy.deepcopy(model)
        if p.choices:
            p.apply(m)
        variants[f"plan{i}"] = m
    res = compare_latency(variants, example_inputs, repeats=repeats, warmup=3)  # eval mode, modes restored
    return [1.0 / paired_speedup(res["dense"], res[f"plan{i}"])[0] for i in range(len(plans))]


def _pick(model: nn.Module, example_inputs: Any, found: list, fraction: float, counter: Any, graph: Any,
          rate: Callable[[Any], float], timer: Callable[[list], list[float]] | None = None
          ) -> tuple[Any, list[PlanOption]]:
    """The fastest option that meets the target once verified (the uniform plan is verified already); the
    options' list with the kept one first. An allocator plan that the dry run changes (groups kept) is counted
    and rated again (``rate``: estimated latency fraction), and passed over if it no longer meets the target or
    is now slower than uniform."""
    from secateur.structured.proof import _verified
    floor = min(found[0][0].count, fraction / (1 + OVERSHOOT))
    meets = [o.count <= fraction * (1 + 1e-12) and (o.name == "uniform" or o.count >= floor) for o, _ in found]
    order = sorted(range(len(found)), key=lambda i: (not meets[i], found[i][0].latency, i))  # ties: uniform
    ready = []  # (index, option, verified plan) in the table's order
    for i in order:
        opt, plan = found[i]
        if opt.name != "uniform":
            if not meets[i]:
                continue
            n = len(plan.choices)
            plan = _verified(model, example_inputs, plan, graph)
            if len(plan.choices) != n:  # the dry run kept groups
                opt = PlanOption(opt.name, counter.exact(plan.choices) / max(counter.total, 1), rate(plan))
                if not floor <= opt.count <= fraction * (1 + 1e-12) or opt.latency > found[0][0].latency:
                    continue
            plan.notes.extend(plan.norm_notes())
        ready.append((i, opt, plan))
        if timer is None or opt.name == "uniform":  # by the table, nothing slower than uniform is needed
            break
    if not ready:
        raise AssertionError("the uniform plan is always an option")  # pragma: no cover
    i, opt, plan = ready[0]
    measured = ""
    if timer is not None and len(ready) > 1:
        fracs = timer([p for _, _, p in ready])
        k = min(range(len(ready)), key=lambda j: (fracs[j], ready[j][1].name != "uniform"))
        i, opt, plan = ready[k]
        measured = "; measured here: " + ", ".join(f"{o.name} {1 / f:.2f}x" for (_, o, _), f in zip(ready, fracs))
    others = [found[j][0] for j in range(len(found)) if j != i]
    plan.notes.append(("latency table: kept the " + _describe(opt) + " plan over "
                       + ", ".join(_describe(o) for o in others) if others else
                       "latency table: kept the " + _describe(opt) + " plan") + measured)
    return plan, [opt, *others]


def _describe(o: PlanOption) -> str:
    return f"{o.name} ({o.count:.3f} of the count, {o.latency:.3f} of the latency by the table)"
