"""prune_channels(target_latency=..., verify=...): the target checked by measurement, with re-allocation.

The "machine" is a fake timer whose answer is a known function of the pruned model (the synthetic table's
estimate times a fixed gap, plus a fixed cost the table cannot see), so every expectation is computed,
never timed. One test runs the real timer, asserting only what cannot depend on the machine's speed."""
import copy
import warnings

import pytest
import torch
from test_target_latency import _estimate, _model, _table

from secateur.errors import PruningError
from secateur.latency_target import LatencyCheck, LatencyRound, measured_ratio
from secateur.structured import prune_channels

torch.set_num_threads(1)


class GapTimer:
    """Measured fraction = table estimate * ``gap`` + ``fixed`` (a part of the time that never shrinks).
    Records what it was given: the dense model must be the untouched original every time."""

    def __init__(self, table, dense_widths, gap=1.0, fixed=0.0):
        self.table, self.gap, self.fixed = table, gap, fixed
        self.dense_widths = dense_widths
        self.calls = 0

    def __call__(self, dense, pruned, example_inputs):
        self.calls += 1
        assert _widths(dense) == self.dense_widths, "the dense model changed while candidates were measured"
        assert _widths(pruned) != self.dense_widths
        return self.gap * _estimate(self.table, pruned) / self.table.total() + self.fixed


def _widths(m):
    return [tuple(p.shape) for p in m.parameters()]


def test_estimate_mode_never_measures_and_reports_the_estimate(monkeypatch):
    import secateur.latency_target as lt

    def boom(*a, **k):
        raise AssertionError("estimate mode measured")
    monkeypatch.setattr(lt, "measured_ratio", boom)
    m, x = _model()
    table = _table(m, x)
    res = prune_channels(m, x, target_latency=0.5, latency_table=table, verify="estimate")
    assert res.latency_measured is None and res.latency_rounds == []
    assert res.latency_estimate == pytest.approx(_estimate(table, m) / table.total())
    assert res.latency_estimate <= 0.5 + 1e-9
    m2, _ = _model()
    res2 = prune_channels(m2, x, target_latency=0.5, latency_table=table)  # a table given: estimate by default
    assert res2.latency_measured is None and _widths(m2) == _widths(m)


def test_a_measured_gap_is_closed_by_a_tighter_estimated_target():
    m, x = _model()
    table = _table(m, x)
    timer = GapTimer(table, _widths(m), gap=1.3)
    res = prune_channels(m, x, target_latency=0.5, latency_table=table,
                         verify=LatencyCheck(timer=timer, tolerance=0.02, rounds=4))
    rounds = res.latency_rounds
    assert len(rounds) >= 2 and timer.calls == len(rounds)
    assert rounds[0].asked == 0.5 and rounds[0].measured > 0.5 * 1.02   # the table alone misses
    for a, b in zip(rounds, rounds[1:]):                              # each retry asks for less, by the gap
        assert b.asked == pytest.approx(a.asked * 0.5 / a.measured)
        assert b.asked < a.asked
    last = rounds[-1]
    assert last.measured <= 0.5 * 1.02 and res.latency_measured == last.measured
    # what was applied is what was measured: the final model's estimate and measured value agree
    assert res.latency_estimate == pytest.approx(last.estimated)
    assert 1.3 * res.latency_estimate == pytest.approx(res.latency_measured)
    assert "measured" in res.description


def test_met_at_once_means_one_round_and_the_estimate_plan():
    m, x = _model()
    ref = copy.deepcopy(m)
    table = _table(m, x)
    res = prune_channels(m, x, target_latency=0.5, latency_table=table,
                         verify=LatencyCheck(timer=GapTimer(table, _widths(m), gap=0.9)))
    assert len(res.latency_rounds) == 1
    prune_channels(ref, x, target_latency=0.5, latency_table=table, verify="estimate")
    assert _widths(ref) == _widths(m)  # measuring changed nothing about the choice


