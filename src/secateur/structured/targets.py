"""Plans that meet a target instead of a ratio: a fraction of the MACs or parameters (bisection on one ratio or
global budget, counted exactly without applying the plan: ``_Counter``) or of the measured latency."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from secateur.errors import PruningError, fail
from secateur.graph.groups import Group, build_graph
from secateur.metrics import count_macs, count_params
from secateur.structured.apply import _apply
from secateur.structured.choose import _candidates, _choose, _ignored, _is_ignored, _new_plan, _refuse_rope
from secateur.structured.plan import Plan
from secateur.structured.proof import _verified


def _validate_latency(ratio, threshold, steps, target_macs, target_params, heads="heads") -> None:
    """A latency target chooses every group's count itself: other ways to say how much to prune conflict."""
    clash = {k: v for k, v in (("threshold", threshold), ("target_macs", target_macs),
                               ("target_params", target_params)) if v is not None}
    if isinstance(ratio, dict):
        clash["ratio"] = ratio
    if steps != 1:
        clash["steps"] = steps
    if heads != "heads":
        clash["heads"] = heads
    if clash:
        raise fail("target_latency chooses the channel counts itself; it cannot be combined with these",
                   where="prune_channels", value=clash, hint="give only target_latency (ratio is ignored)")


def _latency_plan(model: nn.Module, example_inputs: Any, target_latency: float, table: Any,
                  opts: dict) -> Plan:
    """One plan whose per-group counts meet the latency target (see `secateur.allocate.latency_choices`),
    verified like every other plan. Groups the verification keeps whole are left out and the allocation runs
    again over the others, as for MACs targets, until the verified plan keeps every group it chose (or no
    allocation without them meets the target: the last verified plan, which says what it kept)."""
    from secateur.allocate import latency_choices
    graph = build_graph(model, example_inputs, grouped=opts["grouped"])
    ignored, ignored_in = _ignored(model, opts["ignore"]), _ignored(model, opts["ignore_inputs"])
    left_out: set[int] = set()
    plan, notes = None, list(graph.notes)
    for _ in range(len(graph.groups) + 1):
        try:
            choices = latency_choices(model, example_inputs, target_latency, table=table,
                                      importance=opts["importance"], round_to=opts["round_to"], graph=graph,
                                      skip=lambda g: _is_ignored(g, ignored, ignored_in) or id(g) in left_out,
                                      score_options=dict(reduce=opts["reduce"], normalize=opts["normalize"]))
        except PruningError as e:
            if "cannot be reached" not in str(e):
                raise
            if plan is not None:  # reachable until the dry run kept groups whole: the best verified plan
                plan.notes.append(f"target_latency={target_latency} missed: no allocation over the groups left "
                                  "meets it")
                break
            # the allocator's hint names its own options; here the way out is a milder target or fewer constraints
            raise fail("target_latency cannot be reached by removing channels: the table says the model keeps more "
                       "time than that with every prunable group at its smallest count", where="prune_channels",
                       value=target_latency, hint=f"ask for less (a larger target_latency), or drop ignore= / "
                       f"round_to; the allocator said: {e}") from None
        plan = Plan(graph.groups, choices, list(notes), norms=graph.norms)
        plan = _verified(model, example_inputs, plan, graph) if plan.choices else plan
        dropped = {id(g) for g, _ in choices} - {id(g) for g, _ in plan.choices}
        if not dropped:
            break
        left_out |= dropped
        notes = plan.notes
    plan.notes.extend(plan.norm_notes())
    return plan


