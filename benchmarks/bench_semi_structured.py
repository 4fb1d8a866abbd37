"""Is 2:4 really faster? Dense vs semi-structured sparse Linear layers and a whole LLaMA-7B-shaped block.

Per layer (the LLaMA-7B shapes 4096x4096, 11008x4096, 4096x11008) and per decoder block, at several token
counts, three ways of calling: plain eager ``F.linear`` (re-plans every call), ``torch.compile`` and a
captured CUDA graph (kernel launches replayed, no host work). Correctness: the sparse result against the
masked dense result. Needs a CUDA GPU with compute capability >= 8.0; elsewhere it says it is skipped and
why, and measures nothing.

    .venv/bin/python benchmarks/bench_semi_structured.py [--tokens 256 1024 2048 4096 8192] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
from typing import Callable

import torch
import torch.nn.functional as F

from secateur import prune
from secateur.masks import finalize
from secateur.semi_structured import SemiStructuredLinear, device_support, graphed, time_cuda_ms, to_semi_structured
from _results import write_results  # noqa: E402

LAYERS = {"attn 4096x4096": (4096, 4096), "mlp up 11008x4096": (11008, 4096), "mlp down 4096x11008": (4096, 11008)}
OUT = os.path.join(os.path.dirname(__file__), "results", "bench_semi_structured.json")


def time_ms(fn: Callable[[], object], repeat: int = 50) -> float:
    return time_cuda_ms(fn, repeat, warmup=5)


def variants(make: Callable[[], Callable[[], torch.Tensor]]) -> dict[str, Callable[[], object]]:
    """eager / compiled / CUDA-graph versions of a call; a variant that fails is reported, not fatal."""
    out: dict[str, Callable[[], object] | str] = {}
    for name, build in (("eager", lambda: make()),
                        ("compile", lambda: _compiled(make)),
                        ("cudagraph", lambda: graphed(make()))):
        try:
            out[name] = build()
        except Exception as e:  # noqa: BLE001 - recorded in the results
            out[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


def _compiled(make):
    fn = torch.compile(make(), dynamic=False)
    fn()
    return fn


def _measure(dense_v, sparse_v) -> dict:
    row = {}
    for v in ("eager", "compile", "cudagraph"):
        d, s = dense_v[v], sparse_v[v]
        if isinstance(d, str) or isinstance(s, str):
            row[v] = {"error": d if isinstance(d, str) else s}
            continue
        try:
            dm, sm = time_ms(d), time_ms(s)
            row[v] = {"dense_ms": dm, "sparse_ms": sm, "speedup": dm / sm}
        except Exception as e:  # noqa: BLE001
            row[v] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return row


def bench_layers(tokens: list[int], dtype) -> list[dict]:
    """Dense ``F.linear`` vs secateur's `SemiStructuredLinear` (cuSPARSELt called directly, result in
    row-major order, algorithm searched for each token count) vs ``F.linear`` on PyTorch's semi-structured
    tensor subclass (CUDA graph only: its result is transposed)."""
    rows = []
    for label, (out_f, in_f) in LAYERS.items():
        lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=dtype)
        prune(lin, pattern="2:4")
        finalize(lin)
        w = lin.weight.detach().contiguous()
        ws = torch.sparse.to_sparse_semi_structured(w)
        for t in tokens:
            layer = SemiStructuredLinear.from_linear(lin, tokens=t)
            x = torch.randn(t, in_f, device="cuda", dtype=dtype)
            with torch.no_grad():
                ref = F.linear(x, w)
                got = layer(x)
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                row = dict(layer=label, tokens=t, max_rel_err=err, contiguous=got.is_contiguous(),
                           alg_id=layer.alg_id, **_measure(variants(lambda: lambda: F.linear(x, w)),
                                                            variants(lambda: lambda: layer(x))))
                sub = time_ms(graphed(lambda: F.linear(x, ws)))
                row["torch_subclass_cudagraph_speedup"] = row["cudagraph"].get("dense_ms", float("nan")) / sub
            rows.append(row)
            print(_fmt(row) + f"  (torch subclass, graph: {row['torch_subclass_cudagraph_speedup']:.2f}x)",
                  flush=True)
    return rows


def bench_block(tokens: list[int], dtype) -> list[dict]:
    """A LLaMA-7B decoder block: masked dense vs every Linear converted vs only the Linears that
    `to_semi_structured(mode="cuda_graph")` measured faster at that token count."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=1, max_position_embeddings=max(tokens))
    cfg._attn_implementation = "sdpa"
    masked = LlamaDecoderLayer(cfg, layer_idx=0).to("cuda", dtype).eval()
    prune(masked, pattern="2:4", targets="linear")
    every = copy.deepcopy(masked)
    finalize(masked)  # the masked dense twin (same zeros, dense kernels)
    decisions = to_semi_structured(every, measure=False)
    rope = LlamaRotaryEmbedding(cfg).to("cuda")
    rows = []
    for t in tokens:
        chosen = copy.deepcopy(masked)  # its weights are 2:4 already: to_semi_structured takes them unmasked
        picked = to_semi_structured(chosen, tokens=t, mode="cuda_graph")
        h = torch.randn(1, t, 4096, device="cuda", dtype=dtype)
        pos = rope(h, torch.arange(t, device="cuda")[None])
        with torch.no_grad():
            call = lambda blk: (lambda: blk(h, attention_mask=None, position_embeddings=pos))  # noqa: E731
            first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
            ref = first(call(masked)())
            dense_v = variants(lambda: call(masked))
            for label, blk, dec in (("all Linears 2:4", every, decisions), ("2:4 where faster", chosen, picked)):
                got = first(call(blk)())
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                row = dict(layer=f"LLaMA-7B block, {label}", tokens=t, max_rel_err=err,
                           converted=sum(d.converted for d in dec), linears=len(dec),
                           **_measure(dense_v, variants(lambda: call(blk))))
                rows.append(row)
                print(_fmt(row), flush=True)
        del chosen
    return rows


def _fmt(row: dict) -> str:
    parts = [f"{row['layer']:<36} {row['tokens']:>6} tok  err {row['max_rel_err']:.1e}"]
    for v in ("eager", "compile", "cudagraph"):
        r = row[v]
        parts.append(f"{v}: " + (f"{r['dense_ms']:.3f}/{r['sparse_ms']:.3f} ms = {r['speedup']:.2f}x"
                                 if "speedup" in r else "error"))
    return "  ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--block-tokens", type=int, nargs="*", default=None,
                    help="token counts for the whole-block timing (default: --tokens)")
    ap.add_argument("--no-block", action="store_true")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    reason = device_support(dev)
    result = dict(torch=torch.__version__, machine=platform.machine(), dtype=args.dtype, tokens=args.tokens)
    if reason is not None:
        print(f"SKIPPED: {reason}. No GPU timings were taken; run this script on a CUDA GPU with compute "
              f"capability >= 8.0.")
        result.update(skipped=True, reason=reason)
    else:
        result["device"] = torch.cuda.get_device_name()
        print(f"{result['device']}, torch {torch.__version__}, {args.dtype}; times are dense/sparse medians")
        result["layers"] = bench_layers(args.tokens, dtype)
        if not args.no_block:
            result["block"] = bench_block(args.block_tokens or args.tokens, dtype)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
