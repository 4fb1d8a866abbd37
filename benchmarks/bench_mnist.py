"""Training-aware pruning on real MNIST (issue 4's evidence).

Unstructured, for LeNet-300-100 and LeNet-5 (Caffe: conv 20, conv 50, fc 800-500-10):
  * dense baseline trained to near the literature's error (recipe below; cached, rebuilt when missing);
  * secateur GMP (Zhu & Gupta cubic schedule, global magnitude with a per-layer sparsity cap) to 90-99 %;
  * secateur iterative magnitude pruning (global, geometric rounds, fine-tuning with masks held);
  * torch.nn.utils.prune iterative magnitude pruning (global_unstructured, L1) with the SAME rounds, data
    order, optimizer and learning-rate schedule;
  compression = Linear/Conv weights / non-zero weights (biases not counted, as Han et al.), and the best
  compression whose test error is <= dense + 0.1 %.
Structured, LeNet-5: size-weighted group lasso (proximal step after each SGD step) over the structural
engine's channel groups, physical removal of the zeroed channels / neurons with `prune_channels`, then
fine-tuning; MAC reduction at test error <= 1.0 %.
Reconstruction: remove input channels of one layer without any fine-tuning: plain removal vs least-squares
reconstruction (magnitude choice) vs ThiNet greedy choice + reconstruction, same ratio.

Training data are the 60k MNIST training images (train + validation of the pickle), errors are on the 10k
test set, and as in the papers we compare with, the best sparsity meeting the bound is read off the runs.
Every method of a model gets the same budget (epochs of 60k images), batch 128, SGD + Nesterov momentum,
cosine learning rate, random shifts of up to ``shift`` pixels (the same seeded stream for every method).

    python benchmarks/bench_mnist.py                                   # everything (see README for time)
    python benchmarks/bench_mnist.py --parts structured --out benchmarks/results/mnist_structured.json
    python benchmarks/bench_mnist.py --quick                           # smoke test, 1-2 min, temp dir
    python benchmarks/bench_mnist.py --plot-only                       # redraw results/mnist.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn

from secateur import prune
from secateur.data import cache_dir, load_mnist
from secateur.reconstruct import capture_inputs, choose_channels, reconstruct_
from secateur.regularize import GroupLasso, channel_groups
from secateur.schedules import GMP, PruningScheduler
from secateur.training import evaluate, fine_tune

RESULTS = Path(__file__).parent / "results"
BATCH = 128
MOMENTUM = 0.9


# ------------------------------------------------------------------------------------------- models


def lenet300() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def lenet5() -> nn.Module:
    """Caffe's LeNet: no non-linearity between the convolutions, ReLU after ip1."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


MODELS = {"lenet300": lenet300, "lenet5": lenet5}


@dataclass(frozen=True)
class Recipe:
    """Training budget of one model: dense training, then the same budget for every pruning method."""

    dense_epochs: float
    lr: float                 # dense peak learning rate (cosine to 0)
    wd: float
    shift: int                # random translation of up to this many pixels (0: no augmentation)
    prune_epochs: float       # budget of each pruning run (GMP run, whole iterative run, lasso phase)
    prune_lr: float           # peak learning rate while pruning / fine-tuning
    gmp: tuple[float, ...]    # GMP final sparsities
    rounds: int               # iterative pruning rounds within prune_epochs
    final: float              # sparsity after the last iterative round
    max_sparsity: float       # secateur global scope: no layer above this sparsity (a per-layer floor)
    lasso: tuple[float, ...] = ()     # group-lasso lambdas (structured, LeNet-5)
    finetune_epochs: float = 0.0      # structured: fine-tuning after removal
    train_subset: int = 0             # 0: all 60k training images (--quick uses a subset)

    def dense_key(self, name: str, seed: int) -> str:
        fields = (name, self.dense_epochs, self.lr, self.wd, self.shift, self.train_subset, seed, BATCH, MOMENTUM)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