class _Counter:
    """MACs or params of a plan *without applying it*, from the shapes the plan leaves.

    Params: exact (every parameter's kept shape). MACs: every MAC of a leaf module with weight matrices (Conv,
    Linear, ConvTranspose, recurrent layers) is (output positions) x (weight elements), so it scales with the
    kept weight elements exactly; MACs elsewhere (attention matmuls, custom ops) are counted as if they stayed,
    which can only over-estimate. When such MACs exist, ``exact`` counts a plan on a meta skeleton."""

    def __init__(self, model: nn.Module, example_inputs: Any, groups: list[Group], what: str) -> None:
        from secateur.metrics import macs_by_layer
        self.model, self.inputs, self.groups, self.what = model, example_inputs, groups, what
        self.shapes = {}
        for name, mod in model.named_modules():
            for pn, p in mod.named_parameters(recurse=False):
                self.shapes[(name, pn)] = tuple(p.shape)
        if what == "params":
            self.total = count_params(model)
            self.leaves: dict[str, tuple[int, int]] = {}
            self.fixed = 0
            return
        by_layer = macs_by_layer(model, example_inputs)
        self.total = by_layer.get("", 0)
        self.leaves = {}
        for name, mod in model.named_modules():
            mats = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= 2)
            if mats and not any(True for _ in mod.children()) and by_layer.get(name, 0):
                self.leaves[name] = (by_layer[name], mats)
        self.fixed = self.total - sum(m for m, _ in self.leaves.values())

    def estimate(self, choices) -> int:
        """Exact for params, and for MACs when ``fixed`` is 0; an upper bound otherwise."""
        removed = Plan(self.groups, choices).removed
        lost: dict[str, int] = {}
        for (mname, tname), dims in removed.items():
            shape = self.shapes.get((mname, tname))
            if shape is None or (self.what == "macs" and (mname not in self.leaves or len(shape) < 2)):
                continue
            new = math.prod(s - int(dims[d].shape[-1]) if d in dims else s for d, s in enumerate(shape))
            lost[mname] = lost.get(mname, 0) + math.prod(shape) - new
        if self.what == "params":
            return self.total - sum(lost.values())
        return self.total - sum(self.leaves[n][0] * k // self.leaves[n][1] for n, k in lost.items())

    def exact(self, choices, attrs=None) -> int:
        if self.what == "params" or not self.fixed:
            return self.estimate(choices)
        from secateur.graph.verify import skeleton, to_meta
        sk = skeleton(self.model)
        if choices:
            _apply(sk, Plan(self.groups, choices, attrs=attrs or {}))
        try:
            return count_macs(sk, to_meta(self.inputs))
        except Exception:  # noqa: BLE001 - a plan the model cannot run (count ties not found yet): the dry run
            return self.estimate(choices)  # will change it; its upper bound guides the search meanwhile


def _target_plan(model: nn.Module, example_inputs: Any, fraction: float, what: str, opts: dict) -> Plan:
    """One plan meeting a MACs / params target from one capture: the uniform ratio (or the global budget) is
    found by bisection on the plan's count without applying it (`_Counter`), refined on exact counts where the
    cheap count is only an upper bound, then verified. Groups the verification leaves out are excluded and the
    search runs again, so the verified plan still meets the target (when any ratio < 1 can)."""
    if opts["heads"] == "head_dim":
        _refuse_rope(model)
    graph = build_graph(model, example_inputs, opts["heads"], opts["grouped"])
    counter = _Counter(model, example_inputs, graph.groups, what)
    goal = fraction * counter.total
    cands = _candidates(model, graph, 1.0, False, opts["importance"], opts["ignore"], opts["ignore_inputs"],
                        opts["reduce"], opts["normalize"])
    notes = list(graph.notes)

    def search(choose, count, lo: float, hi: float, steps: int) -> tuple[float, float]:
        for _ in range(steps):
            if hi - lo <= 1e-3:
                break
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if count(choose(mid)) <= goal else (mid, hi)
        return lo, hi

    # each round leaves out the groups the previous round's verification dropped (or keeps new count ties), so
    # rounds end: the bound only guards against ties that keep changing
    for _ in range(len(cands) + 4):
        def choose(r: float, cands=cands, fixed=frozenset(), per=None):
            per = per or {}
            return _choose([(g, s, per.get(id(g), r)) for g, s, _ in cands], None, opts["scope"], opts["round_to"],
                           graph.links, graph.ties, fixed)

        hi, per = 0.99, {}
        reachable = counter.exact(choose(hi)) <= goal
        if not reachable:
            notes.append(f"target_{what}={fraction} is not reachable with a ratio below 1; pruned at {hi}")
        else:
            lo, hi = search(choose, counter.estimate, 0.0, hi, 20)  # upper bound: hi meets the goal for sure
            if counter.fixed and what == "macs":
                lo, hi = search(choose, counter.exact, 0.0, hi, 6)  # a lower ratio may meet it too
            if opts["scope"] == "local" and opts["round_to"]:
                per = _top_up(choose, counter.estimate, goal, lo, hi)

        def final(fixed=frozenset(), choose=choose, hi=hi, per=per):
            return choose(hi, fixed=fixed, per=per)

        plan = _new_plan(graph, final(), list(notes), opts["heads"])
        if not plan.choices:
            return plan
        ties = graph.ties
        plan = _verified(model, example_inputs, plan, graph,
                         rechoose=lambda t, fixed, final=final: final(fixed))  # choose reads graph.ties
        dropped = {id(g) for g, _ in final()} - {id(g) for g, _ in plan.choices}
        if not dropped and graph.ties is ties:  # the plan searched for: it meets the goal when any ratio can
            met = reachable
            break
        met = counter.exact(plan.choices, plan.attrs) <= goal
        if met:
            break
        cands = [c for c in cands if id(c[0]) not in dropped]
        notes = plan.notes
    if reachable and not met:  # (said, never a missed target without a word)
        left = counter.exact(plan.choices, plan.attrs) / counter.total
        plan.notes.append(f"target_{what}={fraction} missed: {left:.4g} of the model's {what} left (the groups the "
                          "dry run keeps whole could not be made up for by the others)")
    plan.notes.extend(plan.norm_notes())
    return plan


def _top_up(choose, count, goal: float, lo: float, hi: float, rounds: int = 3) -> dict[int, float]:
    """Groups that go back to the ratio ``lo`` (just short of the goal) while the plan at ``hi`` (which meets it)
    still meets it: id(group) -> lo.

    Why: with ``round_to``, counts move in steps, and at one ratio many groups can step together. One ratio then
    jumps past the target by far: regnet_x_400mf at round_to=8 keeps 0.544 of its MACs at ratio 0.49 and 0.257 at
    0.50, so ``target_macs=0.5`` gave 0.257. The groups whose count differs between the two ratios go back in
    order, the ones the step cut most (relative to their size) first, as many as keep the (upper-bound) count
    within the goal: the longest such run is bisected (adding groups back only adds to the count), the group that
    did not fit is skipped, and the rest is tried again, ``rounds`` times. That costs O(rounds log n) counts, not
    one per group (each count of densenet201 takes 80 ms). Every other group keeps the uniform ratio's count."""
    base = choose(hi)
    at_hi, at_lo = {id(g): (len(c), g.size) for g, c in base}, {id(g): len(c) for g, c in choose(lo)}
    rest = sorted((k for k, (n, _) in at_hi.items() if at_lo.get(k, 0) < n),
                  key=lambda k: -(at_hi[k][0] - at_lo.get(k, 0)) / at_hi[k][1])  # stable: graph order on ties
    per: dict[int, float] = {}
    for _ in range(rounds):
        if not rest:
            break
        fits, over = 0, len(rest)  # fits: a run that meets the goal; over: the shortest known not to (or all)
        if count(choose(hi, per={**per, **dict.fromkeys(rest, lo)})) <= goal:
            fits = over = len(rest)
        while over - fits > 1:
            mid = (fits + over) // 2
            if count(choose(hi, per={**per, **dict.fromkeys(rest[:mid], lo)})) <= goal:
                fits = mid
            else:
                over = mid
        per.update(dict.fromkeys(rest[:fits], lo))
        rest = rest[fits + 1:]
    return per


def _latency_target(model: nn.Module, example_inputs: Any, target: float, table: Any, opts: dict,
                    check: Any) -> tuple[Plan, dict]:
    """The plan for ``target_latency`` (checked by measurement when ``check`` is given) and the result's
    latency fields; ``"estimate"`` is a function of the pruned model, read once the plan is applied."""
    from secateur.latency_model import LatencyTable
    from secateur.latency_target import plan_for_latency
    if table is not None and not isinstance(table, LatencyTable):
        raise fail("latency_table must be a secateur.latency_model.LatencyTable", where="latency_table",
                   value=type(table).__name__, hint="build one with LatencyTable.build(model, example_inputs)")
    table = table if table is not None else LatencyTable.build(model, example_inputs)
    dense = table.total()
    table.estimate(model)  # every table layer is found in this model, before anything changes

    def estimate(m: nn.Module) -> float:
        return table.estimate(m) / dense

    plan, rounds, measured = plan_for_latency(
        model, example_inputs, target, lambda goal: _latency_plan(model, example_inputs, goal, table, opts),
        check, estimate)
    return plan, {"estimate": estimate, "latency_rounds": rounds, "latency_measured": measured}


# ---------------------------------------------------------------- applying
