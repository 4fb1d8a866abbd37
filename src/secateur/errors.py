"""The library's one exception type.

Every message names *where* (module or tensor), *what shape* and *which value* was wrong, so that a
user can fix the call without reading secateur's source (einops-style)."""
from __future__ import annotations

from typing import Any


class PruningError(ValueError):
    """Raised for bad input or for a model secateur cannot prune correctly.

    A `PruningError` is always raised *before* anything is changed: the model is left as it was."""


def fail(message: str, *, where: str | None = None, shape: Any = None, value: Any = None,
         hint: str | None = None) -> PruningError:
    """Build a `PruningError` with a uniform layout: ``[where] message (shape=..., value=...). hint``."""
    parts = []
    if where:
        parts.append(f"[{where}] ")
    parts.append(message)
    extra = []
    if shape is not None:
        extra.append(f"shape={tuple(shape)}")
    if value is not None:
        extra.append(f"value={value!r}")
    if extra:
        parts.append(" (" + ", ".join(extra) + ")")
    if hint:
        parts.append(". " + hint)
    return PruningError("".join(parts))


def check_model_inputs(model: Any, example_inputs: Any, where: str) -> None:
    """The checks every call that runs a model makes first: an ``nn.Module``, and example inputs that are
    there and not empty (a batch of 0 runs most models, and every statistic over it is NaN or nothing)."""
    from torch import Tensor, nn
    if not isinstance(model, nn.Module):
        raise fail("model must be an nn.Module", where=where, value=type(model).__name__)
    if example_inputs is None:
        raise fail("example_inputs are needed (a tensor, a tuple of positional args or a dict of keyword args)",
                   where=where, value=None)
    items = example_inputs.values() if isinstance(example_inputs, dict) else \
        example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    for t in items:
        if isinstance(t, Tensor) and t.numel() == 0:
            raise fail("an example input is empty", where=where, shape=tuple(t.shape),
                       hint="give at least one sample")
        if isinstance(t, Tensor) and t.is_floating_point() and not t.is_meta and bool(t.isnan().any()):
            raise fail("an example input holds NaN: every score and check made on it would be NaN", where=where,
                       shape=tuple(t.shape), hint="check the inputs with torch.isnan")
