"""Masking engine: boolean masks held in ``torch.nn.utils.parametrize`` parametrizations.

Why parametrizations: the Parameter object stays the same (an optimizer built before pruning keeps
working), gradients of masked entries are exactly zero (they flow through ``w * mask``), a mask costs
one byte per weight, and ``finalize`` bakes the zeros in and leaves an ordinary module."""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import fail


class Mask(nn.Module):
    """Parametrization ``w -> w * mask``; ``mask`` is a boolean buffer (saved in the state_dict)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        n = self.mask.numel()
        return f"shape={tuple(self.mask.shape)}, sparsity={1 - int(self.mask.sum()) / max(n, 1):.3f}"


def _mask_module(module: nn.Module, param: str) -> Mask | None:
    if not parametrize.is_parametrized(module, param):
        return None
    for p in module.parametrizations[param]:
        if isinstance(p, Mask):
            return p
    return None


def foreign(module: nn.Module, param: str) -> list[str]:
    """Class names of the parametrizations on ``module.<param>`` that secateur did not add."""
    if not parametrize.is_parametrized(module, param):
        return []
    return [type(p).__name__ for p in module.parametrizations[param] if not isinstance(p, Mask)]


def refuse_foreign(model: nn.Module, action: str) -> None:
    """A PruningError naming the first tensor under a parametrization secateur did not add (its stored
    tensor is not the tensor the model computes with, so ``action`` would give a silently wrong result)."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param in module.parametrizations.keys():
            other = foreign(module, param)
            if other:
                where = f"{name}.{param}" if name else param
                get = f"model.get_submodule({name!r})" if name else "model"
                raise fail(f"cannot {action} a tensor under a parametrization secateur did not add", where=where,
                           value=", ".join(other), hint=f"bake it first with torch.nn.utils.parametrize."
                           f"remove_parametrizations({get}, {param!r})")


