"""Plot a bench_speedup.py result: efficiency (speedup / MACs reduction) per model, batch and target, one bar per
method, with the issue's 0.8 goal and the 1.0 limit drawn across. Methods planned with a latency table at another
batch than the one timed are left out (the row planned at the timed batch is the one a user would run).

    .venv/bin/python benchmarks/plot_speedup.py benchmarks/results/speedup_cpu_auto.json   # writes the .png beside it
    .venv/bin/python benchmarks/plot_speedup.py RESULT.json --compiled   # the torch.compile'd rows: RESULT_compiled.png
    .venv/bin/python benchmarks/plot_speedup.py A.json B.json --out ALL.png   # several runs, one model per run

Several results are merged into one plot only where each model comes from one of them: the methods of a model are
compared within one run (timed interleaved), never across runs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2", "convnext_tiny": "ConvNeXt-T", "vit_b_16": "ViT-B/16"}
LABELS = {"tp": "Torch-Pruning", "secateur": "secateur uniform", "secateur-latency": "secateur width (latency-aware)",
          "secateur-depth": "secateur depth first", "secateur-auto": "secateur prune_fastest",
          "secateur-auto-compiled": "secateur prune_fastest(compile=True)"}


def cells(rows: list[dict], compiled: bool = False) -> tuple[list[tuple], list[str], dict]:
    """(model, batch, target) cells in model / target / batch order, the methods in run order, and
    {(cell, method): efficiency}, of the eager rows or (``compiled``) the torch.compile'd ones."""
    eff, order, methods = {}, [], []
    for r in rows:
        if bool(r.get("compiled")) != compiled or (r.get("table_batch") is not None and r["table_batch"] != r["batch"]):
            continue
        cell = (r["model"], r["batch"], r["target"])
        if cell not in order:
            order.append(cell)
        if r["method"] not in methods:
            methods.append(r["method"])
        eff[cell, r["method"]] = r["efficiency"]
    rank = {m: i for i, m in enumerate(NAMES)}
    order.sort(key=lambda c: (rank.get(c[0], len(rank)), c[0], c[2], c[1]))
    return order, [m for m in LABELS if m in methods] + [m for m in methods if m not in LABELS], eff


def merged(paths: list[Path]) -> tuple[list[dict], dict, str]:
    """The rows of every result, the first one's machine, and the runs' dates; a model in two results is refused
    (its methods would be compared across runs)."""
    rows, owner, dates, machine = [], {}, [], None
    for path in paths:
        data = json.loads(path.read_text())
        for model in {r["model"] for r in data["rows"]}:
            if model in owner:
                raise SystemExit(f"{model} is in both {owner[model]} and {path}: plot one run per model")
            owner[model] = path
        rows += data["rows"]
        machine = machine or data.get("machine", {})
        dates.append(data.get("machine", {}).get("date_utc", ""))
    return rows, machine or {}, ", ".join(d for d in dates if d)


def plot(paths: Path | list[Path], out: Path, compiled: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [paths] if isinstance(paths, Path) else list(paths)
    rows, machine, dates = merged(paths)
    order, methods, eff = cells(rows, compiled)
    if not order:
        raise SystemExit(f"{', '.join(map(str, paths))}: no {'compiled' if compiled else 'eager'} rows to plot")
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, len(order) * 0.75), 4.2))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(order))]
        ax.bar(xs, [eff.get((c, m), 0.0) for c in order], width, label=LABELS.get(m, m))
    ax.axhline(0.8, color="black", linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{NAMES.get(mo, mo)}\nbs {b}, {t:g}x" for mo, b, t in order], fontsize=7)
    ax.set_ylabel("efficiency = speedup / MACs reduction")
    ax.set_title(f"Real speedup{', torch.compile' if compiled else ''} on {machine.get('cpu', '?')} "
                 f"({machine.get('cpu_count', '?')} CPUs), {dates} UTC\n"
                 f"dashed: the 0.8 goal; missing bar: target not reached", fontsize=9)
    ax.legend(fontsize=7, ncol=len(methods), loc="upper left")
    ax.set_ylim(0, 1.45)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, nargs="+", help="bench_speedup.py results (each model in one of them)")
    ap.add_argument("--out", type=Path, help="the image (default: the first JSON's name with .png, _compiled.png "
                                                 "with --compiled)")
    ap.add_argument("--compiled", action="store_true", help="plot the torch.compile'd timings instead of eager")
    args = ap.parse_args(argv)
    first = args.json[0]
    default = first.with_name(first.stem + ("_compiled" if args.compiled else "") + ".png")
    plot(args.json, args.out or default, args.compiled)


if __name__ == "__main__":
    main()
