"""HF Trainer and Lightning callbacks drive a pruning schedule: the masks follow the schedule step by
step (oracle: the schedule's own function), masked weights stay zero through training, resume catches up."""
import pytest
import torch
from torch import nn

from secateur.errors import PruningError
from secateur.masks import iter_masks, masks_of
from secateur.schedules import GMP, PruningScheduler


def expected_sparsity(schedule, steps_done):
    """Target in force after ``steps_done`` optimizer steps, straight from the schedule."""
    s = 0.0
    for t in range(steps_done):
        if schedule.changes_at(t):
            s = max(s, schedule.sparsity_at(t))
    return s


def weight_sparsity(model):
    total = pruned = 0
    for _, mod, param, mask in iter_masks(model):
        total += mask.numel()
        pruned += int((~mask).sum())
        assert int((getattr(mod, param) != 0).logical_and(~mask).sum()) == 0  # effective weights are zero
    return pruned / total


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 2)

    def forward(self, x, labels=None):
        logits = self.b(torch.relu(self.a(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


SCHED = GMP(final=0.75, start=2, end=12, frequency=2)


# --------------------------------------------------------------------------------------------- HF


def hf_trainer(tmp_path, model, callbacks, max_steps, **kw):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, **{"save_strategy": "no", **kw})
    return transformers.Trainer(model=model, args=args, train_dataset=data(), callbacks=callbacks)


class Recorder:
    """Records the sparsity seen after every optimizer step (runs after the pruning callback)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _R(TrainerCallback):
            def __init__(self):
                self.seen = []

            def on_step_end(self, args, state, control, model=None, **kw):
                self.seen.append((state.global_step, weight_sparsity(model)))
        return _R()


def test_hf_callback_follows_the_schedule(tmp_path):
    pytest.importorskip("transformers")
    from secateur.integrations.hf import PruningCallback
    torch.manual_seed(0)
    model = Tiny()
    cb, rec = PruningCallback(SCHED), Recorder()
    trainer = hf_trainer(tmp_path, model, [cb, rec], max_steps=16)
    trainer.train()
    assert [s for s, _ in rec.seen] == list(range(1, 17))
    for step, sparsity in rec.seen:
        assert sparsity == pytest.approx(expected_sparsity(SCHED, step), abs=1 / 64)
    assert weight_sparsity(model) == pytest.approx(0.75, abs=1 / 64)
    logged = [h["sparsity"] for h in trainer.state.log_history if "sparsity" in h]
    assert logged and logged[-1] == pytest.approx(0.75)


def test_hf_callback_with_gradient_accumulation_counts_optimizer_steps(tmp_path):
    pytest.importorskip("transformers")
    from secateur.integrations.hf import PruningCallback
    model = Tiny()
    cb = PruningCallback(SCHED, model=model)
    hf_trainer(tmp_path, model, [cb], max_steps=5, gradient_accumulation_steps=2).train()
    assert cb.scheduler.step_count == 5
    assert weight_sparsity(model) == pytest.approx(expected_sparsity(SCHED, 5), abs=1 / 64)


def test_hf_resume_restores_masks_and_catches_up(tmp_path):
    pytest.importorskip("transformers")
    from secateur.integrations.hf import PruningCallback
    torch.manual_seed(0)
    model = Tiny()
    hf_trainer(tmp_path, model, [PruningCallback(SCHED, model=model)], max_steps=6, save_strategy="steps",
               save_steps=6).train()
    masks6 = {k: v.clone() for k, v in masks_of(model).items()}
    torch.manual_seed(1)
    fresh = Tiny()
    cb = PruningCallback(SCHED, model=fresh)
    trainer = hf_trainer(tmp_path, fresh, [cb], max_steps=7)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert cb.scheduler.step_count == 7
    assert all(torch.equal(masks6[k] | ~v, torch.ones_like(v)) for k, v in masks_of(fresh).items())  # kept subset
    assert weight_sparsity(fresh) == pytest.approx(expected_sparsity(SCHED, 7), abs=1 / 64)


def test_catch_up_without_saved_masks_prunes_to_the_target():
    from secateur.integrations.common import catch_up
    model = Tiny()
    s = PruningScheduler(model, SCHED)
    catch_up(s, 9)
    assert s.step_count == 9 and s.sparsity == pytest.approx(expected_sparsity(SCHED, 9))
    assert weight_sparsity(model) == pytest.approx(s.sparsity, abs=1 / 64)


def test_hf_callback_bad_arguments():
    pytest.importorskip("transformers")
    from secateur.integrations.hf import PruningCallback
    with pytest.raises(PruningError):
        PruningCallback()
    with pytest.raises(PruningError):
        PruningCallback(0.5)
    with pytest.raises(PruningError):
        PruningCallback(SCHED, scheduler=PruningScheduler(Tiny(), SCHED))


# -------------------------------------------------------------------------------------- Lightning


def test_lightning_callback_follows_the_schedule(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from secateur.integrations.lightning import PruningCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Tiny()
            self.seen = []

        def training_step(self, batch, i):
            return self.net(batch["x"], batch["labels"])["loss"]

        def on_train_batch_end(self, outputs, batch, i):
            self.seen.append(self.trainer.global_step)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    mod = Module()
    loader = torch.utils.data.DataLoader(data(), batch_size=8)
    cb = PruningCallback(SCHED)
    seen = []

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            seen.append((trainer.global_step, weight_sparsity(pl_module)))
    trainer = pl.Trainer(max_steps=14, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, After()],
                         default_root_dir=str(tmp_path))
    trainer.fit(mod, loader)
    assert [s for s, _ in seen] == list(range(1, 15))
    for step, sparsity in seen:
        assert sparsity == pytest.approx(expected_sparsity(SCHED, step), abs=1 / 64)
    state = cb.state_dict()
    assert state["step"] == 14
    cb2 = PruningCallback(SCHED)
    cb2.load_state_dict(state)
    cb2.setup(trainer, Module(), "fit")
    assert cb2.scheduler.step_count == 14 and cb2.scheduler.sparsity == cb.scheduler.sparsity
