"""Measure how long a model takes, honestly: warm-up excluded, threads pinned, device synchronised.

Why a module of its own: every speedup secateur claims goes through these functions, so the rules
that make a latency number trustworthy live in one place:

* warm-up runs (first-call allocations, cuDNN/oneDNN algorithm choice, ``torch.compile``) are never timed;
* on the CPU the intra-op thread count is pinned for the measurement and restored afterwards;
* on CUDA the time is read from CUDA events after ``torch.cuda.synchronize`` (host timers lie there);
* a shared or noisy machine is handled by medians and percentiles over repeats and, when comparing
  models, by *interleaving* them (`compare_latency`) so that a burst of load hits every model alike.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from secateur.errors import check_model_inputs, fail, inputs_rejected
from secateur.modes import statistics_kept

__all__ = ["LatencyStats", "benchmark_latency", "compare_latency", "paired_speedup", "pinned_threads"]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one forward call, in seconds, over ``repeats`` timed samples."""

    median: float
    p10: float
    p90: float
    mean: float
    min: float
    repeats: int
    number: int  # forward calls per timed sample (the sample is divided by it)
    device: str
    threads: int | None
    compiled: bool
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: relative width of the middle 80 %, a noise indicator."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else float("inf")

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = self.spread
        if not with_samples:
            d.pop("samples")
        return d

    @classmethod
    def from_samples(cls, samples: Sequence[float], *, number: int, device: str, threads: int | None,
                     compiled: bool) -> "LatencyStats":
        s = sorted(samples)
        return cls(median=statistics.median(s), p10=_quantile(s, 0.1), p90=_quantile(s, 0.9),
                   mean=statistics.fmean(s), min=s[0], repeats=len(s), number=number, device=device,
                   threads=threads, compiled=compiled, samples=tuple(samples))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore the previous value afterwards."""
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or threads < 1:
        raise fail("threads must be a positive integer or None", value=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs_device(model: torch.nn.Module, example_inputs: Any) -> torch.device:
    for t in _tensors(example_inputs):
        return t.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _caller(fn: Callable, example_inputs: Any) -> Callable[[], Any]:
    """``example_inputs`` may be one tensor, a tuple/list of positional inputs, or a dict of keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return lambda: fn(example_inputs)
    if isinstance(example_inputs, Mapping):
        return lambda: fn(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return lambda: fn(*example_inputs)
    raise fail("example_inputs must be a tensor, a tuple/list of inputs, or a dict of keyword inputs",
               value=type(example_inputs).__name__)


class _Timer:
    """Times ``number`` calls of ``call`` on one device; returns seconds per call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, call: Callable[[], Any], number: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            for _ in range(number):
                call()
            self.end.record()
            torch.cuda.synchronize()
            return self.start.elapsed_time(self.end) / 1e3 / number
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        return (time.perf_counter() - t0) / number


def _validate(repeats: int, warmup: int, number: int | None) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise fail("repeats must be a positive integer", value=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise fail("warmup must be a non-negative integer", value=warmup)
    if number is not None and (not isinstance(number, int) or number < 1):
        raise fail("number must be a positive integer or None (auto)", value=number)


def _prepare(model: torch.nn.Module, example_inputs: Any, compile: bool) -> Callable[[], Any]:
    """``dynamic=False``: models of one class differ only in their weights' shapes, and dynamo would turn
    the second one it sees into a dynamic-shape graph (slower kernels), so pruned copies compiled after the
    dense model would be timed with worse code than it was."""
    fn = torch.compile(model, dynamic=False) if compile else model
    return _caller(fn, example_inputs)


def _named(call: Callable[[], Any], model: torch.nn.Module, example_inputs: Any) -> Callable[[], Any]:
    """``call``, whose failure names its model (`inputs_rejected`); a try costs nothing in the timed path until it
    fails."""
    def named():
        try:
            return call()
        except RuntimeError as e:
            with inputs_rejected(model, example_inputs):
                raise e
    return named


@contextlib.contextmanager
def _room_to_compile(models: int) -> Iterator[None]:
    """Room in dynamo's caches for every model compiled here. Models of one class share their ``forward`` code,
    each instance is one more compiled entry of it, and past the recompile limit (8) dynamo silently runs the
    rest eagerly: their timings would be eager's, compared with a compiled model. Restored afterwards."""
    import torch._dynamo.config as cfg
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(cfg, n)]
    old = {n: getattr(cfg, n) for n in names}
    for n in names:
        setattr(cfg, n, old[n] + 4 * models)
    try:
        yield
    finally:
        for n in names:
            setattr(cfg, n, old[n])


