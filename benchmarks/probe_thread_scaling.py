"""Why MobileNetV2 at batch 1 on 2 CPU threads turns a 2x MACs cut into only ~1.3x speed (issue 7's unmet 0.8).

Times, interleaved, the dense model and pruned copies at 1 and at 2 threads, whole models and (``--layers``) every
Conv / BatchNorm / ReLU6 alone on its own captured input, so that one sees which kernels gain from the second
thread and which do not. Plans: ``uniform`` (``target_macs=1/target, round_to=8``: every group, residual stream
included, loses ~29 %) and ``hidden`` (only the inverted residuals' expansion channels, ratio ``--hidden``: the
expand and project 1x1 convs, the depthwise conv, its BatchNorms and ReLU6s all shrink with it).

    python benchmarks/probe_thread_scaling.py [--model mobilenet_v2] [--batch 1] [--target 2] [--layers]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _plans(name: str, x: torch.Tensor, target: float, hidden: float) -> dict[str, torch.nn.Module]:
    import torchvision
    from secateur.structured import prune_channels
    dense = torchvision.models.get_model(name).eval()
    out = {"dense": dense}
    p = copy.deepcopy(dense)
    prune_channels(p, x, target_macs=1 / target, round_to=8)
    out["uniform"] = p.eval()
    p = copy.deepcopy(dense)
    prune_channels(p, x, ratio={"features.*.conv.0.0": hidden}, round_to=8)
    out["hidden"] = p.eval()
    return out


def _median_ms(model, x, rounds: int, calls: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(calls):
                model(x)
            out.append((time.perf_counter() - t) / calls * 1e3)
    return out


def whole_models(models, x, threads, rounds: int) -> dict:
    """Per thread count (set once: switching the count between calls slows the next ones), the models timed
    interleaved, round by round, after a warm-up; the median per model."""
    times = {}
    for nt in threads:
        torch.set_num_threads(nt)
        for m in models.values():
            _median_ms(m, x, 1, 10)  # warm-up at this thread count (oneDNN primitives, thread pool)
        per = {k: [] for k in models}
        for _ in range(rounds):
            for k, m in models.items():
                per[k] += _median_ms(m, x, 1, 5)
        times.update({f"{k}@{nt}": statistics.median(v) for k, v in per.items()})
    return times


def layers(model, x, threads) -> dict[str, dict[int, float]]:
    """Per kind of layer, the sum of each layer's best time alone on its captured input, per thread count."""
    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU6)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m, i[0].clone())))
             for n, m in model.named_modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out: dict[str, dict[int, float]] = {}
    for mod, inp in seen.values():
        kind = type(mod).__name__
        if isinstance(mod, torch.nn.Conv2d):
            kind = "Conv2d depthwise" if mod.groups > 1 else f"Conv2d {mod.kernel_size[0]}x{mod.kernel_size[1]}"
        for nt in threads:
            torch.set_num_threads(nt)
            _median_ms(mod, inp, 1, 20)
            out.setdefault(kind, {}).setdefault(nt, 0.0)
            out[kind][nt] += min(_median_ms(mod, inp, 5, 100))
    return out


def main(argv=None) -> None:
    from secateur.metrics import count_macs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--hidden", type=float, default=0.55, help="ratio of the expansion channels for 'hidden'")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--layers", action="store_true", help="also time every layer alone")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "thread_scaling.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    models = _plans(args.model, x, args.target, args.hidden)
    macs = {k: count_macs(m, x) for k, m in models.items()}
    t = whole_models(models, x, (1, 2), args.rounds)
    rows = []
    print(f"{'plan':<8} {'MACs red':>8} {'1 thr ms':>8} {'2 thr ms':>8} {'2 vs 1':>6} {'eff @1':>6} {'eff @2':>6}")
    for k in models:
        red = macs["dense"] / macs[k]
        e1 = t["dense@1"] / t[f"{k}@1"] / red
        e2 = t["dense@2"] / t[f"{k}@2"] / red
        rows.append(dict(plan=k, macs_reduction=red, ms_1=t[f"{k}@1"], ms_2=t[f"{k}@2"], efficiency_1=e1,
                         efficiency_2=e2))
        print(f"{k:<8} {red:8.2f} {t[f'{k}@1']:8.2f} {t[f'{k}@2']:8.2f} {t[f'{k}@1'] / t[f'{k}@2']:6.2f} "
              f"{e1:6.2f} {e2:6.2f}")
    per_layer = {}
    if args.layers:
        for k in ("dense", "uniform"):
            per_layer[k] = layers(models[k], x, (1, 2))
            for kind, v in sorted(per_layer[k].items()):
                print(f"  {k:<8} {kind:<18} 1 thr {v[1]:6.2f} ms  2 thr {v[2]:6.2f} ms")
    with open(args.out, "w") as f:
        json.dump(dict(command="python benchmarks/probe_thread_scaling.py " + " ".join(argv or []),
                       model=args.model, batch=args.batch, rows=rows, layers=per_layer,
                       loadavg=os.getloadavg()), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
