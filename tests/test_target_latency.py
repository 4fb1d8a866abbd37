"""prune_channels(..., target_latency=...): one allocator-chosen plan that meets an estimated latency target.

The latency table is built from a synthetic cost (a staircase in output channels, linear in input channels,
plus a fixed per-layer overhead) so the tests are deterministic; the check re-estimates the pruned model's
latency from its layers' new sizes, independently of the allocator's own bookkeeping."""
import copy
import math

import pytest
import torch
from torch import nn

from secateur.errors import PruningError
from secateur.latency_model import LatencyTable, layer_specs
from secateur.structured import apply_structure, prune_channels
from helpers import randomize_bn

torch.set_num_threads(1)

OVERHEAD = 1e-4


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = nn.functional.max_pool2d(self.bn2(self.conv2(x)).relu(), 2)
        x = self.conv3(x).relu().mean((2, 3))
        return self.fc(x)


def _model(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN().eval()
    randomize_bn(m.bn1, m.bn2, low=0.1)
    return m, torch.randn(2, 3, 12, 12)


def _out_cost(spec, c):
    """Staircase: time grows per started block of 8 output channels (like a vectorised kernel)."""
    return OVERHEAD + spec.macs(c_out=math.ceil(c / 8) * 8) * 1e-9


def _in_cost(spec, c):
    return OVERHEAD + spec.macs(c_in=c) * 1e-9


def _table(model, x) -> LatencyTable:
    specs = layer_specs(model, x)
    store = {s.key(): {"out": {c: _out_cost(s, c) for c in range(1, s.out_channels + 1)},
                       "in": {c: _in_cost(s, c) for c in range(1, s.in_channels + 1)}} for s in specs.values()}
    return LatencyTable.from_measurements(specs, store, device="synthetic")


def _estimate(table: LatencyTable, model: nn.Module) -> float:
    """The table's latency of ``model`` read from its layers' current sizes."""
    outs, ins = {}, {}
    for name in table.specs:
        mod = model.get_submodule(name)
        w = mod.weight
        outs[name] = w.shape[0]
        ins[name] = w.shape[1] * getattr(mod, "groups", 1)
    return table.total(outs, ins)


@pytest.mark.parametrize("target,round_to", [(0.5, None), (0.3, None), (0.6, 4)])
def test_latency_target_is_met_and_oracle_holds(target, round_to):
    m, x = _model()
    table = _table(m, x)
    dense = _estimate(table, m)
    assert dense == pytest.approx(table.total())
    ref = copy.deepcopy(m)
    res = prune_channels(m, x, target_latency=target, latency_table=table, round_to=round_to)
    assert len(res.plans) == 1
    after = _estimate(table, m)
    assert after <= target * dense * (1 + 1e-9)
    assert after < dense and res.macs_after < res.macs_before
    for name in table.specs:  # no layer is pruned to zero; rounding respected on pruned layers
        w = m.get_submodule(name).weight
        assert w.shape[0] >= 1 and w.shape[1] >= 1
        if round_to and name != "fc" and w.shape[0] < ref.get_submodule(name).weight.shape[0]:
            assert w.shape[0] % round_to == 0
    assert m.fc.out_features == 10  # the model's outputs are never pruned
    res.plans[0].zero_consumers(ref)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


def test_structure_record_rebuilds_the_pruned_model():
    m, x = _model()
    prune_channels(m, x, target_latency=0.5, latency_table=_table(m, x))
    fresh, _ = _model(seed=1)
    apply_structure(fresh, m._secateur_structure)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x))


def test_ignore_is_respected():
    m, x = _model()
    prune_channels(m, x, target_latency=0.6, latency_table=_table(m, x), ignore=["conv2"])
    assert m.conv2.out_channels == 32 and m.bn2.num_features == 32


def test_table_is_built_on_demand(monkeypatch):
    m, x = _model()
    synthetic = _table(m, x)
    calls = []

    def build(model, example_inputs, **kw):
        calls.append(model)
        return synthetic

    monkeypatch.setattr(LatencyTable, "build", staticmethod(build))
    prune_channels(m, x, target_latency=0.5, verify="estimate")  # measuring: tests/test_latency_target.py
    assert calls and calls[0] is m
    assert _estimate(synthetic, m) <= 0.5 * synthetic.total() * (1 + 1e-9)


def _unchanged(m, sd):
    return all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items()) and len(sd) == len(m.state_dict())


@pytest.mark.parametrize("kw", [
    dict(target_latency=0.0), dict(target_latency=1.0), dict(target_latency=1.5), dict(target_latency=-0.2),
    dict(target_latency=True), dict(target_latency="half"), dict(target_latency=0.5, target_macs=0.5),
    dict(target_latency=0.5, target_params=0.5), dict(target_latency=0.5, ratio={"conv1": 0.5}),
    dict(target_latency=0.5, threshold=0.1), dict(target_latency=0.5, steps=2),
    dict(target_latency=0.5, latency_table="table"),
])
def test_bad_values_raise_and_leave_the_model_unchanged(kw):
    m, x = _model()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    kw = dict(kw)
    if "latency_table" not in kw:
        kw["latency_table"] = _table(m, x)
    with pytest.raises(PruningError):
        prune_channels(m, x, **kw)
    assert _unchanged(m, sd)


def test_unreachable_target_says_the_best_estimate_and_changes_nothing():
    m, x = _model()
    table = _table(m, x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    # every layer keeps its fixed overhead even at one channel: 1 % of today's latency is out of reach
    assert len(table.specs) * OVERHEAD > 0.01 * table.total()
    with pytest.raises(PruningError, match="reached_fraction_of_dense"):
        prune_channels(m, x, target_latency=0.01, latency_table=table)
    assert _unchanged(m, sd)
