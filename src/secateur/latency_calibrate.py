"""Calibrating the latency table against the model timed *in place*: one correction per layer, one for the rest.

Why: `secateur.latency_model` times each Conv/Linear *alone* (a fresh layer, its input hot in the caches, its
own allocations) and `secateur.latency_tail` times the other ops one by one. Inside the running model a layer
reads what the previous one just wrote, competes with the weights of its neighbours for the caches, and pays the
module call; the sum of the parts then misses the whole. Measured quiet (batch 8, 2 threads): ResNet-50's
layers alone over-estimate the dense model by 13 % and its uniform 4x copy by 24 %; MobileNetV2's dense model
is over-estimated by 16 % and its pruned copies under-estimated by 30 %, so the table promised 2.5-2.8x where
1.7x was measured. The error depends on the width, so one factor for the model cannot fix it.

How: a few uniform copies of the model (pruned by the structural engine to ``fractions`` of its MACs) and the
dense model are run interleaved with forward hooks on every table layer, which read a clock before and after the
layer: each layer's seconds *in place* at two or three widths, and the whole model's (each the minimum over the
rounds: another process only adds time). Per layer, ``in_place = scale * table + offset`` is fitted over those
widths (least squares on the relative error, the offset kept non-negative: a negative one would promise that a
thin enough layer costs nothing). A layer that slows down faster than the table says (ResNet-50's 1x1 convolutions
in place: the affine fit wants a negative offset) gets ``scale * table ** power`` with ``1 < power <= 3`` instead,
when that fits its points better: steeper, yet positive at every width. The time outside the layers (the whole model minus its layers) is fitted the
same way against the tail's owned estimate; its offset replaces the tail's unowned constant. The table's
staircase (`LatencyTable.snap`, `LatencyTable.candidates`) is left as measured: the correction changes its level
and slope, not where its steps are.

A layer whose width is the same in every copy gets a scale only. A model the engine cannot prune is calibrated
on its dense timing alone (scales only), with a warning. On CUDA the clock synchronises at every read, which
serialises the GPU's queue: in-place layer times there include the launch cost (by design: so does the model
at small batch)."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from secateur.errors import PruningError, fail
from secateur.latency import _caller, _inputs_device, pinned_threads

if TYPE_CHECKING:
    from secateur.latency_model import LatencyTable

__all__ = ["Calibration", "InPlace", "measure_in_place", "fit_line", "fit_curve", "fit_calibration",
           "uniform_variants", "calibrate"]

FRACTIONS = (0.6, 0.35, 0.2)   # MACs kept by the uniform copies: 1.7x to 5x, around the targets usually asked for
MAX_POWER = 3.0                # steepest curve fitted: beyond it a few noisy points would promise near-free thin layers


@dataclass(frozen=True)
class Calibration:
    """``scale[layer] * table ** power[layer] + offset[layer]`` per layer (missing: 1, 1 and 0; ``fit_curve``
    gives a power above 1 only with no offset); the tail's owned part times ``tail_scale``, its unowned constant
    replaced by ``tail_offset`` (None: the table's own)."""

    scale: Mapping[str, float] = field(default_factory=dict)
    offset: Mapping[str, float] = field(default_factory=dict)
    tail_scale: float = 1.0
    tail_offset: float | None = None
    points: int = 0                    # how many models (dense + copies) it was fitted on
    power: Mapping[str, float] = field(default_factory=dict)

    def layer(self, name: str, seconds: float) -> float:
        p = self.power.get(name, 1.0)
        return self.scale.get(name, 1.0) * (seconds if p == 1.0 else seconds ** p) + self.offset.get(name, 0.0)

    def tail(self, seconds: float) -> float:
        return self.tail_scale * seconds

    def other(self, seconds: float) -> float:
        return seconds if self.tail_offset is None else self.tail_offset


@dataclass(frozen=True)
class InPlace:
    """One model timed in place: the whole forward call and each table layer within it (seconds)."""

    total: float
    layers: Mapping[str, float]

    @property
    def outside(self) -> float:
        """Seconds outside the table layers (the tail, the module calls, the hooks' own clock reads)."""
        return self.total - sum(self.layers.values())


# ----------------------------------------------------------------------------------------- measuring
def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


def measure_in_place(models: Sequence[nn.Module], example_inputs: Any, layers: Iterable[str], *, repeats: int = 5,
                     warmup: int = 1, threads: int | None = None,
                     clock: Callable[[], float] | None = None) -> list[InPlace]:
    """Each model's whole forward time and each of its ``layers``' time inside it (a layer called twice is
    summed), the minimum over ``repeats`` rounds; the models are interleaved (one pass of each per round, in
    an order rotated per round) so that load from other processes falls on all of them alike.

    ``clock`` (seconds, read before and after every layer and pass) is for tests; by default the host clock,
    synchronised on CUDA."""
    if not isinstance(repeats, int) or repeats < 1:
        raise fail("repeats must be a positive integer", value=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise fail("warmup must be a non-negative integer", value=warmup)
    if not models:
        raise fail("measure_in_place needs at least one model", value=len(models))
    names = list(layers)
    clock = clock or _clock(_inputs_device(models[0], example_inputs))
    runs, handles = [], []
    try:
        for model in models:
            acc: dict[str, float] = {}
            starts: dict[str, list[float]] = {}
            for n in names:
                try:
                    mod = model.get_submodule(n)
                except AttributeError as e:
                    raise fail("layer of the latency table not found in the model", where=n) from e

                def pre(mod, args, n=n, starts=starts):
                    starts.setdefault(n, []).append(clock())

                def post(mod, args, out, n=n, starts=starts, acc=acc):
                    acc[n] = acc.get(n, 0.0) + clock() - starts[n].pop()
                handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
            runs.append((_caller(model, example_inputs), acc))
        best_total = [math.inf] * len(runs)
        best_layers: list[dict[str, float]] = [{} for _ in runs]
        with pinned_threads(threads), torch.inference_mode():
            for call, _ in runs:
                for _ in range(warmup):
                    call()
            for r in range(repeats):
                shift = r % len(runs)
                for i in list(range(shift, len(runs))) + list(range(shift)):
                    call, acc = runs[i]
                    acc.clear()
                    t0 = clock()
                    call()
                    best_total[i] = min(best_total[i], clock() - t0)
                    for n, s in acc.items():
                        best_layers[i][n] = min(best_layers[i].get(n, math.inf), s)
    finally:
        for h in handles:
            h.remove()
    return [InPlace(t, dict(ls)) for t, ls in zip(best_total, best_layers)]


# ----------------------------------------------------------------------------------------- fitting
def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(scale, offset)`` with ``ys ~ scale * xs + offset``: least squares on the relative error (each point
    weighted by ``1 / y**2``, so a small copy counts as much as the dense model), the offset non-negative and
    the scale positive; otherwise (or when all ``xs`` are equal) a scale alone, and an offset alone when all
    ``xs`` are 0."""
    if len(xs) != len(ys) or not xs:
        raise fail("need as many table estimates as timings, at least one", value=(len(xs), len(ys)))
    ws = [1.0 / max(y, 1e-12) ** 2 for y in ys]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs))
    sy = sum(w * y for w, y in zip(ws, ys))
    sxx = sum(w * x * x for w, x in zip(ws, xs))
    sxy = sum(w * x * y for w, x, y in zip(ws, xs, ys))
    if sxx <= 0:
        return 1.0, max(0.0, sy / sw)
    det = sw * sxx - sx * sx
    if det > 1e-9 * sw * sxx:
        scale, offset = (sw * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det
        if scale > 0 and offset >= 0:
            return scale, offset
    return max(sxy / sxx, 0.0), 0.0


def _relative_error(xs: Sequence[float], ys: Sequence[float], f: Callable[[float], float]) -> float:
    return sum(((f(x) - y) / max(y, 1e-12)) ** 2 for x, y in zip(xs, ys))


def fit_curve(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """``(scale, offset, power)`` with ``ys ~ scale * xs ** power + offset``: `fit_line` (power 1), or, where the
    points rise faster than any line with a non-negative offset through them, ``scale * xs ** power`` with
    ``1 < power <= MAX_POWER`` (least squares in log space, i.e. on the relative error) if its relative error is
    smaller. Both are positive and increasing at every width, which a negative offset would not be."""
    scale, offset = fit_line(xs, ys)
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if offset > 0 or len({x for x, _ in pts}) < 2:
        return scale, offset, 1.0
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    power = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    if not power > 1.0:
        return scale, offset, 1.0
    power = min(power, MAX_POWER)
    a = math.exp(my - power * mx)
    line = _relative_error(xs, ys, lambda x: scale * x + offset)
    curve = _relative_error(xs, ys, lambda x: a * x ** power)
    return (a, 0.0, power) if curve < line else (scale, offset, 1.0)


def fit_calibration(table: "LatencyTable", widths: Sequence[tuple[Mapping[str, int], Mapping[str, int]]],
                    timings: Sequence[InPlace]) -> Calibration:
    """The per-layer and tail corrections that map the table's estimates at ``widths`` (each model's
    ``(out, in)`` channel counts, as `LatencyTable.widths` reads them) onto the in-place ``timings``."""
    if len(widths) != len(timings) or not timings:
        raise fail("need one set of widths per timed model, at least one", value=(len(widths), len(timings)))
    scale, offset, power = {}, {}, {}
    for name, spec in table.specs.items():
        xs, ys = [], []
        for (outs, ins), t in zip(widths, timings):
            if name in t.layers:
                xs.append(table.latency(name, outs.get(name, spec.out_channels), ins.get(name), calibrated=False))
                ys.append(t.layers[name])
        if xs:
            scale[name], offset[name], p = fit_curve(xs, ys)
            if p != 1.0:
                power[name] = p
    tail_xs = [table.owned_tail(outs, calibrated=False) for outs, _ in widths]
    tail_scale, tail_offset = fit_line(tail_xs, [max(0.0, t.outside) for t in timings])
    return Calibration(scale, offset, tail_scale, tail_offset, points=len(timings), power=power)


# ----------------------------------------------------------------------------------------- the copies
def uniform_variants(model: nn.Module, example_inputs: Any, fractions: Sequence[float] = FRACTIONS, *,
                     round_to: int | None = 8) -> list[nn.Module]:
    """Copies of ``model`` pruned by the structural engine to each of ``fractions`` of its MACs (uniform)."""
    from secateur.structured import prune_channels
    out = []
    for f in fractions:
        m = copy.deepcopy(model)
        prune_channels(m, example_inputs, target_macs=f, round_to=round_to)
        out.append(m.eval())
    return out


def _key(table: "LatencyTable", model: nn.Module, what: Any) -> str:
    """Cache key: the table's layers (configuration and input shapes), the model's module tree, and the copies
    (their fractions, or their widths when given)."""
    text = json.dumps([sorted((n, s.key()) for n, s in table.specs.items()), str(model), what], default=str)
    return "calib:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def calibrate(table: "LatencyTable", model: nn.Module, example_inputs: Any, *,
              fractions: Sequence[float] = FRACTIONS, round_to: int | None = 8,
              variants: Sequence[nn.Module] | None = None, repeats: int = 5, warmup: int = 1,
              threads: int | None = None, cache_path: Any = None,
              clock: Callable[[], float] | None = None) -> Calibration:
    """Time ``model`` (the dense model the table was built for) and its uniform copies in place and fit the
    table to them (see the module docstring). ``variants``: the pruned copies to use instead of the engine's.
    ``cache_path``: the table's cache file; the timings are stored there (keyed by the model's structure and
    the copies) and reused. An injected ``clock`` bypasses the cache."""
    from secateur.latency_model import _load, _save
    for f in fractions:
        if not 0 < f < 1:
            raise fail("calibration fractions are MACs kept, in (0, 1)", where="calibrate", value=f)
    what = ("fractions", list(fractions), round_to) if variants is None else \
        ("widths", [table.widths(v) for v in variants])
    key = _key(table, model, what)
    use_cache = cache_path is not None and clock is None
    stored = (_load(cache_path) if use_cache else {}).get(key)
    if stored:
        pts = [stored[k] for k in sorted(stored, key=lambda k: int(k[1:]))]
        widths = [({n: int(c) for n, c in p["out"].items()}, {n: int(c) for n, c in p["in"].items()}) for p in pts]
        timings = [InPlace(float(p["total"]), {n: float(s) for n, s in p["layers"].items()}) for p in pts]
        return fit_calibration(table, widths, timings)
    models = [model]
    if variants is not None:
        models += list(variants)
    else:
        try:
            models += uniform_variants(model, example_inputs, fractions, round_to=round_to)
        except PruningError as e:
            warnings.warn(f"latency calibration: the engine could not prune {type(model).__name__} ({e}); "
                          f"calibrated on the dense model alone (scales only)", stacklevel=2)
    widths = [table.widths(m) for m in models]
    timings = measure_in_place(models, example_inputs, table.specs, repeats=repeats, warmup=warmup,
                               threads=threads, clock=clock)
    if use_cache:
        _save(cache_path, {key: {f"v{i}": {"total": t.total, "layers": dict(t.layers), "out": w[0], "in": w[1]}
                                 for i, (t, w) in enumerate(zip(timings, widths))}})
    return fit_calibration(table, widths, timings)
