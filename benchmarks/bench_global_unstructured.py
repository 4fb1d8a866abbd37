"""Global magnitude pruning of a large stack of Linear layers: secateur vs torch.nn.utils.prune.

Each (method, size) runs in a fresh subprocess so that peak memory (ru_maxrss) belongs to that run alone.
Prints a table and writes benchmarks/results/global_unstructured.json.

    .venv/bin/python benchmarks/bench_global_unstructured.py --layers 8 24 --peer-layers 8
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "global_unstructured.json"


def child(method: str, layers: int, width: int, ratio: float, threads: int) -> dict:
    import torch
    from torch import nn
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    for p in model.parameters():
        p.requires_grad_(False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    t0 = time.perf_counter()
    if method == "secateur":
        import secateur
        secateur.prune(model, ratio, scope="global")
        masks = [secateur.get_mask(m) for m in model]
        pruned = sum(int((~m).sum()) for m in masks)
    else:
        import torch.nn.utils.prune as tprune
        tprune.global_unstructured([(m, "weight") for m in model], pruning_method=tprune.L1Unstructured,
                                   amount=ratio)
        pruned = sum(int((m.weight_mask == 0).sum()) for m in model)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = layers * width * width
    return dict(method=method, layers=layers, params=n, model_gib=n * 4 / 2**30, seconds=seconds,
                rss_before_gib=base, peak_gib=peak, overhead_gib=peak - base, sparsity=pruned / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 24], help="stack depths for secateur")
    ap.add_argument("--peer-layers", type=int, nargs="*", default=[8],
                    help="depths for torch.nn.utils.prune (24 layers needs ~22 GB and ~2 min)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.width, args.ratio, args.threads)))
        return
    jobs = [("secateur", n) for n in args.layers] + [("torch.nn.utils.prune", n) for n in args.peer_layers]
    jobs.sort(key=lambda j: (j[1], j[0] != "secateur"))
    rows = []
    for i, (method, n) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {method}, {n} x Linear({args.width}, {args.width}) ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--width", str(args.width),
                              "--ratio", str(args.ratio), "--threads", str(args.threads)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(dict(method=method, layers=n, error=out.stderr.strip().splitlines()[-1:]))
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = f"{'method':<22}{'layers':>7}{'params':>14}{'model GiB':>10}{'time s':>9}{'peak GiB':>10}{'overhead GiB':>13}{'sparsity':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<22}{r['layers']:>7}  failed: {r['error']}")
            continue
        print(f"{r['method']:<22}{r['layers']:>7}{r['params']:>14,}{r['model_gib']:>10.2f}{r['seconds']:>9.2f}"
              f"{r['peak_gib']:>10.2f}{r['overhead_gib']:>13.2f}{r['sparsity']:>9.4f}")
    ratios = []
    for n in sorted({r["layers"] for r in rows}):
        a = [r for r in rows if r["layers"] == n and r["method"] == "secateur" and "error" not in r]
        b = [r for r in rows if r["layers"] == n and r["method"] != "secateur" and "error" not in r]
        if a and b:
            ratios.append(dict(layers=n, speedup=b[0]["seconds"] / a[0]["seconds"],
                               overhead_ratio=b[0]["overhead_gib"] / max(a[0]["overhead_gib"], 1e-9)))
            print(f"{n} layers: secateur {ratios[-1]['speedup']:.1f}x faster, "
                  f"{ratios[-1]['overhead_ratio']:.1f}x less extra memory than torch.nn.utils.prune")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(machine=platform.machine(), processor=platform.processor(),
                                       threads=args.threads, ratio=args.ratio, rows=rows, ratios=ratios), indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