def _calibrate(timer: _Timer, call: Callable[[], Any], min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (timer resolution, jitter).

    Like ``timeit.autorange``: grow the count until a whole sample is long enough, since one cold call
    says little about the next thousand."""
    n = 1
    while n < 100_000:
        if timer(call, n) * n >= min_sample_s:
            return n
        n *= 2
    return n


def benchmark_latency(model: torch.nn.Module, example_inputs: Any, *, repeats: int = 30, warmup: int = 5,
                      threads: int | None = None, compile: bool = False, number: int | None = 1,
                      min_sample_s: float = 1e-3) -> LatencyStats:
    """Latency of ``model(*example_inputs)`` in eval mode (what inference runs; the model's modes are restored
    and no running statistic changes, `secateur.modes`) under ``torch.inference_mode``.

    ``warmup`` untimed calls come first (they also absorb ``torch.compile``'s compilation). ``number``
    calls make one timed sample; ``number=None`` picks it so that a sample lasts ``min_sample_s``
    (for layers that run in microseconds). ``threads`` pins ``torch.set_num_threads`` during the run.
    The model and inputs are used where they are: nothing is copied or moved."""
    _validate(repeats, warmup, number)
    check_model_inputs(model, example_inputs, "benchmark_latency")
    device = _inputs_device(model, example_inputs)
    with pinned_threads(threads), torch.inference_mode(), statistics_kept(model, eval=True), \
            inputs_rejected(model, example_inputs):
        call = _prepare(model, example_inputs, compile)
        timer = _Timer(device)
        for _ in range(warmup):
            call()
        n = number if number is not None else _calibrate(timer, call, min_sample_s)
        samples = [timer(call, n) for _ in range(repeats)]
    return LatencyStats.from_samples(samples, number=n, device=str(device), threads=threads, compiled=compile)


def compare_latency(models: Mapping[str, torch.nn.Module], example_inputs: Any, *, repeats: int = 30,
                    warmup: int = 5, threads: int | None = None, compile: bool = False,
                    number: int | None = 1, min_sample_s: float = 1e-3,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, LatencyStats]:
    """`benchmark_latency` for several models at once, *interleaved*: each round times every model once,
    in an order rotated per round, so load from other processes is shared fairly between them. In eval mode,
    as `benchmark_latency`.

    Use `paired_speedup` on the result for a ratio that is robust to slow drifts of the machine."""
    _validate(repeats, warmup, number)
    if not isinstance(models, Mapping) or not all(isinstance(m, torch.nn.Module) for m in models.values()):
        raise fail("compare_latency takes a mapping of names to nn.Modules", where="compare_latency",
                   value=type(models).__name__)
    if not models:
        raise fail("compare_latency needs at least one model", value=dict(models))
    for k, m in models.items():
        check_model_inputs(m, example_inputs, f"compare_latency[{k!r}]")
    names = list(models)
    device = _inputs_device(next(iter(models.values())), example_inputs)
    room = _room_to_compile(len(names)) if compile else contextlib.nullcontext()
    with pinned_threads(threads), torch.inference_mode(), room, contextlib.ExitStack() as modes:
        for m in models.values():
            modes.enter_context(statistics_kept(m, eval=True))
        calls = {k: _named(_prepare(m, example_inputs, compile), m, example_inputs) for k, m in models.items()}
        timer = _Timer(device)
        for _ in range(warmup):
            for k in names:
                calls[k]()
        if number is None:
            ns = {k: _calibrate(timer, calls[k], min_sample_s) for k in names}
        else:
            ns = dict.fromkeys(names, number)
        samples: dict[str, list[float]] = {k: [] for k in names}
        for r in range(repeats):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                samples[k].append(timer(calls[k], ns[k]))
            if progress is not None:
                progress(r + 1, repeats)
    return {k: LatencyStats.from_samples(samples[k], number=ns[k], device=str(device), threads=threads,
                                         compiled=compile) for k in names}


def paired_speedup(base: LatencyStats, other: LatencyStats) -> tuple[float, float, float]:
    """Median, p10 and p90 of the per-round ratios ``base / other`` of two interleaved measurements.

    Rounds of `compare_latency` are taken back to back, so the ratio within a round cancels most of
    the machine's slow load changes; its spread says how far the speedup itself can be trusted."""
    if base.repeats != other.repeats:
        raise fail("paired_speedup needs two measurements with the same number of rounds",
                   value=(base.repeats, other.repeats))
    ratios = sorted(b / o for b, o in zip(base.samples, other.samples))
    return statistics.median(ratios), _quantile(ratios, 0.1), _quantile(ratios, 0.9)
