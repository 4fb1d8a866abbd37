"""Training with pruning: recovery fine-tuning with masks held, knowledge distillation, the iterative
prune / fine-tune loop, and checkpoints that resume exactly.

Data is any re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list). Checkpoints are plain
dicts of tensors and plain data (``torch.save``-able, loadable with ``weights_only=True``): the model's
weights under their ordinary names, the masks, the scheduler's counter and the history, plus a
fingerprint of the model so that resuming into a different model is refused before anything changes."""
from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import PruningError, fail
from secateur.masks import Mask, apply_masks, iter_masks, masks_of, original, reapply, remove_mask

Batches = Iterable[Sequence[torch.Tensor]]
CHECKPOINT_FORMAT = "secateur-checkpoint/1"


# ------------------------------------------------------------------------------------ evaluation


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches) -> float:
    """Top-1 accuracy in [0, 1]; the model's train/eval mode is restored afterwards."""
    was = model.training
    model.eval()
    dev = _device(model)
    correct = total = 0
    try:
        for x, y in data:
            pred = model(x.to(dev)).argmax(-1)
            correct += int((pred == y.to(dev)).sum())
            total += int(y.numel())
    finally:
        model.train(was)
    if total == 0:
        raise fail("evaluation data is empty", where="evaluate")
    return correct / total


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *,
                      alpha: float = 0.5, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s loss: ``(1-alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``."""
    hard = F.cross_entropy(student, targets)
    soft = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


# ----------------------------------------------------------------------------------- fine-tuning


def fine_tune(model: nn.Module, data: Batches, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
              teacher: nn.Module | None = None, alpha: float = 0.5, temperature: float = 4.0,
              regularizer: Any = None, scheduler: Any = None,
              on_step: Callable[[int, float], None] | None = None, progress: str | None = None) -> float:
    """Train with the masks held: after every ``optimizer.step()`` the stored values under each mask
    are zeroed again, so momentum or weight decay can never revive a pruned weight.

    ``teacher``: distil from it (usually the unpruned model). ``regularizer``: anything with
    ``proximal_(model, lr, step)`` (see `secateur.regularize`), applied after each step. ``scheduler``: a
    `PruningScheduler`, stepped once per batch. ``on_step(step, loss)`` is called after each batch (for
    checkpointing). Returns the mean loss of the last epoch."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise fail("epochs must be an integer >= 0", where="fine_tune", value=epochs)
    if not _number(alpha) or not 0 <= alpha <= 1 or not _number(temperature) or not 0 < temperature < math.inf:
        raise fail("distillation needs 0 <= alpha <= 1 and a finite temperature > 0", where="fine_tune",
                   value=(alpha, temperature))
    _check_optimizer(model, optimizer, "fine_tune")
    if regularizer is not None:
        if not callable(getattr(regularizer, "proximal_", None)):
            raise fail("regularizer needs a proximal_(model, lr, step) method (see secateur.regularize)",
                       where="fine_tune", value=type(regularizer).__name__)
        if callable(getattr(regularizer, "check", None)):
            regularizer.check(model)  # before any step: a regulariser that cannot act must not fail mid-training
    dev = _device(model)
    modes = (model.training, teacher.training if teacher is not None else None)
    if teacher is not None:
        teacher.eval()
    model.train()
    step, last = 0, math.nan
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in _progress(data, f"{progress} epoch {epoch + 1}/{epochs}" if progress else None):
            x, y = x.to(dev), y.to(dev)
            # a refused step leaves no trace: the forward updates buffers (BatchNorm running statistics)
            buffers = [(b, b.clone()) for b in model.buffers() if b.dtype != torch.bool]
            out = model(x)
            if teacher is not None:
                loss = distillation_loss(out, _teacher_logits(teacher, x), y, alpha=alpha, temperature=temperature)
            else:
                loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss.detach()):  # before the step: a NaN gradient would overwrite every weight
                with torch.no_grad():
                    for b, saved in buffers:
                        b.copy_(saved)
                model.train(modes[0])
                if teacher is not None:
                    teacher.train(modes[1])
                raise fail(f"the loss is {float(loss.detach())} at step {step} (epoch {epoch + 1}); the model "
                           f"has taken the {step} steps before it", where="fine_tune", shape=tuple(x.shape),
                           hint="non-finite inputs or labels in that batch, or a learning rate that diverged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            reg_step = scheduler.step_count if scheduler is not None else step
            if regularizer is not None:
                regularizer.proximal_(model, optimizer.param_groups[0]["lr"], reg_step)
            if scheduler is not None:
                scheduler.step()
            reapply(model)
            _mask_optimizer_state(model, optimizer)
            total, n = total + float(loss.detach()), n + 1
            if on_step is not None:
                on_step(step, float(loss.detach()))
            step += 1
        if n == 0:  # nothing trained in this epoch: a mean loss of 0 would be a lie
            model.train(modes[0])
            if teacher is not None:
                teacher.train(modes[1])
            raise fail("training data is empty" if epoch == 0 else
                       f"training data gave no batch in epoch {epoch + 1}", where="fine_tune",
                       hint=None if epoch == 0 else "pass a re-iterable (a list, a DataLoader), not an iterator")
        last = total / n
    return last


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v)


