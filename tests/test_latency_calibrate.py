"""Calibrating the latency table against in-place timings (secateur.latency_calibrate).

The exact checks run on a fake machine: a clock that only moves when a table layer or the whole model runs,
by a known function of the widths (``scale * table + offset`` per layer, ``tail_scale * owned tail +
tail_offset`` outside the layers). The calibration must recover those numbers exactly from the dense model and
the engine's uniform copies, and a calibration that is the identity (or one factor for everything) must change
no plan. One check times for real, asserting only what cannot depend on the machine's speed."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateur.latency_calibrate as lc
from secateur.allocate import group_counts
from secateur.errors import PruningError
from secateur.graph import build_graph
from secateur.latency_calibrate import Calibration, InPlace, fit_curve, fit_line, measure_in_place
from secateur.latency_model import LatencyTable, channel_grid, layer_specs
from secateur.latency_tail import Tail
from secateur.structured import prune_channels


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pw = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.conv(x).relu())).relu()
        return self.fc(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 8, 8)


def _table(model, x, tail=True):
    """A table of known latencies: affine in the output count, the input count scaling it."""
    specs = layer_specs(model, x)
    store = {s.key(): {"out": {c: 1e-6 * (5 + c) for c in channel_grid(s.out_channels)},
                       "in": {c: 1e-6 * (3 + c) for c in channel_grid(s.in_channels)}} for s in specs.values()}
    t = LatencyTable.from_measurements(specs, store)
    t._names = {id(m): n for n, m in model.named_modules() if n in specs}
    if tail:
        t.tail = Tail(fixed={"conv": 2e-6, "pw": 1e-6}, scaled={"conv": 8e-6, "pw": 6e-6}, other=4e-6)
    return t


@pytest.fixture(scope="module")
def copies():
    """Uniform copies by the engine (the calibration's own two, and one it is not fitted on)."""
    model, x = _net()
    return lc.uniform_variants(model, x, (0.6, 0.3, 0.45), round_to=4)


TRUTH = Calibration(scale={"conv": 1.5, "dw": 0.7, "pw": 1.2, "fc": 2.0},
                    offset={"conv": 3e-6, "dw": 0.0, "pw": 1e-5, "fc": 2e-6}, tail_scale=1.3, tail_offset=9e-6)


class FakeMachine:
    """A clock that moves only when a table layer or a `Net` runs, by ``truth`` applied to the table's raw
    estimate of that layer (or of the tail) at the widths the model has right then. Global forward hooks run
    before a module's own, so the calibration's hooks read the clock after the layer's time was added."""

    def __init__(self, table: LatencyTable, truth: Calibration):
        self.table, self.truth, self.now, self.names, self.widths = table, truth, 0.0, {}, ({}, {})
        self.runs = 0

    def clock(self) -> float:
        return self.now

    def _pre(self, mod, args):
        if isinstance(mod, Net):
            self.names = {id(m): n for n, m in mod.named_modules()}
            self.widths = self.table.widths(mod)

    def _post(self, mod, args, out):
        outs, ins = self.widths
        if isinstance(mod, Net):
            self.runs += 1
            self.now += self.truth.tail(self.table.owned_tail(outs, calibrated=False)) + self.truth.tail_offset
        elif self.names.get(id(mod)) in self.table.specs:
            n = self.names[id(mod)]
            self.now += self.truth.layer(n, self.table.latency(n, outs[n], ins[n], calibrated=False))

    def __enter__(self):
        self.handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                        nn.modules.module.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------- fitting
@given(st.floats(0.05, 20.0), st.floats(0.0, 1e-3), st.lists(st.floats(1e-6, 1e-2), min_size=2, max_size=5,
                                                           unique=True))
@settings(max_examples=100, deadline=None)
def test_fit_line_recovers_any_scale_and_non_negative_offset(scale, offset, xs):
    if max(xs) - min(xs) < 1e-3 * max(xs):
        return
    a, b = fit_line(xs, [scale * x + offset for x in xs])
    assert a == pytest.approx(scale, rel=1e-6) and b == pytest.approx(offset, rel=1e-6, abs=1e-12)


def test_fit_line_falls_back_to_a_scale_and_to_an_offset():
    xs = [1.0, 2.0, 4.0]
    a, b = fit_line(xs, [3 * x - 1 for x in xs])       # a negative offset is not kept: the scale alone
    assert b == 0.0 and a == pytest.approx(sum(x * (3 * x - 1) / (3 * x - 1) ** 2 for x in xs)
                                          / sum(x * x / (3 * x - 1) ** 2 for x in xs))
    assert fit_line([2.0, 2.0], [3.0, 5.0])[1] == 0.0  # one width only: a scale
    assert fit_line([2.0], [3.0]) == (pytest.approx(1.5), 0.0)
    assert fit_line([0.0, 0.0], [3.0, 5.0])[0] == 1.0  # nothing to scale (no owned tail): an offset alone
    a, b = fit_line(xs, [5.0, 3.0, 1.0])               # slower with fewer channels: noise, a scale alone
    assert a > 0 and b == 0.0
    with pytest.raises(PruningError, match="as many"):
        fit_line([1.0], [1.0, 2.0])


@given(st.floats(0.05, 20.0), st.floats(1.05, 2.9), st.lists(st.floats(1e-6, 1e-2), min_size=2, max_size=5,
                                                            unique=True))
@settings(max_examples=100, deadline=None)
def test_fit_curve_recovers_a_steeper_than_linear_layer(scale, power, xs):
    if max(xs) < 1.5 * min(xs):
        return
    a, b, p = fit_curve(xs, [scale * x ** power for x in xs])
    assert b == 0.0 and p == pytest.approx(power, rel=1e-6) and a == pytest.approx(scale, rel=1e-5)


def test_fit_curve_keeps_lines_and_is_never_negative():
    xs = [1.0, 2.0, 4.0]
    assert fit_curve(xs, [2 * x + 1 for x in xs]) == (pytest.approx(2.0), pytest.approx(1.0), 1.0)
    assert fit_curve(xs, [5.0, 3.0, 1.0])[2] == 1.0       # slower with fewer channels: noise, no curve
    assert fit_curve([2.0], [3.0]) == (pytest.approx(1.5), 0.0, 1.0)
    a, b, p = fit_curve(xs, [3 * x - 1 for x in xs])        # what a negative offset would fit: a steeper curve,
    assert b == 0.0 and 1.0 < p <= lc.MAX_POWER             # positive at every width, and closer than the
    line = fit_line(xs, [3 * x - 1 for x in xs])            # scale alone
    err = lambda f: sum(((f(x) - (3 * x - 1)) / (3 * x - 1)) ** 2 for x in xs)  # noqa: E731
    assert err(lambda x: a * x ** p) < err(lambda x: line[0] * x)
    assert a * 1e-3 ** p > 0
    a, b, p = fit_curve(xs, [x ** 5 for x in xs])           # steeper than the cap: never above it
    assert p <= lc.MAX_POWER


def test_measure_in_place_sums_a_layer_called_twice_and_keeps_the_minimum():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x).relu())

    now = [0.0]
    bursts = iter([5.0] * 4)       # the first pass (warm-up excluded) is hit by load at every read

    def clock():
        now[0] += next(bursts, 0.0) + 1.0
        return now[0]
    m = Twice().eval()
    (t,) = measure_in_place([m], torch.randn(2, 4), ["fc"], repeats=3, warmup=0, clock=clock)
    # every read moves the clock by 1: a layer call reads twice (1 s inside), the pass two more around 4 reads
    assert t.layers == {"fc": 2.0} and t.total == 5.0 and t.outside == 3.0
    with pytest.raises(PruningError, match="not found"):
        measure_in_place([m], torch.randn(2, 4), ["nope"], clock=clock)
    assert not m.fc._forward_hooks and not m.fc._forward_pre_hooks


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("tail", [True, False])
def test_calibration_recovers_known_in_place_latencies(tail, copies):
    model, x = _net()
    table = _table(model, x, tail)
    truth = TRUTH if tail else Calibration(TRUTH.scale, TRUTH.offset, 1.0, TRUTH.tail_offset)
    # the engine's own copies once, the same ones given explicitly once
    given = {} if tail else dict(variants=copies[:2])
    with FakeMachine(table, truth) as machine:
        cal = table.calibrate(model, x, fractions=(0.6, 0.3), round_to=4, repeats=2, warmup=1,
                              clock=machine.clock, cache=False, **given)
    c = cal.calibration
    assert c.points == 3 and machine.runs >= 3 * 3
    for n in table.specs:
        assert c.scale[n] == pytest.approx(truth.scale[n], rel=1e-6), n
        assert c.offset[n] == pytest.approx(truth.offset[n], rel=1e-6, abs=1e-12), n
    assert c.tail_offset == pytest.approx(truth.tail_offset, rel=1e-6)
    if tail:
        assert c.tail_scale == pytest.approx(truth.tail_scale, rel=1e-6)
    # and so the calibrated table predicts a copy it was not fitted on, and the raw one is still there
    other = copies[2]
    assert table.widths(other) not in [table.widths(m) for m in copies[:2]]
    with FakeMachine(table, truth) as machine:
        (t,) = measure_in_place([other], x, table.specs, repeats=1, warmup=0, clock=machine.clock)
    assert cal.estimate(other) == pytest.approx(t.total, rel=1e-9)
    assert cal.estimate(other, calibrated=False) == pytest.approx(table.estimate(other), rel=1e-12)
    assert cal.estimate(other, calibrated=False) != pytest.approx(t.total, rel=1e-3)