def check_model(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise fail("model must be an nn.Module", where=where, value=type(model).__name__)


def original(module: nn.Module, param: str) -> torch.Tensor | None:
    """The stored tensor behind ``module.<param>`` (the un-masked values), or None if absent."""
    if parametrize.is_parametrized(module, param):
        return module.parametrizations[param].original
    t = getattr(module, param, None)
    return t if isinstance(t, torch.Tensor) else None


def get_mask(module: nn.Module, param: str = "weight") -> torch.Tensor | None:
    """The boolean keep-mask of ``module.<param>`` (True = kept), or None if it is not masked; read it
    to inspect or copy one layer's pruning decision."""
    m = _mask_module(module, param)
    return None if m is None else m.mask


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    ``parametrize`` keeps the masked tensors' properties on a generated subclass, and ``deepcopy`` shares
    that class between a module and its copy: removing (or adding) a parametrization on one would then
    remove (or add) the property on the other too."""
    if parametrize.is_parametrized(module):
        cls = type(module)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)


def set_mask(module: nn.Module, param: str, mask: torch.Tensor) -> None:
    """Attach (or replace) the keep-mask of ``module.<param>``. The mask must match the tensor's shape.

    Use it for masks decided outside `prune` (by hand, by another tool); pruning then behaves as usual
    (zero gradients, `finalize`, `save`)."""
    where = f"{type(module).__name__}.{param}"
    mask = _check_mask(module, param, mask, where).to(dtype=torch.bool)
    existing = _mask_module(module, param)
    if existing is not None:
        existing.mask = mask
        return
    _own_class(module)
    order = list(module._parameters)  # removing the mask puts the tensor back where it was (see _restore_order)
    parametrize.register_parametrization(module, param, Mask(mask), unsafe=True)
    module.parametrizations[param][0].order = order


def _check_mask(module: nn.Module, param: str, mask, where: str) -> torch.Tensor:
    """``mask`` validated for ``module.<param>`` (a tensor of its shape, boolean or all 0/1), on its device."""
    if not isinstance(module, nn.Module):
        raise fail("module must be an nn.Module", where=where, value=type(module).__name__)
    other = foreign(module, param)
    if other:
        raise fail("cannot mask a tensor under a parametrization secateur did not add", where=where,
                   value=", ".join(other), hint=f"bake it first with torch.nn.utils.parametrize."
                   f"remove_parametrizations(module, {param!r})")
    t = original(module, param)
    if t is None:
        raise fail(f"no such tensor in the module: {param!r}", where=where)
    if not isinstance(mask, torch.Tensor):
        raise fail("mask must be a torch.Tensor", where=where, shape=t.shape, value=type(mask).__name__)
    if tuple(mask.shape) != tuple(t.shape):
        raise fail(f"mask shape {tuple(mask.shape)} does not match the tensor", where=where, shape=t.shape)
    if t.is_meta or mask.is_meta:
        raise fail("masks need real weights: a tensor is on the meta device", where=where, shape=t.shape,
                   hint="materialize the model (model.to_empty(device=...), then load its weights) first")
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)  # NaN is neither
        if bool(bad.any()):
            raise fail("a mask must be boolean or hold only 0 and 1", where=where, shape=t.shape,
                       value=mask[bad].flatten()[0].item())
    return mask.to(device=t.device)


def _mask_first(module: nn.Module, param: str, where: str) -> None:
    """A mask can leave a chain of parametrizations only if it comes first (then it acts on the stored tensor)."""
    plist = module.parametrizations[param]
    if not isinstance(plist[0], Mask):
        raise fail("cannot remove a mask that follows a parametrization secateur did not add", where=where,
                   value=", ".join(foreign(module, param)),
                   hint="remove the other parametrizations with torch.nn.utils.parametrize first")


def remove_mask(module: nn.Module, param: str = "weight", *, bake: bool = True) -> None:
    """Drop the mask of ``module.<param>``; ``bake=True`` writes the zeros into the tensor first.
    Parametrizations secateur did not add (registered after the mask) stay in place."""
    mask = _mask_module(module, param)
    if mask is None:
        return
    plist = module.parametrizations[param]
    if len(plist) > 1:
        _mask_first(module, param, f"{type(module).__name__}.{param}")
        if bake:
            with torch.no_grad():
                plist.original.mul_(mask.mask)
        del plist[0]
        return
    _own_class(module)
    parametrize.remove_parametrizations(module, param, leave_parametrized=bake)
    _restore_order(module, getattr(mask, "order", None))


def _restore_order(module: nn.Module, order: list[str] | None) -> None:
    """torch puts an unparametrized tensor last in ``_parameters`` (``bias`` before ``weight``): put it back in
    its place, so ``parameters()`` and ``state_dict()`` keep their order (an optimizer's state is by position)."""
    if not order:
        return
    rank = {n: i for i, n in enumerate(order)}
    items = sorted(module._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    module._parameters.clear()
    module._parameters.update(items)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yield ``(module_name, module, param, mask)`` for every masked tensor in the model."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param in list(module.parametrizations.keys()):
            m = _mask_module(module, param)
            if m is not None:
                yield name, module, param, m.mask


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """All masks, keyed ``"<module>.<param>"``: to inspect them, or to move them to another instance of
    the same architecture with `apply_masks` (e.g. from a pruned copy back onto the model being trained)."""
    check_model(model, "masks_of")
    return {f"{n}.{p}" if n else p: m for n, _, p, m in iter_masks(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach masks keyed ``"<module>.<param>"`` (as returned by `masks_of`). Checks all before changing any."""
    check_model(model, "apply_masks")
    if not isinstance(masks, Mapping):
        raise fail("masks must be a dict {'<module>.<param>': mask}", where="apply_masks", value=type(masks).__name__)
    modules = dict(model.named_modules())
    plan = []
    for key, mask in masks.items():
        if not isinstance(key, str):
            raise fail("mask keys must be strings '<module>.<param>'", where="apply_masks", value=key)
        mod_name, _, param = key.rpartition(".")
        module = modules.get(mod_name)
        if module is None:
            raise fail("no such tensor in the model", where=key)
        plan.append((module, param, _check_mask(module, param, mask, key).to(dtype=torch.bool)))
    for module, param, mask in plan:
        set_mask(module, param, mask)


def is_pruned(model: nn.Module) -> bool:
    """True while any tensor of the model carries a secateur mask: check it before deploying, since a
    masked model still pays for the parametrizations until `finalize`."""
    check_model(model, "is_pruned")
    return any(True for _ in iter_masks(model))


def finalize(model: nn.Module) -> nn.Module:
    """Make pruning permanent: bake every mask's zeros into its tensor and remove all parametrizations
    secateur added; parametrizations of your own stay in place. The Parameter objects stay the same.
    Returns the model.

    Call it once pruning and fine-tuning are done (before exporting or serving): the model becomes
    an ordinary module again, without the per-forward ``weight * mask`` cost."""
    check_model(model, "finalize")
    found = list(iter_masks(model))
    for name, module, param, _ in found:  # every check before the first change
        if len(module.parametrizations[param]) > 1:
            _mask_first(module, param, f"{name}.{param}" if name else param)
    for _, module, param, _ in found:
        remove_mask(module, param, bake=True)
    return model


def reapply(model: nn.Module) -> None:
    """Zero the stored values under every mask (so optimizer momentum or weight decay cannot make a
    later ``finalize(bake=False)`` or a mask removal revive them)."""
    with torch.no_grad():
        for _, module, param, mask in iter_masks(model):
            original(module, param).mul_(mask)
