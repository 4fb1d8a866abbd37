"""Random models and options for structural pruning *to a target*: ``prune_channels(target_macs=...)``,
``target_params``, ``target_latency`` (a synthetic latency table, no timing) and the allocator behind it
(``secateur.allocate.channel_counts`` / ``group_counts``).

The models come from the engine fuzzer's generator (tests/test_engine_fuzz.py ``architectures``); each example
checks what the docstrings promise:

- ``target_macs`` / ``target_params``: the pruned model's count (secateur's counters, and for params a plain sum
  over the parameters, and the Conv/Linear MACs counted by hooks where only those carry MACs) is at most the target
  fraction of the dense count, or ``plan.notes`` says the target is not reachable with a ratio below 1; the
  result's counts are the model's; the bisection stops within one rounding step per pruned group (restoring one
  step in every pruned group misses the target); every pruned group keeps a multiple of ``round_to`` (counted in
  layer channels: a grouped conv's total) and at least one channel (per head); ``ignore``'d modules keep their
  output channels;
- the plan satisfies the oracle (``plan.apply_checked`` on a fresh copy) and gives bit-for-bit the model
  ``prune_channels`` returned; the output shape is unchanged;
- ``target_latency`` with a synthetic table: the table's estimate of the pruned model (read from its weights'
  shapes) is at most the target, or a group was left out by the dry run (noted), and equals
  ``result.latency_estimate``; an unreachable target raises and changes nothing;
- ``target_macs`` / ``target_params`` with that table (``secateur.fastest_plan``): the target met (or noted as out
  of reach) and the kept plan never rated slower than the uniform plan by the table;
- the allocator: budget, floors and allowed counts hold, a reachable budget is reached, refill leaves no group that
  could take its next count back, and with one cost unit per channel the importance lost equals a brute force
  over every allowed count vector;
- bad values (targets out of range, clashing options, unknown names) raise ``PruningError`` naming the value and
  leave the model bit-for-bit unchanged.

Shrunk failures are in ``KNOWN`` (fixed ones as regressions); options that were ignored without a word (``steps``
> 1 or a ratio dict with a MACs / params target, now refused) are in ``BAD``."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import event, given, settings, strategies as st
from torch import nn

import secateur
from secateur.allocate import BUDGET_SLACK, channel_counts, group_counts, round_candidates, separable
from secateur.errors import PruningError
from secateur.latency_model import LatencyTable, layer_specs
from secateur.metrics import count_macs, count_params
from secateur.structured.targets import _Counter

from test_engine_fuzz import _HC, _NAMES_OP, architectures, example, make

torch.set_num_threads(1)

DETERMINISTIC = ["l1", "l2", "bn_scale", "lamp", "fpgm"]
LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

TARGET_OPTIONS = st.fixed_dictionaries({
    "what": st.sampled_from(["macs", "params"]),
    "fraction": st.floats(0.3, 1.0),  # 1.0 (a bound hypothesis draws) must remove nothing
    "importance": st.sampled_from(DETERMINISTIC),
    "round_to": st.sampled_from([None, None, 2, 4, 8]),
    "scope": st.sampled_from(["local", "global"]),
    "grouped": st.sampled_from(["channels", "groups"]),
    "heads": st.sampled_from(["heads", "heads", "head_dim"]),
    "ignore": st.sampled_from([None, None, 0, 1, 2, 3]),  # index into the model's layers (mod their count)
    "ignore_inputs": st.sampled_from([None, None, None, 0, 1, 2]),
})


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, sd: dict) -> bool:
    now = model.state_dict()
    return now.keys() == sd.keys() and all(now[k].shape == v.shape and torch.equal(now[k], v)
                                          for k, v in sd.items())


def _params(model: nn.Module) -> int:
    """Independent of secateur: every parameter once."""
    return sum(p.numel() for p in model.parameters())


def _layer_macs(model: nn.Module, x) -> tuple[int, bool]:
    """MACs of the Conv/Linear leaves by forward hooks (output elements x weight elements per output), and whether
    those are all of the model's MACs (no attention, recurrent layers or other matmuls)."""
    total, handles = [0], []

    def hook(mod, args, out):
        w = mod.weight
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() * w.shape[1]
        elif isinstance(mod, nn.ConvTranspose2d):
            total[0] += args[0].numel() * w.shape[1] * math.prod(w.shape[2:])
        else:
            total[0] += out.numel() * math.prod(w.shape[1:])
    for m in model.modules():
        if type(m) in LAYERS:
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    pure = not any(isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) for m in model.modules())
    return total[0], pure


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in LAYERS]


