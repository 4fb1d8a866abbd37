"""prune_channels(target_macs=..., latency_table=...): the plan the table rates fastest among those meeting the target.

Hand-made tables (latency per layer as a function of its output / input channel counts) make the allocator's greedy
plan slower than the uniform one, or faster; the checks re-read the pruned model's widths (the table's estimate of
the applied model, independently of the options' bookkeeping) and count its MACs / params with the library's
counters on the pruned model itself."""
import copy

import pytest
import torch
from torch import nn

from secateur.errors import PruningError
from secateur.fastest_plan import OPTIONS, fastest_plan
from secateur.latency_model import LatencyTable, layer_specs
from secateur.metrics import count_macs, count_params
from secateur.structured import prune_channels
from helpers import randomize_bn
from test_target_latency import SmallCNN

torch.set_num_threads(1)


class Net(SmallCNN):
    """Three prunable groups: A = conv1's outputs, B = conv2's, C = conv3's (fc's outputs are the model's)."""


def _model(seed=0, cheap_b=False):
    """``cheap_b``: 28 of B's 32 channels carry almost no weight (near-zero L1 importance), 4 carry a lot."""
    torch.manual_seed(seed)
    m = Net().eval()
    randomize_bn(m.bn1, m.bn2, low=0.5)
    if cheap_b:
        with torch.no_grad():
            for mod, dim in ((m.conv2, 0), (m.conv3, 1)):
                mod.weight.narrow(dim, 0, 28).mul_(1e-4)
            m.bn2.weight[:28] = 1e-4
    return m, torch.randn(2, 3, 12, 12)


def _table(model, x, out_cost, in_cost) -> LatencyTable:
    """A table whose layer ``n`` takes ``out_cost(n, c)`` seconds at ``c`` outputs (all inputs) and whose input
    sweep is ``in_cost(n, c)`` (only its ratio to the full count matters)."""
    specs = layer_specs(model, x)
    store = {s.key(): {"out": {c: out_cost(n, c) for c in range(1, s.out_channels + 1)},
                       "in": {c: in_cost(n, c) for c in range(1, s.in_channels + 1)}} for n, s in specs.items()}
    return LatencyTable.from_measurements(specs, store, device="synthetic")


def _slow_greedy_table(model, x) -> LatencyTable:
    """Group B's channels cost next to no time (conv2's outputs, conv3's inputs) though they hold most MACs;
    A's and C's cost time in proportion. The greedy (least importance per second saved, stop on MACs) removes
    B's near-free, near-unimportant channels first and meets the MACs target with hardly any time saved."""
    slope = {"conv1": 1e-5, "conv2": 1e-8, "conv3": 1e-5, "fc": 0.0}
    in_slope = {"conv1": 0.0, "conv2": 1.0, "conv3": 1e-3, "fc": 1.0}
    return _table(model, x, lambda n, c: 1e-4 + slope[n] * c, lambda n, c: 1.0 + in_slope[n] * c)


