"""The time a model spends *outside* its Conv/Linear layers, charged to the layer whose channels it works on.

Why: `secateur.latency_model` times each Conv/Linear alone, but BatchNorm, activations, residual adds,
pooling, permutes and norms also run over those layers' output channels, and on a CPU at batch 1 they are
a large part of a memory-bound model (MobileNetV2: every depthwise block is conv, BN, ReLU6 over the same
channels). A table that ignores them sees pruning an expansion group as cheaper than it is and misjudges
the whole model's latency, so a latency target is met on paper only.

How: one forward pass under a `TorchDispatchMode` records every ATen op that runs outside a table layer,
and which table layer's output it works on (its *owner*): a table layer's output is owned by that layer,
and an op's output inherits the owner of its first input whose owner's channel count appears in the
output's shape (BN, ReLU, add, pooling keep the channels; a reshape into heads or a matmul to another width
does not, and such an op stays unowned: fixed cost). Then a few more passes time every recorded op *in
place* (on the very arguments it got, so caches and layouts are the model's own), each op's time the
minimum over the passes (another process only adds time). An owned op is also timed at a quarter of its
owner's channels (every argument dimension of the owner's size narrowed), and modelled as the line through
the two points, ``fixed + scaled * c / C`` for ``c`` of the owner's ``C`` output channels kept: elementwise
work is linear in the channels, the call overhead is not (measured: MobileNetV2's BatchNorms at batch 1 do
not halve with half the channels). An op that cannot be narrowed (a shape in an int list argument) gets the
cost of calling an op at all on this device as its fixed part. Unowned ops are a constant of the model.

Measured (benchmarks/bench_latency_model.py, 1 thread, on a machine shared with other jobs: rough): the
whole-model estimate of MobileNetV2 / ResNet-50 at batch 1 (dense, 2x, 4x, latency-aware) was 18-45 % under
the measured latency with the Conv/Linear layers alone, 3-30 % under with the tail. At batch 8 it is mixed:
MobileNetV2 closer for 3 variants of 4, ResNet-50 further (its layers alone already over-estimate by
10-44 %). What no ATen-level timing sees is Python's own per-module cost."""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from secateur.errors import fail
from secateur.latency import _calibrate, _caller, _Timer, pinned_threads

__all__ = ["TailOp", "Tail", "record_tail", "measure_tail", "tail_key", "narrow_count"]


@dataclass(frozen=True)
class TailOp:
    """One ATen op outside the table layers: its name, the shapes of its tensor arguments, and the table
    layer whose output channels it carries (None: none, a fixed cost)."""

    op: str
    shapes: tuple
    owner: str | None
    channels: int = 0              # the owner's output channel count (0 when unowned)


def narrow_count(channels: int) -> int:
    """The second width an owned op is timed at: a quarter of the channels (a multiple of 8 when it can)."""
    c = channels // 4
    return max(1, c - c % 8 if c >= 8 else c)


@dataclass
class Tail:
    """Per-layer non-GEMM time: ``fixed[layer] + scaled[layer] * c / C``; ``other`` is owned by no layer."""

    fixed: dict[str, float] = field(default_factory=dict)
    scaled: dict[str, float] = field(default_factory=dict)
    other: float = 0.0
    overhead: float = 0.0          # the per-op call cost used to split each op into fixed and scaled parts
    ops: int = 0                   # how many ops were timed

    @classmethod
    def from_times(cls, ops: Sequence[TailOp], seconds: Sequence[float], overhead: float,
                   narrow: Mapping[int, float] | None = None) -> "Tail":
        """``seconds[i]``: op ``i`` at full width; ``narrow[i]``: at `narrow_count` of its owner's channels."""
        if len(ops) != len(seconds):
            raise fail("need one time per recorded op", value=(len(ops), len(seconds)))
        narrow = narrow or {}
        tail = cls(overhead=overhead, ops=len(ops))
        for i, (op, s) in enumerate(zip(ops, seconds)):
            if op.owner is None:
                tail.other += s
                continue
            if i in narrow and op.channels > 1:
                c = narrow_count(op.channels)
                slope = max(0.0, (s - narrow[i]) / (op.channels - c))
                base = min(s, max(0.0, s - slope * op.channels))
            else:
                base = min(s, overhead)
            tail.fixed[op.owner] = tail.fixed.get(op.owner, 0.0) + base
            tail.scaled[op.owner] = tail.scaled.get(op.owner, 0.0) + (s - base)
        return tail

    def of(self, layer: str, channels: int, full: int) -> float:
        """Seconds of ``layer``'s tail with ``channels`` of its ``full`` output channels kept."""
        if layer not in self.fixed:
            return 0.0
        return self.fixed[layer] + self.scaled[layer] * channels / full

    def total(self) -> float:
        """The dense model's non-GEMM seconds (owned and unowned)."""
        return self.other + sum(self.fixed.values()) + sum(self.scaled.values())