def test_unreachable_when_measured_keeps_the_fastest_and_warns():
    m, x = _model()
    table = _table(m, x)
    # 45 % of the time never shrinks: 0.5 of dense cannot be measured, whatever the allocator does
    timer = GapTimer(table, _widths(m), gap=1.0, fixed=0.45)
    with pytest.warns(UserWarning, match="not met when measured"):
        res = prune_channels(m, x, target_latency=0.5, latency_table=table,
                             verify=LatencyCheck(timer=timer, rounds=3))
    measured = [r.measured for r in res.latency_rounds]
    assert 1 <= len(measured) <= 3
    assert res.latency_measured == min(measured) > 0.5
    assert res.latency_estimate == pytest.approx(
        next(r.estimated for r in res.latency_rounds if r.measured == min(measured)))
    torch.testing.assert_close(m(x).shape, torch.Size([2, 10]))


def test_unreachable_estimate_in_the_first_round_is_an_error_and_changes_nothing():
    m, x = _model()
    table = _table(m, x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    timer = GapTimer(table, _widths(m))
    with pytest.raises(PruningError, match="reached_fraction_of_dense"):
        prune_channels(m, x, target_latency=0.01, latency_table=table, verify=LatencyCheck(timer=timer))
    assert timer.calls == 0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("verify", ["fast", 3, "MEASURE"])
def test_bad_verify_raises_and_changes_nothing(verify):
    m, x = _model()
    before = _widths(m)
    with pytest.raises(PruningError, match="verify"):
        prune_channels(m, x, target_latency=0.5, latency_table=_table(m, x), verify=verify)
    assert _widths(m) == before


def test_verify_without_target_latency_is_refused():
    m, x = _model()
    with pytest.raises(PruningError, match="target_latency"):
        prune_channels(m, x, ratio=0.5, verify="measure")
    assert m.conv1.out_channels == 16


@pytest.mark.parametrize("kw", [dict(tolerance=-0.1), dict(tolerance=1.0), dict(rounds=0), dict(repeats=0),
                                dict(rounds=True), dict(timer="clock")])
def test_bad_check_settings_raise(kw):
    with pytest.raises(PruningError, match="LatencyCheck"):
        LatencyCheck(**kw)


def test_real_timer_runs_in_eval_and_restores_modes():
    """The default timer on a real (tiny) model: only machine-independent facts are asserted."""
    m, x = _model()
    pruned = copy.deepcopy(m)
    m.train()
    stats = m.bn1.running_mean.clone()
    r = measured_ratio(m, pruned, x, repeats=2, warmup=1)
    assert r > 0 and m.training and all(mod.training for mod in m.modules())
    assert not pruned.training
    assert torch.equal(m.bn1.running_mean, stats)  # eval during timing: BatchNorm statistics untouched


def test_measure_mode_end_to_end_with_the_real_timer():
    m, x = _model()
    table = _table(m, x)
    with warnings.catch_warnings():  # a tiny model's fixed costs may keep it from 0.5 when measured
        warnings.simplefilter("ignore")
        res = prune_channels(m, x, target_latency=0.5, latency_table=table,
                             verify=LatencyCheck(rounds=2, repeats=3, warmup=1))
    assert 1 <= len(res.latency_rounds) <= 2
    assert all(isinstance(r, LatencyRound) and r.measured > 0 for r in res.latency_rounds)
    assert res.latency_measured in [r.measured for r in res.latency_rounds]
    assert m(x).shape == (2, 10)


def test_a_table_of_another_model_is_refused_before_anything_changes():
    from torch import nn

    from secateur.latency_model import LatencyTable, layer_specs
    m, x = _model()
    specs = layer_specs(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), x)
    store = {s.key(): {"out": {c: 1e-3 * c for c in range(1, s.out_channels + 1)},
                       "in": {c: 1e-3 for c in range(1, s.in_channels + 1)}} for s in specs.values()}
    table = LatencyTable.from_measurements(specs, store)
    before = _widths(m)
    with pytest.raises(PruningError, match="not found in the model"):
        prune_channels(m, x, target_latency=0.5, latency_table=table, verify="estimate")
    assert _widths(m) == before
