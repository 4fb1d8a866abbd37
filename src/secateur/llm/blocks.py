"""Find the repeated blocks (transformer layers) that layer-wise calibration walks through.

Why auto-detection by structure rather than a table of attribute names: every model family names its
layer list differently (``model.layers``, ``encoder.layer``, ``transformer.h``...), but all of them hold
the layers in one ``ModuleList``/``Sequential`` of identical modules that contain Linear layers."""
from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from secateur.errors import fail
from secateur.targets import is_hf_conv1d

BlocksSpec = Union[None, str, Iterable[nn.Module]]

_HINT = ("Name them with blocks='<dotted name of the ModuleList>' (e.g. 'model.layers', 'encoder.layer') "
         "or pass the list of block modules")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (the same map with the weight stored ``(in, out)``)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _has_linear(module: nn.Module) -> bool:
    return any(is_linear_like(m) for m in module.modules())


def _is_block_list(container: nn.Module) -> bool:
    children = list(container.children())
    if len(children) < 2 or not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return False
    kind = type(children[0])
    return (all(type(c) is kind for c in children) and not is_linear_like(children[0])
            and all(_has_linear(c) for c in children))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, blocks: BlocksSpec = None) -> tuple[str, list[nn.Module]]:
    """``(name, block modules)`` in execution order. ``blocks`` is None (auto: the list of identical
    Linear-holding modules with the most parameters), a dotted module name, or the modules themselves."""
    if blocks is None:
        found = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
        if not found:
            raise fail("no repeated blocks found (no ModuleList/Sequential of identical modules holding Linear "
                       "layers)", where=type(model).__name__, hint=_HINT)
        name, container = max(found, key=lambda nm: _n_params(nm[1]))
        return name, list(container.children())
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            raise fail("no submodule with this name", where=type(model).__name__, value=blocks, hint=_HINT) from None
        mods = list(container.children())
        if not mods or not all(_has_linear(m) for m in mods):
            raise fail("the named module is not a list of blocks holding Linear layers", where=blocks,
                       value=type(container).__name__, hint=_HINT)
        return blocks, mods
    mods = list(blocks)
    if not mods or not all(isinstance(m, nn.Module) for m in mods):
        raise fail("blocks must be a module name or a non-empty list of modules", value=type(blocks).__name__,
                   hint=_HINT)
    owned = {id(m) for m in model.modules()}
    for i, m in enumerate(mods):
        if id(m) not in owned:
            raise fail("block is not a submodule of the model", where=f"blocks[{i}]", value=type(m).__name__)
    return "<given>", mods
