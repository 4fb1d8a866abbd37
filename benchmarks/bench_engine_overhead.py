"""Where the structural engine's time goes on small and medium models, phase by phase, next to Torch-Pruning 1.6.

For each model, ``prune_channels(model, x, ratio=0.5)`` (x = randn(1, 3, S, S), one thread) is timed end to end
(e2e) and split into the phases it runs, called in the same order here: count_before (params; the dense MACs too
where the capture does not count them), capture (ATen dispatch mode + hooks), groups (union-find -> groups),
importance, choose, verify (dry run with the op-by-op shape check), apply, and count_after (MACs and params of the
pruned model). Every figure is the minimum of ``--repeats`` runs on a freshly built model, in wall and in CPU seconds
(the machine may be shared: the minimum is the least disturbed run, CPU time the least disturbed clock).
Torch-Pruning is called exactly as in ``bench_structural_zoo.py`` (its helpers, not a copy: a forked child per run,
with a timeout), on the same models in the same run; its figure is the minimum wall time of capture + prune (it
counts no MACs; compare it with secateur's capture..apply).

    python benchmarks/bench_engine_overhead.py [--models resnet18 ...] [--repeats 3] [--size 224] [--no-peer]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = ["resnet18", "mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x1_0", "efficientnet_b0",
          "squeezenet1_0", "resnet50", "swin_t"]
PHASES = ["count_before", "capture", "groups", "importance", "choose", "verify", "apply", "count_after"]


def _phases(name: str, size: int) -> dict[str, dict[str, float]]:
    """One prune, phase by phase (the steps of ``prune_channels`` with a float ratio and ``steps=1``): wall and CPU
    seconds (CPU time is less disturbed by other jobs on a shared machine). Where the capture counts the dense MACs
    itself (``capture(..., macs=True)``), count_before is only the parameter count; older engines count apart."""
    import inspect

    import torch
    import torchvision
    from secateur.graph.capture import capture
    from secateur.graph.groups import groups_from
    from secateur.metrics import count_macs, count_params
    from secateur.structured import _candidates, _choose, _new_plan, _verified

    folded = "macs" in inspect.signature(capture).parameters
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    wall, cpu = {}, {}
    clock = time.perf_counter(), time.process_time()

    def lap(key):
        nonlocal clock
        now = time.perf_counter(), time.process_time()
        wall[key], cpu[key] = now[0] - clock[0], now[1] - clock[1]
        clock = now

    count_params(model) if folded else (count_macs(model, x), count_params(model))
    lap("count_before")
    tr = capture(model, x, macs=True) if folded else capture(model, x)
    lap("capture")
    graph = groups_from(tr)
    lap("groups")
    cands = _candidates(model, graph, 0.5, False, "l1", (), (), "mean", None)
    lap("importance")
    plan = _new_plan(graph, _choose(cands, None, "local", None, graph.links), list(graph.notes), "heads")
    lap("choose")
    plan = _verified(model, x, plan, graph)
    plan.notes.extend(plan.norm_notes())
    lap("verify")
    plan.apply(model)
    lap("apply")
    count_macs(model, x), count_params(model)
    lap("count_after")
    for t in (wall, cpu):
        t["sum"] = sum(t[k] for k in PHASES)
        t["capture_to_apply"] = sum(t[k] for k in PHASES[1:-1])  # what Torch-Pruning's figure covers
    return dict(wall=wall, cpu=cpu)


def _end_to_end(name: str, size: int) -> dict[str, float]:
    import torch
    import torchvision
    from secateur.structured import prune_channels
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    t0, c0 = time.perf_counter(), time.process_time()
    prune_channels(model, x, ratio=0.5)
    return dict(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)


def _peer(name: str, size: int, repeats: int, timeout: float) -> dict:
    """Torch-Pruning through the zoo benchmark's own helper (a forked child with a timeout: it hangs on Swin);
    a failure is reported once, not repeated."""
    from bench_structural_zoo import _peer as zoo_peer, run
    runs = []
    for _ in range(repeats):
        r = run(zoo_peer, name, size, timeout)
        if not r.get("ok"):
            return dict(error=r.get("error", "pruned model output shape changed"))
        runs.append(r)
    return dict(capture=min(r["capture_s"] for r in runs), prune=min(r["prune_s"] for r in runs),
                total=min(r["capture_s"] + r["prune_s"] for r in runs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--timeout", type=float, default=60.0, help="per Torch-Pruning run, seconds")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "engine_overhead.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "..", "src"))
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        runs = [_phases(name, args.size) for _ in range(args.repeats)]
        e2e = [_end_to_end(name, args.size) for _ in range(args.repeats)]
        row = dict(model=name)
        for clock in ("wall", "cpu"):
            row[f"secateur_{clock}"] = {k: min(r[clock][k] for r in runs) for k in [*PHASES, "sum", "capture_to_apply"]}
            row[f"secateur_{clock}"]["prune_channels"] = min(r[clock] for r in e2e)
        if not args.no_peer:
            row["torch_pruning"] = _peer(name, args.size, args.repeats, args.timeout)
        rows.append(row)
        print(f"{name}: done", file=sys.stderr, flush=True)
    for clock in ("wall", "cpu"):
        print(f"\n{clock} seconds, min of {args.repeats} runs, x = randn(1, 3, {args.size}, {args.size}), 1 thread; "
              "cap..apply = capture to apply; e2e = prune_channels; TP = Torch-Pruning capture + prune (wall)")
        print(f"{'model':20}" + "".join(f"{k:>13}" for k in PHASES) + f"{'sum':>8}{'e2e':>8}{'cap..apply':>11}{'TP':>8}")
        for r in rows:
            s, p = r[f"secateur_{clock}"], r.get("torch_pruning", {})
            print(f"{r['model']:20}" + "".join(f"{s[k]:13.3f}" for k in PHASES) + f"{s['sum']:8.3f}"
                  f"{s['prune_channels']:8.3f}{s['capture_to_apply']:11.3f}" + (f"{p['total']:8.3f}" if "total" in p else f"{'-':>8}")
                  + (f"  TP: {p['error'][:50]}" if "error" in p else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(size=args.size, repeats=args.repeats, threads=1, torch=torch.__version__,
                       note="min of repeats on a shared 2-core machine: noisy", rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