def _out_width(mod: nn.Module) -> int:
    w = mod.weight
    return w.shape[1] * mod.groups if isinstance(mod, nn.ConvTranspose2d) else w.shape[0]


def _in_width(mod: nn.Module) -> int:
    w = mod.weight
    return w.shape[0] if isinstance(mod, nn.ConvTranspose2d) else w.shape[1] * getattr(mod, "groups", 1)


def _removed(chans: torch.Tensor) -> int:
    return int(chans.shape[-1]) if chans.dim() == 2 else int(chans.numel())


def _check_counts(plan, round_to) -> None:
    """Every pruned group keeps at least one channel (per head) and a multiple of round_to layer channels (a group
    channel is ``unit`` layer channels; a kernel's ``align`` joins round_to), unless it keeps everything."""
    for g, chans in plan.choices:
        n = _removed(chans)
        heads = int(g.block.max()) + 1 if g.block is not None else 1
        assert n % heads == 0, f"{g.name}: {n} channels removed from {heads} heads unevenly"
        per, kept = g.size // heads, (g.size - n) // heads
        assert 1 <= kept < per, f"{g.name}: keeps {kept} of {per}"
        rt = math.lcm(round_to or 1, g.align)
        step = rt if g.block is not None else rt // math.gcd(rt, g.unit)
        assert kept % step == 0, f"{g.name}: keeps {kept} (x{g.unit} layer channels), round_to={round_to}"


def _restored(plan, round_to) -> list | None:
    """The plan with one rounding step given back in every pruned group (None where a group has heads)."""
    out = []
    for g, chans in plan.choices:
        if g.block is not None or chans.dim() == 2:
            return None
        rt = math.lcm(round_to or 1, g.align)
        step = rt // math.gcd(rt, g.unit)
        kept = min(g.size, g.size - chans.numel() + step)
        if kept < g.size:
            out.append((g, chans[: g.size - kept]))
    return out


def _refused(e: PruningError, model, sd) -> str:
    assert _unchanged(model, sd), f"a refusal changed the model: {e}"
    assert _NAMES_OP.search(str(e)) or "prune_channels" in str(e), f"a PruningError that names nothing: {e}"
    assert "internal:" not in str(e), str(e)
    return f"refused: {str(e)[:60]}"


def _oracle(original, x, plan, pruned) -> None:
    fresh = copy.deepcopy(original)
    err = plan.apply_checked(fresh, x)
    assert math.isnan(err) or err < 1e-4, f"oracle error {err:.3g}: {plan}, notes {plan.notes}"
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x)), "the plan applied differs from what prune_channels returned"


# ----------------------------------------------------------------------------------------------------------------
# target_macs / target_params

