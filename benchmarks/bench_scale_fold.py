"""Head dims of attention whose softmax scale follows the head size (graph/scale_fold.py, issue #3): per model,
``plan_channels(model, x, ratio=0.5, heads=...)`` then apply, recording the MACs fraction, how many SDPA calls had
their scale folded into q's rows, how many kept their q/k dims, the oracle error (pruned model vs the original with
the chosen channels zeroed at their consumers) and whether a ``secateur.save`` / ``load`` round trip is bit-exact.
``--attn eager`` runs timm's eager attention path (``fused_attn = False``: ``q * self.scale`` with a stored scale),
``--attn fused`` its SDPA path (where timm calls it experimental, as in Swin); default: what timm picks.

    python benchmarks/bench_scale_fold.py --models vit_tiny_patch16_224 tv:vit_b_16 [--heads head_dim] [--attn eager]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import secateur
from secateur.errors import PruningError
from secateur.metrics import count_macs
from secateur.structured import plan_channels


def _make(name: str, attn: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name.startswith("tv:"):
        import torchvision
        m = getattr(torchvision.models, name[3:])()
        size = 224
    else:
        import timm
        m = timm.create_model(name, pretrained=False)
        size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    for mod in m.modules():
        if attn != "default" and hasattr(mod, "fused_attn"):
            mod.fused_attn = attn == "fused"
    with torch.no_grad():  # zero-initialised heads (torchvision's ViT) would make the oracle vacuous
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    return m.eval(), torch.randn(1, 3, size, size)


def measure(name: str, heads: str, attn: str) -> dict:
    torch.manual_seed(0)
    m, x = _make(name, attn)
    macs0 = count_macs(m, x)
    t0 = time.perf_counter()
    plan = plan_channels(m, x, ratio=0.5, heads=heads)
    plan_s = time.perf_counter() - t0
    err = plan.apply_checked(m, x)
    with torch.no_grad():
        got = m(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        secateur.save(m, path)
        torch.manual_seed(0)
        fresh = secateur.load(_make(name, attn)[0], path)
        with torch.no_grad():
            reload_exact = bool(torch.equal(fresh(x), got))
    notes = plan.notes
    return {"model": name, "heads": heads, "attn": attn, "macs_frac": count_macs(m, x) / macs0,
            "folded": sum("scaled by sqrt(" in n for n in notes),
            "qk_kept": sum("q/k head dims are kept" in n or "one unit (kept)" in n for n in notes),
            "oracle_err": err, "reload_exact": reload_exact, "plan_s": round(plan_s, 1),
            "fold_notes": [n for n in notes if "scale" in n][:4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="timm names or tv:<torchvision name>")
    ap.add_argument("--heads", default="head_dim", choices=["heads", "head_dim"])
    ap.add_argument("--attn", default="default", choices=["default", "eager", "fused"],
                    help="timm attention's path: fused_attn as timm sets it, False, or True")
    ap.add_argument("--out", default=None, help="JSON path to write the rows to")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        try:
            row = measure(name, args.heads, args.attn)
        except PruningError as e:  # a refusal is a result (eva02's RoPE under heads="head_dim")
            rows.append({"model": name, "heads": args.heads, "attn": args.attn, "refused": str(e)})
            print(f"{name:32s} heads={args.heads:8s} attn={args.attn:7s} refused: {e}", flush=True)
            continue
        rows.append(row)
        print(f"{name:32s} heads={args.heads:8s} attn={args.attn:7s} MACs {row['macs_frac']:.3f} "
              f"folded {row['folded']:2d} qk_kept {row['qk_kept']:2d} oracle {row['oracle_err']:.1e} "
              f"reload_exact {row['reload_exact']} plan {row['plan_s']} s", flush=True)
    if args.out:
        cmd = ["--models", *args.models, "--heads", args.heads] + ["--attn", args.attn]
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_scale_fold.py " + " ".join(cmd),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
