"""Modules whose inner width is their input's width, position for position (issue #3).

timm's CoaT attention (``FactorAttnConvRelPosEnc``) reads ``B, N, C = x.shape``, reshapes q / k / v with
``C // self.num_heads`` and its result with ``reshape(B, N, C)``: its heads x head size must equal the residual
stream's width. A count tie (graph/ties.py) cannot say so there: the shared convolutional position encoding
(``ConvRelPosEnc``) splits the heads into sections of different window sizes, so the heads form several groups whose
counts must *sum* to the stream's width over the head size. What this module does instead is coarser, and needs no
new kind of constraint: the input channel ``i`` and the inner channel ``i`` (what the output projection reads) are
one unit, so a stream channel leaves together with the head holding that inner position (the stream is then pruned
in head-sized chunks, each with its head). Any union is a valid plan (removing a union is removing each part, each
proven by the oracle); the sizes it leaves (``num_heads``, the sections' ``channel_splits``) are updated by the
size updaters and the cut proposals (graph/splits.py), and the dry run still checks every op shape.

Registered by class name ("module.Class" -> the child whose input is the inner tensor): timm is never imported."""
from __future__ import annotations

from typing import Any

from torch import nn

SAME_WIDTH: dict[str, str] = {}


def enter(tr: Any, mod: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook part: remember a registered module's input channels for its child; at that child, union them
    one to one with the child's input channels (nothing where either carries none or the widths differ)."""
    from secateur.graph.modules import _channels
    pending = tr.same_width
    if id(mod) in pending:
        outer = pending.pop(id(mod))
        x = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape")), None)
        inner = _channels(tr, x, -1) if x is not None and tr.get(x) is not None else None
        if outer is not None and inner is not None and outer.numel() == inner.numel():
            tr.atoms.union(outer, inner)
    child = SAME_WIDTH.get(f"{type(mod).__module__}.{type(mod).__name__}")
    if child is None or not isinstance(getattr(mod, child, None), nn.Module):
        return
    x = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape")), None)
    if x is not None and tr.get(x) is not None:
        pending[id(getattr(mod, child))] = _channels(tr, x, -1)


SAME_WIDTH["timm.models.coat.FactorAttnConvRelPosEnc"] = "proj"