def _staircase_table(model, x) -> LatencyTable:
    """Time in proportion to MACs, in steps of 8 output channels (the greedy's usual good case)."""
    specs = layer_specs(model, x)
    return _table(model, x, lambda n, c: 1e-4 + specs[n].macs(c_out=-(-c // 8) * 8) * 1e-9,
                  lambda n, c: 1e-4 + specs[n].macs(c_in=c) * 1e-9)


def _estimate(table: LatencyTable, model: nn.Module) -> float:
    """The table's seconds of ``model`` read from its layers' current weight shapes."""
    outs, ins = {}, {}
    for name in table.specs:
        w = model.get_submodule(name).weight
        outs[name], ins[name] = w.shape[0], w.shape[1] * getattr(model.get_submodule(name), "groups", 1)
    return table.total(outs, ins)


def _uniform(model, x, fraction, what="macs", **kw):
    m = copy.deepcopy(model)
    prune_channels(m, x, **{f"target_{what}": fraction}, **kw)
    return m


OPTS = dict(importance="l1", scope="local", ignore=(), round_to=None, heads="heads", reduce="mean", normalize=None,
            ignore_inputs=(), grouped="channels")


@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_slower_greedy_plan_is_not_returned(fraction):
    m, x = _model(cheap_b=True)
    table = _slow_greedy_table(m, x)
    macs0 = count_macs(m, x)
    plan, options = fastest_plan(m, x, fraction, "macs", table, OPTS, options=("uniform", "greedy"))
    by = {o.name: o for o in options}
    assert by["greedy"].count >= min(by["uniform"].count, fraction / 1.05)  # not over-pruned: a fair rival
    # the situation under test: the allocator's greedy plan is slower than uniform by this very table
    assert by["greedy"].latency > by["uniform"].latency * 1.05
    assert by["greedy"].count <= fraction
    assert options[0].name == "uniform"
    assert any(n.startswith("latency table: kept the uniform") for n in plan.notes)

    # all options: whatever is kept, it is not the greedy plan and no slower than uniform on the pruned model
    res = prune_channels(m, x, target_macs=fraction, latency_table=table)
    uni = _uniform(_model(cheap_b=True)[0], x, fraction)
    assert count_macs(m, x) <= fraction * macs0  # met, counted on the pruned model
    assert _estimate(table, m) <= _estimate(table, uni) * (1 + 1e-9)
    assert _estimate(table, m) < by["greedy"].latency * table.total()
    assert res.latency_estimate == pytest.approx(_estimate(table, m) / table.total())
    assert not any(n.startswith("latency table: kept the greedy") for n in res.notes)


@pytest.mark.parametrize("what,fraction,round_to,scope", [("macs", 0.5, None, "local"), ("macs", 0.3, 4, "local"),
                                                          ("params", 0.5, None, "local"), ("macs", 0.4, 8, "global")])
def test_fastest_plan_meets_target_and_is_no_slower_than_uniform(what, fraction, round_to, scope):
    m, x = _model()
    table = _staircase_table(m, x)
    ref = copy.deepcopy(m)
    count = count_macs if what == "macs" else (lambda model, _: count_params(model))
    before = count(m, x)
    res = prune_channels(m, x, **{f"target_{what}": fraction}, latency_table=table, round_to=round_to, scope=scope)
    uni = _uniform(ref, x, fraction, what, round_to=round_to, scope=scope)
    assert count(m, x) <= fraction * before
    assert _estimate(table, m) <= _estimate(table, uni) * (1 + 1e-9)
    assert _estimate(table, m) < _estimate(table, ref)
    assert m.fc.out_features == 10
    if round_to:
        for name in ("conv1", "conv2", "conv3"):
            c = m.get_submodule(name).out_channels
            assert c == ref.get_submodule(name).out_channels or c % round_to == 0
    # the pruned model is the plan applied: it computes the reference (chosen channels zeroed at consumers)
    res.plans[0].zero_consumers(ref)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


def test_greedy_kept_when_it_is_faster():
    """With time in proportion to MACs but one group's channels near-unimportant and cheap in MACs, the allocator
    options beat uniform and one of them is kept (the choice is by the estimate, not a fixed preference)."""
    m, x = _model()
    table = _table(m, x, lambda n, c: 1e-4 + {"conv1": 1e-5, "conv2": 1e-7, "conv3": 1e-5, "fc": 0.0}[n] * c,
                   lambda n, c: 1.0 + {"conv1": 0.0, "conv2": 0.1, "conv3": 0.001, "fc": 1.0}[n] * c)
    plan, options = fastest_plan(m, x, 0.6, "macs", table, OPTS)
    by = {o.name: o for o in options}
    assert all(o.count <= 0.6 + 1e-12 for o in options)
    assert "uniform" in by and len(by) == len(options)
    fair = [o for o in options if o.name != "uniform" and o.count >= min(by["uniform"].count, 0.6 / 1.05)]
    if fair and min(o.latency for o in fair) < by["uniform"].latency:
        assert options[0].name != "uniform" and options[0].latency == min(o.latency for o in fair)
    else:
        assert options[0].name == "uniform"


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp1, self.mlp2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.att(h, h, h, need_weights=False)[0]
        h = h + self.mlp2(self.mlp1(h).relu())
        return self.out(h)


def test_mha_in_projection_counts():
    """nn.MultiheadAttention's input projection is a bare parameter, outside the table's Linear layers: the MACs
    target is still met on the pruned model's own count (the engine's exact count, not the table's modules)."""
    torch.manual_seed(0)
    m, x = MHANet().eval(), torch.randn(2, 10, 6)
    specs = layer_specs(m, x)
    assert not any(n == "att" for n in specs)
    table = _table(m, x, lambda n, c: 1e-4 + specs[n].macs(c_out=c) * 1e-9,
                   lambda n, c: 1e-4 + specs[n].macs(c_in=c) * 1e-9)
    ref = copy.deepcopy(m)
    before = count_macs(m, x)
    res = prune_channels(m, x, target_macs=0.5, latency_table=table)
    assert count_macs(m, x) <= 0.5 * before
    assert res.macs_after == count_macs(m, x)
    assert _estimate(table, m) <= _estimate(table, _uniform(ref, x, 0.5)) * (1 + 1e-9)
    # every option meets the target without overshooting it by far (a budget on the table's Linear layers alone
    # would remove far more: the input projection's MACs do not shrink in its count)
    _, options = fastest_plan(ref, x, 0.5, "macs", table, OPTS)
    assert all(0.5 / 1.15 <= o.count <= 0.5 for o in options), options


def test_refusals():
    m, x = _model()
    table = _staircase_table(m, x)
    with pytest.raises(PruningError, match="latency_table"):
        prune_channels(copy.deepcopy(m), x, ratio=0.5, latency_table=table)
    with pytest.raises(PruningError, match="whole-head"):
        prune_channels(copy.deepcopy(m), x, target_macs=0.5, latency_table=table, heads="head_dim")
    with pytest.raises(PruningError, match="LatencyTable"):
        prune_channels(copy.deepcopy(m), x, target_macs=0.5, latency_table={"conv1": 1.0})
    with pytest.raises(PruningError, match="unknown plan option"):
        fastest_plan(m, x, 0.5, "macs", table, {}, options=("fast",))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PruningError):
        prune_channels(m, x, target_macs=0.5, latency_table=LatencyTable.shapes_only(m, x))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched on refusal


def test_measure_keeps_the_fastest_measured_plan(monkeypatch):
    """``measure=True``: the options the table rates at least as fast as uniform are timed here, and the fastest
    *measured* is kept, whatever the table said (it misordered ConvNeXt-T's plans at 2x on the CPU)."""
    import secateur.fastest_plan as F
    m, x = _model()
    table = _table(m, x, lambda n, c: 1e-4 + {"conv1": 1e-5, "conv2": 1e-7, "conv3": 1e-5, "fc": 0.0}[n] * c,
                   lambda n, c: 1.0 + {"conv1": 0.0, "conv2": 0.1, "conv3": 0.001, "fc": 1.0}[n] * c)
    _, by_table = fastest_plan(m, x, 0.6, "macs", table, OPTS)
    if by_table[0].name == "uniform":
        pytest.skip("the table already prefers uniform here")
    seen = []

    def timer(model, inputs, plans, repeats=10):  # plans come in the table's order, uniform last (the fallback):
        seen.append(len(plans))  # measured, uniform is the fastest here
        return [0.9] * (len(plans) - 1) + [0.5]

    monkeypatch.setattr(F, "measured_fractions", timer)
    plan, options = fastest_plan(m, x, 0.6, "macs", table, OPTS, measure=True)
    assert seen and seen[0] >= 2  # the table's pick and uniform at least
    assert options[0].name == "uniform" and "measured here" in plan.notes[-1]
    # with real timing (no patch) the call runs end to end and keeps a plan that meets the target
    monkeypatch.undo()
    plan, options = fastest_plan(m, x, 0.6, "macs", table, OPTS, measure=True, repeats=3)
    assert options[0].count <= 0.6 + 1e-12
