"""A latency model of *this* device: how long each prunable layer takes for a given channel count.

Why: MACs are a poor proxy for time. Kernels process channels in blocks (8/16 on CPUs, 8/32/64 on GPU
tensor cores), so latency is a staircase in the channel count: a layer with 72 output channels can be
as slow as one with 80, or slower. HALP-style pruning measures the staircase once per device and
layer shape, then (1) snaps counts to the fast side of each step and (2) spends the pruning budget
where it buys the most time (`secateur.allocate`).

How: every Conv/Linear is recorded with the actual input shape it sees (forward hooks, one run), then
a fresh layer of the same configuration is timed alone over a grid of output-channel counts (at the
full input count) and over a grid of input-channel counts (at the full output count). A layer with
``c_in`` and ``c_out`` kept is estimated as ``T_out(c_out) * T_in(c_in) / T_in(C_in)`` (separable:
exact for the MACs and close for time). Depthwise convolutions have one sweep (in = out = groups).
Measurements are cached as JSON per device (``$SECATEUR_CACHE`` or ``~/.cache/secateur``) and keyed
by the full layer configuration, input shape, dtype, threads and torch version, so identical layers
(ResNet has many) and later runs cost nothing.

The rest of the model (norms, activations, adds, pooling: `secateur.latency_tail`) is timed op by op in
place and charged to the layer whose output channels it works on, linearly in that layer's kept channels,
so that the table's estimate is of the whole model and a group's cost includes the elementwise work on
its channels (``LatencyTable.build(tail=True)``, the default).

Both are timed out of their context, so the sum of the parts misses the whole model; `LatencyTable.calibrate`
(``build(calibrate=True)``) fits a per-layer scale and offset, and one for the tail, to the model and a few
uniformly pruned copies timed *in place* (`secateur.latency_calibrate`)."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from secateur.data import cache_dir
from secateur.errors import check_model_inputs, fail, inputs_rejected
from secateur.latency import _calibrate, _caller, _inputs_device, _Timer, pinned_threads
from secateur.latency_calibrate import Calibration
from secateur.latency_tail import Tail, measure_tail, record_tail, tail_key
from secateur.modes import keeps_statistics, statistics_kept

__all__ = ["LayerSpec", "LatencyTable", "layer_specs", "channel_grid", "device_name", "cache_dir"]


# ----------------------------------------------------------------------------------------- layer specs
@dataclass(frozen=True)
class LayerSpec:
    """What determines a layer's latency: its type, configuration and the input shape it actually sees."""

    kind: str                          # key of `_KINDS`: "conv1d", "conv2d", "conv3d", "linear"
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    config: tuple                      # kernel, stride, padding, dilation, groups, bias (conv) / bias (linear)
    groups: int = 1
    dtype: str = "torch.float32"
    channels_last: bool = False

    @property
    def depthwise(self) -> bool:
        """Depthwise: in = out = groups, so one channel count moves all three together."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def key(self) -> str:
        d = asdict(self)
        d.pop("output_shape")
        return json.dumps(d, sort_keys=True, default=str)

    def macs(self, c_in: int | None = None, c_out: int | None = None) -> float:
        """Multiply-accumulates with ``c_in`` / ``c_out`` channels kept (exact for conv and linear)."""
        c_in, c_out = self._counts(c_in, c_out)
        positions = math.prod(self.output_shape) // self.output_shape[self._channel_dim]
        per_out = (c_in // self._groups(c_in)) * self._kernel_volume
        return float(positions * c_out * per_out)

    def params(self, c_in: int | None = None, c_out: int | None = None) -> float:
        c_in, c_out = self._counts(c_in, c_out)
        bias = c_out if self._has_bias else 0
        return float(c_out * (c_in // self._groups(c_in)) * self._kernel_volume + bias)

    # helpers ------------------------------------------------------------------------------------
    def _counts(self, c_in, c_out):
        c_in = self.in_channels if c_in is None else c_in
        c_out = self.out_channels if c_out is None else c_out
        if self.depthwise:
            c_in = c_out
        return c_in, c_out

    def _groups(self, c_in: int) -> int:
        return c_in if self.depthwise else self.groups

    @property
    def _channel_dim(self) -> int:
        return -1 if self.kind == "linear" else 1

    @property
    def _kernel_volume(self) -> int:
        return 1 if self.kind == "linear" else math.prod(self.config[0])

    @property
    def _has_bias(self) -> bool:
        return bool(self.config[-1])


@dataclass(frozen=True)
class _Kind:
    """How to describe and rebuild one layer type (the registry below is keyed by module type)."""

    name: str
    spec: Callable[[nn.Module, torch.Tensor, torch.Tensor], LayerSpec]
    build: Callable[[LayerSpec, int, int, torch.device], tuple[nn.Module, torch.Tensor]]


def _conv_spec(name: str):
    def spec(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSpec:
        cfg = (tuple(m.kernel_size), tuple(m.stride), m.padding if isinstance(m.padding, str) else
               tuple(m.padding), tuple(m.dilation), m.groups, m.padding_mode, m.bias is not None)
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return LayerSpec(name, m.in_channels, m.out_channels, tuple(x.shape), tuple(y.shape), cfg,
                         groups=m.groups, dtype=str(x.dtype), channels_last=cl)
    return spec


def _conv_build(cls: type[nn.Module]):
    def build(spec: LayerSpec, c_in: int, c_out: int, device: torch.device):
        kernel, stride, padding, dilation, groups, padding_mode, bias = spec.config
        if spec.depthwise:
            c_in = groups = c_out
        dtype = _dtype(spec.dtype)
        m = nn.utils.skip_init(cls, c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        shape = list(spec.input_shape)
        shape[1] = c_in
        x = torch.randn(shape, device=device, dtype=dtype)
        if spec.channels_last:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return _fill(m), x
    return build


def _linear_spec(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSpec:
    return LayerSpec("linear", m.in_features, m.out_features, tuple(x.shape), tuple(y.shape),
                     (m.bias is not None,), dtype=str(x.dtype))


def _linear_build(spec: LayerSpec, c_in: int, c_out: int, device: torch.device):
    dtype = _dtype(spec.dtype)
    m = nn.utils.skip_init(nn.Linear, c_in, c_out, bias=spec.config[0], device=device, dtype=dtype)
    shape = list(spec.input_shape)
    shape[-1] = c_in
    return _fill(m), torch.randn(shape, device=device, dtype=dtype)


def _fill(m: nn.Module) -> nn.Module:
    """Random finite weights: uninitialised memory may hold denormals, which are slow on CPUs."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    return m.eval()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