def test_calibration_recovers_a_steeper_layer(copies):
    model, x = _net()
    table = _table(model, x)
    truth = Calibration(TRUTH.scale, {**TRUTH.offset, "pw": 0.0}, TRUTH.tail_scale, TRUTH.tail_offset,
                        power={"pw": 1.4})
    with FakeMachine(table, truth) as machine:
        cal = table.calibrate(model, x, variants=copies[:2], repeats=1, warmup=0, clock=machine.clock, cache=False)
    c = cal.calibration
    assert c.power == {"pw": pytest.approx(1.4, rel=1e-6)} and c.offset["pw"] == 0.0
    assert c.scale["pw"] == pytest.approx(1.2, rel=1e-5)
    with FakeMachine(table, truth) as machine:
        (t,) = measure_in_place([copies[2]], x, table.specs, repeats=1, warmup=0, clock=machine.clock)
    assert cal.estimate(copies[2]) == pytest.approx(t.total, rel=1e-6)


def test_calibrated_total_is_the_corrected_sum_of_the_parts():
    model, x = _net()
    table = _table(model, x)
    cal = LatencyTable(**{**table.__dict__, "calibration": TRUTH})
    outs, ins = {"conv": 16, "dw": 16, "pw": 24, "fc": 10}, {"dw": 16, "pw": 16, "fc": 24}
    expect = sum(TRUTH.scale[n] * table.latency(n, outs[n], ins.get(n)) + TRUTH.offset[n] for n in table.specs)
    expect += TRUTH.tail_scale * sum(table.tail_latency(n, outs[n]) for n in table.specs) + TRUTH.tail_offset
    assert cal.total(outs, ins) == pytest.approx(expect, rel=1e-12)
    assert cal.total(outs, ins, calibrated=False) == pytest.approx(table.total(outs, ins), rel=1e-12)
    members = [[("conv", "out"), ("dw", "out"), ("pw", "in")], [("pw", "out"), ("fc", "in")]]
    assert cal.cost_fn(members, "latency")([16, 24]) == pytest.approx(expect, rel=1e-12)
    assert cal.snap("pw", 20) == table.snap("pw", 20) and cal.candidates("pw") == table.candidates("pw")


