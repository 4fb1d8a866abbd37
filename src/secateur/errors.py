"""The library's one exception type.

Every message names *where* (module or tensor), *what shape* and *which value* was wrong, so that a
user can fix the call without reading secateur's source (einops-style)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


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


def shape_of(inputs: Any):
    """The shape of a single tensor input (None for several inputs, named in the message instead)."""
    from torch import Tensor
    if isinstance(inputs, Tensor):
        return inputs.shape
    if isinstance(inputs, (tuple, list)) and len(inputs) == 1 and isinstance(inputs[0], Tensor):
        return inputs[0].shape
    return None


@contextlib.contextmanager
def inputs_rejected(model: Any, example_inputs: Any) -> Iterator[None]:
    """A model that fails on the example inputs (a wrong shape or dtype, or a compiler error) gets a PruningError
    naming the model, the input shape and torch's first line."""
    try:
        yield
    except RuntimeError as e:
        raise fail("the model failed on the example inputs", where=type(model).__name__,
                   shape=shape_of(example_inputs), value=str(e).splitlines()[0][:200] if str(e) else None,
                   hint="pass example inputs the model accepts (command line: --input-shape)") from e
