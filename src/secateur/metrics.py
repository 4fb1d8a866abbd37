"""Model size metrics: parameters and multiply-accumulates.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (ATen-level, like fvcore: convolutions, matmuls,
attention; element-wise ops, norms and pooling count 0), halved (one MAC = two FLOPs). It runs on meta tensors,
so counting a large model allocates nothing."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# attention kernels FlopCounterMode does not know (the CPU flash path): q k^T and attn v, like its GPU formulas
_EXTRA = {op: _sdpa_flops for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,)}


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, example_inputs: Any) -> FlopCounterMode:
    """Count one forward. nn.MultiheadAttention / TransformerEncoderLayer's inference fast path is one fused
    kernel FlopCounterMode does not see (ViT-B/16 read 11.3 G MACs instead of 16.8 G), so it is switched off
    while counting; the slow path computes the same thing with ops that are counted."""
    from secateur.graph.capture import call
    counter = mac_counter()
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            call(model, example_inputs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)
    return counter


def mac_counter() -> FlopCounterMode:
    """The counter ``count_macs`` runs a forward under (also entered by the capture, which counts while it runs:
    ``capture(..., macs=True)``); MACs are ``get_total_flops() // 2``."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs``."""
    return _run(model, example_inputs).get_total_flops() // 2


def macs_by_layer(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs per module (qualified name, "" for the whole model; parents include their children)."""
    counts = _run(model, example_inputs).get_flop_counts()
    out = {}
    for name, ops in counts.items():
        key = "" if name == "Global" else name.split(".", 1)[1] if "." in name else ""
        out[key] = sum(ops.values()) // 2
    return out
