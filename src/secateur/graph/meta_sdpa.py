"""``F.scaled_dot_product_attention`` on the meta device as the CPU runs it.

Why: PyTorch picks the attention kernel by device (a dispatch stub of ``aten::_fused_sdp_choice``): on the CPU the
flash kernel ``_scaled_dot_product_flash_attention_for_cpu``, one op that reads q, k and v with their heads (also
one key/value head for many query heads: multi-query, or grouped-query with ``enable_gqa``); on meta, which has no
stub, always the math decomposition (``repeat_interleave`` of the key/value heads, ``bmm``, softmax). The capture
labels the two differently: a one-KV-head attention (Falcon, GPT-BigCode, a LLaMA with one KV head) was one group
on the CPU and split into others on meta, with other notes, so a plan made on meta was not the CPU's. Here a meta
call takes the path the CPU would take: the CPU's own choice function is asked on CPU stand-ins of the same sizes,
strides and dtypes (``torch.empty_strided``: no values are written, so no memory is touched), and where it says
flash the CPU's op sequence is issued on meta (a boolean mask first becomes ``where(mask, 0, -inf)`` in q's dtype,
as the CPU does; then the flash kernel, which has a meta kernel). Anything else (dropout, a mask shape the kernel
does not take, a call off meta) runs as it would.

It serves the dry run on meta too (``verify.run``): its op sequence is then the CPU capture's, so the trace needs no
second, meta reference (``verify._meta_trace``: a forward of the unpruned model on meta and an alignment).
mobilenetv5_300m's one dry run (1.2 GB of weights: on meta in ``plan_channels``) took 2.5 s that way and 1.2 s with
the CPU's kernel (measured with the trace-driven version this replaces, which covered neither boolean masks nor
grouped-query attention)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch

aten = torch.ops.aten
_FLASH = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class CpuAttention(TorchFunctionMode):
    """See the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _bind(args, kwargs)
            if call is not None and cpu_flash(call):
                return _flash(call)
        return func(*args, **kwargs)


def _bind(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    if len(args) > len(_NAMES) or not set(kwargs) <= set(_NAMES):
        return None
    call = {**_DEFAULTS, **dict(zip(_NAMES, args)), **kwargs}
    if not all(isinstance(call.get(n), torch.Tensor) for n in _NAMES[:3]):
        return None
    return call


def cpu_flash(call: dict[str, Any]) -> bool:
    """Would the CPU run this call (meta tensors) with its flash kernel? Its own choice function, on stand-ins."""
    q, k, v, mask = call["query"], call["key"], call["value"], call["attn_mask"]
    if any(t.device.type != "meta" for t in (q, k, v)) or (mask is not None and not isinstance(mask, torch.Tensor)):
        return False
    try:
        with no_dispatch():  # the question is not the model's: no mode below sees it
            stand = [None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                     for t in (q, k, v, mask)]
            return torch._fused_sdp_choice(*stand, dropout_p=call["dropout_p"], is_causal=call["is_causal"],
                                           scale=call["scale"], enable_gqa=call["enable_gqa"]) == _FLASH
    except (RuntimeError, TypeError, ValueError):
        return False


def _flash(call: dict[str, Any]) -> torch.Tensor:
    q, mask = call["query"], call["attn_mask"]
    if mask is not None and mask.dtype == torch.bool:  # the CPU's convert_boolean_attn_mask
        neg = aten.scalar_tensor.default(float("-inf"), dtype=q.dtype, device=mask.device)
        zero = aten.scalar_tensor.default(0.0, dtype=q.dtype, layout=torch.strided, device=mask.device)
        mask = aten.where.self(mask, zero, neg)
    extra = {}
    if mask is not None:
        extra["attn_mask"] = mask
    if call["scale"] is not None:
        extra["scale"] = call["scale"]
    return aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, call["key"], call["value"], call["dropout_p"], call["is_causal"], **extra)[0]