def check_target(spec, opts) -> str:
    model, x = make(spec), example(spec)
    original = copy.deepcopy(model)
    sd = _state(model)
    with torch.no_grad():
        out0 = model(x)
    what, fraction = opts["what"], opts["fraction"]
    layers = _layers(model)
    ignore = [] if opts["ignore"] is None or not layers else [layers[opts["ignore"] % len(layers)]]
    kw = {k: opts[k] for k in ("importance", "round_to", "scope", "grouped", "heads")}
    macs0, params0 = count_macs(model, x), count_params(model)
    assert params0 == _params(model)
    lm0, pure = _layer_macs(model, x)
    if pure:
        assert lm0 == macs0, "count_macs differs from the Conv/Linear MACs of a model with no other matmul"
    widths0 = {n: _out_width(model.get_submodule(n)) for n in ignore}
    k = opts.get("ignore_inputs")
    inputs = [] if k is None or not layers else [layers[-1 - k % len(layers)]]  # from the end: others than ignore
    in0 = {n: _in_width(model.get_submodule(n)) for n in inputs}
    try:
        res = secateur.prune_channels(model, x, **{f"target_{what}": fraction}, ignore=ignore, ignore_inputs=inputs,
                                      **kw)
    except PruningError as e:
        return _refused(e, model, sd)
    macs1, params1 = count_macs(model, x), count_params(model)
    assert params1 == _params(model)
    if pure:
        assert _layer_macs(model, x)[0] == macs1
    assert (res.macs_before, res.macs_after, res.params_before, res.params_after) == (macs0, macs1, params0, params1)
    with torch.no_grad():
        out1 = model(x)
    assert out1.shape == out0.shape
    for n in ignore:
        assert _out_width(model.get_submodule(n)) == widths0[n], f"ignored {n} lost output channels"
    for n in inputs:
        assert _in_width(model.get_submodule(n)) == in0[n], f"ignore_inputs {n} lost input channels"
    total, count = (macs0, macs1) if what == "macs" else (params0, params1)
    goal = fraction * total
    assert count <= total
    if count > goal:
        assert any("not reachable" in n for n in res.notes), \
            f"{what} {count} > {fraction} x {total} and no note says why: {res.notes}"
        return "target not reachable (noted)"
    if not res.plans:
        return "met without pruning"
    plan, = res.plans  # one plan, applied once
    _check_counts(plan, opts["round_to"])
    _oracle(original, x, plan, model)
    # tight: one rounding step given back in every pruned group misses the target (the bisection stops at 1e-3 of
    # the ratio, under one channel per group of these sizes); count ties / head groups couple the counts: skipped
    counter = _Counter(original, x, plan.groups, what)
    back = _restored(plan, opts["round_to"])
    tied = any("tie" in n.lower() for n in plan.notes)
    if back is not None and not tied and (what == "params" or not counter.fixed):
        assert counter.exact(back) > goal, f"more pruned than needed: {counter.exact(back)} <= {goal}, {plan}"
    return f"met ({what}, {opts['scope']})"


def check_steps_refused(spec, opts, steps) -> str:
    """``steps`` splits ``ratio``; a MACs / params target is met by one plan: a target with steps > 1 is refused
    (as target_latency refuses it) rather than ignored, and nothing changes."""
    model, x = make(spec), example(spec)
    sd = _state(model)
    with pytest.raises(PruningError, match="steps") as e:
        secateur.prune_channels(model, x, **{f"target_{opts['what']}": opts["fraction"]}, steps=steps)
    assert str(steps) in str(e.value)
    assert _unchanged(model, sd)
    return "refused"


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=4), opts=TARGET_OPTIONS)
def test_random_targets(spec, opts):
    event(check_target(spec, opts))


@pytest.mark.slow
@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=6), opts=TARGET_OPTIONS)
def test_random_targets_many(spec, opts):
    event(check_target(spec, opts))


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=3), opts=TARGET_OPTIONS, steps=st.integers(2, 4))
def test_target_with_steps(spec, opts, steps):
    event(check_steps_refused(spec, opts, steps))


# ----------------------------------------------------------------------------------------------------------------
# target_latency with a synthetic table

