"""A latency target met on this machine, not only on the latency table's estimate.

Why: the table times each Conv/Linear alone and the ATen ops between them in place (`secateur.latency_tail`),
but not Python's module calls, and a layer inside the model does not run exactly as it does alone. So "the
table says 0.5x" can measure 0.6x. `plan_for_latency` therefore (with ``verify="measure"``) times the dense model against the
pruned candidate (interleaved, same inputs), and when the measured ratio misses the target by more than a
tolerance it asks the allocator again for a tighter *estimated* target (the target scaled by the measured
/ estimated gap), always planning from the untouched dense model. The result says what was estimated and
what was measured in every round."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from secateur.errors import PruningError, fail

__all__ = ["LatencyCheck", "LatencyRound", "plan_for_latency", "measured_ratio", "VERIFY_MODES"]

VERIFY_MODES = ("measure", "estimate")
Timer = Callable[[nn.Module, nn.Module, Any], float]


@dataclass(frozen=True)
class LatencyCheck:
    """How a latency target is checked by measurement. ``timer(dense, pruned, example_inputs)`` returns the
    measured latency of ``pruned`` as a fraction of ``dense``'s (default: `measured_ratio` with the
    ``repeats`` / ``warmup`` / ``threads`` below); inject one to measure elsewhere or in tests."""

    tolerance: float = 0.05       # the measured fraction may exceed the target by this much (relative)
    rounds: int = 3               # allocations at most, the first included
    repeats: int = 10
    warmup: int = 3
    threads: int | None = None
    timer: Timer | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not 0 <= self.tolerance < 1:
            raise fail("tolerance is a relative slack in [0, 1)", where="LatencyCheck", value=self.tolerance)
        for name in ("rounds", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise fail(f"{name} must be a positive integer", where="LatencyCheck", value=v)
        if self.timer is not None and not callable(self.timer):
            raise fail("timer must be callable as timer(dense, pruned, example_inputs)", where="LatencyCheck",
                       value=type(self.timer).__name__)

    def measure(self, dense: nn.Module, pruned: nn.Module, example_inputs: Any) -> float:
        if self.timer is not None:
            return float(self.timer(dense, pruned, example_inputs))
        return measured_ratio(dense, pruned, example_inputs, repeats=self.repeats, warmup=self.warmup,
                              threads=self.threads)


@dataclass(frozen=True)
class LatencyRound:
    """One allocation: the estimated target asked of the allocator, the table's estimate of the plan it
    gave (fractions of the dense model's estimate) and, when measured, the measured fraction."""

    asked: float
    estimated: float
    measured: float | None


def measured_ratio(dense: nn.Module, pruned: nn.Module, example_inputs: Any, *, repeats: int = 10,
                   warmup: int = 3, threads: int | None = None) -> float:
    """Median over interleaved rounds of ``pruned / dense`` latency (`secateur.latency.compare_latency`).
    Both run in eval mode (a BatchNorm in training mode would update its statistics); their modes are
    restored afterwards."""
    from secateur.latency import compare_latency, paired_speedup
    modes = [(m, m.training) for m in (*dense.modules(), *pruned.modules())]
    dense.eval()
    pruned.eval()
    try:
        res = compare_latency({"dense": dense, "pruned": pruned}, example_inputs, repeats=repeats, warmup=warmup,
                              threads=threads)
    finally:
        for m, mode in modes:
            m.training = mode
    return 1.0 / paired_speedup(res["dense"], res["pruned"])[0]


def resolve_verify(verify: Any, table_given: bool) -> LatencyCheck | None:
    """``None`` (auto): measure when the table is built here (it describes this machine), trust the estimate
    when a table is given (it may describe another device). Returns None for estimate-only."""
    if verify is None:
        verify = "estimate" if table_given else "measure"
    if isinstance(verify, LatencyCheck):
        return verify
    if verify not in VERIFY_MODES:
        raise fail("verify must be 'measure', 'estimate' or a secateur.latency_target.LatencyCheck",
                   where="prune_channels", value=verify)
    return LatencyCheck() if verify == "measure" else None


def plan_for_latency(model: nn.Module, example_inputs: Any, target: float,
                     plan_fn: Callable[[float], Any], check: LatencyCheck | None,
                     estimate: Callable[[nn.Module], float]
                     ) -> tuple[Any, list[LatencyRound], float | None]:
    """The plan to apply, the rounds that led to it and its measured fraction (None when not measured). ``plan_fn(estimated_target)`` plans on the untouched
    ``model``; ``estimate(m)`` is the table's latency of ``m`` as a fraction of the dense model's.

    Without ``check`` the first plan is returned (its estimate is filled in once applied). With it, each
    candidate is applied to a copy and measured; the first within tolerance wins, else the fastest measured
    one (with a warning). A tighter target the allocator cannot reach ends the search; one it cannot reach in
    the first round is the caller's error (raised as is)."""
    if check is None:
        return plan_fn(target), [], None
    asked, best, rounds = target, None, []
    for r in range(check.rounds):
        try:
            plan = plan_fn(asked)
        except PruningError:
            if r == 0:
                raise
            break
        pruned = copy.deepcopy(model)
        if plan.choices:
            plan.apply(pruned)
        measured = check.measure(model, pruned, example_inputs)
        rounds.append(LatencyRound(asked, estimate(pruned), measured))
        del pruned
        if best is None or measured < best[1]:
            best = (plan, measured)
        if measured <= target * (1 + check.tolerance):
            return plan, rounds, measured
        if measured <= 0:
            break
        asked = asked * target / measured  # the gap between table and machine is assumed to stay
    assert best is not None
    warnings.warn(f"prune_channels: latency target {target:.3f} not met when measured after {len(rounds)} "
                  f"allocation(s); kept the fastest measured plan ({best[1]:.3f} of dense)", stacklevel=4)
    return best[0], rounds, best[1]
