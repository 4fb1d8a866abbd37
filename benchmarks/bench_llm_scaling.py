"""How the time of one-shot Wanda and SparseGPT grows with model size (randomly initialised LLaMA-style
models, this CPU). Calibration is small (default 8 x 128 random tokens): the timings are of the pruning
machinery, not of model quality; SparseGPT then warns that its Hessian is rank-deficient, as expected.

    .venv/bin/python benchmarks/bench_llm_scaling.py [--sizes 20m 60m 200m 1b] [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
import warnings

import torch

from secateur.llm import prune_llm
from secateur.masks import iter_masks, remove_mask

# name: (hidden, intermediate, layers, heads, kv heads) -- the largest is TinyLlama-1.1B's shape
SIZES = {
    "20m": (256, 688, 4, 4, 4),
    "60m": (512, 1376, 8, 8, 8),
    "200m": (1024, 2816, 12, 16, 16),
    "1b": (2048, 5632, 22, 32, 4),
}
VOCAB = 32000
OUT = os.path.join(os.path.dirname(__file__), "results", "bench_llm_scaling.json")


def build(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def unmask(model) -> None:
    for _, module, param, _ in list(iter_masks(model)):
        remove_mask(module, param, bake=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, VOCAB, (1, args.seq_len), generator=gen) for _ in range(args.samples)]
    old = json.load(open(args.out)) if os.path.exists(args.out) else {}
    rows = {r["size"]: r for r in old.get("results", [])}
    print(f"{'size':<6} {'params':>8} {'block params':>12} {'wanda s':>8} {'sparsegpt s':>11} (threads={args.threads}, "
          f"{args.samples}x{args.seq_len} tokens)")
    for size in args.sizes:
        model = build(size)
        params = sum(p.numel() for p in model.parameters())
        block_params = sum(p.numel() for p in model.model.layers.parameters())
        row = dict(size=size, shape=SIZES[size], params=params, block_params=block_params)
        for method in ("wanda", "sparsegpt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                rep = prune_llm(model, calib, method=method, sparsity=0.5, rollback=False)
                row[method + "_s"] = time.perf_counter() - t0
            row[method + "_sparsity"] = rep.total_sparsity
            unmask(model)
        rows[size] = row
        print(f"{size:<6} {params / 1e6:>7.0f}M {block_params / 1e6:>11.0f}M {row['wanda_s']:>8.1f} "
              f"{row['sparsegpt_s']:>11.1f}", flush=True)
        del model
        gc.collect()
    ordered = [rows[s] for s in SIZES if s in rows]
    growth = {}
    if len(ordered) >= 2:
        a, b = ordered[0], ordered[-1]
        for method in ("wanda", "sparsegpt"):
            slope = math.log(b[method + "_s"] / a[method + "_s"]) / math.log(b["block_params"] / a["block_params"])
            growth[method] = slope
            print(f"{method}: time ~ (block params)^{slope:.2f} from {a['size']} to {b['size']}")
    result = dict(torch=torch.__version__, machine=platform.machine(), cpu_threads=args.threads,
                  calibration=f"{args.samples} x {args.seq_len} random tokens", results=ordered,
                  time_exponent_vs_block_params=growth)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
