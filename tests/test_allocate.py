"""Latency/MACs/params-aware allocation of channel counts (secateur.allocate).

Oracles: with one cost unit per channel the allocator must equal exact global lowest-k selection;
budgets, floors and allowed counts are invariants; on a latency staircase it must keep step edges
and lose less importance than a uniform ratio reaching the same cost."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateur.allocate import BUDGET_SLACK, as_ratios, channel_counts, round_candidates, separable
from secateur.errors import PruningError
from secateur.latency_model import LatencyTable, LayerSpec, channel_grid


def _kept_loss(scores, counts):
    """Importance removed when each group keeps its ``counts[g]`` highest scores."""
    return sum(float(torch.sort(s).values[: s.numel() - k].sum()) for s, k in zip(scores, counts))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.floats(1.0, 8.0), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_unit_costs_equal_global_lowest_selection(sizes, target, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) for n in sizes]
    cost = separable([float] * len(sizes))  # one unit per kept channel
    total = sum(sizes)
    budget = total / target * (1 + BUDGET_SLACK)  # met to rounding counts as met
    if budget < len(sizes):  # the default floor keeps one channel per group
        with pytest.raises(PruningError, match="cannot be reached"):
            channel_counts(sizes, scores, cost, target, normalize="none")
        return
    counts = channel_counts(sizes, scores, cost, target, normalize="none")
    n_remove = total - math.floor(budget)
    # oracle: the global lowest n_remove scores, but never the last channel of a group
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    order = torch.argsort(flat)
    removed = [0] * len(sizes)
    for idx in order.tolist():
        if sum(removed) == n_remove:
            break
        if removed[owner[idx]] < sizes[owner[idx]] - 1:
            removed[owner[idx]] += 1
    assert counts == [n - r for n, r in zip(sizes, removed)]
    assert cost(counts) <= budget


@given(st.lists(st.integers(2, 48), min_size=1, max_size=5), st.floats(1.0, 3.0), st.integers(0, 10_000),
       st.sampled_from([1, 4, 8]), st.floats(0.05, 0.5))
@settings(max_examples=60, deadline=None)
def test_budget_floor_and_allowed_counts_hold(sizes, target, seed, multiple, floor):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) * 10 ** float(torch.rand(1, generator=g) * 3) for n in sizes]
    weights = (torch.rand(len(sizes), generator=g) + 0.1).tolist()
    cost = separable([lambda k, w=w, m=multiple: w * math.ceil(k / m) for w in weights])
    cands = [round_candidates(n, multiple) for n in sizes]
    before = [s.clone() for s in scores]
    try:
        counts = channel_counts(sizes, scores, cost, target, candidates=cands, min_keep=floor)
    except PruningError as e:
        assert "cannot be reached" in str(e)
        floors = [min(c for c in cs if c >= math.ceil(floor * n)) for cs, n in zip(cands, sizes)]
        assert cost(floors) > cost(sizes) / target * (1 + BUDGET_SLACK)  # it really was out of reach
        return
    finally:
        assert all(torch.equal(a, b) for a, b in zip(scores, before))  # inputs untouched
    assert cost(counts) <= cost(sizes) / target * (1 + BUDGET_SLACK)
    for k, n, cs in zip(counts, sizes, cands):
        assert k in cs and k >= math.ceil(floor * n) or k == n
    for g, cs in enumerate(cands):  # maximal: no group can take its next count back within the budget
        up = [c for c in cs if c > counts[g]]
        if up:
            raised = counts[:g] + [up[0]] + counts[g + 1:]
            assert cost(raised) > cost(sizes) / target * (1 + BUDGET_SLACK)


def test_target_one_is_identity_and_ratios_roundtrip():
    scores = [torch.rand(8), torch.rand(5)]
    counts = channel_counts([8, 5], scores, separable([float, float]), 1.0)
    assert counts == [8, 5]
    r = as_ratios(["a", "b"], [4, 5], [8, 5])
    assert r == {"a": 0.5, "b": 0.0}


def test_expensive_channels_go_first():
    same = torch.linspace(1, 2, 16)
    cost = separable([lambda k: 10.0 * k, lambda k: 1.0 * k])
    cheap_first = channel_counts(["costly", "cheap"], [same, same.clone()], cost, 1.5)
    assert cheap_first[0] < cheap_first[1] == 16


def test_rank_fn_spends_the_budget_where_it_buys_time():
    """Same MACs per channel everywhere; group 0's channels take 10x the time: with latency ranking
    a MACs target is met by pruning group 0, with MACs ranking by importance alone."""
    torch.manual_seed(0)
    scores = [torch.rand(32) + 1.0, torch.rand(32)]  # group 1 is less important
    macs = separable([float, float])
    latency = separable([lambda k: 10.0 * k, lambda k: 1.0 * k])
    by_macs = channel_counts(["a", "b"], scores, macs, 1.5, normalize="none")
    by_time = channel_counts(["a", "b"], scores, macs, 1.5, normalize="none", rank_fn=latency)
    assert by_macs[0] == 32 and by_macs[1] < 32
    assert macs(by_time) <= 64 / 1.5 and macs(by_macs) <= 64 / 1.5
    assert by_time[0] < 32 and latency(by_time) < latency(by_macs)
    # steps that save MACs but no time come last
    flat = separable([lambda k: 1.0, lambda k: float(k)])
    c = channel_counts(["a", "b"], [torch.ones(8), torch.ones(8) * 5], separable([float, float]), 1.25,
                       normalize="none", rank_fn=flat)
    assert c == [8, 4]


def test_staircase_keeps_step_edges_and_beats_uniform():
    torch.manual_seed(1)
    sizes = [256, 128, 64]
    scores = [torch.rand(n) for n in sizes]
    steps = [32, 16, 8]
    fns = [lambda k, s=s: float(math.ceil(k / s)) for s in steps]
    cost = separable(fns)
    counts = channel_counts(sizes, scores, cost, 2.0)
    assert all(k % s == 0 for k, s in zip(counts, steps))  # off-edge counts lose importance for nothing
    assert cost(counts) <= cost(sizes) / 2
    # the uniform ratio that reaches the same cost loses at least as much (normalized) importance
    norm = [s / s.mean() for s in scores]
    for keep in torch.linspace(1.0, 0.0, 201).tolist():
        uniform = [max(1, int(n * keep)) for n in sizes]
        if cost(uniform) <= cost(sizes) / 2:
            break
    assert _kept_loss(norm, counts) <= _kept_loss(norm, uniform)


def test_coupled_latency_target_from_a_table():
    """Two groups coupled through one layer (group 0's count is layer b's input count)."""
    sa = LayerSpec("linear", 16, 64, (1, 16), (1, 64), (True,))
    sb = LayerSpec("linear", 64, 32, (1, 64), (1, 32), (True,))
    store = {sa.key(): {"out": {c: math.ceil(c / 16) * 1e-3 for c in channel_grid(64)},
                        "in": {c: 1e-3 for c in channel_grid(16)}},
             sb.key(): {"out": {c: 1e-4 * c for c in channel_grid(32)},
                        "in": {c: 1e-4 * c for c in channel_grid(64)}}}
    t = LatencyTable.from_measurements({"a": sa, "b": sb}, store)
    members = [[("a", "out"), ("b", "in")], [("b", "out")]]
    cost = t.cost_fn(members, "latency")
    dense = cost([64, 32])
    assert dense == pytest.approx(4e-3 + 32e-4)
    counts = channel_counts(["g0", "g1"], [torch.rand(64), torch.rand(32)], cost, 2.0,
                            candidates=[t.candidates("a"), None])
    assert cost(counts) <= dense / 2
    assert counts[0] in t.candidates("a")
    macs = t.cost_fn(members, "macs")
    m_counts = channel_counts(["g0", "g1"], [torch.rand(64), torch.rand(32)], macs, 3.0)
    assert macs(m_counts) <= macs([64, 32]) / 3


@pytest.mark.parametrize("kw, match", [
    ({"target": None}, "exactly one"),
    ({"budget": 3.0}, "exactly one"),
    ({"target": 0.5}, ">= 1"),
    ({"normalize": "zscore"}, "normalizer"),
    ({"lookahead": 0}, "lookahead"),
    ({"min_keep": 0}, "min_keep"),
    ({"min_keep": 1.5}, "fraction"),
    ({"candidates": [None]}, "candidate"),
])
def test_bad_arguments(kw, match):
    args = {"target": 2.0, **kw}
    with pytest.raises(PruningError, match=match):
        channel_counts([4, 4], [torch.rand(4), torch.rand(4)], separable([float, float]), **args)


def test_bad_importance():
    cost = separable([float, float])
    with pytest.raises(PruningError, match="one importance vector"):
        channel_counts([4, 4], [torch.rand(4)], cost, 2.0)
    with pytest.raises(PruningError, match="NaN"):
        channel_counts([4, 4], [torch.rand(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])], cost, 2.0)
    with pytest.raises(PruningError, match="channel count"):
        channel_counts([4, 5], [torch.rand(4), torch.rand(4)], cost, 2.0)
    with pytest.raises(PruningError, match="1-D"):
        channel_counts([4, 4], [torch.rand(4), torch.rand(2, 2)], cost, 2.0)
    with pytest.raises(PruningError, match="cannot be reached"):
        channel_counts([4, 4], [torch.rand(4), torch.rand(4)], cost, 10.0)


class _ResNetish(torch.nn.Module):
    """Conv stem, a residual block and a head: groups with coupled producers and consumers."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 48, 3, padding=1)
        self.b = nn.Conv2d(48, 32, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x).relu()
        x = x + self.b(self.a(x).relu())
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("metric, target", [("macs", 2.0), ("params", 3.0)])
def test_group_counts_meets_the_target_on_the_real_model(metric, target):
    pytest.importorskip("secateur.structured")
    from secateur.allocate import group_counts
    from secateur.metrics import count_macs, count_params
    from secateur.structured import Plan
    model, x = _ResNetish().eval(), torch.randn(1, 3, 16, 16)
    before = count_macs(model, x) if metric == "macs" else count_params(model)
    pairs = group_counts(model, x, target, metric=metric, round_to=8)
    assert pairs and all(k % 8 == 0 or k == g.size for g, k in pairs)
    from secateur.importance import group_scores
    choices = [(g, torch.argsort(group_scores(g, model, "l1"), stable=True)[: g.size - k]) for g, k in pairs
               if k < g.size]
    Plan([g for g, _ in pairs], choices).apply(model)
    after = count_macs(model, x) if metric == "macs" else count_params(model)
    if metric == "params":  # biases of the head and norms are outside the groups' conv/linear weights
        assert after <= before / target + 5 + 64
    else:
        assert after <= before / target
    assert model(x).shape == (1, 5)


def test_group_counts_ranks_by_a_latency_table():
    pytest.importorskip("secateur.structured")
    from secateur.allocate import group_counts
    from secateur.latency_model import layer_specs
    model, x = _ResNetish().eval(), torch.randn(1, 3, 16, 16)
    specs = layer_specs(model, x)
    # conv "a" is made 50x slower per channel than the others: a latency-ranked MACs target prunes it first
    store = {}
    for n, s in specs.items():
        per = 50e-6 if n == "a" else 1e-6
        store[s.key()] = {"out": {c: per * c for c in channel_grid(s.out_channels)},
                          "in": {c: 1.0 for c in channel_grid(s.in_channels)}}
    table = LatencyTable.from_measurements(specs, store)
    by_macs = dict((g.name, k) for g, k in group_counts(model, x, 1.3, metric="macs", table=table))
    by_time = dict((g.name, k) for g, k in group_counts(model, x, 1.3, metric="macs", rank="latency",
                                                      table=table))
    assert by_time["a"] < by_macs["a"]