def _synthetic_table(model, x, seed: int) -> LatencyTable | None:
    """Per layer: an overhead plus MACs-proportional time in steps of ``block`` output channels, linear in the
    input channels; no timing. None when the model has no table layer."""
    specs = layer_specs(model, x)
    if not specs:
        return None
    g = torch.Generator().manual_seed(seed)
    store = {}
    for s in specs.values():
        block = int(torch.randint(1, 9, (1,), generator=g))
        scale = float(torch.rand(1, generator=g)) + 0.2
        fixed = 0.05 * s.macs()  # a launch overhead: 5 % of the layer's dense time
        store[s.key()] = {
            "out": {c: 1e-9 * scale * (fixed + s.macs(c_out=min(s.out_channels, -(-c // block) * block)))
                    for c in range(1, s.out_channels + 1)},
            "in": {c: 1e-9 * (fixed + s.macs(c_in=c)) for c in range(1, s.in_channels + 1)}}
    return LatencyTable.from_measurements(specs, store, device="synthetic")


def _table_estimate(table: LatencyTable, model: nn.Module) -> float:
    """The table's seconds of ``model`` from its layers' weight shapes (not the table's own ``widths``)."""
    outs, ins = {}, {}
    for name, spec in table.specs.items():
        mod = model.get_submodule(name)
        outs[name] = mod.weight.shape[0]
        ins[name] = mod.weight.shape[1] * (1 if spec.depthwise else getattr(mod, "groups", 1))
    return table.total(outs, ins)


LATENCY_OPTIONS = st.fixed_dictionaries({
    "target": st.floats(0.35, 0.95),
    "importance": st.sampled_from(DETERMINISTIC),
    "round_to": st.sampled_from([None, None, 2, 4]),
    "grouped": st.sampled_from(["channels", "groups"]),
    "ignore": st.sampled_from([None, None, 0, 1]),
    "table_seed": st.integers(0, 1000),
})


def check_latency(spec, opts) -> str:
    model, x = make(spec), example(spec)
    table = _synthetic_table(model, x, opts["table_seed"])
    if table is None:
        return "no table layer"
    original = copy.deepcopy(model)
    sd = _state(model)
    with torch.no_grad():
        out0 = model(x)
    layers = _layers(model)
    ignore = [] if opts["ignore"] is None else [layers[opts["ignore"] % len(layers)]]
    widths0 = {n: _out_width(model.get_submodule(n)) for n in ignore}
    dense = _table_estimate(table, model)
    assert dense == pytest.approx(table.total(), rel=1e-12)
    target = opts["target"]
    try:
        res = secateur.prune_channels(model, x, target_latency=target, latency_table=table, verify="estimate",
                                      importance=opts["importance"], round_to=opts["round_to"],
                                      grouped=opts["grouped"], ignore=ignore)
    except PruningError as e:
        assert _unchanged(model, sd)
        if "cannot be reached" in str(e):
            assert str(target) in str(e)
            return "unreachable (raised)"
        return _refused(e, model, sd)
    est = _table_estimate(table, model) / dense
    assert res.latency_estimate == pytest.approx(est, rel=1e-9)
    for n in ignore:
        assert _out_width(model.get_submodule(n)) == widths0[n], f"ignored {n} lost output channels"
    with torch.no_grad():
        assert model(x).shape == out0.shape
    if res.plans:
        _check_counts(res.plans[0], opts["round_to"])
        _oracle(original, x, res.plans[0], model)
    if est > target * (1 + 1e-9):
        assert any("group(s) there" in n for n in res.notes), \
            f"estimate {est:.4f} > target {target} and no group was left out by the dry run: {res.notes}"
        return "missed: the dry run kept groups (noted)"
    return "met"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=4), opts=LATENCY_OPTIONS)
def test_random_latency_targets(spec, opts):
    event(check_latency(spec, opts))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=6), opts=LATENCY_OPTIONS)
def test_random_latency_targets_many(spec, opts):
    event(check_latency(spec, opts))


# target_macs / target_params with a latency table (secateur.fastest_plan): the target is met on the engine's
# exact count, and the plan kept is never one the table rates slower than the uniform plan

def check_fastest(spec, opts) -> str:
    model, x = make(spec), example(spec)
    table = _synthetic_table(model, x, opts["table_seed"])
    if table is None:
        return "no table layer"
    sd = _state(model)
    what, fraction = opts["what"], opts["fraction"]
    kw = {k: opts[k] for k in ("importance", "round_to", "scope", "grouped")}
    uniform = copy.deepcopy(model)
    total = count_macs(model, x) if what == "macs" else _params(model)
    dense = _table_estimate(table, model)
    try:
        secateur.prune_channels(uniform, x, **{f"target_{what}": fraction}, **kw)
        res = secateur.prune_channels(model, x, **{f"target_{what}": fraction}, latency_table=table,
                                      verify="estimate", **kw)
    except PruningError as e:
        return _refused(e, model, sd)
    count = count_macs(model, x) if what == "macs" else _params(model)
    est = _table_estimate(table, model) / dense
    assert res.latency_estimate == pytest.approx(est, rel=1e-9)
    if count > fraction * total:
        assert any("not reachable" in n for n in res.notes), f"{count} > {fraction} x {total}: {res.notes}"
        return "not reachable (noted)"
    assert est <= _table_estimate(table, uniform) / dense * (1 + 1e-9), "slower than the uniform plan"
    if res.plans:
        _check_counts(res.plans[0], opts["round_to"])
    kept = next((n for n in res.notes if n.startswith("latency table: kept the")), "")
    return "kept " + kept.split()[4] if kept else "nothing pruned"


