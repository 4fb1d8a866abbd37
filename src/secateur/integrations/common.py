"""What both callbacks share: building the scheduler and catching up after a resume."""
from __future__ import annotations

from typing import Any

from torch import nn

from secateur.errors import fail
from secateur.schedules import PruningScheduler, Schedule


def check_args(schedule: Schedule | None, scheduler: PruningScheduler | None, prune_kwargs: dict, where: str) -> None:
    if (schedule is None) == (scheduler is None):
        raise fail("give exactly one of schedule or scheduler", where=where,
                   value={"schedule": schedule, "scheduler": scheduler})
    if scheduler is not None and prune_kwargs:
        raise fail("prune options belong to the PruningScheduler you passed", where=where, value=sorted(prune_kwargs))
    if schedule is not None and not isinstance(schedule, Schedule):
        raise fail("schedule must be a secateur Schedule (OneShot, GMP, Linear, Iterative)", where=where,
                   value=type(schedule).__name__)
    if scheduler is not None and not isinstance(scheduler, PruningScheduler):
        raise fail("scheduler must be a secateur PruningScheduler", where=where, value=type(scheduler).__name__)


def build(model: Any, schedule: Schedule, prune_kwargs: dict, where: str) -> PruningScheduler:
    if not isinstance(model, nn.Module):
        raise fail("the training loop gave no model to prune", where=where, value=type(model).__name__)
    return PruningScheduler(model, schedule, **prune_kwargs)


def catch_up(scheduler: PruningScheduler, global_step: int) -> None:
    """Bring a scheduler to ``global_step`` optimizer steps (a resumed run) with one prune to the
    target in force there; masks restored from the checkpoint make that prune a no-op."""
    if scheduler.step_count >= global_step:
        return
    target = scheduler.sparsity
    changes = []
    for t in range(scheduler.step_count, global_step):
        if scheduler.schedule.changes_at(t):
            s = scheduler.schedule.sparsity_at(t)
            if s > target:
                target = s
                changes.append((t, s))
    if target > scheduler.sparsity:
        scheduler._apply(target)
        scheduler.sparsity = target
        scheduler.applied.extend(changes)
    scheduler.step_count = global_step
