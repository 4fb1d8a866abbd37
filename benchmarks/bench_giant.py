"""Structural pruning of torchvision's giants (regnet_y_128gf: 645 M params, vit_h_14: 632 M), which the zoo
benchmark skips because their default initialisation alone takes minutes on 2 cores (issue #3 names
regnet_y_128gf among Torch-Pruning's slowest: 26 s).

The model is built with its ``nn.init`` calls skipped and filled with normal(0, 0.02) weights (pruning time does not
depend on the values), then ``prune_channels(model, randn(1, 3, 224, 224), ratio=0.5)`` runs once on 1 thread.
Printed and written per model: wall and CPU seconds, peak RSS, MACs and params after / dense, and (``--peer``)
Torch-Pruning's capture + prune seconds on the same weights, in a forked child. ``--oracle`` also checks, in a
child of its own (not timed), that the pruned model's output equals the original's with the removed channels zeroed
at their consumers (norms over pruned channels computed over the kept ones), as ``tests/test_zoo.py`` does for the
rest of the zoo, which skips these two for the CI box's time.

    python benchmarks/bench_giant.py [--models regnet_y_128gf vit_h_14] [--peer] [--oracle] [--out results/giant.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
_INITS = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "zeros_", "ones_", "constant_",
          "trunc_normal_", "xavier_uniform_", "xavier_normal_")


def build(name: str):
    """torchvision ``name`` with its initialisers skipped, weights normal(0, 0.02), BatchNorm statistics 0 / 1."""
    import torch
    import torch.nn.init as init
    import torchvision
    saved = {k: getattr(init, k) for k in _INITS}
    try:
        for k in _INITS:
            setattr(init, k, lambda t, *a, **kw: t)
        model = torchvision.models.get_model(name)
    finally:
        for k, f in saved.items():
            setattr(init, k, f)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.fill_(1)
    return model.eval()


def secateur_run(name: str) -> dict:
    import torch
    from secateur.structured import prune_channels
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = build(name)
    built = time.perf_counter() - t0
    x = torch.randn(1, 3, 224, 224)
    wall, cpu = time.perf_counter(), time.process_time()
    res = prune_channels(model, x, ratio=0.5)
    return dict(build_s=built, wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                macs_frac=res.macs_after / res.macs_before, params_frac=res.params_after / res.params_before,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def oracle_run(name: str) -> dict:
    """Relative max error of the pruned model against the zeroed original (``plan_channels`` at ratio 0.5)."""
    import torch
    from secateur.structured import plan_channels
    torch.set_num_threads(2)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    err = plan_channels(model, x, ratio=0.5).apply_checked(model, x)  # raises if the output shape changed
    return dict(oracle_err=err, shape_kept=True)


def peer_run(name: str) -> dict:
    import torch
    import torch_pruning as tp
    torch.set_num_threads(1)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    wall, cpu = time.perf_counter(), time.process_time()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[classifier])
    pruner.step()
    return dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)


def _child(fn, name, q):
    try:
        q.put(fn(name))
    except Exception as e:  # noqa: BLE001 - reported as the row's error
        q.put(dict(error=f"{type(e).__name__}: {e}"[:300]))


def _forked(fn, name: str, timeout: float) -> dict:
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, name, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        return dict(error=f"timeout after {timeout:.0f} s")
    return q.get() if not q.empty() else dict(error=f"exit code {p.exitcode}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["regnet_y_128gf"])
    ap.add_argument("--peer", action="store_true", help="also time Torch-Pruning (MagnitudePruner, L1, 50 %%)")
    ap.add_argument("--oracle", action="store_true", help="also check the pruned model against the zeroed original")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "giant.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'model':<18} {'build s':>8} {'wall s':>7} {'CPU s':>7} {'RSS GB':>7} {'MACs':>6} {'params':>6} "
          f"{'TP wall s':>9}", flush=True)
    for name in args.models:
        row = dict(model=name, secateur=_forked(secateur_run, name, args.timeout))
        if args.peer:
            row["torch_pruning"] = _forked(peer_run, name, args.timeout)
        if args.oracle:
            row["oracle"] = _forked(oracle_run, name, args.timeout)
            print(f"{name:<18} oracle: {row['oracle']}", flush=True)
        s, t = row["secateur"], row.get("torch_pruning", {})
        if "error" in s:
            print(f"{name:<18} {s['error']}", flush=True)
        else:
            tp_s = f"{t['wall_s']:.1f}" if "wall_s" in t else t.get("error", "-")[:30]
            print(f"{name:<18} {s['build_s']:8.1f} {s['wall_s']:7.1f} {s['cpu_s']:7.1f} {s['peak_rss_gb']:7.2f} "
                  f"{s['macs_frac']:6.3f} {s['params_frac']:6.3f} {tp_s:>9}", flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump(dict(command="python benchmarks/bench_giant.py " + " ".join(argv or []), rows=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
