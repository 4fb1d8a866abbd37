"""Saving a pruned model: secateur.save/load vs torch.save/torch.load of the state_dict (pickle).

A torchvision ResNet-50 (random weights) pruned globally to 90 % with masks, then (a) saved masked and
(b) finalized. For each: file size, save and load wall time, and whether the reloaded model's outputs
are bit-identical. secateur stores each mask as 1 bit per weight; the masked state_dict that torch.save
pickles holds each mask as a bool tensor (1 byte per weight). Prints a table and writes
benchmarks/results/bench_io.json.

    .venv/bin/python benchmarks/bench_io.py [--model resnet50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "bench_io.json"


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    import secateur

    def build():
        torch.manual_seed(0)
        return torchvision.models.get_model(args.model, weights=None).eval()

    x = torch.randn(1, 3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for state in ("masked", "finalized"):
            model = build()
            secateur.prune(model, args.ratio, scope="global")
            if state == "finalized":
                secateur.finalize(model)
            with torch.no_grad():
                ref = model(x)
            st_path, pt_path = os.path.join(tmp, "m.safetensors"), os.path.join(tmp, "m.pt")
            t_save, _ = best_of(lambda: secateur.save(model, st_path), args.repeats)
            t_load, back = best_of(lambda: secateur.load(build(), st_path), args.repeats)
            t_build, _ = best_of(build, args.repeats)  # load includes building the fresh model: report apart
            with torch.no_grad():
                exact = torch.equal(back(x), ref)
            t_tsave, _ = best_of(lambda: torch.save(model.state_dict(), pt_path), args.repeats)

            def tload():
                fresh = build()
                if state == "masked":  # the masked state_dict needs the parametrizations present first
                    secateur.apply_masks(fresh, {k: torch.ones_like(v) for k, v in secateur.masks_of(model).items()})
                fresh.load_state_dict(torch.load(pt_path, weights_only=True))
                return fresh
            t_tload, tback = best_of(tload, args.repeats)
            with torch.no_grad():
                texact = torch.equal(tback(x), ref)
            rows.append({"state": state, "method": "secateur.save/load", "bytes": os.path.getsize(st_path),
                         "save_s": t_save, "load_s": t_load, "build_s": t_build, "exact": exact})
            rows.append({"state": state, "method": "torch.save/load (state_dict)", "bytes": os.path.getsize(pt_path),
                         "save_s": t_tsave, "load_s": t_tload, "build_s": t_build, "exact": texact})
    print(f"{args.model}, global magnitude {args.ratio:.0%}, best of {args.repeats}, {args.threads} thread(s); "
          "load times include building the fresh model")
    print(f"{'state':10}{'method':32}{'MiB':>9}{'save s':>9}{'load s':>9}{'build s':>9}{'exact':>7}")
    for r in rows:
        print(f"{r['state']:10}{r['method']:32}{r['bytes'] / 2**20:>9.1f}{r['save_s']:>9.3f}{r['load_s']:>9.3f}"
              f"{r['build_s']:>9.3f}{str(r['exact']):>7}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "ratio": args.ratio, "repeats": args.repeats,
                                   "threads": args.threads, "torch": torch.__version__,
                                   "machine": platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
