"""How the time of one-shot Wanda and SparseGPT grows with model size (randomly initialised LLaMA-style
models, on this CPU or a GPU). Calibration is small (default 8 x 128 random tokens): the timings are of the
pruning machinery, not of model quality; SparseGPT then warns that its Hessian is rank-deficient, as expected.

    .venv/bin/python benchmarks/bench_llm_scaling.py [--sizes 20m 60m 200m 1b] [--threads 1]
    PYTHONPATH=src python benchmarks/bench_llm_scaling.py --device cuda --dtype bfloat16 [--offload | --disk DIR]

``--device cuda`` builds the model on the GPU (or, with ``--offload``, keeps it in CPU memory and lets
``prune_llm(device=...)`` move one block at a time to the GPU) and reports peak GPU memory; results go to
``results/bench_llm_scaling_<device>[_offload].json`` so CPU and GPU runs do not overwrite each other.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import time
import warnings

import torch

from secateur.llm import empty_model, prune_llm
from secateur.masks import iter_masks, remove_mask
from _results import write_results  # noqa: E402

# name: (hidden, intermediate, layers, heads, kv heads) -- the largest is TinyLlama-1.1B's shape
SIZES = {
    "20m": (256, 688, 4, 4, 4),
    "60m": (512, 1376, 8, 8, 8),
    "200m": (1024, 2816, 12, 16, 16),
    "1b": (2048, 5632, 22, 32, 4),
}
VOCAB = 32000
RESULTS = os.path.join(os.path.dirname(__file__), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(size: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Random weights, initialised directly on ``device`` (a 1B model initialises in seconds on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def default_out(device: str, offload: bool) -> str:
    if device == "cpu":
        return os.path.join(RESULTS, "bench_llm_scaling.json")
    return os.path.join(RESULTS, f"bench_llm_scaling_{device.split(':')[0]}{'_offload' if offload else ''}.json")


def save_checkpoint(model, folder: str, shard_bytes: int = 2**30) -> str:
    """The model's state dict as ~1 GiB safetensors shards (as Hugging Face writes them)."""
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    part, size, n = {}, 0, 0
    items = list(model.state_dict().items())
    for i, (k, v) in enumerate(items):
        part[k] = v.detach().contiguous()
        size += v.numel() * v.element_size()
        if size >= shard_bytes or i == len(items) - 1:
            save_file(part, os.path.join(folder, f"model-{n:05d}.safetensors"))
            part, size, n = {}, 0, n + 1
    return folder


def fresh_dir(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


def unmask(model) -> None:
    for _, module, param, _ in list(iter_masks(model)):
        remove_mask(module, param, bake=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the blocks are computed")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights' dtype")
    ap.add_argument("--offload", action="store_true",
                    help="keep the model in CPU memory; prune_llm moves one block at a time to --device")
    ap.add_argument("--disk", metavar="DIR", default=None,
                    help="prune from disk: save each model's checkpoint under DIR, then prune a meta skeleton "
                    "block by block from it (offload_dir=), writing to DIR/<size>-<method>; reports peak RSS")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.offload and not cuda:
        raise SystemExit("--offload needs --device cuda (the model is on the CPU already)")
    if args.disk and args.offload:
        raise SystemExit("--disk and --offload are two different placements; choose one")
    args.out = args.out or default_out(args.device, args.offload)
    if args.disk and args.out == default_out(args.device, False):
        args.out = args.out.replace(".json", "_disk.json")
    home = "cpu" if args.offload or not cuda else args.device
    dtype = DTYPES[args.dtype]
    if cuda:  # CUDA context and cuBLAS handles are created here, not inside the first timing
        torch.ones(64, 64, device=args.device) @ torch.ones(64, 64, device=args.device)
        sync(args.device)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, VOCAB, (1, args.seq_len), generator=gen) for _ in range(args.samples)]
    old = json.load(open(args.out)) if os.path.exists(args.out) else {}
    rows = {r["size"]: r for r in old.get("results", [])}
    heads = "".join(f" {m + ' s':>11}" for m in args.methods)
    where = args.device + (" offload" if args.offload else "") + (" disk" if args.disk else "")
    print(f"{'size':<6} {'params':>8} {'block params':>12}{heads} (device={where}, "
          f"{args.dtype}, threads={args.threads}, {args.samples}x{args.seq_len} tokens)")
    for size in args.sizes:
        model = build(size, "cpu" if args.disk else home, dtype)
        params = sum(p.numel() for p in model.parameters())
        block_params = sum(p.numel() for p in model.model.layers.parameters())
        row = dict(size=size, shape=SIZES[size], params=params, block_params=block_params)
        if args.disk:
            ckpt = save_checkpoint(model, os.path.join(args.disk, size))
            del model
            gc.collect()
            model = empty_model(lambda: build(size, "cpu", dtype))
        for method in args.methods:
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sync(args.device)
                t0 = time.perf_counter()
                disk = dict(offload_dir=ckpt, save_dir=fresh_dir(os.path.join(args.disk, f"{size}-{method}"))) \
                    if args.disk else {}
                rep = prune_llm(model, calib, method=method, sparsity=0.5, rollback=False, progress=False,
                                device=args.device if cuda else None, **disk)
                sync(args.device)
                row[method + "_s"] = time.perf_counter() - t0
            row[method + "_sparsity"] = rep.total_sparsity
            if cuda:
                row[method + "_peak_gpu_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
            if args.disk:
                row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
            unmask(model)
        rows[size] = row
        cells = "".join(f" {row[m + '_s']:>11.2f}" for m in args.methods)
        print(f"{size:<6} {params / 1e6:>7.0f}M {block_params / 1e6:>11.0f}M{cells}", flush=True)
        del model
        gc.collect()
    ordered = [rows[s] for s in SIZES if s in rows]
    growth = {}
    if len(ordered) >= 2:
        a, b = ordered[0], ordered[-1]
        for method in args.methods:
            if method + "_s" not in a or method + "_s" not in b:
                continue
            slope = math.log(b[method + "_s"] / a[method + "_s"]) / math.log(b["block_params"] / a["block_params"])
            growth[method] = slope
            print(f"{method}: time ~ (block params)^{slope:.2f} from {a['size']} to {b['size']}")
    gpu = torch.cuda.get_device_name(args.device) if cuda else None
    result = dict(torch=torch.__version__, machine=platform.machine(), cpu_threads=args.threads,
                  device=args.device, gpu=gpu, dtype=args.dtype, offload=args.offload, disk=bool(args.disk),
                  calibration=f"{args.samples} x {args.seq_len} random tokens", results=ordered,
                  time_exponent_vs_block_params=growth)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
