"""Time ``prune_channels(target_macs=...)`` on torchvision models (random weights, 1x3x224x224).

Reports wall time, the MACs fraction reached and the number of plans applied. Run it with the library you want
to time on PYTHONPATH (e.g. an older checkout for a before/after comparison):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_target_macs.py --models resnet18 mobilenet_v2 --target 0.5
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision
    from secateur.structured import prune_channels
    rows = []
    for name in args.models:
        for rep in range(args.repeats):
            torch.manual_seed(rep)
            model = torchvision.models.get_model(name).eval()
            x = torch.randn(1, 3, 224, 224)
            t0 = time.perf_counter()
            res = prune_channels(model, x, target_macs=args.target)
            dt = time.perf_counter() - t0
            row = {"model": name, "repeat": rep, "seconds": round(dt, 2), "macs_fraction":
                   round(res.macs_after / res.macs_before, 4), "plans": len(res.plans),
                   "channels_pruned": res.channels_pruned}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.machine(), "threads": args.threads, "target": args.target,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