RECIPES = {
    # LeNet-300-100 without augmentation, as in the papers (their dense error: 1.64 %)
    "lenet300": Recipe(dense_epochs=30, lr=0.05, wd=1e-4, shift=0, prune_epochs=20, prune_lr=0.02,
                       gmp=(0.9, 0.95, 0.97, 0.98, 0.99), rounds=10, final=0.99, max_sparsity=0.995),
    # LeNet-5 with random shifts of up to 2 pixels (papers' dense error without: 0.80 %)
    "lenet5": Recipe(dense_epochs=10, lr=0.05, wd=5e-4, shift=2, prune_epochs=3, prune_lr=0.02,
                     gmp=(0.95, 0.98, 0.99), rounds=6, final=0.99, max_sparsity=0.995,
                     lasso=(1e-3, 2e-3, 4e-3), finetune_epochs=3),
}
QUICK = {name: replace(r, dense_epochs=1, prune_epochs=0.5, gmp=r.gmp[:2], rounds=2, lasso=r.lasso[:1],
                       finetune_epochs=0.5 if r.lasso else 0.0, train_subset=6000)
         for name, r in RECIPES.items()}


# --------------------------------------------------------------------------------------------- data


def shift_images(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    """Translate each flattened 28x28 image by its own random (dy, dx) in [-s, s]^2, zero-filled."""
    if s == 0:
        return x
    b = x.shape[0]
    img = F.pad(x.reshape(b, 28, 28), (s, s, s, s))
    d = torch.randint(0, 2 * s + 1, (2, b), generator=g)
    r = torch.arange(28)
    rows = (r[None] + d[0, :, None])[:, :, None]
    cols = (r[None] + d[1, :, None])[:, None, :]
    return img[torch.arange(b)[:, None, None], rows, cols].reshape(b, 784)


class Stream:
    """Shuffled, augmented mini-batches of one seeded stream; each iteration yields the next ``epochs``
    worth of batches, so every method sees exactly the same data in the same order for the same budget."""

    def __init__(self, x, y, seed: int, epochs: float, shift: int):
        self.x, self.y, self.seed, self.epochs, self.shift = x, y, seed, epochs, shift
        self.per_epoch = math.ceil(len(y) / BATCH)
        self.pos = 0
        self._epoch, self._perm = -1, None
        self._aug = torch.Generator().manual_seed(seed + 10_000)

    def steps(self, epochs: float | None = None) -> int:
        return max(1, round((self.epochs if epochs is None else epochs) * self.per_epoch))

    def __iter__(self):
        for _ in range(self.steps()):
            epoch, b = divmod(self.pos, self.per_epoch)
            if self._epoch != epoch:
                self._perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed + epoch))
                self._epoch = epoch
            idx = self._perm[b * BATCH:(b + 1) * BATCH]
            self.pos += 1
            yield shift_images(self.x[idx], self.shift, self._aug), self.y[idx]


def test_batches(ds):
    return [(ds.x_test[i:i + 2000], ds.y_test[i:i + 2000]) for i in range(0, len(ds.y_test), 2000)]


def sgd(model, lr, wd):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=wd, nesterov=True)


def cosine(opt, peak: float, steps: int):
    """An ``on_step`` callback for `fine_tune`: sets the learning rate of the *next* step (cosine to 0)."""
    for group in opt.param_groups:
        group["lr"] = peak

    def on_step(step, _loss):
        for group in opt.param_groups:
            group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * min(step + 1, steps) / steps))
    return on_step


def train(model, stream, lr, wd, **kw):
    """`secateur.training.fine_tune` for one pass over ``stream`` with a cosine learning rate."""
    opt = sgd(model, lr, wd)
    fine_tune(model, stream, opt, epochs=1, on_step=cosine(opt, lr, stream.steps()), **kw)


def plain_train(model, stream, lr, wd):
    """The same loop without secateur (for torch.nn.utils.prune: its forward pre-hook applies the mask)."""
    opt = sgd(model, lr, wd)
    on_step = cosine(opt, lr, stream.steps())
    model.train()
    for step, (x, y) in enumerate(stream):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        on_step(step, None)


def weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def compression(model) -> tuple[int, int]:
    """(prunable weights, non-zero weights) over Linear/Conv weights (biases not counted, as Han et al.)."""
    total = sum(m.weight.numel() for m in weights(model))
    nz = sum(int(torch.count_nonzero(m.weight.detach())) for m in weights(model))
    return total, nz


