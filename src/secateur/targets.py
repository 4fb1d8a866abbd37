"""Which tensors may be pruned.

By default the weights of Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and transformers' GPT-2
``Conv1D``. Norm layers, biases and embeddings are skipped unless asked for, as in PaddleSlim's
unstructured pruner and the torch tutorial."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from secateur.errors import fail

#: Module types whose ``weight`` is pruned by default.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

ModuleFilter = Callable[[str, nn.Module], bool]
TargetSpec = Union[None, str, ModuleFilter, Iterable[str]]


@dataclass(frozen=True)
class Target:
    """One prunable tensor: ``getattr(module, param)`` inside ``model`` at ``module_name``."""

    module_name: str
    module: nn.Module
    param: str

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def tensor(self) -> torch.Tensor:
        from secateur.masks import original
        return original(self.module, self.param)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a Linear with the weight stored ``(in, out)``), recognised
    without importing transformers. The class is looked up along the MRO because a masked module's class
    is parametrize's subclass ``ParametrizedConv1D``."""
    return hasattr(module, "nf") and any(c.__name__ == "Conv1D" for c in type(module).__mro__)


def is_default_layer(name: str, module: nn.Module) -> bool:
    return isinstance(module, DEFAULT_TYPES) or is_hf_conv1d(module)


def is_conv1x1(name: str, module: nn.Module) -> bool:
    """PaddleSlim's ``prune_params_type='conv1x1_only'``: only pointwise convolutions."""
    return isinstance(module, _CONV_TYPES) and all(k == 1 for k in module.kernel_size)


PRESETS: dict[str, ModuleFilter] = {
    "default": is_default_layer,
    "linear": lambda n, m: isinstance(m, nn.Linear),
    "conv": lambda n, m: isinstance(m, _CONV_TYPES),
    "conv1x1": is_conv1x1,
}


def _module_filter(targets: TargetSpec) -> ModuleFilter:
    if targets is None:
        return is_default_layer
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise fail("unknown targets preset", value=targets, hint=f"choose one of {sorted(PRESETS)}")
        return PRESETS[targets]
    if callable(targets):
        return targets
    names = set(targets)  # module names, checked by select_targets
    return lambda n, m: n in names


def _names(value, what: str) -> tuple[str, ...]:
    """An iterable of module names as a tuple (read once: it may be a generator), else a PruningError."""
    kinds = "a preset name, a filter (name, module) -> bool or " if what == "targets" else "a glob or "
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise fail(f"{what} must be {kinds}an iterable of module names, not {type(value).__name__}", where=what,
                   value=value)
    value = tuple(value)
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise fail(f"{what} must be {kinds}an iterable of module names", where=what, value=bad[0])
    return value


def select_targets(model: nn.Module, targets: TargetSpec = None, *, include_bias: bool = False,
                   exclude: Iterable[str] = ()) -> list[Target]:
    """Resolve a target spec into the list of tensors to prune, in module order.

    ``targets`` is None (the default layer types), a preset name (``"linear"``, ``"conv"``, ``"conv1x1"``),
    a filter ``(name, module) -> bool`` or an iterable of module names. ``include_bias`` adds biases.
    ``exclude``: globs matched against module names (``"fc"``, ``"layer4.*"``) and tensor names
    (``"fc.bias"``), like the keys of a per-layer amount dict; one that matches no candidate tensor is an
    error, so that a typo cannot leave a layer the user meant to protect unprotected."""
    from secateur.masks import foreign, original

    exclude = (exclude,) if isinstance(exclude, str) else _names(exclude, "exclude")
    if targets is not None and not isinstance(targets, str) and not callable(targets):
        targets = _names(targets, "targets")
    keep = _module_filter(targets)
    if targets is not None and not isinstance(targets, str) and not callable(targets):
        known = [n for n, _ in model.named_modules()]
        missing = [n for n in dict.fromkeys(targets) if n not in set(known)]
        if missing:
            raise fail("no module of that name in the model", where=type(model).__name__, value=missing,
                       hint=f"module names look like {[n for n in known if n][:5]}")
    excluded = list(dict.fromkeys(exclude))
    used: set[str] = set()

    def is_excluded(*names: str) -> bool:
        hits = [pat for pat in excluded if any(fnmatch.fnmatchcase(n, pat) for n in names if n)]
        used.update(hits)
        return bool(hits)

    found: list[Target] = []
    for name, module in model.named_modules():
        if not keep(name, module):
            continue
        skip_module = is_excluded(name)
        for param in ("weight", "bias") if include_bias else ("weight",):
            other = foreign(module, param)
            t = None if other else original(module, param)
            if t is None and not other:
                continue
            if is_excluded(f"{name}.{param}" if name else param) or skip_module:
                continue
            if other:  # its stored tensor is not the one the model computes with
                raise fail("cannot prune a tensor under a parametrization secateur did not add",
                           where=f"{name}.{param}" if name else param, value=", ".join(other),
                           hint=f"bake it first with torch.nn.utils.parametrize.remove_parametrizations("
                           f"model.get_submodule({name!r}), {param!r}), or exclude=[{name!r}]")
            if not torch.is_floating_point(t):
                raise fail("cannot prune a non-floating tensor", where=f"{name}.{param}", shape=t.shape,
                           value=t.dtype)
            found.append(Target(name, module, param))
    unused = [pat for pat in excluded if pat not in used]
    if unused:
        raise fail("exclude entries matched no target tensor", where=type(model).__name__, value=unused,
                   hint="give module names or globs such as 'fc' or 'layer4.*'")
    if not found and excluded:
        raise fail("exclude removed every target tensor", where=type(model).__name__, value=excluded)
    if not found:
        raise fail("the target filter selected no prunable tensor", where=type(model).__name__,
                   value=targets, hint="check the filter or the module names")
    return found