FASTEST_OPTIONS = st.fixed_dictionaries({
    "what": st.sampled_from(["macs", "params"]),
    "fraction": st.floats(0.3, 0.95),
    "importance": st.sampled_from(DETERMINISTIC),
    "round_to": st.sampled_from([None, None, 2, 4]),
    "scope": st.sampled_from(["local", "global"]),
    "grouped": st.sampled_from(["channels", "groups"]),
    "table_seed": st.integers(0, 1000),
})


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=4), opts=FASTEST_OPTIONS)
def test_random_fastest_plans(spec, opts):
    event(check_fastest(spec, opts))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=6), opts=FASTEST_OPTIONS)
def test_random_fastest_plans_many(spec, opts):
    event(check_fastest(spec, opts))


# ----------------------------------------------------------------------------------------------------------------
# MACs targets are searched on meta skeletons (`_Counter.exact`) and reported on the model: both counts must agree
# (an nn.LSTM's fused CPU kernel counted 0 MACs on the CPU and its matmuls on meta)

def check_meta_macs(spec) -> str:
    from secateur.graph.verify import skeleton, to_meta
    model, x = make(spec), example(spec)
    cpu = count_macs(model, x)
    assert count_macs(skeleton(model), to_meta(x)) == cpu, "MACs on meta differ from the CPU's"
    return "counted"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=5))
def test_macs_on_meta_equal_the_cpu(spec):
    event(check_meta_macs(spec))


# ----------------------------------------------------------------------------------------------------------------
# the allocator against brute force

def _loss(scores, counts) -> float:
    """Importance removed when each group keeps its ``counts[g]`` highest scores."""
    return sum(float(torch.sort(s.double()).values[: s.numel() - k].sum()) for s, k in zip(scores, counts))


@st.composite
def allocations(draw):
    sizes = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g).round(decimals=draw(st.sampled_from([1, 6]))) for n in sizes]
    cost_kind = draw(st.sampled_from(["unit", "weighted", "staircase", "table", "noisy"]))
    if cost_kind == "unit":
        fns = [float] * len(sizes)
    elif cost_kind == "weighted":
        ws = [draw(st.floats(0.1, 5.0)) for _ in sizes]
        fns = [lambda k, w=w: w * k for w in ws]
    elif cost_kind == "staircase":
        steps = [draw(st.integers(1, 4)) for _ in sizes]
        fns = [lambda k, s=s: 1.0 + float(math.ceil(k / s)) for s in steps]
    else:  # an arbitrary table per group: increasing, or not (measured latency has noise)
        tabs = [[0.0] + draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n)) for n in sizes]
        tabs = [sorted(t) if cost_kind == "table" else t for t in tabs]
        fns = [lambda k, t=t: t[k] for t in tabs]
    cands = None
    if draw(st.booleans()):
        cands = [draw(st.none() | st.lists(st.integers(1, n), min_size=0, max_size=n)) for n in sizes]
    min_keep = draw(st.sampled_from([1, 2, 0.5, 0.3, 1.0]))
    target = draw(st.floats(1.0, 4.0))
    return dict(sizes=sizes, scores=scores, fns=fns, cands=cands, min_keep=min_keep, target=target,
                kind=cost_kind, normalize=draw(st.sampled_from(["none", "mean"])))


def _allowed(n, cand, min_keep) -> list[int]:
    """What the docstring allows a group: its candidates (all counts when None) at or above the floor, or all."""
    floor = max(1, math.ceil(min_keep * n)) if isinstance(min_keep, float) else min(min_keep, n)
    base = range(1, n + 1) if cand is None else cand
    return sorted({c for c in base if floor <= c <= n} | {n})


