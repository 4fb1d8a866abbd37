"""2:4 masked Linear layers -> PyTorch semi-structured sparse weights (cuSPARSELt / CUTLASS) where it pays.

Why measure: the sparse kernel is faster than dense only for some shapes and token counts, and through
the plain ``F.linear`` path each call re-plans on the host (about 0.6 ms on an H100 with torch 2.11), so
in eager mode it is almost always slower end to end. Replayed from a CUDA graph (``torch.compile(mode=
"reduce-overhead")`` or `graphed`) the host work disappears and only the kernels count. So a layer is
converted only when a timing of its own shape, in the execution mode the caller will use (``mode``),
says sparse beats dense; every other layer stays masked dense, and the reason is returned per layer.

Why a layer class: the sparse matmul returns its result transposed (a non-contiguous ``[tokens, out]``
view). Attention code that reshapes q/k/v into heads then hands scaled-dot-product attention tensors
whose last dim is not contiguous, and SDPA falls back from its flash kernel to the quadratic math path:
we measured a whole LLaMA-7B block 8x slower at 8192 tokens. `SemiStructuredLinear` asks cuSPARSELt for the
result in row-major order directly (no copy), or copies it to a contiguous tensor on the CUTLASS path.

On CPU and on GPUs below compute capability 8.0, nothing is converted and the reason says why."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import fail
from secateur.masks import get_mask, remove_mask

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Decision:
    """What ``to_semi_structured`` did with one Linear layer."""

    name: str
    converted: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None


def device_support(device: torch.device) -> str | None:
    """None when ``device`` can run semi-structured sparse matmuls, else the reason it cannot."""
    if device.type != "cuda":
        return f"{device.type.upper()} tensors: PyTorch's semi-structured (2:4) kernels run on CUDA GPUs only"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (2:4 sparse tensor cores need Ampere or newer)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def is_2_4(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row holds at most 2 non-zeros."""
    if not isinstance(weight, torch.Tensor):
        raise fail("is_2_4 takes a weight tensor", where="is_2_4", value=type(weight).__name__)
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _layer_reason(module: nn.Linear) -> str | None:
    w = module.weight
    if get_mask(module, "weight") is None and not is_2_4(w.detach()):
        return "not 2:4 sparse (no mask and the weight is not 2:4)"
    if not is_2_4(w.detach()):
        return "weight is not 2:4 (at most 2 non-zeros in every 4 inputs)"
    why = device_support(w.device)
    if why:
        return why
    if w.dtype not in SPARSE_DTYPES:
        return f"dtype {w.dtype}: semi-structured sparse matmul needs float16 or bfloat16"
    return None


def _cusparselt() -> bool:
    """True when torch exposes cuSPARSELt's direct ops (compress, matmul with a transposed result)."""
    available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)
    return bool(available()) and hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")


class SemiStructuredLinear(nn.Module):
    """A 2:4 sparse Linear for inference, built by `to_semi_structured`.

    With cuSPARSELt (Hopper, and Ampere builds that have it) and bfloat16 it holds the compressed weight and calls the
    kernel directly, asking for the result already in ``[tokens, out]`` row-major order
    (``transpose_result``) with the algorithm cuSPARSELt's search picked for this shape: on an H100 that
    was 1.1-1.4x faster than dense per layer under CUDA graphs, where going through ``F.linear`` on the tensor
    subclass plus the copy to a contiguous result was not faster at all. Otherwise (float16, or a build with
    only CUTLASS) it holds
    PyTorch's semi-structured tensor and returns ``F.linear(...).contiguous()`` (see the module docstring for
    why contiguous). There is no dense ``weight`` attribute in the cuSPARSELt form: the zeros are not stored."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, *,
                 packed: torch.Tensor | None = None, sparse_weight: torch.Tensor | None = None, alg_id: int = 0):
        super().__init__()
        if (packed is None) == (sparse_weight is None):
            raise fail("SemiStructuredLinear needs exactly one of packed= and sparse_weight=")
        self.in_features, self.out_features, self.alg_id = in_features, out_features, int(alg_id)
        self.register_buffer("packed", packed)
        self.weight = None if sparse_weight is None else nn.Parameter(sparse_weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear, tokens: int = 2048, alg_id: int | None = None) -> "SemiStructuredLinear":
        """From a 2:4 (masked or plain) CUDA Linear; ``tokens`` rows are what cuSPARSELt's algorithm search
        is run with (pass ``alg_id`` to skip the search)."""
        dense = module.weight.detach().contiguous()
        if not _cusparselt() or dense.dtype != torch.bfloat16:  # fp16: see _search
            return cls(module.in_features, module.out_features, module.bias,
                       sparse_weight=torch.sparse.to_sparse_semi_structured(dense))
        packed = torch._cslt_compress(dense)
        if alg_id is None:
            x = torch.randn(tokens, module.in_features, device=dense.device, dtype=dense.dtype)
            alg_id = _search(packed, x)
        return cls(module.in_features, module.out_features, module.bias, packed=packed, alg_id=alg_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if self.packed is None:  # the subclass supports few ops: give it a plain contiguous 2-D input
            return F.linear(rows, self.weight, self.bias).contiguous().view(*x.shape[:-1], self.out_features)
        y = torch._cslt_sparse_mm(self.packed, rows.t(), transpose_result=True, alg_id=self.alg_id)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = f"cuSPARSELt alg {self.alg_id}" if self.packed is not None else "semi-structured tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"


def _search(packed: torch.Tensor, x: torch.Tensor) -> int:
    """cuSPARSELt's fastest algorithm id for this weight and token count (0, its default, if the search is
    not there or fails). Only used for bfloat16: on an H100 with torch 2.11 the search with a transposed
    result killed the process with an illegal instruction for float16 (every shape we tried), while
    bfloat16 was exact; float16 layers take the tensor-subclass path instead."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the search is marked deprecated in recent torch, still the only way
            return int(torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True))
    except (AttributeError, RuntimeError, TypeError) as e:
        log.info("cuSPARSELt algorithm search unavailable (%s); using its default", e)
        return 0


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Capture ``fn`` (a call closed over static CUDA inputs) in a CUDA graph and return its replay: the
    kernels run without the host work (planning, Python dispatch) that makes eager 2:4 calls slow."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture: lazy initialisation must not be recorded
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


