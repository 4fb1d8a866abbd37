"""Two probes behind the latency table's measurement rules (README, "Why latency-aware lost on MobileNetV2").

1. fake steps: build a model's latency table with the old rule (median of the repeats) and the current one
   (minimum over interleaved rounds, suspect counts re-measured), alternately, and count the output-sweep
   points that are more than 25 % slower than some larger count of the same layer.
2. page faults: minor page faults and time of one early MobileNetV2 convolution at batch 8, inside the model
   and alone (an output above glibc's 32 MB mmap threshold is faulted in afresh on every call).

    .venv/bin/python benchmarks/probe_latency_table.py --model mobilenet_v2 --batch 1 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torchvision

import secateur.latency_model as lm
from secateur.latency import _Timer, pinned_threads


def median_sweep(spec, which, counts, device, *, threads, repeats, warmup, min_sample_s, tick, timer=None):
    """The table's old rule: the median of ``repeats`` interleaved samples per count, nothing re-measured."""
    timer = timer or _Timer(device)
    with pinned_threads(threads), torch.inference_mode():
        calls, numbers = lm.sweep_calls(spec, which, counts, device, timer, warmup=warmup,
                                        min_sample_s=min_sample_s, tick=tick)
        samples = [[] for _ in counts]
        for _ in range(repeats):
            for i, call in enumerate(calls):
                samples[i].append(timer(call, numbers[i]))
    return {str(c): statistics.median(s) for c, s in zip(counts, samples)}


def inverted(table: lm.LatencyTable) -> tuple[int, int, float]:
    bad, worst = 0, 1.0
    for curve in table.out_curves.values():
        s = curve.seconds
        for i in range(len(s)):
            r = max((s[i] / s[j] for j in range(i + 1, len(s))), default=1.0)
            worst, bad = max(worst, r), bad + (r > 1.25)
    return bad, sum(len(c.seconds) for c in table.out_curves.values()), worst


def fake_steps(args) -> None:
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    current = lm._measure_sweep
    for _ in range(args.rounds):
        for label, sweep in (("median of repeats", median_sweep), ("min + re-measure", current)):
            lm._measure_sweep = sweep
            t0 = time.perf_counter()
            table = lm.LatencyTable.build(model, x, threads=args.threads, repeats=3, max_points=12, in_points=6,
                                          cache=False, progress=False)
            bad, points, worst = inverted(table)
            print(f"{label:18s} inverted {bad:3d}/{points} points, worst {worst:6.2f}x, "
                  f"{time.perf_counter() - t0:5.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    lm._measure_sweep = current


def page_faults(args) -> None:
    torch.set_num_threads(args.threads)
    model = torchvision.models.mobilenet_v2().eval()
    conv = model.features[2].conv[0][0]  # 16 -> 96 channels at 112x112: 38.5 MB of float32 output at batch 8
    seen = {"faults": [], "ms": []}

    def pre(mod, a):
        seen["f0"], seen["t0"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()

    def post(mod, a, out):
        seen["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - seen["f0"])
        seen["ms"].append((time.perf_counter() - seen["t0"]) * 1e3)
    hooks = [conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(6):
            model(torch.randn(8, 3, 224, 224))
        for h in hooks:
            h.remove()
        inside = dict(seen)
        seen.update(faults=[], ms=[])
        xi = torch.randn(8, 16, 112, 112)
        for _ in range(6):
            pre(conv, None)
            post(conv, None, conv(xi))
    for where, s in (("in the model", inside), ("alone", seen)):
        print(f"features.2.conv.0.0 {where:12s}: minor faults per call {s['faults'][2:]}, "
              f"ms {[round(t, 1) for t in s['ms'][2:]]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fake_steps(args)
    page_faults(args)


if __name__ == "__main__":
    main()