def layer_density(model) -> list[float]:
    return [round(int(torch.count_nonzero(m.weight.detach())) / m.weight.numel(), 5) for m in weights(model)]


def log(msg):
    print(msg, flush=True)


def error(model, ds) -> float:
    return 1 - evaluate(model, test_batches(ds))


def row(model, ds, t, **extra):
    total, nz = compression(model)
    return {**extra, "error": error(model, ds), "weights": total, "nonzero": nz, "compression": total / nz,
            "density_per_layer": layer_density(model), "seconds": time.time() - t}


# ------------------------------------------------------------------------------------- experiments


def dense(name, ds, rc: Recipe, seed):
    """Train the dense baseline, or load it from the cache (keyed by the recipe); one process trains
    while any other waits on its lock file."""
    path = cache_dir() / "bench_mnist" / f"{name}-{rc.dense_key(name, seed)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    model = MODELS[name]()
    while True:
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            info = {**saved["info"], "cached": str(path)}
            log(f"[{name}] dense (cached): error {info['error']:.2%}")
            return model, info
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.time() - lock.stat().st_mtime > 3600:  # a dead run's lock
                lock.unlink(missing_ok=True)
            time.sleep(5)
    try:
        torch.manual_seed(seed)
        t = time.time()
        stream = Stream(ds.x_train, ds.y_train, seed=seed, epochs=rc.dense_epochs, shift=rc.shift)
        train(model, stream, rc.lr, rc.wd, progress=f"{name} dense")
        info = {"error": error(model, ds), "epochs": rc.dense_epochs, "seconds": time.time() - t}
        tmp = path.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
    log(f"[{name}] dense: error {info['error']:.2%} ({info['seconds']:.0f}s)")
    return model, info


def clone(name, model):
    twin = MODELS[name]()
    twin.load_state_dict(model.state_dict())
    return twin