def _check_optimizer(model: nn.Module, optimizer: Any, where: str) -> None:
    """The optimizer must update this model's parameters, with state of their shapes. The common slip: an optimizer
    that has stepped before a structural prune keeps momentum / Adam moments of the full-size tensors (the pruned
    parameters are the same objects, sliced), and its next step fails deep inside torch."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise fail("optimizer must be a torch.optim.Optimizer", where=where, value=type(optimizer).__name__)
    names = {id(p): n for n, p in model.named_parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(id(p) in names for p in held):
        raise fail(f"the optimizer holds none of the model's parameters ({len(held)} tensors of another model)",
                   where=where, value=type(model).__name__, hint="build it from model.parameters()")
    for p in held:
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                raise fail(f"the optimizer's {key!r} for this parameter has another shape: it stepped before the "
                           f"model was pruned", where=names.get(id(p), "a parameter"), shape=tuple(p.shape),
                           value=tuple(v.shape), hint="build a new optimizer after a structural prune")
    stale = [p for p in held if id(p) not in names]
    if stale:
        warnings.warn(f"{where}: the optimizer holds {len(stale)} tensors that are not parameters of the model "
                      f"(first shape {tuple(stale[0].shape)}); they are stepped but take no part in its forward",
                      stacklevel=3)


@torch.no_grad()
def _mask_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum / Adam moments under the masks too, so a pruned entry's stored value is not
    pushed away from zero at the next step (it would be re-zeroed, but this keeps it exactly zero)."""
    for _, module, param, mask in iter_masks(model):
        state = optimizer.state.get(original(module, param))
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape and value.is_floating_point():
                value.mul_(mask)


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return teacher(x)


def _progress(data: Batches, desc: str | None):
    if desc is None:
        return data
    try:
        from tqdm.auto import tqdm
        return tqdm(data, desc=desc, leave=False)
    except ImportError:
        return data


# ------------------------------------------------------------------------------------ checkpoints

_ORIGINAL = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")
_PARAM_BUFFER = re.compile(r"(^|\.)parametrizations\.[^.]+\.\d+\.")


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under ordinary names (``fc.weight``, not ``fc.parametrizations.weight.original``),
    stored (unmasked) values, masks left out: the same keys whether or not the model is pruned."""
    out = {}
    for key, value in model.state_dict().items():
        if _PARAM_BUFFER.search(key):
            continue
        out[_plain_name(key)] = value
    return out


def fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Tensor names and shapes: what must match for a checkpoint to belong to this model."""
    return {k: list(v.shape) for k, v in plain_state(model).items()}