def check_allocation(a) -> str:
    sizes, scores, cost = a["sizes"], a["scores"], separable(a["fns"])
    limit = cost(sizes) / a["target"] * (1 + BUDGET_SLACK)
    allowed = [_allowed(n, a["cands"][i] if a["cands"] else None, a["min_keep"]) for i, n in enumerate(sizes)]
    feasible = [c for c in itertools.product(*allowed) if cost(c) <= limit]
    norm = [s / s.mean().clamp_min(1e-12) if a["normalize"] == "mean" else s for s in scores]
    try:
        counts = channel_counts(sizes, scores, cost, a["target"], candidates=a["cands"], min_keep=a["min_keep"],
                                normalize=a["normalize"])
    except PruningError as e:
        assert "cannot be reached" in str(e), str(e)
        assert not feasible, f"a feasible budget was refused: {feasible[:3]}"
        return "infeasible"
    assert feasible, "counts for a budget no allowed vector meets"
    assert cost(counts) <= limit
    for k, al in zip(counts, allowed):
        assert k in al, f"{k} not allowed ({al})"
    for g in range(len(sizes)):  # refill: no group can take its next allowed count back within the budget
        up = [c for c in allowed[g] if c > counts[g]]
        if up:
            assert cost(counts[:g] + [up[0]] + counts[g + 1:]) > limit, f"group {g} could keep {up[0]}"
    best = min(_loss(norm, c) for c in feasible)
    got = _loss(norm, counts)
    if a["kind"] == "unit" and a["cands"] is None:  # one cost unit per channel: the greedy is exact
        assert got <= best + 1e-9 * (1 + abs(best)), f"lost {got}, brute force {best}"
        return "unit: optimal"
    event(f"{a['kind']}: {'optimal' if got <= best + 1e-9 * (1 + abs(best)) else 'suboptimal'}")
    return "feasible"


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(a=allocations())
def test_allocator_against_brute_force(a):
    event(check_allocation(a))


# group_counts on real graphs: MACs / params of the Conv/Linear layers the groups touch

GROUP_OPTIONS = st.fixed_dictionaries({
    "metric": st.sampled_from(["macs", "params"]),
    "target": st.floats(1.05, 4.0),
    "round_to": st.sampled_from([None, 2, 4]),
    "min_keep": st.sampled_from([1, 2, 0.25, 0.5]),
})


def check_group_counts(spec, opts) -> str:
    model, x = make(spec), example(spec)
    sd = _state(model)
    try:
        table = LatencyTable.shapes_only(model, x)
        counts = group_counts(model, x, opts["target"], metric=opts["metric"], table=table,
                              round_to=opts["round_to"], min_keep=opts["min_keep"])
    except PruningError as e:
        assert _unchanged(model, sd)
        if "cannot be reached" in str(e):
            return "unreachable"
        return _refused(e, model, sd)
    assert _unchanged(model, sd)
    if not counts:
        return "no groups"
    groups = [g for g, _ in counts]
    cost = table.cost_fn(table.members_of(groups), opts["metric"], sizes=[g.size for g in groups])
    kept = [k for _, k in counts]
    assert cost(kept) <= cost([g.size for g in groups]) / opts["target"] * (1 + BUDGET_SLACK)
    for g, k in counts:
        floor = max(1, math.ceil(opts["min_keep"] * g.size)) if isinstance(opts["min_keep"], float) \
            else min(opts["min_keep"], g.size)
        assert k == g.size or k >= floor, f"{g.name} keeps {k} < floor {floor}"
        if opts["round_to"] and k < g.size:
            step = opts["round_to"] // math.gcd(opts["round_to"], g.unit)
            assert k in round_candidates(g.size, step), f"{g.name} keeps {k}, round_to {opts['round_to']}"
    return "met"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=_HC, database=None)
@given(spec=architectures(max_blocks=4), opts=GROUP_OPTIONS)
def test_random_group_counts(spec, opts):
    event(check_group_counts(spec, opts))


# ----------------------------------------------------------------------------------------------------------------
# bad input: PruningError naming the value, the model unchanged

def _small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return m, torch.randn(2, 3, 6, 6)


BAD = [
    (dict(target_macs=0.0), "0.0"), (dict(target_macs=-0.5), "-0.5"), (dict(target_macs=1.5), "1.5"),
    (dict(target_params=float("nan")), "nan"), (dict(target_params=float("inf")), "inf"),
    (dict(target_macs=True), "True"), (dict(target_params="half"), "half"),
    (dict(target_macs=0.5, target_params=0.5), "target_params"), (dict(target_macs=0.5, threshold=0.1), "threshold"),
    (dict(target_macs=0.5, target_latency=0.5), "target_macs"), (dict(target_params=0.5, steps=2), "steps"),
    (dict(target_macs=0.5, steps=3), "steps"), (dict(target_macs=0.5, ratio={"0": 0.5}), "ratio"),
    (dict(target_params=0.5, ratio={"3": 0.2}, scope="global"), "ratio"),
    (dict(target_macs=0.5, ignore=["nope"]), "nope"), (dict(target_params=0.5, ignore_inputs=["3.x*"]), "3.x*"),
    (dict(target_macs=0.5, scope="globel"), "globel"), (dict(target_macs=0.5, round_to=0), "0"),
    (dict(target_macs=0.5, heads="dims"), "dims"), (dict(target_macs=0.5, grouped="group"), "group"),
    (dict(target_macs=0.5, importance="l7"), "l7"), (dict(target_latency=0.0), "0.0"),
    (dict(target_latency=1.0), "1.0"), (dict(target_latency=0.5, latency_table=42), "int"),
    (dict(target_macs=0.5, verify="measure"), "measure"), (dict(target_params=0.5, latency_table=42), "int"),
]


