"""The per-layer latency table (secateur.latency_model).

Staircase logic is checked on tables built from synthetic measurements whose steps are known by
construction; measurement, shapes, caching and MACs/params on real (tiny) layers, with independent
oracles (the module's own parameter count, torch's FLOP counter, forward hooks)."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import secateur.latency_model as lm
from secateur.errors import PruningError
from secateur.latency_model import LatencyTable, LayerSpec, channel_grid, layer_specs


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.conv(x).relu()))
        return self.fc(x.mean((2, 3)))


@given(st.integers(1, 5000), st.integers(2, 64), st.sampled_from([1, 8, 16]))
@settings(max_examples=200, deadline=None)
def test_channel_grid_properties(c, max_points, multiple):
    g = channel_grid(c, max_points=max_points, multiple=multiple)
    assert g == sorted(set(g)) and g[-1] == c and g[0] >= 1
    if c <= max_points:
        assert g == list(range(1, c + 1))
    elif len(g) == 1:  # no more channels than one step of the grid: only the full count
        assert c <= multiple * max(1, math.ceil(c / max_points / multiple))
    else:
        step = g[0]
        assert step % multiple == 0
        assert all(b - a == step for a, b in zip(g[:-2], g[1:-1]))
        assert len(g) <= max_points + 1 or step == multiple


def test_layer_specs_record_actual_shapes():
    m, x = Tiny().eval(), torch.randn(2, 3, 12, 10)
    shapes = {}

    def record(n):
        def hook(mod, args, out):
            shapes.setdefault(n, (args[0].shape, out.shape))
        return hook
    hooks = [mod.register_forward_hook(record(n))
             for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    m(x)
    for h in hooks:
        h.remove()
    specs = layer_specs(m, x)
    assert set(specs) == set(shapes)
    for n, s in specs.items():
        assert s.input_shape == tuple(shapes[n][0]) and s.output_shape == tuple(shapes[n][1])
    assert specs["dw"].depthwise and not specs["pw"].depthwise and specs["fc"].kind == "linear"
    assert set(layer_specs(m, x, layers=["fc"])) == {"fc"}
    with pytest.raises(PruningError, match="nope"):
        layer_specs(m, x, layers=["nope"])


@pytest.mark.parametrize("layer, c_in, c_out", [("conv", 3, 8), ("conv", 3, 16), ("pw", 5, 24), ("pw", 16, 7),
                                                 ("dw", 9, 9), ("fc", 11, 3), ("fc", 24, 10)])
def test_macs_and_params_match_independent_counts(layer, c_in, c_out):
    m, x = Tiny().eval(), torch.randn(2, 3, 12, 10)
    spec = layer_specs(m, x)[layer]
    built, inp = lm._BY_NAME[spec.kind].build(spec, c_in, c_out, torch.device("cpu"))
    assert spec.params(c_in, c_out) == sum(p.numel() for p in built.parameters())
    with FlopCounterMode(display=False) as counter:  # torch's own counter: 2 FLOPs per MAC, no bias
        built(inp)
    assert spec.macs(c_in, c_out) == pytest.approx(counter.get_total_flops() / 2)
    assert built(inp).shape[0] == 2


def _synthetic(step: int = 32, full: int = 256, in_full: int = 128):
    """A layer whose output latency is ``ceil(c / step)`` ms and input latency linear in c."""
    spec = LayerSpec("linear", in_full, full, (1, in_full), (1, full), (True,))
    out = {c: math.ceil(c / step) * 1e-3 for c in channel_grid(full)}
    inn = {c: (c / in_full) * 8e-3 for c in channel_grid(in_full)}
    return spec, LatencyTable.from_measurements({"fc": spec}, {spec.key(): {"out": out, "in": inn}})


def test_staircase_candidates_and_snap():
    _, t = _synthetic()
    assert t.candidates("fc") == list(range(32, 257, 32))  # the fast edge of every step
    for c in range(1, 257):
        s = t.snap("fc", c)
        assert s >= c and s % 32 == 0 and t.latency("fc", s) == t.latency("fc", c)
        assert s == 32 * math.ceil(c / 32)


def test_latency_reads_next_measured_count_and_scales_with_inputs():
    spec, t = _synthetic()
    assert t.latency("fc", 256) == pytest.approx(8e-3)
    assert t.latency("fc", 65) == pytest.approx(3e-3)  # 65 -> measured 72 -> third step
    assert t.latency("fc", 64, in_channels=64) == pytest.approx(2e-3 * 0.5)
    assert t.total() == pytest.approx(8e-3)
    for bad in (0, 257, 3.5):
        with pytest.raises(PruningError, match="fc"):
            t.latency("fc", bad)
    with pytest.raises(PruningError, match="input"):
        t.latency("fc", 8, in_channels=129)
    with pytest.raises(PruningError, match="not in the latency table"):
        t.latency("other", 8)


def test_noise_within_tolerance_is_not_a_step():
    spec = LayerSpec("linear", 8, 64, (1, 8), (1, 64), (True,))
    out = {c: 1e-3 * (1 + 0.01 * ((c // 8) % 2)) for c in channel_grid(64)}  # 1 % wiggle
    t = LatencyTable.from_measurements({"fc": spec}, {spec.key(): {"out": out, "in": {c: 1e-3 for c in range(1, 9)}}})
    assert t.candidates("fc") == [64]
    assert t.snap("fc", 1) == 64


def test_cost_fn_metrics_agree_with_specs():
    m, x = Tiny().eval(), torch.randn(1, 3, 8, 8)
    specs = layer_specs(m, x)
    store = {}
    for s in specs.values():
        store[s.key()] = {"out": {c: c * 1e-6 for c in channel_grid(s.out_channels)},
                          "in": {c: c * 1e-6 for c in channel_grid(s.in_channels)}}
    t = LatencyTable.from_measurements(specs, store)
    # one group: conv's outputs = dw's channels = pw's inputs; another: pw outputs = fc inputs
    members = [[("conv", "out"), ("dw", "out"), ("pw", "in")], [("pw", "out"), ("fc", "in")]]
    macs = t.cost_fn(members, "macs")
    assert macs([16, 24]) == pytest.approx(sum(s.macs() for s in specs.values()))
    expect = (specs["conv"].macs(3, 8) + specs["dw"].macs(8, 8) + specs["pw"].macs(8, 12)
              + specs["fc"].macs(12, 10))
    assert macs([8, 12]) == pytest.approx(expect)
    params = t.cost_fn(members, "params")
    assert params([16, 24]) == pytest.approx(sum(p.numel() for p in m.parameters()))
    lat = t.cost_fn(members, "latency")
    assert lat([16, 24]) == pytest.approx(t.total())
    assert lat([8, 12]) < lat([16, 24])
    with pytest.raises(PruningError, match="metric"):
        t.cost_fn(members, "flops")
    with pytest.raises(PruningError, match="role"):
        t.cost_fn([[("conv", "sideways")]])


def test_build_measures_once_then_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    m, x = Tiny().eval(), torch.randn(1, 3, 8, 8)
    t = LatencyTable.build(m, x, threads=1, repeats=2, warmup=1, max_points=4, min_sample_s=2e-4, progress=False)
    assert set(t.specs) == {"conv", "dw", "pw", "fc"}
    for n, s in t.specs.items():
        assert all(t.latency(n, c) > 0 for c in range(1, s.out_channels + 1))
        assert t.snap(n, 1) in channel_grid(s.out_channels, max_points=4) and t.candidates(n)[-1] == s.out_channels
    assert t.latency(m.fc, 10) == t.latency("fc", 10)  # modules are accepted too
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["torch"] == torch.__version__

    def no_measuring(*a, **k):
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(lm, "_measure_sweep", no_measuring)
    t2 = LatencyTable.build(m, x, threads=1, repeats=2, warmup=1, max_points=4, progress=False)
    assert all(t2.latency(n, s.out_channels) == t.latency(n, s.out_channels) for n, s in t.specs.items())
    with pytest.raises(AssertionError, match="measured again"):  # another shape is another key
        LatencyTable.build(m, torch.randn(2, 3, 8, 8), threads=1, max_points=4, progress=False)


def test_build_rejects_model_without_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    with pytest.raises(PruningError, match="no Conv/Linear"):
        LatencyTable.build(nn.ReLU(), torch.randn(1, 3), progress=False)


def test_partial_members_and_graph_groups():
    """A group that owns only part of a layer (a concatenation) removes ``width`` positions per channel."""
    from types import SimpleNamespace as NS
    a = LayerSpec("linear", 4, 8, (1, 4), (1, 8), (True,))
    b = LayerSpec("linear", 4, 8, (1, 4), (1, 8), (True,))
    c = LayerSpec("linear", 16, 2, (1, 16), (1, 2), (True,))  # consumes cat(a, b)
    specs = {"a": a, "b": b, "c": c}
    t = LatencyTable.from_measurements(specs, {
        s.key(): {"out": {k: 1e-3 for k in range(1, s.out_channels + 1)},
                  "in": {k: 1e-3 for k in range(1, s.in_channels + 1)}} for s in specs.values()})
    groups = [NS(size=8, members=[NS(module="a", name="weight", kind="out", index=torch.arange(8)),
                                  NS(module="a", name="bias", kind="out", index=torch.arange(8)),
                                  NS(module="c", name="weight", kind="in", index=torch.arange(8))]),
              NS(size=8, members=[NS(module="b", name="weight", kind="out", index=torch.arange(8)),
                                  NS(module="c", name="weight", kind="in", index=torch.arange(8, 16))])]
    members = t.members_of(groups)
    assert members == [[("a", "out", 1.0), ("c", "in", 1.0)], [("b", "out", 1.0), ("c", "in", 1.0)]]
    macs = t.cost_fn(members, "macs", sizes=[8, 8])
    assert macs([5, 6]) == pytest.approx(a.macs(4, 5) + b.macs(4, 6) + c.macs(5 + 6, 2))
    assert macs([8, 8]) == pytest.approx(sum(s.macs() for s in specs.values()))
    with pytest.raises(PruningError, match="one size per group"):
        t.cost_fn(members, "macs", sizes=[8])


def test_shapes_only_table_counts_but_does_not_time():
    m, x = Tiny().eval(), torch.randn(1, 3, 8, 8)
    t = LatencyTable.shapes_only(m, x)
    members = [[("conv", "out"), ("dw", "out"), ("pw", "in")], [("pw", "out"), ("fc", "in")]]
    assert t.cost_fn(members, "params")([16, 24]) == sum(p.numel() for p in m.parameters())
    with pytest.raises(PruningError, match="not measured"):
        t.latency("conv", 8)
    with pytest.raises(PruningError, match="not measured"):
        t.cost_fn(members, "latency")([16, 24])


# ----------------------------------------------------------------------------------- robust sweeps
def test_suspects_are_points_slower_than_a_larger_count():
    assert lm._suspects([1.0, 2.0, 3.0, 4.0]) == []                    # a rising staircase is trusted
    assert lm._suspects([1.0, 1.1, 1.0, 2.0]) == []                    # small wobbles (< 25 %) too
    assert lm._suspects([1.0, 5.0, 2.0, 3.0]) == [1, 2, 3]             # 5.0 before 2.0 and 3.0
    assert lm._suspects([]) == []


class _FakeTimer:
    """Seconds per call = channels * 1e-4, except that the listed counts are 'hit by load' for the first
    ``bursts`` samples each: the sweep must not keep a fake step."""

    def __init__(self, bursts: dict[int, int]):
        self.bursts = dict(bursts)
        self.calls: dict[int, int] = {}

    def __call__(self, call, number):
        c = call.__defaults__[0].out_channels  # the layer this call runs
        self.calls[c] = self.calls.get(c, 0) + 1
        t = c * 1e-4
        if self.bursts.get(c, 0) > 0:
            self.bursts[c] -= 1
            t *= 20
        return t


def _sweep(timer, repeats=3):
    spec = lm.layer_specs(nn.Sequential(nn.Conv2d(3, 32, 1)), torch.randn(1, 3, 4, 4))["0"]
    return lm._measure_sweep(spec, "out", [8, 16, 24, 32], torch.device("cpu"), threads=None, repeats=repeats,
                             warmup=0, min_sample_s=0.0, tick=lambda: None, timer=timer)


def test_sweep_keeps_the_minimum_and_remeasures_fake_steps():
    # 16 is disturbed for its first 3 samples (every sample of the first pass, as a median of 3 would see)
    t = _FakeTimer({16: 3 + 1})  # +1: the calibration call
    got = _sweep(t)
    assert got == {str(c): pytest.approx(c * 1e-4) for c in (8, 16, 24, 32)}
    assert t.calls[16] > t.calls[8]  # only the suspect (and the counts it was compared with) ran again


def test_sweep_gives_up_after_retries_and_reports_what_it_saw():
    t = _FakeTimer({16: 10 ** 6})  # a real step (or endless load): kept, after the bounded retries
    got = _sweep(t, repeats=2)
    assert got["16"] == pytest.approx(16 * 1e-4 * 20) and got["8"] == pytest.approx(8e-4)
    assert t.calls[16] == 1 + 2 * (1 + lm._RETRIES)