def checkpoint(model: nn.Module, *, scheduler: Any = None, optimizer: torch.optim.Optimizer | None = None,
               history: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """A plain dict for ``torch.save``: weights, masks, scheduler/optimizer state, history, ``extra``, and the
    structure record of a structurally pruned model (so that `resume` can shape a freshly built one).
    Tensors are references to the live ones: save (or clone) it before training goes on."""
    from secateur.structured.plan import STRUCTURE_ATTR
    return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint(model), "weights": plain_state(model),
            "masks": dict(masks_of(model)), "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "history": list(history or []), "extra": extra,
            "structure": copy.deepcopy(getattr(model, STRUCTURE_ATTR, None)) or None}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **kw: Any) -> None:
    """`checkpoint` written atomically (temporary file, then rename): a kill mid-write leaves the
    previous checkpoint intact."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(checkpoint(model, **kw), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise fail("no such checkpoint file", where="load_checkpoint", value=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a file it cannot read
        raise fail(f"cannot read the file as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                   where="load_checkpoint", value=path,
                   hint="pass a file written by secateur.training.save_checkpoint") from e
    return ckpt


def _plain_name(key: str) -> str:
    return _ORIGINAL.sub(lambda m: f"{m.group(1)}{m.group(2)}", key)


def _check_checkpoint(model: nn.Module, ckpt: Mapping[str, Any], where: str) -> None:
    """Everything about the model's part of a checkpoint that loading it could trip on."""
    for key in ("fingerprint", "weights", "masks"):
        if not isinstance(ckpt.get(key), Mapping):
            raise fail(f"the checkpoint has no {key!r} dict", where=where, value=type(ckpt.get(key)).__name__,
                       hint="write checkpoints with secateur.training.checkpoint / save_checkpoint")
    mine, theirs = fingerprint(model), ckpt["fingerprint"]
    if mine != theirs:
        missing = sorted(set(mine) - set(theirs))[:3]
        extra = sorted(set(theirs) - set(mine))[:3]
        shapes = [(k, theirs[k], mine[k]) for k in mine if k in theirs and mine[k] != theirs[k]][:3]
        raise fail("the checkpoint belongs to a different model", where=where,
                   value={"missing from checkpoint": missing, "not in model": extra,
                          "shape (checkpoint, model)": shapes})
    weights = ckpt["weights"]
    if set(weights) != set(mine):
        raise fail("the checkpoint's weights do not match its fingerprint", where=where,
                   value={"missing": sorted(set(mine) - set(weights))[:3],
                          "unexpected": sorted(map(str, set(weights) - set(mine)))[:3]})
    for key, shape in mine.items():
        w = weights[key]
        if not isinstance(w, torch.Tensor) or list(w.shape) != shape:
            raise fail("checkpoint tensor does not fit the model", where=key,
                       shape=w.shape if isinstance(w, torch.Tensor) else None,
                       value=shape if isinstance(w, torch.Tensor) else type(w).__name__)
    # loading under plain names needs every parametrization to be a secateur mask (removed, then re-attached)
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for param, plist in module.parametrizations.items():
                if len(plist) != 1 or not isinstance(plist[0], Mask):
                    raise fail("resume handles only secateur masks as parametrizations",
                               where=f"{name}.{param}" if name else param, value=[type(p).__name__ for p in plist])
    params = {_plain_name(n) for n, _ in model.named_parameters()}
    for key, mask in ckpt["masks"].items():
        if key not in params or not isinstance(mask, torch.Tensor) or list(mask.shape) != mine[key] \
                or mask.dtype != torch.bool:
            raise fail("checkpoint mask does not fit the model", where=str(key),
                       shape=mask.shape if isinstance(mask, torch.Tensor) else None, value=mine.get(key))
    if not isinstance(ckpt.get("history", []), (list, tuple)):
        raise fail("the checkpoint's history is not a list", where=where, value=type(ckpt["history"]).__name__)


