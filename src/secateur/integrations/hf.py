"""Hugging Face ``Trainer`` callback: one scheduler step per optimizer step.

    from secateur.integrations.hf import PruningCallback
    from secateur.schedules import GMP
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[PruningCallback(GMP(final=0.8, start=0, end=200, frequency=20), model=model)])

Pass ``model=`` when you may resume from a checkpoint: the masks are attached at once, so the Trainer's
checkpoint (which then holds them as buffers) restores them into the new run before training starts.
Without it, the scheduler is built from the Trainer's model at ``on_train_begin``."""
from __future__ import annotations

from typing import Any

from secateur.errors import fail
from secateur.integrations.common import build, catch_up, check_args
from secateur.schedules import PruningScheduler, Schedule

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the install
    raise fail("secateur.integrations.hf needs transformers", hint="pip install secateur[zoo]") from None

WHERE = "integrations.hf.PruningCallback"


class PruningCallback(TrainerCallback):
    """Run a secateur pruning schedule inside ``transformers.Trainer`` (adds ``sparsity`` to the logs)."""

    def __init__(self, schedule: Schedule | None = None, *, scheduler: PruningScheduler | None = None,
                 model: Any = None, **prune_kwargs):
        check_args(schedule, scheduler, prune_kwargs, WHERE)
        self.schedule, self.prune_kwargs = schedule, prune_kwargs
        self.scheduler = scheduler
        if scheduler is None and model is not None:
            self.scheduler = build(model, schedule, prune_kwargs, WHERE)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.scheduler is None:
            self.scheduler = build(model, self.schedule, self.prune_kwargs, WHERE)
        catch_up(self.scheduler, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # one call per optimizer step (after gradient accumulation), after optimizer.step()
        while self.scheduler.step_count < state.global_step:
            self.scheduler.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer stores a copy of ``logs`` in ``state.log_history`` before callbacks run: update
        # both, so the history and any logging callback after this one see the sparsity.
        if logs is None or self.scheduler is None:
            return
        logs["sparsity"] = self.scheduler.sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = self.scheduler.sparsity