@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_identity_or_one_factor_calibration_changes_no_plan(factor):
    """The correction is the identity (or the same factor on every part, which a relative target cannot
    see): same estimates up to the factor, same allocation, same pruned model."""
    model, x = _net()
    table, graph = _table(model, x), build_graph(model, x)
    one = Calibration({n: factor for n in table.specs}, {}, factor, factor * table.tail.other)
    cal = LatencyTable(**{**table.__dict__, "calibration": one})
    assert cal.estimate(model) == pytest.approx(factor * table.estimate(model), rel=1e-12)
    for target in (1.3, 2.0, 3.0):
        a = group_counts(model, x, target, metric="latency", table=table, graph=graph)
        b = group_counts(model, x, target, metric="latency", table=cal, graph=graph)
        assert [k for _, k in a] == [k for _, k in b]
        assert any(k < g.size for g, k in a)  # a plan that prunes something
    p1, p2 = Net().eval(), Net().eval()
    p2.load_state_dict(p1.state_dict())
    prune_channels(p1, x, target_latency=0.5, latency_table=table, verify="estimate")
    prune_channels(p2, x, target_latency=0.5, latency_table=cal, verify="estimate")
    assert table.widths(p1) == table.widths(p2)


def test_engine_refusal_falls_back_to_the_dense_model(monkeypatch):
    model, x = _net()
    table = _table(model, x)

    def refuse(*a, **k):
        raise PruningError("nothing to prune here")
    monkeypatch.setattr(lc, "uniform_variants", refuse)
    with FakeMachine(table, TRUTH) as machine, pytest.warns(UserWarning, match="dense model alone"):
        cal = table.calibrate(model, x, repeats=1, warmup=0, clock=machine.clock, cache=False)
    assert cal.calibration.points == 1 and set(cal.calibration.offset.values()) == {0.0}
    assert machine.runs == 1 and cal.estimate(model) == pytest.approx(machine.now, rel=1e-9)  # one dense pass
    with pytest.raises(PruningError, match="fractions"):
        table.calibrate(model, x, fractions=(1.5,), cache=False)
    with pytest.raises(PruningError, match="shapes-only"):
        LatencyTable.shapes_only(model, x).calibrate(model, x)


