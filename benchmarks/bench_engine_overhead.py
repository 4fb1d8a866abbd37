"""Where the structural engine's time goes on small and medium models, phase by phase, next to Torch-Pruning 1.6.

For each model, ``prune_channels(model, x, ratio=0.5)`` (x = randn(1, 3, S, S), one thread) is timed end to end
(e2e) and split into the phases it runs, called in the same order here: count_before (params; the dense MACs are
tallied by the capture), capture (ATen dispatch mode + hooks), groups (union-find -> groups), importance, choose,
verify (dry run on a twin with the op-by-op shape check; it also tallies the pruned MACs), apply (the twin's slices
moved into the model), and count_after (params; the MACs too where the dry run could not count them). Each repeat
runs secateur's phases, secateur end to end, then Torch-Pruning, alternately, so that a shared machine's load
falls on both alike; every figure is the minimum over ``--repeats``, in wall and in CPU seconds (CPU time is the
least disturbed clock). Torch-Pruning is called exactly as in ``bench_structural_zoo.py`` (its helpers, not a
copy: a forked child per run, with a timeout, reporting its own wall and CPU seconds); its figure is capture +
prune (it counts no MACs; compare it with secateur's e2e, which does).

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
    """One prune, phase by phase (the steps of ``prune_channels`` with a float ratio and ``steps=1``, with the old
    objects frozen out of the garbage collector as ``prune_channels`` does): wall and CPU seconds."""
    from secateur.structured import _old_objects_spared
    return _old_objects_spared(_phase_times)(name, size)


def _phase_times(name: str, size: int) -> dict[str, dict[str, float]]:
    import torch
    import torchvision
    from secateur.graph.capture import capture
    from secateur.graph.groups import groups_from
    from secateur.metrics import count_macs, count_params
    from secateur.structured.apply import _apply
    from secateur.structured.choose import _candidates, _choose, _new_plan
    from secateur.structured.proof import _verified

    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    wall, cpu = {}, {}
    clock = time.perf_counter(), time.process_time()

    def lap(key):
        nonlocal clock
        now = time.perf_counter(), time.process_time()
        wall[key], cpu[key] = now[0] - clock[0], now[1] - clock[1]
        clock = now

    count_params(model)
    lap("count_before")
    tr = capture(model, x, macs=True)
    if tr.macs is None:
        count_macs(model, x)
    lap("capture")
    graph = groups_from(tr)
    lap("groups")
    cands = _candidates(model, graph, 0.5, False, "l1", (), (), "mean", None)
    lap("importance")
    plan = _new_plan(graph, _choose(cands, None, "local", None, graph.links), list(graph.notes), "heads")
    lap("choose")
    done = {}
    plan = _verified(model, x, plan, graph, done)
    plan.notes.extend(plan.norm_notes())
    lap("verify")
    _apply(model, plan, reuse=done.get("slices"))
    lap("apply")
    if done.get("macs") is None:
        count_macs(model, x)
    count_params(model)
    lap("count_after")
    for t in (wall, cpu):
        t["sum"] = sum(t[k] for k in PHASES)
        t["capture_to_apply"] = sum(t[k] for k in PHASES[1:-1])
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


def _peer_once(name: str, size: int, timeout: float) -> dict:
    """One Torch-Pruning run through the zoo benchmark's own helper (a forked child with a timeout: it hangs on
    Swin): wall and CPU seconds of capture + prune, or the error."""
    from bench_structural_zoo import _peer as zoo_peer, run
    r = run(zoo_peer, name, size, timeout)
    if not r.get("ok"):
        return dict(error=r.get("error", "pruned model output shape changed"))
    return dict(wall=r["capture_s"] + r["prune_s"], cpu=r["capture_cpu_s"] + r["prune_cpu_s"],
                capture=r["capture_s"], prune=r["prune_s"])


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
        runs, e2e, peer = [], [], []
        for _ in range(args.repeats):  # alternately: the machine's load falls on both engines alike
            runs.append(_phases(name, args.size))
            e2e.append(_end_to_end(name, args.size))
            if not args.no_peer and not any("error" in p for p in peer):  # a failure is reported once
                peer.append(_peer_once(name, args.size, args.timeout))
        row = dict(model=name)
        for clock in ("wall", "cpu"):
            row[f"secateur_{clock}"] = {k: min(r[clock][k] for r in runs) for k in [*PHASES, "sum", "capture_to_apply"]}
            row[f"secateur_{clock}"]["prune_channels"] = min(r[clock] for r in e2e)
        if peer:
            bad = [p for p in peer if "error" in p]
            row["torch_pruning"] = bad[0] if bad else dict(
                total=min(p["wall"] for p in peer), total_cpu=min(p["cpu"] for p in peer),
                capture=min(p["capture"] for p in peer), prune=min(p["prune"] for p in peer))
        rows.append(row)
        print(f"{name}: done", file=sys.stderr, flush=True)
    for clock in ("wall", "cpu"):
        print(f"\n{clock} seconds, min of {args.repeats} runs, x = randn(1, 3, {args.size}, {args.size}), 1 thread; "
              f"cap..apply = capture to apply; e2e = prune_channels; TP = Torch-Pruning capture + prune ({clock})")
        print(f"{'model':20}" + "".join(f"{k:>13}" for k in PHASES) + f"{'sum':>8}{'e2e':>8}{'cap..apply':>11}{'TP':>8}")
        for r in rows:
            s, p = r[f"secateur_{clock}"], r.get("torch_pruning", {})
            print(f"{r['model']:20}" + "".join(f"{s[k]:13.3f}" for k in PHASES) + f"{s['sum']:8.3f}"
                  f"{s['prune_channels']:8.3f}{s['capture_to_apply']:11.3f}" + (f"{p['total' if clock == 'wall' else 'total_cpu']:8.3f}" if "total" in p else f"{'-':>8}")
                  + (f"  TP: {p['error'][:50]}" if "error" in p else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(size=args.size, repeats=args.repeats, threads=1, torch=torch.__version__,
                       note=("min of repeats on a shared 2-core machine (load from other jobs): noisy; secateur and "
                             "Torch-Pruning run alternately, repeat by repeat; CPU seconds are the steadier clock"), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