_KINDS: dict[type, _Kind] = {
    nn.Conv1d: _Kind("conv1d", _conv_spec("conv1d"), _conv_build(nn.Conv1d)),
    nn.Conv2d: _Kind("conv2d", _conv_spec("conv2d"), _conv_build(nn.Conv2d)),
    nn.Conv3d: _Kind("conv3d", _conv_spec("conv3d"), _conv_build(nn.Conv3d)),
    nn.Linear: _Kind("linear", _linear_spec, _linear_build),
}
_BY_NAME = {k.name: k for k in _KINDS.values()}


def _kind_of(module: nn.Module) -> _Kind | None:
    return _KINDS.get(type(module))


def _check_build_options(**options: Any) -> None:
    """``LatencyTable.build``'s counts and tolerances, before anything is measured (``multiple=0`` divided by zero,
    ``repeats=0`` measured infinities)."""
    for name in ("repeats", "max_points", "in_points", "multiple"):
        v = options[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise fail(f"{name} must be a positive int", where="LatencyTable.build", value=v)
    if isinstance(options["warmup"], bool) or not isinstance(options["warmup"], int) or options["warmup"] < 0:
        raise fail("warmup must be an int >= 0", where="LatencyTable.build", value=options["warmup"])
    for name in ("min_sample_s", "tolerance"):
        v = options[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise fail(f"{name} must be a finite number >= 0", where="LatencyTable.build", value=v)


@keeps_statistics(eval=True)
def layer_specs(model: nn.Module, example_inputs: Any,
                layers: Iterable[str] | None = None) -> dict[str, LayerSpec]:
    """One forward pass with hooks: the `LayerSpec` of every Conv/Linear (or of the named ``layers``).

    A layer called more than once (shared weights) is recorded at its first call."""
    check_model_inputs(model, example_inputs, "layer_specs")
    wanted = None if layers is None else set(layers)
    specs: dict[str, LayerSpec] = {}
    handles = []
    names = dict(model.named_modules())
    if wanted is not None:
        missing = sorted(wanted - set(names))
        if missing:
            raise fail("no such layer in the model", where=missing[0], value=missing[:5])
    for name, m in names.items():
        kind = _kind_of(m)
        if kind is None or (wanted is not None and name not in wanted):
            continue

        def hook(mod, args, out, name=name, kind=kind):
            if name not in specs and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                specs[name] = kind.spec(mod, args[0], out)
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode(), inputs_rejected(model, example_inputs):
            _caller(model, example_inputs)()
    finally:
        for h in handles:
            h.remove()
    return specs


# ----------------------------------------------------------------------------------------- the grid
def channel_grid(channels: int, *, max_points: int = 32, multiple: int = 8) -> list[int]:
    """Counts to measure: multiples of a step (itself a multiple of ``multiple``, the usual kernel
    block) with at most ~``max_points`` of them, plus ``channels`` itself. Small layers get every count."""
    if channels < 1:
        raise fail("channel count must be positive", value=channels)
    if channels <= max_points:
        return list(range(1, channels + 1))
    step = multiple * max(1, math.ceil(channels / max_points / multiple))
    grid = list(range(step, channels, step))
    return grid + [channels]


def device_name(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """A file-name-safe identity of the device the latencies belong to."""
    device = torch.device(device)
    if device.type == "cuda":
        name = f"cuda-{torch.cuda.get_device_name(device)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{cpu}-{torch.backends.cpu.get_cpu_capability()}-t{threads or torch.get_num_threads()}"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _cache_file(cache_path: str | os.PathLike | None, device: str, where: str) -> Path:
    """The cache file to read and write (``cache_path``, or the device's file under `cache_dir`), checked before
    anything is measured: a path that cannot be written would otherwise fail only after minutes of timing."""
    if cache_path is not None and not isinstance(cache_path, (str, os.PathLike)):
        raise fail("cache_path is a file path (str or os.PathLike) or None", where=where,
                   value=type(cache_path).__name__)
    path = Path(cache_path) if cache_path else cache_dir() / "latency" / f"{device}.json"
    if path.is_dir():
        raise fail("cache_path is a directory; it names the JSON file to keep timings in", where=where, value=str(path))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise fail("the latency cache cannot be written there", where=where, value=str(path),
                   hint=f"{parent} is {'a file' if not parent.is_dir() else 'not writable'}; pass another "
                        "cache_path, set SECATEUR_CACHE, or cache=False")
    return path


# ----------------------------------------------------------------------------------------- the table
@dataclass
class _Curve:
    """Measured latency (s) at grid counts; ``at(c)`` reads the step value of the next measured count."""

    counts: list[int]
    seconds: list[float]

    def at(self, c: int) -> float:
        for n, s in zip(self.counts, self.seconds):
            if n >= c:
                return s
        return self.seconds[-1]


@dataclass
class LatencyTable:
    """Per-layer latency lookup on one device. Build with `LatencyTable.build`; query with
    `latency`, `snap`, `candidates`; turn group counts into a model cost with `cost_fn`."""

    specs: dict[str, LayerSpec]
    out_curves: dict[str, _Curve]
    in_curves: dict[str, _Curve]
    device: str
    tolerance: float = 0.02
    tail: Tail | None = None           # time outside the Conv/Linear layers (None: not measured, counted 0)
    calibration: Calibration | None = None   # in-place correction (`calibrate`); None: the parts as timed alone
    _names: dict[int, str] = field(default_factory=dict, repr=False)

    # building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, *, layers: Iterable[str] | None = None,
              threads: int | None = None, repeats: int = 5, warmup: int = 1, max_points: int = 16,
              in_points: int = 8, multiple: int = 8, min_sample_s: float = 2e-3, cache: bool = True,
              cache_path: str | os.PathLike | None = None, tolerance: float = 0.02,
              progress: bool = True, tail: bool = True, tail_repeats: int | None = None,
              calibrate: bool | Mapping[str, Any] = False) -> "LatencyTable":
        """Measure every Conv/Linear of ``model`` (or the named ``layers``) on the device of
        ``example_inputs``. Identical layer configurations are measured once; cached ones not at all.
        ``max_points`` / ``in_points`` bound the output / input channel grids (the input dependence is
        smoother, so it gets fewer points); each measured count costs about ``repeats + 2`` calls.
        ``tail`` also times the ops outside those layers (`secateur.latency_tail`: ``tail_repeats``, by
        default ``max(5, repeats)``, more forward passes of ``model``, each op the minimum over them; cached
        by the op sequence), so estimates are of the whole model. ``calibrate`` (True, or a dict of
        `calibrate`'s options) then fits the table to the model and uniform copies of it timed in place."""
        _check_build_options(repeats=repeats, warmup=warmup, max_points=max_points, in_points=in_points,
                             multiple=multiple, min_sample_s=min_sample_s, tolerance=tolerance)
        specs = layer_specs(model, example_inputs, layers)
        if not specs:
            raise fail("the model has no Conv/Linear layer that runs on the example inputs",
                       where=type(model).__name__)
        device = _first_device(example_inputs, model)
        dev_name = device_name(device, threads)
        path = _cache_file(cache_path, dev_name, "LatencyTable.build") if cache else None
        store = _load(path) if cache else {}
        todo = _sweeps_to_measure(specs, store, max_points, in_points, multiple)
        fresh: dict[str, dict[str, dict[str, float]]] = {}
        bar = _progress(sum(len(cs) for *_, cs in todo), progress, "latency table")
        for key, spec, which, counts in todo:
            fresh.setdefault(key, {})[which] = _measure_sweep(
                spec, which, counts, device, threads=threads, repeats=repeats, warmup=warmup,
                min_sample_s=min_sample_s, tick=bar)
        if fresh:
            for key, sweeps in fresh.items():
                for which, pts in sweeps.items():
                    store.setdefault(key, {}).setdefault(which, {}).update(pts)
            if cache:
                _save(path, fresh)
        table = cls.from_measurements(specs, store, device=dev_name, tolerance=tolerance)
        table._names = {id(m): n for n, m in model.named_modules() if n in specs}
        if tail:
            table.tail = _build_tail(model, example_inputs, specs, path if cache else None, device,
                                     threads=threads, repeats=tail_repeats or max(5, repeats), warmup=warmup)
        if calibrate:
            opts = dict(calibrate) if isinstance(calibrate, Mapping) else {}
            opts.setdefault("threads", threads)
            opts.setdefault("cache", cache)
            if cache:
                opts.setdefault("cache_path", path)
            with statistics_kept(model, eval=True):
                table = table.calibrate(model, example_inputs, **opts)
        return table

    def calibrate(self, model: nn.Module, example_inputs: Any, *, cache: bool = True,
                  cache_path: str | os.PathLike | None = None, **options: Any) -> "LatencyTable":
        """A copy of this table corrected by timings of ``model`` (the dense model it was built for) and of
        uniformly pruned copies *in place* (`secateur.latency_calibrate.calibrate`: ``fractions``, ``round_to``,
        ``variants``, ``repeats``, ``warmup``, ``threads``, ``clock``). Timings are cached in the table's
        cache file (``cache_path``, by default the device's) unless ``cache=False``."""
        from secateur.latency_calibrate import calibrate
        if not self.out_curves:
            raise fail("a shapes-only table cannot be calibrated", where=type(model).__name__,
                       hint="build it with LatencyTable.build")
        path = _cache_file(cache_path, self.device, "LatencyTable.calibrate") if cache else None
        cal = calibrate(self, model, example_inputs, cache_path=path, **options)
        return replace(self, calibration=cal, _names=dict(self._names))

    @classmethod
    def shapes_only(cls, model: nn.Module, example_inputs: Any, *,
                    layers: Iterable[str] | None = None) -> "LatencyTable":
        """A table without measurements (one forward pass, no timing): ``cost_fn`` with the ``"macs"``
        and ``"params"`` metrics works, latency queries raise."""
        specs = layer_specs(model, example_inputs, layers)
        table = cls(specs, {}, {}, "none")
        table._names = {id(m): n for n, m in model.named_modules() if n in specs}
        return table

    @classmethod
    def from_measurements(cls, specs: Mapping[str, LayerSpec], store: Mapping[str, Mapping[str, Mapping]],
                          *, device: str = "unknown", tolerance: float = 0.02) -> "LatencyTable":
        """A table from raw measurements ``{spec.key(): {"out": {count: s}, "in": {count: s}}}``
        (as stored in the cache; every measured count is used); also how tests build known staircases."""
        if not isinstance(specs, Mapping) or not all(isinstance(v, LayerSpec) for v in specs.values()):
            raise fail("specs maps layer names to LayerSpec (as layer_specs returns)",
                       where="LatencyTable.from_measurements", value=type(specs).__name__)
        if not isinstance(store, Mapping):
            raise fail("store maps LayerSpec.key() to {'out': {count: seconds}, 'in': {...}}",
                       where="LatencyTable.from_measurements", value=type(store).__name__)
        outs, ins = {}, {}
        for name, spec in specs.items():
            sweeps = store.get(spec.key(), {})
            for which, full, dest in (("out", spec.out_channels, outs), ("in", spec.in_channels, ins)):
                if which == "in" and spec.depthwise:
                    continue
                pts = {int(k): float(v) for k, v in sweeps.get(which, {}).items()}
                grid = sorted(c for c in pts if 1 <= c <= full)
                if not grid or grid[-1] != full:
                    raise fail("latency measurements are missing for this layer", where=name,
                               shape=spec.input_shape, value=which)
                dest[name] = _Curve(grid, [pts[c] for c in grid])
        return cls(dict(specs), outs, ins, device, tolerance)

    # queries ------------------------------------------------------------------------------------
    def name_of(self, layer: str | nn.Module) -> str:
        name = layer if isinstance(layer, str) else self._names.get(id(layer))
        if name is None or name not in self.specs:
            raise fail("layer is not in the latency table", where=str(name or type(layer).__name__),
                       value=sorted(self.specs)[:5])
        return name

    def latency(self, layer: str | nn.Module, channels: int, in_channels: int | None = None, *,
                calibrated: bool = True) -> float:
        """Estimated seconds of ``layer`` with ``channels`` output channels kept (and ``in_channels``
        input channels; full when None). Counts between grid points read the next measured count. With a
        `calibration` (and ``calibrated``), the in-place correction of this layer is applied."""
        name = self.name_of(layer)
        spec = self.specs[name]
        self._check(name, channels, spec.out_channels, "output")
        t = self._curve(self.out_curves, name).at(channels)
        if not (in_channels is None or spec.depthwise or in_channels == spec.in_channels):
            self._check(name, in_channels, spec.in_channels, "input")
            curve = self._curve(self.in_curves, name)
            t = t * curve.at(in_channels) / curve.seconds[-1]
        return self.calibration.layer(name, t) if calibrated and self.calibration is not None else t

    def snap(self, layer: str | nn.Module, channels: int) -> int:
        """The largest measured count that is no slower than ``channels`` (within ``tolerance``):
        the fast side of the staircase, i.e. the channels that come for free at this latency."""
        name = self.name_of(layer)
        spec = self.specs[name]
        self._check(name, channels, spec.out_channels, "output")
        curve = self._curve(self.out_curves, name)
        limit = curve.at(channels) * (1 + self.tolerance)
        best = channels
        for n, s in zip(curve.counts, curve.seconds):
            if n >= channels and s <= limit:
                best = n
        return best

    def candidates(self, layer: str | nn.Module) -> list[int]:
        """Counts at the fast edge of each step: every larger measured count is slower by more than
        ``tolerance``. Pruning to any other count keeps fewer channels for no time saved."""
        curve = self._curve(self.out_curves, self.name_of(layer))
        keep, best = [], math.inf
        for n, s in sorted(zip(curve.counts, curve.seconds), reverse=True):
            if s * (1 + self.tolerance) < best or not keep:
                keep.append(n)
                best = min(best, s)
        return sorted(keep)

    def tail_latency(self, layer: str | nn.Module, channels: int, *, calibrated: bool = True) -> float:
        """Estimated seconds of the ops outside the table layers that work on ``layer``'s output channels
        (norm, activation, add, ...), with ``channels`` of them kept; 0 without a measured tail."""
        name = self.name_of(layer)
        full = self.specs[name].out_channels
        self._check(name, channels, full, "output")
        t = 0.0 if self.tail is None else self.tail.of(name, channels, full)
        return self.calibration.tail(t) if calibrated and self.calibration is not None else t

    def owned_tail(self, out_counts: Mapping[str, int] | None = None, *, calibrated: bool = True) -> float:
        """The tail's part that follows the layers' output counts (full where no count is given)."""
        out_counts = out_counts or {}
        return sum(self.tail_latency(n, out_counts.get(n, s.out_channels), calibrated=calibrated)
                   for n, s in self.specs.items())

    def other(self, *, calibrated: bool = True) -> float:
        """The tail's fixed part, owned by no layer (with a calibration: the fitted time outside the layers)."""
        t = 0.0 if self.tail is None else self.tail.other
        return self.calibration.other(t) if calibrated and self.calibration is not None else t

    def total(self, out_counts: Mapping[str, int] | None = None,
              in_counts: Mapping[str, int] | None = None, *, tail: bool = True, calibrated: bool = True) -> float:
        """Estimated seconds of the model (full where no count is given): the table's layers, plus with
        ``tail`` the ops outside them (their owned part scaled by the owners' counts, the rest fixed).
        ``calibrated=False`` ignores the `calibration`: the parts as timed alone."""
        out_counts, in_counts = out_counts or {}, in_counts or {}
        total = sum(self.latency(n, out_counts.get(n, s.out_channels), in_counts.get(n), calibrated=calibrated)
                    for n, s in self.specs.items())
        if tail:
            total += self.other(calibrated=calibrated) + self.owned_tail(out_counts, calibrated=calibrated)
        return total

    def widths(self, model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
        """``(output, input)`` channel counts of the table's layers in ``model`` (a pruned copy of the model
        the table was built for: layers are found by name)."""
        outs, ins = {}, {}
        for name, spec in self.specs.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError as e:
                raise fail("layer of the latency table not found in the model", where=name) from e
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 2:
                raise fail("layer of the latency table has no Conv/Linear weight here", where=name,
                           value=type(mod).__name__)
            outs[name] = int(w.shape[0])
            ins[name] = int(w.shape[1]) * (1 if spec.depthwise else int(getattr(mod, "groups", 1)))
        return outs, ins

    def for_model(self, model: nn.Module) -> "LatencyTable":
        """This table without the layers that went with blocks ``drop_blocks`` dropped from ``model`` (and
        their share of the tail): what `estimate`, `cost_fn` and the allocators need once a block is gone.
        ``self`` when nothing was dropped. A layer missing for any other reason is still an error."""
        from secateur.structured.depth import Skipped
        gone = set()
        for name in self.specs:
            path = name.split(".")
            for i in range(1, len(path)):
                try:
                    if isinstance(model.get_submodule(".".join(path[:i])), Skipped):
                        gone.add(name)
                        break
                except AttributeError:
                    break
        if not gone:
            return self
        keep = {n: s for n, s in self.specs.items() if n not in gone}
        if not keep:
            raise fail("every layer of the latency table went with dropped blocks", where=type(model).__name__,
                       value=len(gone))
        tail = None if self.tail is None else replace(
            self.tail, fixed={n: v for n, v in self.tail.fixed.items() if n in keep},
            scaled={n: v for n, v in self.tail.scaled.items() if n in keep})
        return replace(self, specs=keep, out_curves={n: c for n, c in self.out_curves.items() if n in keep},
                       in_curves={n: c for n, c in self.in_curves.items() if n in keep}, tail=tail,
                       _names={i: n for i, n in self._names.items() if n in keep})

    def estimate(self, model: nn.Module, *, tail: bool = True, calibrated: bool = True) -> float:
        """Estimated seconds of ``model`` at its current widths (a pruned copy of the model the table was
        built for: layers are found by name); ``tail=False`` counts the table's layers only;
        ``calibrated=False`` ignores the `calibration`."""
        outs, ins = self.widths(model)
        return self.total(outs, ins, tail=tail, calibrated=calibrated)

    def cost_fn(self, members: Sequence[Sequence[tuple]], metric: str = "latency", *,
                sizes: Sequence[int] | None = None) -> Callable[[Sequence[int]], float]:
        """Model cost of per-group keep counts, for `secateur.allocate.channel_counts`.

        ``members[g]`` lists ``(layer_name, "out" | "in")`` or ``(layer_name, role, width)``: group ``g``
        sets that layer's output or input channel count. Without ``sizes`` the layer keeps exactly the
        group's count. With ``sizes`` (each group's full channel count) a group may own only part of a
        layer (concatenations, splits): the layer loses ``width`` positions per removed group channel.
        ``metric`` is ``"latency"`` (seconds, from the table, with the measured tail: see `total`),
        ``"layers"`` (the Conv/Linear layers' seconds alone), ``"macs"`` or ``"params"`` (exact counts),
        so one allocator serves every target."""
        if metric not in _METRICS:
            raise fail("unknown cost metric", value=metric, hint=f"use one of {sorted(_METRICS)}")
        if sizes is not None and len(sizes) != len(members):
            raise fail("need one size per group", value=(len(members), len(sizes)))
        norm: list[list[tuple[str, str, float]]] = []
        for ms in members:
            row = []
            for m in ms:
                layer, role, width = (*m, 1.0) if len(m) == 2 else m
                self.name_of(layer)
                if role not in ("out", "in"):
                    raise fail("group member role must be 'out' or 'in'", where=layer, value=role)
                row.append((layer, role, float(width)))
            norm.append(row)
        specs, measure = self.specs, _METRICS[metric]
        fixed = self.other() if metric == "latency" else 0.0
        memo: dict[tuple[str, Any, Any], float] = {}  # the allocator asks for the same layer widths again and again

        def one(n: str, s: LayerSpec, c_out: Any, c_in: Any) -> float:
            key = (n, c_out, c_in)
            if key not in memo:
                memo[key] = measure(self, n, s, c_out, c_in)
            return memo[key]

        def cost(counts: Sequence[int]) -> float:
            outs: dict[str, int] = {}
            ins: dict[str, int] = {}
            for g, (ms, k) in enumerate(zip(norm, counts)):
                for layer, role, width in ms:
                    dest = outs if role == "out" else ins
                    if sizes is None:
                        dest[layer] = k
                    else:
                        full = specs[layer].out_channels if role == "out" else specs[layer].in_channels
                        dest[layer] = dest.get(layer, full) - round(width * (sizes[g] - k))
            for dest in (outs, ins):
                for layer, c in dest.items():
                    dest[layer] = max(1, c)
            return fixed + sum(one(n, s, outs.get(n), ins.get(n)) for n, s in specs.items())
        return cost

    def members_of(self, groups: Sequence[Any]) -> list[list[tuple[str, str, float]]]:
        """``cost_fn`` members of structural groups (`secateur.graph.Group`: ``size`` and ``members`` with
        ``module``, ``name``, ``kind``, ``index``): each weight of a table layer that a group slices."""
        out = []
        for g in groups:
            row = []
            for m in g.members:
                if m.name == "weight" and m.module in self.specs and m.kind in ("out", "in"):
                    spec = self.specs[m.module]
                    # a grouped conv's weight dim 1 is a group's local input index: one position is one
                    # input channel of every group (grouped="channels")
                    local = spec.groups > 1 and not spec.depthwise and m.kind == "in" and m.dim == 1
                    per = spec.groups if local else 1
                    row.append((m.module, m.kind, m.index.numel() * per / g.size))
            out.append(row)
        return out

    def _curve(self, curves: Mapping[str, _Curve], name: str) -> _Curve:
        if name not in curves:
            raise fail("this layer's latency was not measured (a shapes-only table answers MACs and params)",
                       where=name, shape=self.specs[name].input_shape, hint="build it with LatencyTable.build")
        return curves[name]

    def _check(self, name: str, c: int, full: int, what: str) -> None:
        if not isinstance(c, int) or not 1 <= c <= full:
            raise fail(f"{what} channel count out of range 1..{full}", where=name,
                       shape=self.specs[name].input_shape, value=c)


def _latency_metric(t: LatencyTable, n: str, s: LayerSpec, c_out, c_in) -> float:
    c_out = c_out if c_out is not None else s.out_channels
    return t.latency(n, c_out, c_in) + t.tail_latency(n, c_out)


_METRICS: dict[str, Callable[[LatencyTable, str, LayerSpec, Any, Any], float]] = {
    "latency": _latency_metric,
    "layers": lambda t, n, s, c_out, c_in: t.latency(n, c_out if c_out is not None else s.out_channels, c_in),
    "macs": lambda t, n, s, c_out, c_in: s.macs(c_in, c_out),
    "params": lambda t, n, s, c_out, c_in: s.params(c_in, c_out),
}


# ----------------------------------------------------------------------------------------- helpers
def _first_device(example_inputs: Any, model: nn.Module) -> torch.device:
    return _inputs_device(model, example_inputs)


@keeps_statistics(eval=True)
def _build_tail(model: nn.Module, example_inputs: Any, specs: Mapping[str, LayerSpec], path: Path | None,
                device: torch.device, *, threads: int | None, repeats: int, warmup: int) -> Tail:
    """The model's tail (`secateur.latency_tail`), from the cache when the same op sequence was timed before."""
    layers = {n: s.out_channels for n, s in specs.items()}
    ops = record_tail(model, example_inputs, layers)
    key = tail_key(ops)
    cached = (_load(path) if path is not None else {}).get(key, {})
    times = cached.get("ops", {})
    if len(times) == len(ops) and "1" in cached.get("overhead", {}):
        seconds, overhead = [float(times[str(i)]) for i in range(len(ops))], float(cached["overhead"]["1"])
        narrow = {int(i): float(s) for i, s in cached.get("narrow", {}).items()}
    else:
        seconds, narrow, overhead = measure_tail(model, example_inputs, layers, ops, device=device,
                                                 threads=threads, repeats=repeats, warmup=warmup)
        if path is not None:
            _save(path, {key: {"ops": {str(i): s for i, s in enumerate(seconds)}, "overhead": {"1": overhead},
                               "narrow": {str(i): s for i, s in narrow.items()}}})
    return Tail.from_times(ops, seconds, overhead, narrow)


def _sweeps_to_measure(specs: Mapping[str, LayerSpec], store: Mapping, max_points: int, in_points: int,
                       multiple: int):
    """``(key, spec, "out" | "in", counts still to measure)`` for each distinct layer configuration."""
    todo, seen = [], set()
    for spec in specs.values():
        key = spec.key()
        if key in seen:
            continue
        seen.add(key)
        sweeps = [("out", spec.out_channels)] + ([] if spec.depthwise else [("in", spec.in_channels)])
        for which, full in sweeps:
            have = store.get(key, {}).get(which, {})
            points = max_points if which == "out" else in_points
            counts = [c for c in channel_grid(full, max_points=points, multiple=multiple)
                      if str(c) not in have]
            if counts:
                todo.append((key, spec, which, counts))
    return todo


def _measure_sweep(spec: LayerSpec, which: str, counts: Sequence[int], device: torch.device, *,
                   threads: int | None, repeats: int, warmup: int, min_sample_s: float,
                   tick: Callable[[], None], timer: Callable[[Callable[[], Any], int], float] | None = None,
                   ) -> dict[str, float]:
    """Seconds per count: the *minimum* over interleaved rounds, then counts that look like a step
    against the trend re-measured (`_suspects`).

    Why the minimum: another process can only add time to a sample, never remove it, so on a shared
    machine the median of a few samples still carries load bursts. A burst that hits one count of the
    sweep makes a fake step (72 channels "slower" than 96), and the allocator then builds its plan on
    that step (seen on MobileNetV2: 128 channels measured 12x slower than 192). Rounds are interleaved
    (every count once per round) so that a burst spreads over the sweep instead of one count."""
    timer = timer or _Timer(device)
    with pinned_threads(threads), torch.inference_mode():
        calls, numbers = sweep_calls(spec, which, counts, device, timer, warmup=warmup, min_sample_s=min_sample_s,
                                     tick=tick)
        best = [math.inf] * len(counts)
        todo = list(range(len(counts)))
        for _ in range(1 + _RETRIES):
            for _ in range(repeats):
                for i in todo:
                    best[i] = min(best[i], timer(calls[i], numbers[i]))
            todo = _suspects(best)
            if not todo:
                break
    return {str(c): s for c, s in zip(counts, best)}


def sweep_calls(spec: LayerSpec, which: str, counts: Sequence[int], device: torch.device, timer: Any, *,
                warmup: int, min_sample_s: float, tick: Callable[[], None]) -> tuple[list, list]:
    """One warmed-up call per channel count of a sweep (``which``: "out" or "in" channels) and the number of
    calls per timing sample that makes a sample last ``min_sample_s``."""
    kind = _BY_NAME[spec.kind]
    calls, numbers = [], []
    for c in counts:
        c_in, c_out = (spec.in_channels, c) if which == "out" else (c, spec.out_channels)
        m, x = kind.build(spec, c_in, c_out, device)
        call = (lambda m=m, x=x: m(x))
        for _ in range(warmup):
            call()
        calls.append(call)
        numbers.append(_calibrate(timer, call, min_sample_s))
        tick()
    return calls, numbers


_RETRIES = 2          # extra rounds of measurement for suspect counts
_INVERSION = 0.25     # a count this much slower than a larger count of the same sweep is suspect


def _suspects(seconds: Sequence[float]) -> list[int]:
    """Indices (into ascending counts) of points slower by more than `_INVERSION` than some larger count,
    with that larger count: more channels are rarely much faster, so one of the two was disturbed."""
    out: set[int] = set()
    for i, s in enumerate(seconds):
        for j in range(i + 1, len(seconds)):
            if s > seconds[j] * (1 + _INVERSION):
                out.update((i, j))
    return sorted(out)


def _load(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("torch") != torch.__version__:
        return {}
    return data.get("layers", {})


def _save(path: Path, fresh: Mapping) -> None:
    """Merge ``fresh`` into the file (another process may have written it meanwhile), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = _load(path)
    for key, sweeps in fresh.items():
        for which, pts in sweeps.items():
            layers.setdefault(key, {}).setdefault(which, {}).update(pts)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"torch": torch.__version__, "layers": layers}, f)
    os.replace(tmp, path)


def _progress(total: int, enabled: bool, desc: str) -> Callable[[], None]:
    if not enabled or total == 0:
        return lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        state = {"n": 0}

        def tick() -> None:
            state["n"] += 1
            if state["n"] % 20 == 0 or state["n"] == total:
                print(f"{desc}: {state['n']}/{total}", flush=True)
        return tick
    bar = tqdm(total=total, desc=desc, leave=False)

    def tick() -> None:
        bar.update()
        if bar.n >= total:
            bar.close()
    return tick
