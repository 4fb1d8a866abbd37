"""torchvision's MViT (video, ``torchvision.models.video.mvit``): the positional encoding and the multiscale
attention's stored sizes (issue #3).

Why a leaf for ``PositionalEncoding``: MViT V1 adds ``repeat_interleave(temporal_pos) + spatial_pos`` (both
``[positions, C]``) and ``class_pos`` to ``cat(class_token, x)`` in place. Traced op by op, the two 2-d tables are
constants (a free parameter is labelled only when it has one non-1 dim: which of two dims is the channel dim is
not known before it meets one), so every channel of the first stage's stream was one unit, and the stream stayed
whole (mvit_v1_b: 0.67 of dense parameters at ratio 0.5; V2 has no absolute tables and reached 0.33). As one op it
is exact: the output's channels are the input's, and every table is sliced along its last dim with them.

Why a leaf for ``MultiscaleAttention``: traced op by op, a single-head attention's q/k/v dims became the units
(q dim d, k dim d and v dim d together, through the depthwise pooling convs), but the pooling's LayerNorm over the
head dims sits between the qkv rows and ``q.k``: zeroing the rows leaves the norm's bias there, so removal is not
zeroing and the oracle failed (0.25 relative error). As one op, whole heads are the units: head ``h`` owns its
q/k/v rows and its projection columns; the pooling convs, their norms and V2's relative-position tables are shared
by all heads (over one head's dims) and stay. Removing a head is zeroing it at the projection (the oracle's
reference), also with V2's residual pooling (``x + q`` per head). ``heads="head_dim"`` keeps whole heads here
(noted): the norm over the head dims makes per-dim removal inexact. A one-head attention keeps its head (never
pruned to zero).

Why an updater for it: its forward reshapes with ``self.num_heads`` / ``self.head_dim`` and ``self.output_dim``;
they are read from the sliced tensors (the projection's input width over the unchanged head size). ``scaler``
stays: a head's size does not change. torchvision is never imported here: all is registered by class name."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import LEAVES_BY_NAME, UPDATERS_BY_NAME, _channels, _consumed, _input, _shape_for

_MVIT = "torchvision.models.video.mvit"


def _positional_encoding(tr: Tracer, mod: nn.Module, args, kwargs, out: torch.Tensor) -> None:
    """Output channels = input channels; the class token and the position tables ride along (their last dim)."""
    chan = _channels(tr, _input(args, kwargs), -1)
    if chan is None:  # an unlabelled stream: nothing here can be pruned
        tr.set(out, None)
        return
    for p in (mod.class_token, mod.spatial_pos, mod.temporal_pos, mod.class_pos):
        if p is not None:
            tr.slot(p, p.dim() - 1, chan, "param")
    tr.set(out, _shape_for(out.dim(), -1, chan))


def _attention(tr: Tracer, mod: nn.Module, args, kwargs, out) -> None:
    """(x [B, N, C], thw) -> (y, thw): input channels -> qkv columns; head h owns its rows in the
    ``[3, heads, head_dim]`` layout and its ``project[0]`` columns; ``project[0]``'s rows are new channels."""
    x = _input(args, kwargs)
    heads, d = int(mod.num_heads), int(mod.head_dim)
    qkv, proj = mod.qkv, mod.project[0]
    if qkv.weight.shape[0] != 3 * heads * d or proj.weight.shape[1] != heads * d:
        raise tr.error(f"{type(mod).__name__}: qkv rows {qkv.weight.shape[0]} and projection inputs "
                       f"{proj.weight.shape[1]} do not split into {heads} heads of {d}", x)
    if tr.head_dim and _HEAD_DIM_NOTE not in tr.notes:
        tr.notes.append(_HEAD_DIM_NOTE)
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(qkv.weight, 1, _consumed(tr, chan), "in")
    units = tr.atoms.new(heads).repeat_interleave(d)
    tr.slot(qkv.weight, 0, units.repeat(3), "out")
    if qkv.bias is not None:
        tr.slot(qkv.bias, 0, units.repeat(3), "out")
    tr.slot(proj.weight, 1, units, "in")
    atoms = tr.atoms.new(proj.weight.shape[0])
    tr.slot(proj.weight, 0, atoms, "out")
    if proj.bias is not None:
        tr.slot(proj.bias, 0, atoms, "out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        if isinstance(t, torch.Tensor):
            tr.set(t, _shape_for(t.dim(), -1, atoms) if t is outs[0] else None)


_HEAD_DIM_NOTE = ("torchvision MViT MultiscaleAttention: heads='head_dim' keeps whole heads there (a LayerNorm over "
                  "the head dims pools q/k/v, so removing a dim is not zeroing it)")


def _multiscale_attention(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """Sizes from the sliced projection: whole heads left, each of the old head size."""
    width, head = int(mod.project[0].weight.shape[1]), int(old.get("head_dim", mod.head_dim))
    if head <= 0 or width % head:
        return {}
    sizes = {"embed_dim": int(mod.qkv.weight.shape[1]), "output_dim": width, "num_heads": width // head}
    for k, v in sizes.items():
        setattr(mod, k, v)
    return sizes


LEAVES_BY_NAME[f"{_MVIT}.PositionalEncoding"] = _positional_encoding
LEAVES_BY_NAME[f"{_MVIT}.MultiscaleAttention"] = _attention
UPDATERS_BY_NAME[f"{_MVIT}.MultiscaleAttention"] = _multiscale_attention
