"""How the amount of pruning grows over training, and a scheduler that applies it.

A schedule is a small frozen dataclass that maps a training step to a target sparsity and says at
which steps the sparsity changes; `PruningScheduler` calls ``step()`` once per training step and, at
those steps only, prunes the model to the new target (masks never regrow, so each update prunes among
the survivors). Schedules are pure functions of the step, which is what makes resume and multi-process
training exact: the only state is the step counter."""
from __future__ import annotations

import inspect
import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

from torch import nn

from secateur.errors import fail


def _ratio(value: float, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise fail(f"{name} must be a sparsity in [0, 1]", where=where, value=value)
    return float(value)


def _step(value: int, name: str, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(f"{name} must be an integer >= {minimum}", where=where, value=value)
    return value


class Schedule:
    """Base: ``sparsity_at(step)`` (0 before the schedule starts) and ``changes_at(step)``."""

    kind: ClassVar[str] = ""

    def sparsity_at(self, step: int) -> float:
        raise NotImplementedError

    def changes_at(self, step: int) -> bool:
        """True at the steps where the target sparsity is (re)applied."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.sparsity_at(step)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


_SCHEDULES: dict[str, type[Schedule]] = {}


def _register(cls):
    _SCHEDULES[cls.kind] = cls
    return cls


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """Inverse of ``Schedule.to_dict`` (used when a checkpoint is resumed)."""
    if not isinstance(d, Mapping):
        raise fail("a schedule dict is needed", where="schedule_from_dict", value=type(d).__name__,
                   hint="pass Schedule.to_dict()'s output")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _SCHEDULES:
        raise fail("unknown schedule kind", where="schedule", value=kind, hint=f"known: {sorted(_SCHEDULES)}")
    cls = _SCHEDULES[kind]
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(map(str, set(d) - set(known)))
    if unknown:
        raise fail(f"unknown field {unknown[0]!r} for schedule {kind!r}", where="schedule_from_dict",
                   value=unknown, hint=f"fields: {sorted(known)}")
    missing = sorted(k for k, f in known.items()
                     if k not in d and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise fail(f"missing field {missing[0]!r} for schedule {kind!r}", where="schedule_from_dict",
                   value=missing, hint=f"fields: {sorted(known)}")
    return cls(**d)


@_register
@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once, to ``sparsity``, at step ``at``."""

    sparsity: float
    at: int = 0
    kind: ClassVar[str] = "one_shot"

    def __post_init__(self):
        _ratio(self.sparsity, "sparsity", "OneShot")
        _step(self.at, "at", "OneShot")

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.at else 0.0

    def changes_at(self, step: int) -> bool:
        return step == self.at


@dataclass(frozen=True)
class _Ramp(Schedule):
    """Shared fields, validation and update grid for schedules that ramp from ``initial`` at ``start``
    to ``final`` at ``end``, updating every ``frequency`` steps and holding ``final`` afterwards."""

    final: float
    start: int = 0
    end: int = 0
    frequency: int = 1
    initial: float = 0.0

    def __post_init__(self):
        where = type(self).__name__
        _ratio(self.initial, "initial", where)
        _ratio(self.final, "final", where)
        _step(self.start, "start", where)
        _step(self.end, "end", where)
        _step(self.frequency, "frequency", where, minimum=1)
        if self.end < self.start:
            raise fail("end step precedes start step", where=where, value=(self.start, self.end))
        if self.final < self.initial:
            raise fail("final sparsity is below initial sparsity (masks never regrow)", where=where,
                       value=(self.initial, self.final))

    def _progress(self, step: int) -> float:
        """Fraction of the ramp done at the last update at or before ``step`` (1 at and after end)."""
        if step >= self.end:
            return 1.0
        done = (step - self.start) // self.frequency * self.frequency
        return done / (self.end - self.start)

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end:  # exactly ``final``: 0.2 + (0.9 - 0.2) * 1.0 is 0.8999999999999999
            return float(self.final)
        return self._shape(self._progress(step))

    def changes_at(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.frequency == 0)


@_register
@dataclass(frozen=True)
class GMP(_Ramp):
    """Gradual magnitude pruning (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3``
    for ``t = t0, t0 + dt, ..., t0 + n dt`` with ``t0 = start``, ``dt = frequency``, ``t0 + n dt = end``.

    PaddleSlim's phases map onto it with `GMP.phases` (stable: before start; pruning: start..end;
    tuning: after end, final sparsity held)."""

    kind: ClassVar[str] = "gmp"

    def _shape(self, progress: float) -> float:
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    @classmethod
    def phases(cls, *, final: float, stable: int, pruning: int, tuning: int = 0, updates: int | None = None,
               initial: float = 0.0) -> "GMP":
        """PaddleSlim-style GMP: ``stable`` steps dense, ``pruning`` steps of cubic ramp (``updates``
        mask updates, default one per step), then ``tuning`` steps at the final sparsity. ``tuning`` is
        the caller's remaining training; it only has to be non-negative."""
        _step(stable, "stable", "GMP.phases")
        _step(pruning, "pruning", "GMP.phases")
        _step(tuning, "tuning", "GMP.phases")
        freq = 1 if updates is None else max(1, pruning // _step(updates, "updates", "GMP.phases", minimum=1))
        return cls(final=final, start=stable, end=stable + pruning, frequency=freq, initial=initial)


@_register
@dataclass(frozen=True)
class Linear(_Ramp):
    """Sparsity grows linearly from ``initial`` at ``start`` to ``final`` at ``end``."""

    kind: ClassVar[str] = "linear"

    def _shape(self, progress: float) -> float:
        return self.initial + (self.final - self.initial) * progress


@_register
@dataclass(frozen=True)
class Iterative(Schedule):
    """``steps`` prune rounds, one every ``every`` training steps from ``start``. ``mode="geometric"``
    removes the same fraction of the surviving weights each round (Han et al.'s iterative pruning);
    ``"linear"`` adds the same sparsity each round."""

    final: float
    steps: int
    start: int = 0
    every: int = 1
    mode: str = "geometric"
    kind: ClassVar[str] = "iterative"

    def __post_init__(self):
        _ratio(self.final, "final", "Iterative")
        _step(self.steps, "steps", "Iterative", minimum=1)
        _step(self.start, "start", "Iterative")
        _step(self.every, "every", "Iterative", minimum=1)
        if self.mode not in ("geometric", "linear"):
            raise fail("mode must be 'geometric' or 'linear'", where="Iterative", value=self.mode)

    def level(self, k: int) -> float:
        """Sparsity after round ``k`` (1-based)."""
        k = min(max(k, 0), self.steps)
        if k == self.steps:  # exactly ``final``: the formulas round (1 - (1 - 0.1) ** 1 is 0.09999999999999998)
            return float(self.final)
        if self.mode == "linear":
            return self.final * k / self.steps
        return 1.0 - (1.0 - self.final) ** (k / self.steps)

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        return self.level((step - self.start) // self.every + 1)

    def changes_at(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0 and \
            (step - self.start) // self.every < self.steps


PruneFn = Callable[[nn.Module, float], Any]


def channel_pruning(example_inputs: Any, **prune_channels_kwargs: Any) -> "ChannelPruning":
    """A ``prune_fn`` for `PruningScheduler` that removes channels physically with
    ``secateur.structured.prune_channels``; the schedule's sparsity is the fraction of each group's
    *original* channels removed so far: the widths at the first update are remembered (also in the scheduler's
    ``state_dict``, so a resumed run goes on from them), and each update leaves every group the width one-shot
    pruning to that sparsity would (``scope="global"``: the total of the widths). Small steps on a narrow layer
    thus add up instead of each rounding to nothing.
    Physical removal replaces parameters: rebuild the optimizer after an update (``scheduler.applied``
    grows) and do not use it under DDP, where masks (the default) are the way."""
    from secateur.structured import prune_channels
    _check_options(prune_channels, prune_channels_kwargs, ChannelPruning.SCHEDULE_SETS, "channel_pruning")
    return ChannelPruning(example_inputs, prune_channels_kwargs)


def _check_options(fn: Callable, options: dict, taken: tuple[str, ...], where: str) -> None:
    """Options meant for ``fn`` that it does not take (or that the scheduler sets itself) are refused now,
    not at the first pruning step mid-training."""
    known = set(inspect.signature(fn).parameters) - set(taken)
    bad = sorted(set(options) - known)
    if bad:
        why = " (the schedule sets it)" if bad[0] in taken else ""
        raise fail(f"{fn.__name__}() takes no option {bad[0]!r}{why}", where=where, value=bad,
                   hint=f"options: {sorted(known)}")


@dataclass
class ChannelPruning:
    """``sizes``: each group's width at the first update, keyed by `secateur.structured.choose.group_keys` (None before it)."""
    example_inputs: Any
    kwargs: dict
    sizes: dict[str, int] | None = None
    # what the schedule decides (how much, when, in how many rounds): refused as options
    SCHEDULE_SETS: ClassVar[tuple[str, ...]] = ("model", "example_inputs", "ratio", "threshold", "target_macs",
                                                "target_params", "target_latency", "latency_table", "verify",
                                                "steps")

    def __call__(self, model: nn.Module, target: float, previous: float = 0.0) -> Any:
        from secateur.graph.groups import build_graph
        from secateur.structured import plan_channels
        from secateur.structured.choose import toward_original, widths
        kw = self.kwargs
        graph = build_graph(model, self.example_inputs, kw.get("heads", "heads"), kw.get("grouped", "channels"))
        if self.sizes is None:  # (a scheduler state from before the widths were kept: shares of the survivors)
            self.sizes = {} if previous > 0 else widths(graph)
        survivors = 1.0 - (1.0 - target) / (1.0 - previous) if previous < 1 else 0.0
        ratio = toward_original(model, graph, self.sizes, lambda g: target, lambda g: survivors,
                                kw.get("scope", "local"), kw.get("ignore", ()), kw.get("ignore_inputs", ()))
        if not ratio:
            return None
        plan = plan_channels(model, self.example_inputs, ratio=ratio, graph=graph, **kw)
        return plan.apply(model) if plan.choices else None

    def state(self) -> dict[str, int] | None:
        return dict(self.sizes) if self.sizes is not None else None


class PruningScheduler:
    """Drive pruning from a schedule: call ``step()`` once per training step (after ``optimizer.step()``).

    By default it calls ``secateur.prune(model, amount=s, **prune_kwargs)`` when the target changes;
    ``prune_fn(model, sparsity)`` replaces that (`channel_pruning` removes channels through the
    structural engine). Under ``torch.distributed`` the new masks are broadcast from rank 0 so every
    rank holds the same masks even with a random or data-dependent criterion. Build it before wrapping
    the model in ``DistributedDataParallel``: it attaches (all-ones) masks at once, which DDP must see."""

    def __init__(self, model: nn.Module, schedule: Schedule, *, prune_fn: PruneFn | None = None,
                 broadcast: bool = True, **prune_kwargs):
        if not isinstance(schedule, Schedule):
            raise fail("schedule must be a secateur Schedule", where="PruningScheduler", value=type(schedule))
        if prune_fn is not None and prune_kwargs:
            raise fail("pass prune options or prune_fn, not both", where="PruningScheduler",
                       value=sorted(prune_kwargs))
        self.model = model
        self.schedule = schedule
        self.prune_kwargs = prune_kwargs
        self.prune_fn = prune_fn
        self.broadcast = broadcast
        if prune_fn is None:
            # Attach all-ones masks now: it validates the prune options up front, and a parametrization
            # registered after DistributedDataParallel wraps the model would cut DDP's gradient hooks
            # (so build the scheduler before wrapping the model in DDP).
            from secateur.prune import prune
            _check_options(prune, prune_kwargs, ("model", "amount"), "PruningScheduler")
            prune(model, amount=0.0, **prune_kwargs)
        self.step_count = 0          # number of step() calls so far; the next call handles this step
        self.sparsity = 0.0          # last target applied
        self.applied: list[tuple[int, float]] = []

    def _apply(self, sparsity: float) -> None:
        if isinstance(self.prune_fn, ChannelPruning):
            self.prune_fn(self.model, sparsity, self.sparsity)
        elif self.prune_fn is not None:
            self.prune_fn(self.model, sparsity)
        else:
            from secateur.prune import prune
            prune(self.model, amount=sparsity, **self.prune_kwargs)
        if self.broadcast:
            from secateur.distributed import broadcast_masks, is_distributed
            if is_distributed():
                broadcast_masks(self.model)

    def step(self) -> float:
        """Advance one training step; prune if the schedule changes here. Returns the current target."""
        t = self.step_count
        if self.schedule.changes_at(t):
            target = self.schedule.sparsity_at(t)
            if target > self.sparsity:
                self._apply(target)
                self.sparsity = target
                self.applied.append((t, target))
        self.step_count = t + 1
        return self.sparsity

    def state_dict(self) -> dict[str, Any]:
        """Plain data only (ints, floats, lists, a dict for the schedule): safe for ``torch.save`` and
        ``torch.load(weights_only=True)``. Masks live in the model, see `secateur.training.checkpoint`."""
        state = {"step": self.step_count, "sparsity": self.sparsity, "applied": [list(a) for a in self.applied],
                 "schedule": self.schedule.to_dict()}
        if isinstance(self.prune_fn, ChannelPruning):  # the widths the schedule's shares are of
            state["channel_sizes"] = self.prune_fn.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter; refuses a state written by a different schedule (nothing is changed)."""
        try:
            step, sparsity = int(state["step"]), float(state["sparsity"])
            applied = [(int(a), float(b)) for a, b in state["applied"]]
            sched = state["schedule"]
            sizes = state.get("channel_sizes")
            if sizes is not None:
                sizes = {str(k): int(v) for k, v in sizes.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise fail("not a PruningScheduler state", where="PruningScheduler.load_state_dict",
                       value=sorted(state) if isinstance(state, dict) else type(state)) from e
        if sched != self.schedule.to_dict():
            raise fail("the state was written by a different schedule", where="PruningScheduler.load_state_dict",
                       value={"saved": sched, "current": self.schedule.to_dict()})
        self.step_count, self.sparsity, self.applied = step, sparsity, applied
        if isinstance(self.prune_fn, ChannelPruning):
            self.prune_fn.sizes = sizes