# ----------------------------------------------------------------------------------------- recording
class _TailMode(TorchDispatchMode):
    """Records (and when ``timer`` is given, times) the ATen ops that run outside table layers."""

    def __init__(self, timer: Callable[[Callable[[], Any], int], float] | None = None,
                 numbers: dict[Any, int] | None = None, min_sample_s: float = 2e-4):
        super().__init__()
        self.inside = 0                         # depth of table-layer calls we are in
        self.owner: WeakIdKeyDictionary = WeakIdKeyDictionary()   # tensor -> (layer, channels)
        self.ops: list[TailOp] = []
        self.seconds: list[float] = []
        self.narrow: dict[int, float] = {}
        self.failed: set[str] = set()
        self.timer, self.numbers, self.min_sample_s = timer, numbers, min_sample_s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        owner = self._owner_of(tree_flatten((args, kwargs))[0], flat_out)
        for t in flat_out:
            if owner is None:
                self.owner.pop(t, None)
            else:
                self.owner[t] = owner
        i = len(self.ops)
        self.ops.append(TailOp(str(func), _shapes(args, kwargs), *(owner or (None, 0))))
        if self.timer is not None:
            try:
                self.seconds.append(self._time(func, args, kwargs, i))
            except Exception:  # noqa: BLE001 - an op that cannot run twice is left out (measure_tail warns)
                self.seconds.append(0.0)
                self.failed.add(str(func))
                return out
            if owner is not None:
                small = _narrowed((args, kwargs), owner[1])
                if small is not None:
                    try:
                        self.narrow[i] = self._time(func, *small, (i, "narrow"))
                    except Exception:  # noqa: BLE001 - the op refuses the narrowed shapes: overhead model
                        pass
        return out

    def _owner_of(self, flat_in: list, flat_out: list) -> tuple[str, int] | None:
        shapes = [tuple(t.shape) for t in flat_out]
        for t in flat_in:
            if isinstance(t, torch.Tensor) and t in self.owner:
                name, c = self.owner[t]
                if any(c in s for s in shapes):
                    return name, c
        return None

    def _time(self, func, args, kwargs, i: Any) -> float:
        if func._schema.is_mutable:  # in-place ops run on copies, so the model's values stay what they were
            args, kwargs = tree_map(_clone, (args, kwargs))
        call = (lambda: func(*args, **kwargs))
        if i not in self.numbers:
            self.numbers[i] = _calibrate(self.timer, call, self.min_sample_s)
        return self.timer(call, self.numbers[i])


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _narrowed(args_kwargs: Any, channels: int) -> Any:
    """``(args, kwargs)`` with every tensor dimension of size ``channels`` narrowed to `narrow_count`
    (fresh contiguous copies); None when no tensor has such a dimension."""
    c = narrow_count(channels)
    hit = False

    def cut(t: Any) -> Any:
        nonlocal hit
        if not isinstance(t, torch.Tensor):
            return t
        for d, n in enumerate(t.shape):
            if n == channels:
                t = t.narrow(d, 0, c)
                hit = True
        return t.contiguous()
    small = tree_map(cut, args_kwargs)
    return small if hit else None


def _shapes(args, kwargs) -> tuple:
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None
                 for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))


def _run(model: nn.Module, example_inputs: Any, layers: Mapping[str, int], mode: _TailMode) -> Any:
    """One forward pass under ``mode``, with table layers marked (their ops are the table's, not the tail's)."""
    handles = []
    for name, m in model.named_modules():
        if name not in layers:
            continue
        channels = layers[name]

        def pre(mod, args):
            mode.inside += 1

        def post(mod, args, out, name=name, channels=channels):
            mode.inside -= 1
            if isinstance(out, torch.Tensor):
                mode.owner[out] = (name, channels)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode(), mode:
            return _caller(model, example_inputs)()
    finally:
        for h in handles:
            h.remove()


def record_tail(model: nn.Module, example_inputs: Any, layers: Mapping[str, int]) -> list[TailOp]:
    """The ops outside ``layers`` (``{name: output channels}``) of one forward pass, with their owners."""
    mode = _TailMode()
    _run(model, example_inputs, layers, mode)
    return mode.ops


def tail_key(ops: Sequence[TailOp]) -> str:
    """A cache key for a recorded tail: the op sequence, shapes and owners (device, dtype and threads are in
    the cache file's name and the shapes)."""
    text = json.dumps([(o.op, o.shapes, o.owner, o.channels) for o in ops])
    return "tail:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def measure_tail(model: nn.Module, example_inputs: Any, layers: Mapping[str, int], ops: Sequence[TailOp], *,
                 device: torch.device, threads: int | None = None, repeats: int = 5, warmup: int = 1,
                 min_sample_s: float = 2e-4, timer: Any = None
                 ) -> tuple[list[float], dict[int, float], float]:
    """Seconds of every op of ``ops`` (as recorded by `record_tail`) and of the owned ones narrowed, each
    the minimum over ``repeats`` forward passes that time every op in place, and the per-op call overhead
    of this device."""
    timer = timer or _Timer(device)
    numbers: dict[Any, int] = {}
    best = [math.inf] * len(ops)
    narrow: dict[int, float] = {}
    failed: set[str] = set()
    with pinned_threads(threads):
        for _ in range(warmup):
            _run(model, example_inputs, layers, _TailMode())
        for _ in range(repeats):
            mode = _TailMode(timer, numbers, min_sample_s)
            _run(model, example_inputs, layers, mode)
            if [o.op for o in mode.ops] != [o.op for o in ops]:
                raise fail("the model ran different ops on another pass: its tail cannot be timed op by op",
                           where=type(model).__name__, value=(len(ops), len(mode.ops)))
            best = [min(b, s) for b, s in zip(best, mode.seconds)]
            failed |= mode.failed
            for i, s in mode.narrow.items():
                narrow[i] = min(narrow.get(i, math.inf), s)
        overhead = _overhead(timer, device, min_sample_s)
    if failed:
        warnings.warn(f"latency tail: these ops could not be run again to be timed and count as 0 s: "
                      f"{sorted(failed)}", stacklevel=2)
    return best, narrow, overhead


def _overhead(timer: Any, device: torch.device, min_sample_s: float, repeats: int = 5) -> float:
    """The cost of calling an ATen op at all: an add of one-element tensors, called as the tail's ops are."""
    a = torch.zeros(1, device=device)
    add = torch.ops.aten.add.Tensor
    call = (lambda: add(a, a))
    with torch.inference_mode():
        n = _calibrate(timer, call, min_sample_s)
        return min(timer(call, n) for _ in range(repeats))