def test_build_calibrates_for_real_and_caches_the_timings(tmp_path, monkeypatch):
    """Real timing: only what the machine's speed cannot change is asserted."""
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    model, x = _net()
    opts = dict(threads=1, repeats=2, warmup=1, max_points=4, min_sample_s=2e-4, progress=False)
    t = LatencyTable.build(model, x, calibrate=dict(fractions=(0.5,), round_to=4, repeats=2), **opts)
    c = t.calibration
    assert c is not None and c.points == 2 and set(c.scale) == set(t.specs)
    assert all(s >= 0 and math.isfinite(s) for s in c.scale.values())
    assert all(o >= 0 for o in c.offset.values()) and c.tail_offset >= 0
    assert t.estimate(model) > 0 and t.estimate(model, calibrated=False) == LatencyTable.build(
        model, x, **opts).estimate(model)

    def no_timing(*a, **k):
        raise AssertionError("timed again despite the cache")
    monkeypatch.setattr(lc, "measure_in_place", no_timing)
    t2 = LatencyTable.build(model, x, calibrate=dict(fractions=(0.5,), round_to=4, repeats=2), **opts)
    assert t2.calibration == c
    with pytest.raises(AssertionError, match="timed again"):  # other copies are another key
        LatencyTable.build(model, x, calibrate=dict(fractions=(0.4,), round_to=4), **opts)


def test_in_place_record_round_trips():
    t = InPlace(3.0, {"a": 1.0, "b": 0.5})
    assert t.outside == 1.5
    assert Calibration().layer("a", 2.0) == 2.0 and Calibration().other(7.0) == 7.0
