"""Model size metrics: parameters and multiply-accumulates.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (ATen-level, like fvcore: convolutions, matmuls,
attention; element-wise ops, norms and pooling count 0), halved (one MAC = two FLOPs). It runs on meta tensors,
so counting a large model allocates nothing."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from secateur.modes import keeps_statistics


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """``_grouped_mm`` (mixture-of-experts kernels, transformers' ``grouped_mm`` experts): a 2-d operand is split
    into groups by ``offs`` and each of its rows (or, 2-d by 2-d, each of its columns) meets one group only, so it
    costs what one matmul of the whole operand would: output elements times the contracted size."""
    if len(a) == 2 and len(b) == 2:  # contracted dim split: out [groups, M, N]
        return 2 * a[0] * a[1] * b[1]
    n = 1
    for s in out_shape:
        n *= s
    return 2 * n * a[-1]


def _fused_rnn_flops(x, weights, *args, out_shape=None, **kwargs) -> int:
    """cuDNN's / MIOpen's whole recurrent layer stack in one call: every matrix of every layer and direction (input,
    hidden, projection) meets every time step of every sequence once. ``x`` is [T, B, in], [B, T, in] or a
    packed [tokens, in]."""
    steps = 1
    for s in x[:-1]:
        steps *= s
    return 2 * steps * sum(w[0] * w[1] for w in weights if len(w) == 2)


def _mkldnn_rnn_flops(x, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused LSTM layer (oneDNN, one call per layer and direction): its input and hidden matmuls (what the
    op's decomposition on meta counts)."""
    return _fused_rnn_flops(x, [w_ih, w_hh])


# kernels FlopCounterMode does not know: attention on the CPU flash path (q k^T and attn v, like its GPU formulas),
# fused recurrent layers (nn.LSTM counted 0 MACs on the CPU and its full count on meta), grouped matmuls
_RNN_OPS = {"mkldnn_rnn_layer": _mkldnn_rnn_flops, "_cudnn_rnn": _fused_rnn_flops, "miopen_rnn": _fused_rnn_flops}
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
          **{getattr(torch.ops.aten, k): f for k, f in _RNN_OPS.items() if hasattr(torch.ops.aten, k)},
          **({torch.ops.aten._grouped_mm: _grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {})}


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@keeps_statistics
def _run(model: nn.Module, example_inputs: Any) -> FlopCounterMode:
    """Count one forward, in the model's own mode (no running statistic changes: `secateur.modes`).
    nn.MultiheadAttention / TransformerEncoderLayer's inference fast path is one fused kernel FlopCounterMode does
    not see (ViT-B/16 read 11.3 G MACs instead of 16.8 G), so it is switched off while counting; the slow path
    computes the same thing with ops that are counted."""
    from secateur.graph.capture import call
    counter = mac_counter()
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), counter:
                call(model, example_inputs)
        except AssertionError as e:  # FlopCounterMode's module tracker hooks the grad of a module input that is a
            if "gradient function" not in str(e):  # parameter (PiT, CaiT pass cls tokens so): with grad mode off
                raise  # that leaf has no grad accumulator to hook. Count again with grad mode on
            counter = mac_counter()
            with torch.enable_grad(), counter:
                call(model, example_inputs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)
    return counter


def mac_counter() -> FlopCounterMode:
    """The counter ``count_macs`` runs a forward under (also entered by the capture, which counts while it runs:
    ``capture(..., macs=True)``); MACs are ``get_total_flops() // 2``."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)


class MacTally:
    """What ``count_macs`` counts, tallied by a dispatch mode that already sees every op (the capture's, the dry
    run's), without a ``FlopCounterMode`` of its own: that mode's module tracker and pytree work cost more than the
    capture's own per-op work (regnet_x_400mf: 0.12 s of a 0.28 s capture). It uses FlopCounterMode's own formulas
    (``flop_registry`` plus ``_EXTRA``). FlopCounterMode first decomposes an op that has a CompositeImplicitAutograd
    kernel (``native_batch_norm`` on the CPU) and counts the pieces; the first time such an op arrives here its
    decomposition runs once on meta under a FlopCounterMode: where it counts nothing (norms, element-wise ops),
    the op counts nothing here either; where it counts something (or the op is a higher-order op), the tally gives
    up: ``total`` is None and the caller counts with ``count_macs``."""

    _registry: dict | None = None
    _decomposes: dict = {}  # op -> None (no decomposition), 0 (its decomposition counts nothing), 1 (counts)
    _ops: dict = {}  # id(op) -> (op, what to do): ops hash in Python, ids do not (ops are long-lived singletons)

    def __init__(self) -> None:
        if MacTally._registry is None:  # (formula, takes shapes): shape_wrapper's tree_map was half the tally's time
            MacTally._registry = {k: (getattr(f, "__wrapped__", f), hasattr(f, "__wrapped__"))
                                  for k, f in mac_counter().flop_registry.items()}
        self.flops: int | None = 0

    def add(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.flops is None:
            return
        known = self._ops.get(id(func))
        if known is None:
            dec = self._decomposes.get(func, -1)
            if dec == -1:
                dec = self._decomposes[func] = _decomposition_counts(func, args, kwargs)
            # "give up" (decomposes into counted ops), "skip" (counts nothing), or (formula, takes shapes)
            what = ("give up" if dec else "skip") if dec is not None else self._registry.get(func.overloadpacket,
                                                                                             "skip")
            known = self._ops[id(func)] = (func, what)
        what = known[1]
        if what == "give up":
            self.flops = None
        elif what != "skip":
            fn, shapes = what
            if shapes:  # what torch.utils.flop_counter.shape_wrapper hands its formulas
                self.flops += fn(*_shapes(args), out_shape=_shapes(out), **_shapes(kwargs))
            else:
                self.flops += fn(*args, **kwargs, out_val=out)

    @property
    def total(self) -> int | None:
        """MACs (``count_macs``'s figure) or None where the tally gave up."""
        return None if self.flops is None else self.flops // 2


def _shapes(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.shape
    if type(x) in (list, tuple) and all(type(v) is int for v in x):  # strides, paddings: nothing to map
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_shapes(v) for v in x) if not hasattr(x, "_fields") else type(x)(*(_shapes(v) for v in x))
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return x


def _decomposition_counts(func: Any, args: tuple, kwargs: dict) -> int | None:
    """None: ``func`` has no CompositeImplicitAutograd decomposition (FlopCounterMode counts it whole); 0: its
    decomposition, run on meta copies of these arguments, counts no FLOPs; 1: it counts some, or cannot be run."""
    if isinstance(func, torch._ops.HigherOrderOperator):
        return 1
    dk = torch._C.DispatchKey.CompositeImplicitAutograd
    if dk not in func.py_kernels and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), dk):
        return None
    from torch.utils._pytree import tree_map

    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    try:
        with mac_counter() as fc:
            func.decompose(*tree_map(meta, args), **tree_map(meta, kwargs))
        return 1 if fc.get_total_flops() else 0
    except Exception:  # noqa: BLE001 - cannot tell: give up counting (count_macs runs instead)
        return 1


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