def gmp(name, ds, base, rc: Recipe, seed):
    rows = []
    for s in rc.gmp:
        model = clone(name, base)
        stream = Stream(ds.x_train, ds.y_train, seed=seed + 1, epochs=rc.prune_epochs, shift=rc.shift)
        steps = stream.steps()
        # cubic ramp over the first 2/3 of the budget (~40 mask updates); the last third recovers
        end = int(2 * steps / 3)
        sched = PruningScheduler(model, GMP(final=s, start=0, end=end, frequency=max(1, end // 40)),
                                 scope="global", max_sparsity=rc.max_sparsity)
        t = time.time()
        train(model, stream, rc.prune_lr, rc.wd, scheduler=sched, progress=f"{name} GMP {s}")
        rows.append(row(model, ds, t, target=s, epochs=rc.prune_epochs))
        log(f"[{name}] GMP -> {s}: error {rows[-1]['error']:.2%}, {rows[-1]['compression']:.1f}x "
            f"({rows[-1]['seconds']:.0f}s)")
    return rows


def levels(rc: Recipe) -> list[float]:
    """Geometric rounds: the same fraction of the survivors removed each round, ending at ``final``."""
    return [1 - (1 - rc.final) ** (k / rc.rounds) for k in range(1, rc.rounds + 1)]


def iterative(name, ds, base, rc: Recipe, seed, engine: str):
    """Han et al.'s prune / fine-tune rounds: secateur (masks held by `fine_tune`) or torch.nn.utils.prune
    (global_unstructured, L1, same rounds, data, optimizer and schedule; no per-layer cap: it has none)."""
    model = clone(name, base)
    stream = Stream(ds.x_train, ds.y_train, seed=seed + 2, epochs=rc.prune_epochs / rc.rounds, shift=rc.shift)
    params = [(m, "weight") for m in weights(model)]
    rows, t, prev = [], time.time(), 0.0
    for r, level in enumerate(levels(rc), 1):
        if engine == "secateur":
            prune(model, amount=level, scope="global")
            train(model, stream, rc.prune_lr, rc.wd)
        else:
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured,
                                       amount=1 - (1 - level) / (1 - prev))
            plain_train(model, stream, rc.prune_lr, rc.wd)
        prev = level
        rows.append(row(model, ds, t, round=r, target=level, epochs=rc.prune_epochs * r / rc.rounds))
        log(f"[{name}] {engine} iterative round {r}: sparsity {1 - rows[-1]['nonzero'] / rows[-1]['weights']:.4f}"
            f" error {rows[-1]['error']:.2%}")
    return rows


def best_within(rows, bound):
    """The row of highest compression whose error is within ``bound`` (None if none is)."""
    ok = [r for r in rows if r["error"] <= bound + 1e-12]
    return max(ok, key=lambda r: r["compression"]) if ok else None


def structured_lenet5(ds, base, rc: Recipe, lam, seed):
    """Group lasso (lambda ramped up over the first quarter, constant learning rate so that zeroed groups
    stay exactly zero), removal of the zeroed channel groups, cosine fine-tuning."""
    from secateur.metrics import count_macs
    from secateur.structured import prune_channels
    example = ds.x_test[:1]
    model = clone("lenet5", base)
    macs0 = count_macs(model, example)
    stream = Stream(ds.x_train, ds.y_train, seed=seed + 3, epochs=rc.prune_epochs, shift=rc.shift)
    ramp = max(1, stream.steps() // 4)
    reg = GroupLasso(tuple(channel_groups(model, example_inputs=example)),
                     lam=lambda step: lam * min(1.0, (step + 1) / ramp), size_weighted=True)
    t = time.time()
    fine_tune(model, stream, sgd(model, rc.prune_lr, rc.wd), epochs=1, regularizer=reg,
              progress=f"lenet5 group lasso {lam:g}")
    err_sparse = error(model, ds)
    zero = sum(int((n == 0).sum()) for n in reg.norms(model))
    result = prune_channels(model, example, ratio=0.0, threshold=1e-12, importance="l2", scope="global")
    macs1 = count_macs(model, example)
    err_pruned = error(model, ds)
    train(model, Stream(ds.x_train, ds.y_train, seed=seed + 4, epochs=rc.finetune_epochs, shift=rc.shift),
          rc.prune_lr, rc.wd)
    err = error(model, ds)
    shapes = {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {"lambda": lam, "groups_zeroed": zero, "error_after_lasso": err_sparse, "error_after_removal": err_pruned,
           "error": err, "macs_dense": macs0, "macs": macs1, "mac_reduction": macs0 / macs1,
           "params": sum(p.numel() for p in model.parameters()), "shapes": shapes,
           "epochs": rc.prune_epochs + rc.finetune_epochs, "seconds": time.time() - t,
           "engine": str(result).splitlines()[0]}
    log(f"[lenet5] group lasso {lam:g}: zeroed {zero} channels, error {err_sparse:.2%} -> removed {err_pruned:.2%} "
        f"-> fine-tuned {err:.2%}; MACs {macs0:,} -> {macs1:,} ({macs0 / macs1:.1f}x); layers {shapes}")
    return out


def reconstruction(name, ds, base, layer_index, ratios, calib, seed):
    """Remove input channels of the ``layer_index``-th Linear/Conv without fine-tuning."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.y_train), generator=g)[:calib]
    batches = [ds.x_train[idx[i:i + 500]] for i in range(0, calib, 500)]
    dense_err = error(base, ds)
    for ratio in ratios:
        for method in ("plain (l1 choice)", "reconstructed (l1 choice)", "reconstructed (greedy ThiNet)"):
            model = clone(name, base)
            layer = weights(model)[layer_index]
            x = capture_inputs(model, layer, batches)
            c = x.shape[1] if x.dim() == 4 else x.shape[-1]
            n_keep = max(1, round(c * (1 - ratio)))
            keep = choose_channels(layer, x, n_keep, method="greedy" if "greedy" in method else "l1")
            if method.startswith("plain"):
                with torch.no_grad():
                    layer.weight[:, ~keep] = 0
                errs = None
            else:
                errs = reconstruct_(layer, x, keep, ridge=1e-4)
            err = error(model, ds)
            rows.append({"layer": layer_index, "removed_ratio": ratio, "kept": n_keep, "of": c, "method": method,
                         "error": err, "dense_error": dense_err,
                         "output_rel_error": None if errs is None else errs["reconstructed"]})
            log(f"[{name}] remove {ratio:.0%} inputs of layer {layer_index}: {method}: error {err:.2%}")
    return rows


# ------------------------------------------------------------------------------------------ report


METHODS = (("secateur GMP", "gmp"), ("secateur iterative", "iterative_secateur"),
           ("torch.nn.utils.prune iterative", "iterative_torch"))


def table(title, head, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)] if rows else \
        [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(f"\n{title}\n{line(head)}\n{'-' * len(line(head))}")
    for r in rows:
        print(line(r))


def print_tables(out):
    summary = []
    for name, res in out["models"].items():
        for method, key in METHODS:
            if key in res:
                best = res["best"][method]
                summary.append([name, method, f"{res['dense']['error']:.2%}",
                                "-" if best is None else f"{best['compression']:.1f}x",
                                "-" if best is None else f"{best['error']:.2%}",
                                "-" if best is None else f"{best['nonzero']:,}/{best['weights']:,}",
                                f"{res['recipe']['dense_epochs']:g} + {res['recipe']['prune_epochs']:g}"])
    if summary:
        table("Unstructured: compression at test error <= dense + 0.1 % (epochs: dense + each pruning run)",
              ["model", "method", "dense err", "compression", "err", "non-zero/total", "epochs"], summary)
    for name, res in out["models"].items():
        if "gmp" in res:
            table(f"{name}: all runs", ["method", "sparsity", "err", "compression", "epochs", "density per layer"],
                  [[label + (f" r{r['round']}" if "round" in r else ""), f"{1 - r['nonzero'] / r['weights']:.4f}",
                    f"{r['error']:.2%}", f"{r['compression']:.1f}x", f"{r['epochs']:g}",
                    " ".join(f"{d:.3f}" for d in r["density_per_layer"])]
                   for label, key in (("GMP", "gmp"), ("secateur iter", "iterative_secateur"),
                                      ("torch iter", "iterative_torch")) for r in res[key]])
        if "reconstruction" in res:
            table(f"{name}: input-channel removal without fine-tuning (dense error "
                  f"{res['dense']['error']:.2%})", ["removed", "method", "err", "rel. output error"],
                  [[f"{r['removed_ratio']:.0%} ({r['of'] - r['kept']}/{r['of']})", r["method"], f"{r['error']:.2%}",
                    "-" if r["output_rel_error"] is None else f"{r['output_rel_error']:.3f}"]
                   for r in res["reconstruction"]])
        if "structured" in res:
            table("lenet5 structured (group lasso -> physical removal -> fine-tune)",
                  ["lambda", "err", "MACs", "MAC reduction", "layers", "epochs"],
                  [[f"{r['lambda']:g}", f"{r['error']:.2%}", f"{r['macs']:,}", f"{r['mac_reduction']:.1f}x",
                    " ".join("x".join(map(str, s)) for s in r["shapes"].values()), f"{r['epochs']:g}"]
                   for r in res["structured"]])


def plot(out_dir: Path) -> Path | None:
    """Test error vs compression (unstructured, per model and method) and vs MAC reduction (structured,
    the rows of every ``mnist*.json`` in ``out_dir`` together), written to ``out_dir/mnist.png``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed (pip install 'secateur[plot]'): no plot")
        return None
    panels, structured = [], {}
    for f in sorted(out_dir.glob("mnist*.json")):
        for name, res in json.loads(f.read_text())["models"].items():
            if any(key in res for _, key in METHODS):
                panels.append((f"{name}: unstructured", res, "unstructured"))
            if "structured" in res:  # every structured file's rows (several lambda sweeps) in one panel
                structured.setdefault(name, {"dense": res["dense"], "structured": []})["structured"] += \
                    res["structured"]
    panels += [(f"{name}: structured (group lasso)", res, "structured") for name, res in structured.items()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, res, kind) in zip(axes[0], panels):
        dense_err = 100 * res["dense"]["error"]
        if kind == "unstructured":
            for (label, key), marker in zip(METHODS, "osx"):
                rows = sorted(res.get(key, []), key=lambda r: r["compression"])
                ax.plot([r["compression"] for r in rows], [100 * r["error"] for r in rows], marker=marker,
                        label=label, alpha=0.8)
            ax.axhline(dense_err + 0.1, color="grey", ls="--", lw=1, label="dense + 0.1 %")
            ax.set_xlabel("compression (weights / non-zero)")
        else:
            rows = sorted(res["structured"], key=lambda r: r["mac_reduction"])
            ax.plot([r["mac_reduction"] for r in rows], [100 * r["error"] for r in rows], marker="o",
                    label="group lasso + removal + fine-tune")
            ax.axhline(1.0, color="grey", ls="--", lw=1, label="1.0 % target")
            ax.set_xlabel("MAC reduction (dense / pruned)")
        ax.axhline(dense_err, color="black", lw=1, label=f"dense {dense_err:.2f} %")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(  # label 2, 3, 5 of each decade only
            lambda v, _: f"{v:g}×" if f"{v:.0e}"[0] in "235" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_ylabel("test error (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "mnist.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(MODELS))
    ap.add_argument("--parts", nargs="+", default=["unstructured", "reconstruction"],
                    choices=["unstructured", "reconstruction", "structured"])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny budgets on 6k training images, results in a temporary directory")
    ap.add_argument("--lasso", type=float, nargs="+", default=None,
                    help="structured: group-lasso lambdas instead of the recipe's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default results/mnist.json, or "
                    "results/mnist_structured.json for --parts structured)")
    ap.add_argument("--plot-only", action="store_true", help="only redraw mnist.png from the JSON files")
    args = ap.parse_args(argv)
    if args.plot_only:
        log(f"wrote {plot(Path(args.out).parent if args.out else RESULTS)}")
        return None
    if args.out is None:
        root = Path(tempfile.mkdtemp(prefix="bench_mnist_")) if args.quick else RESULTS
        args.out = str(root / ("mnist_structured.json" if args.parts == ["structured"] else "mnist.json"))
    torch.set_num_threads(args.threads)
    ds = load_mnist(merge_val=True)
    t0 = time.time()
    out = {"command": " ".join(["python", *sys.argv]) if argv is None else f"main({argv})",
           "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "threads": args.threads, "train_images": len(ds.y_train), "test_images": len(ds.y_test), "models": {}}
    for name in args.models:
        rc = (QUICK if args.quick else RECIPES)[name]
        if args.lasso is not None and rc.lasso:
            rc = replace(rc, lasso=tuple(args.lasso))
        if rc.train_subset:
            ds = type(ds)(ds.x_train[:rc.train_subset], ds.y_train[:rc.train_subset], ds.x_test, ds.y_test)
        t_model = time.time()
        base, dres = dense(name, ds, rc, args.seed)
        bound = dres["error"] + 0.001
        res = out["models"][name] = {"dense": dres, "bound": bound, "recipe": asdict(rc)}
        if "structured" in args.parts and rc.lasso:
            res["structured"] = [structured_lenet5(ds, base, rc, lam, args.seed) for lam in rc.lasso]
            ok = [r for r in res["structured"] if r["error"] <= 0.01 + 1e-12]
            res["best_structured"] = max(ok, key=lambda r: r["mac_reduction"]) if ok else None
        if "reconstruction" in args.parts:
            # layer 1: fc2's inputs (fc1 neurons) of LeNet-300-100, conv2's inputs (conv1 filters) of LeNet-5
            res["reconstruction"] = reconstruction(name, ds, base, 1, [0.5, 0.75],
                                                   5000 if name == "lenet300" else 1000, args.seed)
        if "unstructured" in args.parts:
            res["gmp"] = gmp(name, ds, base, rc, args.seed)
            res["iterative_secateur"] = iterative(name, ds, base, rc, args.seed, "secateur")
            res["iterative_torch"] = iterative(name, ds, base, rc, args.seed, "torch")
            res["best"] = {method: best_within(res[key], bound) for method, key in METHODS}
        res["seconds"] = time.time() - t_model
    out["seconds"] = time.time() - t0
    print_tables(out)
    print(f"\ntotal {out['seconds']:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")
    png = plot(Path(args.out).parent)
    if png:
        print(f"wrote {png}")
    return out


if __name__ == "__main__":
    main()
