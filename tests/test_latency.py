"""Latency measurement (secateur.latency): warm-up excluded, threads restored, honest statistics.

Timing oracles use `time.sleep`, whose duration is a known lower bound, never a hard-coded speed."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from secateur.errors import PruningError
from secateur.latency import LatencyStats, benchmark_latency, compare_latency, paired_speedup, pinned_threads


class Sleeper(nn.Module):
    """Sleeps ``first`` seconds on the first call, then ``rest`` seconds; records call order in ``log``."""

    def __init__(self, first: float, rest: float, name: str = "", log: list | None = None):
        super().__init__()
        self.first, self.rest, self.calls, self.name, self.log = first, rest, 0, name, log

    def forward(self, x):
        time.sleep(self.first if self.calls == 0 else self.rest)
        self.calls += 1
        if self.log is not None:
            self.log.append(self.name)
        return x


def test_statistics_match_numpy():
    rng = np.random.default_rng(0)
    samples = rng.exponential(1.0, size=37).tolist()
    s = LatencyStats.from_samples(samples, number=1, device="cpu", threads=1, compiled=False)
    assert s.median == pytest.approx(np.median(samples))
    assert s.p10 == pytest.approx(np.percentile(samples, 10))
    assert s.p90 == pytest.approx(np.percentile(samples, 90))
    assert s.mean == pytest.approx(np.mean(samples))
    assert s.min == min(samples) and s.repeats == 37
    assert s.spread == pytest.approx((s.p90 - s.p10) / s.median)
    assert "samples" not in s.as_dict() and len(s.as_dict(with_samples=True)["samples"]) == 37


def test_warmup_is_not_timed_and_sleep_is_a_lower_bound():
    m = Sleeper(first=0.3, rest=0.002)
    s = benchmark_latency(m, torch.zeros(1), repeats=5, warmup=1)
    assert m.calls == 6
    assert s.min >= 0.002
    assert s.p90 < 0.3  # the slow first call was the warm-up
    # without warm-up the first (slow) call is one of the samples
    s0 = benchmark_latency(Sleeper(first=0.3, rest=0.002), torch.zeros(1), repeats=5, warmup=0)
    assert max(s0.samples) >= 0.3


def test_number_divides_the_sample():
    m = Sleeper(first=0.002, rest=0.002)
    s = benchmark_latency(m, torch.zeros(1), repeats=3, warmup=0, number=4)
    assert m.calls == 12 and s.number == 4
    assert 0.002 <= s.min < 0.008  # per call, not per sample of 4 calls


def test_auto_number_reaches_min_sample_time():
    # a sample lasts about min_sample_s, not one microsecond: several calls per sample, unless a preempted
    # calibration call alone took that long. On a loaded machine one calibration can be preempted, so the
    # property must hold in one of three tries (a wrong calibration fails all three)
    def ok():
        s = benchmark_latency(nn.Identity(), torch.zeros(1), repeats=3, warmup=1, number=None, min_sample_s=1e-3)
        return (s.number > 1 or s.median >= 1e-3) and s.median * s.number >= 5e-4
    assert any(ok() for _ in range(3))


def test_threads_pinned_and_restored():
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x
    benchmark_latency(Probe(), torch.zeros(1), repeats=2, warmup=1, threads=1)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")
    with pytest.raises(PruningError, match=r"\[Boom\] the model failed on the example inputs.*boom"):
        benchmark_latency(Boom(), torch.zeros(1), repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before
    with pinned_threads(None):
        assert torch.get_num_threads() == before


def test_inputs_forms():
    class Two(nn.Module):
        def forward(self, a, b=None):
            return a + (0 if b is None else b)
    x = torch.ones(2)
    for inputs in (x, (x, x), [x], {"a": x, "b": x}):
        assert benchmark_latency(Two(), inputs, repeats=2, warmup=0).repeats == 2
    with pytest.raises(PruningError, match="example_inputs"):
        benchmark_latency(Two(), 3, repeats=1, warmup=0)


@pytest.mark.parametrize("kw", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}, {"number": 0}])
def test_bad_arguments(kw):
    with pytest.raises(PruningError):
        benchmark_latency(nn.Identity(), torch.zeros(1), **{"repeats": 2, "warmup": 0, **kw})


def test_compare_interleaves_and_orders_fairly():
    log: list[str] = []
    models = {k: Sleeper(0.0, 0.0, name=k, log=log) for k in "abc"}
    res = compare_latency(models, torch.zeros(1), repeats=6, warmup=0)
    assert set(res) == set("abc") and all(r.repeats == 6 for r in res.values())
    rounds = [log[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == list("abc") for r in rounds)  # every model once per round
    firsts = [r[0] for r in rounds]
    assert {f: firsts.count(f) for f in "abc"} == {"a": 2, "b": 2, "c": 2}  # rotation


def test_compare_measures_the_slower_model_as_slower():
    res = compare_latency({"slow": Sleeper(0.004, 0.004), "fast": Sleeper(0.001, 0.001)}, torch.zeros(1),
                          repeats=5, warmup=1)
    med, lo, hi = paired_speedup(res["slow"], res["fast"])
    assert lo <= med <= hi
    assert res["slow"].min >= 0.004 and med > 1.0


def test_paired_speedup_is_the_median_of_round_ratios():
    a = LatencyStats.from_samples([2.0, 4.0, 6.0, 100.0], number=1, device="cpu", threads=None, compiled=False)
    b = LatencyStats.from_samples([1.0, 1.0, 3.0, 50.0], number=1, device="cpu", threads=None, compiled=False)
    med, lo, hi = paired_speedup(a, b)
    ratios = [2.0, 4.0, 2.0, 2.0]
    assert med == pytest.approx(np.median(ratios))
    assert lo == pytest.approx(np.percentile(ratios, 10)) and hi == pytest.approx(np.percentile(ratios, 90))
    c = LatencyStats.from_samples([1.0], number=1, device="cpu", threads=None, compiled=False)
    with pytest.raises(PruningError):
        paired_speedup(a, c)


def test_compile_flag_is_timed_after_compiling_in_warmup():
    # torch.compile is exercised (it needs a C++ toolchain on CPU); the result must still be timed
    pytest.importorskip("torch._inductor")
    m = nn.Linear(8, 8).eval()
    try:
        s = benchmark_latency(m, torch.randn(2, 8), repeats=2, warmup=1, compile=True)
    except Exception as e:  # pragma: no cover - environment without a compiler
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert s.compiled and s.repeats == 2


@pytest.mark.slow
def test_compare_latency_compiles_every_model_past_dynamos_recompile_limit():
    # models of one class share their forward code; past dynamo's recompile limit (8) the rest would silently run
    # eagerly and be timed as if compiled
    pytest.importorskip("torch._inductor")
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    models = {f"m{i}": nn.Sequential(nn.Linear(8, 8 + i), nn.ReLU()).eval() for i in range(limit + 2)}
    try:
        res = compare_latency(models, torch.randn(2, 8), repeats=3, warmup=1, compile=True)
    except Exception as e:  # pragma: no cover - environment without a compiler
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert counters["stats"]["unique_graphs"] == len(models)
    assert torch._dynamo.config.recompile_limit == limit  # restored
    assert all(r.compiled for r in res.values())