def _shaped_like(model: nn.Module, ckpt: Mapping[str, Any]) -> nn.Module | None:
    """A meta copy of ``model`` resized by the checkpoint's structure record, where ``model`` is a freshly built,
    unpruned one that this makes fit the checkpoint (channels removed physically during training, as by
    `secateur.schedules.channel_pruning`); None otherwise (the model is checked as it is)."""
    from secateur.structured.plan import STRUCTURE_ATTR
    structure = ckpt.get("structure")
    if not isinstance(structure, Mapping) or not structure or getattr(model, STRUCTURE_ATTR, None) \
            or masks_of(model) or not isinstance(ckpt.get("fingerprint"), Mapping) \
            or fingerprint(model) == ckpt["fingerprint"]:
        return None
    from secateur.graph.verify import skeleton
    from secateur.structured import apply_structure
    try:
        shaped = apply_structure(skeleton(model), dict(structure))
    except Exception:  # noqa: BLE001 - a record that does not fit this model: it is checked as it is, and refused
        return None
    return shaped if fingerprint(shaped) == ckpt["fingerprint"] else None


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, where: str) -> None:
    if state is None:
        raise fail("the checkpoint holds no optimizer state", where=where)
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not isinstance(state.get("state"), Mapping) \
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise fail("the checkpoint's optimizer state is not an optimizer state_dict", where=where,
                   value=sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__)
    saved = [len(g["params"]) for g in groups]
    current = [len(g["params"]) for g in optimizer.param_groups]
    if saved != current:
        raise fail("the checkpoint's optimizer state does not fit this optimizer", where=where,
                   value={"parameters per group (checkpoint)": saved, "(optimizer)": current},
                   hint="build the optimizer over the same parameters, in the same groups, as when saving")


