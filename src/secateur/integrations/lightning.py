"""PyTorch Lightning callback: one scheduler step per optimizer step.

    from secateur.integrations.lightning import PruningCallback
    trainer = lightning.Trainer(callbacks=[PruningCallback(GMP(final=0.8, start=0, end=200, frequency=20))])

The scheduler is built in ``setup`` (before Lightning wraps the module for distributed training and
before the optimizer exists, as `PruningScheduler` requires); its state travels in Lightning's
checkpoints, and the masks travel with the module's state_dict."""
from __future__ import annotations

from typing import Any

from secateur.errors import fail
from secateur.integrations.common import build, catch_up, check_args
from secateur.schedules import PruningScheduler, Schedule

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the install
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise fail("secateur.integrations.lightning needs lightning", hint="pip install secateur[lightning]") from None

WHERE = "integrations.lightning.PruningCallback"


class PruningCallback(pl.Callback):
    """Run a secateur pruning schedule inside ``lightning.Trainer`` (logs ``sparsity``)."""

    def __init__(self, schedule: Schedule | None = None, *, scheduler: PruningScheduler | None = None,
                 log: bool = True, **prune_kwargs):
        check_args(schedule, scheduler, prune_kwargs, WHERE)
        self.schedule, self.prune_kwargs, self.log = schedule, prune_kwargs, log
        self.scheduler = scheduler
        self._pending: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.scheduler is None:
            self.scheduler = build(pl_module, self.schedule, self.prune_kwargs, WHERE)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer, pl_module) -> None:
        catch_up(self.scheduler, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        while self.scheduler.step_count < trainer.global_step:
            self.scheduler.step()
        if self.log:
            pl_module.log("sparsity", self.scheduler.sparsity, on_step=True, prog_bar=False)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