MODES = ("eager", "cuda_graph")


def time_cuda_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def to_semi_structured(model: nn.Module, *, tokens: int = 2048, measure: bool = True, min_speedup: float = 1.0,
                       repeat: int = 20, mode: str = "eager",
                       filter: Callable[[str, nn.Module], bool] | None = None) -> list[Decision]:
    """Convert 2:4 Linear weights of ``model`` to semi-structured sparse tensors in place, where it pays.

    A layer qualifies when its (masked) weight is 2:4 along the input dimension, lives on a CUDA GPU of
    compute capability >= 8.0 and is float16/bfloat16. With ``measure`` (default), ``F.linear`` on
    ``tokens`` input rows is timed once per (shape, dtype), dense vs sparse, called the way the model will
    be run (``mode``: ``"eager"``, or ``"cuda_graph"`` for models replayed from CUDA graphs, e.g. under
    ``torch.compile(mode="reduce-overhead")``), and the layer is converted only when sparse is at least
    ``min_speedup`` times faster. A converted layer's mask is baked in first (the sparse tensor holds the
    zeros) and the layer is replaced by a `SemiStructuredLinear`. Returns one `Decision` per Linear
    layer, with the reason for each layer left dense; on CPU every layer stays masked dense and says so."""
    if not isinstance(model, nn.Module):
        raise fail("to_semi_structured() needs an nn.Module", value=type(model).__name__)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise fail("tokens must be a positive integer", value=tokens)
    if not min_speedup > 0:
        raise fail("min_speedup must be positive", value=min_speedup)
    if mode not in MODES:
        raise fail(f"mode must be one of {MODES}", value=mode)
    timer = (lambda fn: time_cuda_ms(fn, repeat)) if mode == "eager" else \
        (lambda fn: time_cuda_ms(graphed(fn), repeat))
    decisions: list[Decision] = []
    plan: list[tuple[nn.Linear, SemiStructuredLinear]] = []
    timed: dict[tuple, tuple[float, float]] = {}
    algs: dict[tuple, int] = {}
    parents = {id(child): (parent, key) for parent in model.modules() for key, child in parent.named_children()}
    for name, module in model.named_modules():
        if isinstance(module, SemiStructuredLinear):
            decisions.append(Decision(name, True, "already semi-structured"))
            continue
        if not isinstance(module, nn.Linear) or (filter is not None and not filter(name, module)):
            continue
        reason = _layer_reason(module)
        if reason is not None:
            decisions.append(Decision(name, False, reason))
            continue
        key = (tuple(module.weight.shape), module.weight.dtype, module.bias is not None)
        try:
            new = SemiStructuredLinear.from_linear(module, tokens, alg_id=algs.get(key))
        except (RuntimeError, NotImplementedError, ValueError) as e:
            decisions.append(Decision(name, False, f"conversion refused: {e}"))
            continue
        algs[key] = new.alg_id
        if id(module) not in parents:
            decisions.append(Decision(name, False, "the model itself is this Linear: wrap it in a module first"))
            continue
        if not measure:
            decisions.append(Decision(name, True, "converted (not measured)"))
            plan.append((module, new))
            continue
        if key not in timed:
            with torch.no_grad():
                x = torch.randn(tokens, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
                dense, b = module.weight.detach(), module.bias
                try:
                    timed[key] = (timer(lambda: F.linear(x, dense, b)), timer(lambda: new(x)))
                except (RuntimeError, NotImplementedError) as e:
                    timed[key] = (float("nan"), float("nan"))
                    log.warning("sparse matmul failed for %s: %s", key, e)
        d_ms, s_ms = timed[key]
        if not s_ms == s_ms:  # NaN: the sparse matmul failed
            decisions.append(Decision(name, False, "sparse matmul failed for this shape"))
        elif s_ms * min_speedup <= d_ms:
            decisions.append(Decision(name, True, f"sparse {d_ms / s_ms:.2f}x faster at {tokens} tokens ({mode})",
                                      d_ms, s_ms))
            plan.append((module, new))
        else:
            decisions.append(Decision(name, False, f"kept dense: sparse {d_ms / s_ms:.2f}x dense speed at "
                                      f"{tokens} tokens ({mode})", d_ms, s_ms))
    for module, new in plan:  # everything decided: now change the model
        remove_mask(module, "weight", bake=True)
        setattr(*parents[id(module)], new)
    for d in decisions:
        if not d.converted:
            log.info("%s stays dense: %s", d.name, d.reason)
    return decisions
