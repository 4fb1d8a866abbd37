"""How close ``prune_channels(target_macs=t, round_to=8)`` lands to the MACs target, against Torch-Pruning.

Why: with ``round_to``, channel counts move in steps, and one uniform ratio can jump far past a target when many
groups step at the same ratio (regnet_x_400mf: 0.544 of the MACs at ratio 0.49, 0.257 at 0.50). A model pruned
past its target pays accuracy for nothing. Each model and target runs three ways in one process:

- ``one ratio``: secateur's bisection on one uniform ratio alone (``structured.targets._top_up`` switched off);
- ``secateur``: the shipped ``prune_channels`` (groups that stepped go back while the target holds);
- ``tp``: Torch-Pruning 1.6.1 (L1, round_to=8, iterative steps until the MACs target is met: the first step at
  or under it, as ``bench_speedup.py`` does).

Reported: the MACs fraction each keeps (lower than the target = pruned past it; "-" where Torch-Pruning failed or
did not reach the target in its steps) and secateur's plan seconds. Random
weights (the counts do not depend on them), 1x3x224x224, one thread.

    .venv/bin/python benchmarks/bench_target_precision.py --out benchmarks/results/target_precision.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf",
          "regnet_y_400mf", "densenet121", "convnext_tiny", "shufflenet_v2_x1_0", "mnasnet1_0", "vgg11_bn"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25], help="MACs fractions to keep")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torchvision
    import secateur.structured.targets as targets
    from secateur.metrics import count_macs
    from secateur.structured import prune_channels
    import bench_speedup

    tp_args = bench_speedup.parse(["--models", "none"])
    shipped = targets._top_up
    rows, t_all = [], time.perf_counter()
    for name in args.models:
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        macs0 = count_macs(dense, x)
        tp, tp_error = {}, None
        if not args.no_peer:
            try:
                tp = bench_speedup.prune_tp(dense, x, sorted(1 / t for t in args.targets), tp_args)
            except Exception as e:  # noqa: BLE001 - the peer's failure is a result, not the end of the run
                tp_error = f"{type(e).__name__}: {e}"
        for t in args.targets:
            row = {"model": name, "target": t}
            for label, top_up in (("one_ratio", lambda *a, **k: {}), ("secateur", shipped)):
                targets._top_up = top_up
                try:
                    m = copy.deepcopy(dense)
                    t0 = time.perf_counter()
                    prune_channels(m, x, target_macs=t, round_to=8)
                    row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
                    row[label] = round(count_macs(m, x) / macs0, 4)
                finally:
                    targets._top_up = shipped
            pruned = tp.get(1 / t)
            row["tp"] = round(count_macs(pruned, x) / macs0, 4) if pruned is not None else None
            if tp_error:
                row["tp_error"] = tp_error
            rows.append(row)
            print(f"{name:20s} {t:5.2f}  one ratio {row['one_ratio']:.4f}  secateur {row['secateur']:.4f} "
                  f"({row['secateur_s']:.1f} s)  tp {row['tp'] if row['tp'] is not None else '-'}", flush=True)
    print(f"\n{'model':20s} target  one ratio  secateur   tp")
    for r in rows:
        print(f"{r['model']:20s} {r['target']:6.2f}  {r['one_ratio']:9.4f}  {r['secateur']:8.4f}  "
              f"{r['tp'] if r['tp'] is not None else '-'}")
    if args.out:
        import platform
        write_results(args.out, {"benchmark": "target_precision", "command": " ".join(sys.argv), "args": vars(args),
                                 "machine": {"cpu": platform.processor() or platform.machine(),
                                             "torch": torch.__version__, "torchvision": torchvision.__version__,
                                             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
                                 "seconds": round(time.perf_counter() - t_all, 1), "rows": rows})


if __name__ == "__main__":
    main()
