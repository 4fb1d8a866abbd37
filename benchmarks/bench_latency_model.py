"""How well the latency table predicts whole models: Conv/Linear layers alone, + tail, and calibrated in place.

For each model and batch size: build the latency table (``LatencyTable.build``, tail included, afresh unless --cache), make
a few pruned copies (uniform ``prune_channels(target_macs=...)`` at 2x and 4x, and the latency-aware
allocation at 2x), time the dense model and the copies *interleaved* (`compare_latency`; minimum over the
rounds, since another process only adds time), and compare with the table's estimates without the tail
(``tail=False``: what the table knew before `secateur.latency_tail`) and with it. Two errors per variant:
the absolute estimate against the measured latency, and the estimated speedup over dense against the
measured one (what a latency target relies on): the ratio of the minima, and the median of the per-round
ratios ("paired", robust to slow changes of the machine's load).

The third estimate is the table calibrated against the model timed in place (`LatencyTable.calibrate`: the
dense model and uniform copies at 0.6 and 0.3 of its MACs, so of the variants below only the dense model was
in its fit; the 2x and 4x copies and the latency-aware plans were not). ``latency-aware@2x (cal)`` is the
allocation made with the calibrated table: its measured speedup says whether calibration buys a faster model.

    .venv/bin/python benchmarks/bench_latency_model.py --models mobilenet_v2 resnet50 --batch 8 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from bench_speedup import ROUND_TO, _apply_counts, _macs_budget, _scored_groups, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "latency_model_calibrated.json"


def variants(dense, x, table, calibrated=None):
    """Pruned copies of ``dense`` whose latencies the table must predict."""
    from secateur.allocate import channel_counts, round_candidates
    from secateur.latency_model import LatencyTable
    from secateur.structured import prune_channels
    out = {"dense": dense}
    for t in (2, 4):
        m = copy.deepcopy(dense)
        prune_channels(m, x, target_macs=1 / t, round_to=ROUND_TO)
        out[f"uniform@{t}x"] = m
    graph, groups, scores = _scored_groups(dense, x)
    sizes = [g.size for g in groups]
    macs, budget = _macs_budget(dense, x, LatencyTable.shapes_only(dense, x), groups, 2)
    for label, t in (("latency-aware@2x", table), ("latency-aware@2x (cal)", calibrated)):
        if t is None:
            continue
        latency = t.cost_fn(t.members_of(groups), "latency", sizes=sizes)
        counts = channel_counts(groups, scores, macs, budget=budget, min_keep=ROUND_TO, rank_fn=latency,
                                candidates=[round_candidates(n, ROUND_TO) for n in sizes])
        out[label] = _apply_counts(dense, graph, groups, scores, counts)
    return out


def run(name: str, batch: int, args) -> list[dict]:
    from secateur.latency import compare_latency, paired_speedup
    from secateur.latency_model import LatencyTable
    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)().eval()
    x = torch.randn(batch, 3, 224, 224)
    t0 = time.perf_counter()
    table = LatencyTable.build(dense, x, threads=args.threads, repeats=args.table_repeats,
                               max_points=args.table_points, in_points=max(4, args.table_points // 2),
                               cache=args.cache, progress=False)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = table.calibrate(dense, x, threads=args.threads, repeats=args.calib_repeats, cache=args.cache)
    calib_s = time.perf_counter() - t0
    models = variants(dense, x, table, cal)
    load = os.getloadavg()
    res = compare_latency(models, x, repeats=args.repeats, warmup=2, threads=args.threads)
    rows = []
    dense_est = [table.estimate(dense, tail=False, calibrated=False), table.estimate(dense, calibrated=False),
                 cal.estimate(dense)]
    for k, m in models.items():
        meas = res[k].min
        est = [table.estimate(m, tail=False, calibrated=False), table.estimate(m, calibrated=False), cal.estimate(m)]
        rows.append({"model": name, "batch": batch, "variant": k, "measured_ms": meas * 1e3,
                     "measured_median_ms": res[k].median * 1e3, "gemm_ms": est[0] * 1e3,
                     "with_tail_ms": est[1] * 1e3, "calibrated_ms": est[2] * 1e3,
                     "err_gemm": est[0] / meas - 1, "err_with_tail": est[1] / meas - 1,
                     "err_calibrated": est[2] / meas - 1,
                     "speedup_measured": res["dense"].min / meas,
                     "speedup_paired": paired_speedup(res["dense"], res[k])[0],
                     "speedup_gemm": dense_est[0] / est[0], "speedup_with_tail": dense_est[1] / est[1],
                     "speedup_calibrated": dense_est[2] / est[2],
                     "tail_ops": table.tail.ops, "tail_overhead_us": table.tail.overhead * 1e6,
                     "table_build_s": build_s, "calibration_s": calib_s, "load_average_before_timing": load})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--table-points", type=int, default=12)
    ap.add_argument("--table-repeats", type=int, default=3)
    ap.add_argument("--calib-repeats", type=int, default=5, help="rounds of the in-place timing of the calibration")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time with this thread's CPU time instead of the wall clock (needs --threads 1): on a shared "
                         "machine it leaves out the time other processes ran, not their effect on the caches")
    ap.add_argument("--cache", action="store_true",
                    help="reuse cached latency tables (default: measure afresh, on this run's load)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.cpu_clock:
        if args.threads != 1:
            ap.error("--cpu-clock counts one thread's time: use it with --threads 1")
        import types

        import secateur.latency
        import secateur.latency_calibrate
        cpu = types.SimpleNamespace(perf_counter=time.thread_time)
        secateur.latency.time = secateur.latency_calibrate.time = cpu
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows = []
    print(f"{'model':<14}{'bs':>3} {'variant':<24}{'measured':>9}{'layers':>9}{'+tail':>9}{'calib':>9}"
          f"{'err layers':>11}{'err +tail':>10}{'err calib':>10}{'speedup':>8}{'paired':>8}{'est layers':>11}"
          f"{'est +tail':>10}{'est calib':>10}{'load':>6}")
    for name in args.models:
        for b in args.batch:
            for r in run(name, b, args):
                rows.append(r)
                print(f"{r['model']:<14}{r['batch']:>3} {r['variant']:<24}{r['measured_ms']:>7.2f}ms"
                      f"{r['gemm_ms']:>7.2f}ms{r['with_tail_ms']:>7.2f}ms{r['calibrated_ms']:>7.2f}ms"
                      f"{r['err_gemm']:>+11.0%}{r['err_with_tail']:>+10.0%}{r['err_calibrated']:>+10.0%}"
                      f"{r['speedup_measured']:>7.2f}x{r['speedup_paired']:>7.2f}x{r['speedup_gemm']:>10.2f}x"
                      f"{r['speedup_with_tail']:>9.2f}x{r['speedup_calibrated']:>9.2f}x"
                      f"{r['load_average_before_timing'][0]:>6.1f}", flush=True)
    out = {"benchmark": "latency_model", "clock": "thread CPU time" if args.cpu_clock else "wall", "command": " ".join(["benchmarks/bench_latency_model.py", *(argv or sys.argv[1:])]),
           "machine": machine(), "load_average_at_start": load0, "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {out['seconds']:.0f} s (load average at start {load0}, at end {os.getloadavg()})")


if __name__ == "__main__":
    main()
