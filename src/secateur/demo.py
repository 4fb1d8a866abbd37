"""``secateur demo``: the seed MLP experiment on real MNIST, extended.

Train the seed's MLP (784-200-200-10), prune 60 % of each layer by magnitude, fine-tune with masks held,
then go to 90 % two ways with the same budget of non-zero weights: per layer and globally. Global pruning
should keep more accuracy because it leaves more weights where they matter (the first layer holds most
of the redundancy)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from secateur.errors import PruningError, fail
from secateur.prune import prune


def seed_mlp(n_in: int = 784, hidden: int = 200, n_out: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def _progress(label: str, i: int, n: int, loss: float) -> None:
    if sys.stderr.isatty() or i == n:
        end = "\n" if i == n else "\r"
        print(f"  {label}: batch {i}/{n}  loss {loss:.4f}", end=end, file=sys.stderr, flush=True)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
          batch: int = 128, seed: int = 0, label: str = "train") -> None:
    """Plain Adam training; masks stay in force because they live in the parametrizations."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        order = torch.randperm(len(y), generator=g)
        n = (len(y) + batch - 1) // batch
        for i in range(n):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (i + 1) % 50 == 0 or i + 1 == n:
                _progress(f"{label} epoch {ep + 1}/{epochs}", i + 1, n, loss.item())
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@dataclass
class Row:
    step: str
    accuracy: float
    nonzero: int
    total: int
    layer_sparsity: dict = field(default_factory=dict)


def _row(step: str, model: nn.Module, x, y) -> Row:
    layers = [m for m in model if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m in layers)
    nonzero = sum(int((m.weight != 0).sum()) for m in layers)
    sparsity = {f"fc{i + 1}": round(1 - int((m.weight != 0).sum()) / m.weight.numel(), 4)
                for i, m in enumerate(layers)}
    return Row(step, accuracy(model, x, y), nonzero, total, sparsity)


def _table(rows: list[Row]) -> str:
    names = list(rows[0].layer_sparsity)
    head = ["step", "test acc", "non-zero weights", *[f"{n} sparsity" for n in names]]
    body = [[r.step, f"{100 * r.accuracy:.2f} %", f"{r.nonzero:,} / {r.total:,}",
             *[f"{100 * r.layer_sparsity[n]:.1f} %" for n in names]] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def run_demo(*, epochs: int = 1, ratio: float = 0.6, global_ratio: float = 0.9, data: str = "mnist",
             out_dir: str | Path = "secateur-out", seed: int = 0, hidden: int = 200) -> list[Row]:
    """Run the experiment, print the table, write ``demo.json`` and ``histograms.png`` (if matplotlib)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise fail("epochs must be an integer >= 0", where="demo", value=epochs)
    for name, r in (("ratio", ratio), ("global_ratio", global_ratio)):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise fail(f"{name} must be in [0, 1)", where="demo", value=r)
    if data not in ("mnist", "digits"):
        raise fail("unknown demo data set", where="demo", value=data, hint="choose 'mnist' or 'digits'")
    out = Path(out_dir)
    clash = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:  # checked before the (long) training, not when the results are written
        raise fail(f"the output folder cannot be created: {str(clash)!r} is a file", where="demo",
                   value=str(out), hint="choose another output folder (--out DIR), or move that file away")
    from secateur import data as datasets
    ds = datasets.load_mnist() if data == "mnist" else datasets.load_digits()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"secateur demo: {data} ({len(ds.y_train)} train / {len(ds.y_test)} test), MLP "
          f"{ds.x_train.shape[1]}-{hidden}-{hidden}-{ds.num_classes}", flush=True)
    model = seed_mlp(ds.x_train.shape[1], hidden, ds.num_classes)
    train(model, ds.x_train, ds.y_train, epochs=epochs, seed=seed, label="train")
    rows = [_row("dense", model, ds.x_test, ds.y_test)]
    from secateur.report import report
    before = report(model, ds.x_test[:1])

    prune(model, ratio, criterion="l1")  # local: ratio of each layer
    rows.append(_row(f"prune {ratio:.0%} per layer", model, ds.x_test, ds.y_test))
    train(model, ds.x_train, ds.y_train, epochs=epochs, seed=seed + 1, label="fine-tune")
    rows.append(_row("fine-tuned, masks held", model, ds.x_test, ds.y_test))

    import copy
    local, glob = copy.deepcopy(model), model
    prune(local, global_ratio)
    rows.append(_row(f"prune {global_ratio:.0%} per layer", local, ds.x_test, ds.y_test))
    train(local, ds.x_train, ds.y_train, epochs=epochs, seed=seed + 2, label="fine-tune (per layer)")
    rows.append(_row("  + fine-tune", local, ds.x_test, ds.y_test))
    prune(glob, global_ratio, scope="global", max_sparsity=0.99)
    rows.append(_row(f"prune {global_ratio:.0%} global", glob, ds.x_test, ds.y_test))
    train(glob, ds.x_train, ds.y_train, epochs=epochs, seed=seed + 2, label="fine-tune (global)")
    rows.append(_row("  + fine-tune", glob, ds.x_test, ds.y_test))
    after = report(glob, ds.x_test[:1])

    print(_table(rows))
    print(after.table())
    (out / "demo.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    after.to_json(out / "report.json")
    written = [out / "demo.json", out / "report.json"]
    try:
        after.histograms(out / "histograms.png", before=before)
        after.to_html(out / "report.html", before=before)
        written += [out / "histograms.png", out / "report.html"]
    except PruningError as e:  # matplotlib is an optional extra
        print(f"(pictures skipped: {e})")
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - t0:.1f} s")
    return rows