def resume(model: nn.Module, ckpt: Mapping[str, Any], *, scheduler: Any = None,
           optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """Restore weights, masks, scheduler and optimizer from a `checkpoint`; returns its history.

    Everything is checked first (format, model fingerprint, weight and mask shapes, schedule, optimizer
    groups); a checkpoint of a different model, schedule or optimizer is a PruningError and the model,
    scheduler and optimizer are left untouched."""
    where = f"resume({type(model).__name__})"
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise fail("not a secateur checkpoint", where="resume",
                   value=ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__)
    shaped = _shaped_like(model, ckpt)  # a fresh model of a structurally pruned run: its shapes after the record
    _check_checkpoint(model if shaped is None else shaped, ckpt, where)
    if scheduler is not None:
        state = ckpt.get("scheduler")
        if state is None:
            raise fail("the checkpoint holds no scheduler state", where="resume")
        if not isinstance(state, Mapping) or state.get("schedule") != scheduler.state_dict()["schedule"]:
            raise fail("the checkpoint was written with a different schedule", where="resume",
                       value={"saved": state.get("schedule") if isinstance(state, Mapping) else state,
                              "current": scheduler.state_dict()["schedule"]})
    if optimizer is not None:
        _check_optimizer_state(optimizer, ckpt.get("optimizer"), where)
    # apply. Scheduler and optimizer first: each loads all-or-nothing (torch's optimizer checks before it
    # sets anything), so a failure there is undone here before the model is touched.
    sched_before = scheduler.state_dict() if scheduler is not None else None
    try:
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except Exception as e:
        if scheduler is not None:
            scheduler.load_state_dict(sched_before)
        if isinstance(e, PruningError):
            raise
        raise fail(f"the checkpoint's optimizer state does not load ({type(e).__name__}: {e})", where=where) from e
    # the model: drop current masks (keeping the Parameter objects), load weights, re-attach masks. All
    # of it was checked above (names, shapes, parametrizations).
    if shaped is not None:
        from secateur.structured import apply_structure
        apply_structure(model, ckpt["structure"])  # (the Parameter objects stay: an optimizer over them still fits)
    for _, module, param, _ in list(iter_masks(model)):
        remove_mask(module, param, bake=False)
    model.load_state_dict(ckpt["weights"], strict=True)
    apply_masks(model, ckpt["masks"])
    return list(ckpt.get("history", []))


# ------------------------------------------------------------------------------- iterative loop


def _measure(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    from secateur.report import report
    rep = report(model, example_inputs)
    return {"params": rep.total_params, "nonzero": rep.nonzero_params, "sparsity": rep.sparsity,
            "macs": rep.macs_nonzero}


def iterative_prune(model: nn.Module, train_data: Batches, eval_data: Batches, *,
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], rate: float = 0.2,
                    target: float = 0.99, max_drop: float = 0.01, epochs: int = 1, example_inputs: Any = None,
                    teacher: nn.Module | None = None, max_rounds: int = 100, progress: bool = False,
                    **prune_kwargs: Any) -> tuple[nn.Module, list[dict]]:
    """Prune ``rate`` of the surviving weights, fine-tune ``epochs`` with masks held, evaluate; repeat
    until the accuracy drop from the unpruned model exceeds ``max_drop`` (that round is undone: the
    model returned is the last one within the bound) or sparsity ``target`` is reached.

    ``prune_kwargs`` go to `secateur.prune` (``scope="global"``, ``criterion=...``). Returns ``(model,
    history)``; each history row has round, target sparsity, accuracy, drop, params, nonzero, sparsity
    (of all parameters), MACs (non-zero, with ``example_inputs``) and ``accepted``."""
    from secateur.prune import prune
    for name, v, lo, hi in (("rate", rate, 0, 1), ("target", target, 0, 1), ("max_drop", max_drop, 0, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not lo <= v <= hi:
            raise fail(f"{name} must be in [{lo}, {hi}]", where="iterative_prune", value=v)
    if rate == 0:
        raise fail("rate must be > 0", where="iterative_prune", value=rate)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise fail("max_rounds must be a positive int", where="iterative_prune", value=max_rounds)
    if not callable(make_optimizer):
        raise fail("make_optimizer is a function model -> torch.optim.Optimizer", where="iterative_prune",
                   value=type(make_optimizer).__name__)
    base = evaluate(model, eval_data)
    history = [{"round": 0, "target": 0.0, "accuracy": base, "drop": 0.0, **_measure(model, example_inputs),
                "accepted": True}]
    level = 0.0
    for r in range(1, max_rounds + 1):
        if level >= target - 1e-12:
            break
        level = min(target, 1 - (1 - level) * (1 - rate))
        saved = _snapshot(model)  # weights + masks only: undoing a round needs exactly these
        prune(model, amount=level, **prune_kwargs)
        try:  # a failing round is undone: the model is as the last accepted round left it
            opt = make_optimizer(model)
            if not isinstance(opt, torch.optim.Optimizer):
                raise fail("make_optimizer(model) must return a torch.optim.Optimizer", where="iterative_prune",
                           value=type(opt).__name__)
            fine_tune(model, train_data, opt, epochs=epochs, teacher=teacher,
                      progress=f"round {r}" if progress else None)
        except BaseException:
            resume(model, saved)
            raise
        acc = evaluate(model, eval_data)
        ok = base - acc <= max_drop
        history.append({"round": r, "target": level, "accuracy": acc, "drop": base - acc,
                        **_measure(model, example_inputs), "accepted": ok})
        if progress:
            print(f"round {r}: target sparsity {level:.4f} accuracy {acc:.4f} (drop {base - acc:+.4f})"
                  f"{'' if ok else ' -> over the bound, undone'}", flush=True)
        if not ok:
            resume(model, saved)
            break
    return model, history


def _snapshot(model: nn.Module) -> dict[str, Any]:
    ck = checkpoint(model)
    ck["weights"] = {k: v.detach().clone() for k, v in ck["weights"].items()}
    ck["masks"] = {k: v.clone() for k, v in ck["masks"].items()}
    return ck