@pytest.mark.parametrize("kw, named", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_input_raises_naming_the_value_and_changes_nothing(kw, named):
    m, x = _small()
    sd = _state(m)
    with pytest.raises(PruningError) as e:
        secateur.prune_channels(m, x, **kw)
    assert named in str(e.value), f"{named!r} not named in: {e.value}"
    assert _unchanged(m, sd)


# ----------------------------------------------------------------------------------------------------------------
# shrunk cases

def _target(**kw):
    return dict(dict(what="macs", fraction=0.5, importance="l1", round_to=None, scope="local", grouped="channels",
                     heads="heads", ignore=None, ignore_inputs=None), **kw)


KNOWN = [
    # nothing can go (the model's outputs are kept): the plan has no choices, so it was not kept, and its
    # "not reachable" note went with it: the target was missed without a word
    pytest.param({"input": [2, 2, 2], "blocks": [{"op": "ln", "d": 2}, {"op": "ln", "d": 2}],
                  "head": {"op": "head", "kind": "none", "c": 2, "out": 1}, "seed": 0},
                 _target(what="params"), id="unreachable_note_lost"),
    # the same for target_latency: group_counts returned no counts when no group can lose channels, so the
    # target (0.5) was "met" at 1.0 of the dense latency without the documented PruningError
    pytest.param({"input": [2, 2, 2], "blocks": [{"op": "ln", "d": 2}, {"op": "ln", "d": 2}],
                  "head": {"op": "head", "kind": "mean", "c": 2, "out": 1}, "seed": 0},
                 dict(target=0.5, importance="l1", round_to=None, grouped="channels", ignore=None, table_seed=0),
                 id="latency_nothing_prunable_not_refused"),
    # found by a reseeded run: an nn.LSTM counted 0 MACs on the CPU (its fused kernel) and its matmuls on meta, so
    # the uniform plan (0.86 of the MACs) was rated 1.035 of them and passed over for a plan the table rated slower
    pytest.param({'blocks': [{'bidir': False, 'din': 11, 'hidden': 8, 'kind': 'lstm', 'op': 'rnn'},
                             {'bias': False, 'd': 8, 'heads': 1, 'op': 'attn'},
                             {'act': 'relu', 'bias': False, 'din': 8, 'dout': 20, 'op': 'linear'},
                             {'bidir': True, 'din': 20, 'hidden': 11, 'kind': 'gru', 'op': 'rnn'},
                             {'act': 'relu', 'd': 22, 'hidden': 23, 'norm': False, 'op': 'mlp'},
                             {'d': 22, 'op': 'ln'}],
                  'head': {'c': 22, 'kind': 'tokens', 'op': 'head', 'out': 1},
                  'input': [2, 4, 11],
                  'seed': 0},
                 {'fraction': 0.9,
                  'grouped': 'channels',
                  'importance': 'l1',
                  'round_to': 4,
                  'scope': 'global',
                  'table_seed': 0,
                  'what': 'macs'}, id="lstm_macs_uncounted_on_the_cpu"),
    # found by a reseeded run: the dry run kept the one group the latency allocator chose (a size the head's
    # control flow reads), the plan removed nothing, and its notes were dropped with it: 1.0 of the latency for a
    # 0.59 target without a word (the allocation now runs again without such groups, and the notes are kept)
    pytest.param({'blocks': [{'body': [{'act': 'relu',
                                        'conv': {'bias': False,
                                                 'cin': 3,
                                                 'cout': 3,
                                                 'groups': 1,
                                                 'k': 1,
                                                 'op': 'conv',
                                                 'p': 0,
                                                 's': 1},
                                        'norm': {'c': 3, 'kind': 'bn', 'op': 'norm'},
                                        'op': 'unit'}],
                              'c': 3,
                              'op': 'scaled'},
                             {'a': [{'act': 'relu',
                                     'conv': {'bias': False,
                                              'cin': 3,
                                              'cout': 15,
                                              'groups': 3,
                                              'k': 3,
                                              'op': 'conv',
                                              'p': 1,
                                              's': 1},
                                     'norm': {'c': 15, 'kind': 'ln', 'op': 'norm'},
                                     'op': 'unit'}],
                              'act': 'relu',
                              'b': [{'act': 'relu',
                                     'conv': {'bias': False,
                                              'cin': 3,
                                              'cout': 15,
                                              'groups': 1,
                                              'k': 1,
                                              'op': 'conv',
                                              'p': 0,
                                              's': 1},
                                     'norm': {'c': 15, 'kind': 'bn', 'op': 'norm'},
                                     'op': 'unit'}],
                              'op': 'add2'},
                             {'body': [{'act': 'relu',
                                        'conv': {'bias': True,
                                                 'cin': 15,
                                                 'cout': 15,
                                                 'groups': 1,
                                                 'k': 1,
                                                 'op': 'conv',
                                                 'p': 0,
                                                 's': 1},
                                        'norm': {'c': 15, 'kind': 'bn', 'op': 'norm'},
                                        'op': 'unit'}],
                              'c': 15,
                              'op': 'scaled'},
                             {'act': 'relu',
                              'body': [{'act': 'relu',
                                        'conv': {'bias': False,
                                                 'cin': 15,
                                                 'cout': 15,
                                                 'groups': 1,
                                                 'k': 1,
                                                 'op': 'conv',
                                                 'p': 0,
                                                 's': 1},
                                        'norm': {'c': 15, 'kind': 'bn', 'op': 'norm'},
                                        'op': 'unit'},
                                       {'act': None,
                                        'conv': {'bias': True,
                                                 'cin': 15,
                                                 'cout': 15,
                                                 'groups': 1,
                                                 'k': 1,
                                                 'op': 'conv',
                                                 'p': 0,
                                                 's': 1},
                                        'norm': {'c': 15, 'kind': 'bn', 'op': 'norm'},
                                        'op': 'unit'}],
                              'op': 'res',
                              'proj': None}],
                  'head': {'c': 15, 'in': 990, 'kind': 'gap', 'op': 'head', 'out': 1},
                  'input': [2, 3, 6, 11],
                  'seed': 0},
                 {'grouped': 'channels',
                  'ignore': None,
                  'importance': 'l1',
                  'round_to': None,
                  'table_seed': 70,
                  'target': 0.59375}, id="latency_target_dry_run_notes_lost"),
]


def test_latency_target_allocates_again_without_the_groups_the_dry_run_keeps(monkeypatch):
    """A group the dry run keeps whole leaves its share of the cut undone: the allocation runs again over the other
    groups, so the target is still met where they can make up for it (it was missed, and noted only since session
    25). The stand-in verifier keeps whole the group the first allocation cut most (the allocator's favourite)."""
    import secateur.structured.targets as targets
    real, calls = targets._verified, []

    def verified(model, example_inputs, plan, graph=None, done=None, rechoose=None):
        plan = real(model, example_inputs, plan, graph, done, rechoose)
        if not calls:
            calls.append(max(plan.choices, key=lambda gc: len(gc[1]))[0].name)
        calls.append(sorted(g.name for g, _ in plan.choices))
        plan.choices = [(g, c) for g, c in plan.choices if g.name != calls[0]]
        return plan

    monkeypatch.setattr(targets, "_verified", verified)
    torch.manual_seed(0)
    layers = []
    for a, b in zip([8] + [24] * 6, [24] * 6 + [2]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model, x = nn.Sequential(*layers[:-1]), torch.randn(4, 8)
    table = _synthetic_table(model, x, 0)
    dense = _table_estimate(table, model)
    res = secateur.prune_channels(model, x, target_latency=0.7, latency_table=table, verify="estimate")
    assert len(calls) == 3 and calls[0] in calls[1] and calls[0] not in calls[2]  # (two rounds, without it)
    assert _table_estimate(table, model) / dense <= 0.7 * (1 + 1e-9), res.notes


@pytest.mark.parametrize("spec, opts", KNOWN)
def test_known_cases(spec, opts):
    if "target" in opts:
        check_latency(spec, opts)
    elif "table_seed" in opts:
        check_fastest(spec, opts)
    else:
        check_target(spec, opts)
