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
