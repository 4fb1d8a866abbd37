"""Window attentions (torchvision Swin V1/V2, MaxViT) under ``prune_channels(ratio=0.5)``, 1x3x224x224, random
weights, 1 thread: dense MACs, MACs after, plan time (``plan_channels``, includes the dry run), oracle error
(pruned vs original with the removed channels zeroed at their consumers, norms over the kept channels), and the
plan's notes other than norm notes. Uses whatever ``secateur`` is first on the path (run it from two checkouts
with PYTHONPATH to compare). Plan times are wall clock on a shared 2-core machine: indicative only.

    PYTHONPATH=src python benchmarks/bench_windows.py [--models swin_t ...] [--heads head_dim] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

import secateur
from secateur.metrics import count_macs
from secateur.structured import plan_channels

MODELS = ["swin_t", "swin_v2_t", "maxvit_t", "swin_s", "swin_b", "swin_v2_s", "swin_v2_b"]


def measure(name: str, heads: str = "heads") -> dict:
    torch.manual_seed(0)
    m = torchvision.models.get_model(name).eval()
    with torch.no_grad():  # zero-initialised parameters would make the oracle error 0/0
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    x = torch.randn(1, 3, 224, 224)
    dense = count_macs(m, x)
    t = time.perf_counter()
    plan = plan_channels(m, x, ratio=0.5, heads=heads)
    plan_s = time.perf_counter() - t
    err = plan.apply_checked(m, x)
    after = count_macs(m, x)
    return dict(model=name, heads=heads, macs_dense=dense, macs_after=after, macs_fraction=round(after / dense, 4),
                plan_s=round(plan_s, 2), oracle_err=err,
                notes=[n for n in plan.notes if "normalises over pruned" not in n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--heads", default="heads", choices=["heads", "head_dim"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.heads))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(secateur=secateur.__file__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
