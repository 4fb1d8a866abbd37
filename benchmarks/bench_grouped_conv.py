"""Grouped convolutions, the two ways secateur prunes them, on the torchvision RegNets and ResNeXts.

Per model, at 50 % channels (l1, 224 px, local scope, like bench_structural_zoo.py): MACs and params after pruning
with ``grouped="groups"`` (whole conv groups, the behaviour before issue #3) and ``grouped="channels"`` (the same
local channels from every group), the oracle error of each (removal vs zeroing at the consumers) and Torch-Pruning's
MACs from ``results/structural_zoo.json`` (same settings, measured there). Counting only: no timing, so a shared
machine does not change the numbers.

    python benchmarks/bench_grouped_conv.py [--models regnet_x_400mf resnext50_32x4d] [--size 224]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
GIANTS = {"regnet_y_128gf"}  # 645M params: minutes to build on 2 cores


def _one(name: str, size: int, grouped: str) -> dict:
    import torchvision
    from secateur.metrics import count_macs, count_params
    from secateur.structured import plan_channels
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    macs0, params0 = count_macs(model, x), count_params(model)
    t0 = time.perf_counter()
    plan = plan_channels(model, x, ratio=0.5, grouped=grouped)
    plan_s = time.perf_counter() - t0
    err = plan.apply_checked(model, x)
    widths = sorted({m.in_channels // m.groups for m in model.modules()
                     if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels})
    return {"macs_before": macs0, "params_before": params0, "macs": count_macs(model, x),
            "params": count_params(model), "oracle_err": err, "plan_s": round(plan_s, 2),
            "group_widths_after": widths}


def main() -> None:
    import torchvision
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "grouped_conv.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.models or [n for n in torchvision.models.list_models(module=torchvision.models)
                            if (n.startswith("regnet") or n.startswith("resnext")) and n not in GIANTS]
    with open(os.path.join(ROOT, "results", "structural_zoo.json")) as f:
        tp = {r["model"]: r.get("torch_pruning", {}).get("macs") for r in json.load(f)["rows"]}
    rows = []
    for name in names:
        row = {"model": name, "torch_pruning_macs": tp.get(name)}
        for grouped in ("groups", "channels"):
            row[grouped] = _one(name, args.size, grouped)
        g, c = row["groups"], row["channels"]
        row["macs_ratio_channels_vs_groups"] = round(c["macs"] / g["macs"], 4)
        if row["torch_pruning_macs"]:
            row["vs_tp_groups"] = round(g["macs"] / row["torch_pruning_macs"], 4)
            row["vs_tp_channels"] = round(c["macs"] / row["torch_pruning_macs"], 4)
        print(f"{name:20s} MACs after/before: groups {g['macs'] / g['macs_before']:.3f}  channels "
              f"{c['macs'] / c['macs_before']:.3f}  vs TP: {row.get('vs_tp_groups')} -> {row.get('vs_tp_channels')}"
              f"  oracle {g['oracle_err']:.1e} / {c['oracle_err']:.1e}", flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"size": args.size, "ratio": 0.5, "importance": "l1", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
