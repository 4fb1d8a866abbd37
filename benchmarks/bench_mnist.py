"""Training-aware pruning on real MNIST (issue 4's evidence).

Unstructured, for LeNet-300-100 and LeNet-5 (Caffe: conv 20, conv 50, fc 800-500-10):
  * dense baseline;
  * secateur GMP (Zhu & Gupta cubic schedule, global magnitude) to a few final sparsities;
  * secateur iterative magnitude pruning (global, geometric rounds, fine-tuning with masks held);
  * torch.nn.utils.prune iterative magnitude pruning (global_unstructured, L1) at the SAME training budget,
    same data order, same optimizer;
  compression = prunable weights / non-zero weights, at test error <= dense + 0.1 %.
Structured, LeNet-5: group lasso (proximal) over the structural engine's channel groups, then physical
removal of the zeroed channels/neurons with `secateur.structured.prune_channels`, then fine-tuning; MAC
reduction at test error <= 1.0 %.
Reconstruction: remove input channels of one layer without any fine-tuning, plain removal vs least-squares
reconstruction (magnitude choice) vs ThiNet greedy choice + reconstruction, same ratio.

Budgets are in epochs over the 50k training images (``--epochs``: dense training; every pruning method
gets the same budget ``--prune-epochs``). Like the papers we compare with, errors are on the 10k test set
and the best sparsity meeting the bound is read off the runs; the validation split is not used.

    python benchmarks/bench_mnist.py                 # default budget, ~8 min of one core
    python benchmarks/bench_mnist.py --epochs 1 --prune-epochs 1 --models lenet300   # quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn

from secateur import prune
from secateur.data import load_mnist
from secateur.reconstruct import capture_inputs, choose_channels, reconstruct_
from secateur.regularize import GroupLasso, channel_groups
from secateur.schedules import GMP, PruningScheduler
from secateur.training import evaluate, fine_tune

RESULTS = Path(__file__).parent / "results"
BATCH = 128
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4


# ------------------------------------------------------------------------------------------- models


def lenet300() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def lenet5() -> nn.Module:
    """Caffe's LeNet: no non-linearity between the convolutions, ReLU after ip1."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


MODELS = {"lenet300": lenet300, "lenet5": lenet5}


# --------------------------------------------------------------------------------------------- data


class Stream:
    """Shuffled mini-batches; each iteration yields the next ``epochs`` worth of batches of one seeded
    stream, so every method sees exactly the same data in the same order for the same budget."""

    def __init__(self, x, y, seed: int, epochs: float = 1.0):
        self.x, self.y, self.seed, self.epochs = x, y, seed, epochs
        self.per_epoch = math.ceil(len(y) / BATCH)
        self.pos = 0

    def steps(self, epochs: float) -> int:
        return max(1, round(epochs * self.per_epoch))

    def __iter__(self):
        for _ in range(self.steps(self.epochs)):
            epoch, b = divmod(self.pos, self.per_epoch)
            if getattr(self, "_epoch", None) != epoch:
                self._perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed + epoch))
                self._epoch = epoch
            idx = self._perm[b * BATCH:(b + 1) * BATCH]
            self.pos += 1
            yield self.x[idx], self.y[idx]


def test_batches(ds):
    return [(ds.x_test[i:i + 2000], ds.y_test[i:i + 2000]) for i in range(0, len(ds.y_test), 2000)]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def compression(model) -> tuple[int, int]:
    """(prunable weights, non-zero weights) over Linear/Conv weights (biases not counted, as Han et al.)."""
    total = sum(m.weight.numel() for m in weights(model))
    nz = sum(int(torch.count_nonzero(m.weight.detach())) for m in weights(model))
    return total, nz


def plain_train(model, stream, opt):
    model.train()
    for x, y in stream:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def log(msg):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- experiments


def dense(name, ds, epochs, seed):
    torch.manual_seed(seed)
    model = MODELS[name]()
    stream = Stream(ds.x_train, ds.y_train, seed=seed, epochs=epochs)
    opt = sgd(model)
    t = time.time()
    fine_tune(model, stream, opt, epochs=1, progress=f"{name} dense")
    err = 1 - evaluate(model, test_batches(ds))
    log(f"[{name}] dense: error {err:.2%} ({time.time() - t:.0f}s)")
    return model, {"error": err, "epochs": epochs, "seconds": time.time() - t}


def clone(name, model):
    twin = MODELS[name]()
    twin.load_state_dict(model.state_dict())
    return twin


def gmp(name, ds, base, targets, budget, seed):
    rows = []
    for s in targets:
        model = clone(name, base)
        stream = Stream(ds.x_train, ds.y_train, seed=seed + 1, epochs=budget)
        steps = stream.steps(budget)
        # prune over the first 3/4 of the budget, ~25 mask updates; the last quarter recovers
        end = int(0.75 * steps)
        sched = PruningScheduler(model, GMP(final=s, start=0, end=end, frequency=max(1, end // 25)), scope="global")
        t = time.time()
        fine_tune(model, stream, sgd(model), epochs=1, scheduler=sched, progress=f"{name} GMP {s:.3f}")
        err = 1 - evaluate(model, test_batches(ds))
        total, nz = compression(model)
        rows.append({"target": s, "error": err, "weights": total, "nonzero": nz, "compression": total / nz,
                     "epochs": budget, "seconds": time.time() - t})
        log(f"[{name}] GMP -> {s:.3f}: error {err:.2%}, compression {total / nz:.1f}x ({time.time() - t:.0f}s)")
    return rows


def iterative_secateur(name, ds, base, rounds, rate, budget, seed):
    model = clone(name, base)
    stream = Stream(ds.x_train, ds.y_train, seed=seed + 2, epochs=budget / rounds)
    rows, level, t = [], 0.0, time.time()
    for r in range(1, rounds + 1):
        level = 1 - (1 - level) * (1 - rate)
        prune(model, amount=level, scope="global")
        fine_tune(model, stream, sgd(model), epochs=1)
        err = 1 - evaluate(model, test_batches(ds))
        total, nz = compression(model)
        rows.append({"round": r, "target": level, "error": err, "weights": total, "nonzero": nz,
                     "compression": total / nz, "epochs": budget * r / rounds, "seconds": time.time() - t})
        log(f"[{name}] secateur iterative round {r}: sparsity {1 - nz / total:.4f} error {err:.2%}")
    return rows


def iterative_torch(name, ds, base, rounds, rate, budget, seed):
    model = clone(name, base)
    stream = Stream(ds.x_train, ds.y_train, seed=seed + 2, epochs=budget / rounds)  # same data as secateur's
    params = [(m, "weight") for m in weights(model)]
    rows, t = [], time.time()
    for r in range(1, rounds + 1):
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=rate)
        plain_train(model, stream, sgd(model))
        err = 1 - evaluate(model, test_batches(ds))
        total, nz = compression(model)
        rows.append({"round": r, "error": err, "weights": total, "nonzero": nz, "compression": total / nz,
                     "epochs": budget * r / rounds, "seconds": time.time() - t})
        log(f"[{name}] torch.nn.utils.prune iterative round {r}: sparsity {1 - nz / total:.4f} error {err:.2%}")
    return rows


def best_within(rows, bound):
    ok = [r for r in rows if r["error"] <= bound + 1e-12]
    return max(ok, key=lambda r: r["compression"]) if ok else None


def structured_lenet5(ds, base, lam, budget, finetune, seed):
    from secateur.metrics import count_macs
    from secateur.structured import prune_channels
    example = ds.x_test[:1]
    model = clone("lenet5", base)
    macs0 = count_macs(model, example)
    groups = channel_groups(model, example_inputs=example)
    reg = GroupLasso(tuple(groups), lam=lam, size_weighted=True)
    stream = Stream(ds.x_train, ds.y_train, seed=seed + 3, epochs=budget)
    t = time.time()
    fine_tune(model, stream, sgd(model), epochs=1, regularizer=reg, progress=f"lenet5 group lasso {lam:g}")
    err_sparse = 1 - evaluate(model, test_batches(ds))
    zero = sum(int((n == 0).sum()) for n in reg.norms(model))
    result = prune_channels(model, example, ratio=0.0, threshold=1e-12, importance="l2", scope="global")
    macs1 = count_macs(model, example)
    err_pruned = 1 - evaluate(model, test_batches(ds))
    stream2 = Stream(ds.x_train, ds.y_train, seed=seed + 4, epochs=finetune)
    fine_tune(model, stream2, sgd(model), epochs=1)
    err = 1 - evaluate(model, test_batches(ds))
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    row = {"lambda": lam, "groups_zeroed": zero, "error_after_lasso": err_sparse, "error_after_removal": err_pruned,
           "error": err, "macs_dense": macs0, "macs": macs1, "mac_reduction": macs0 / macs1,
           "params": sum(p.numel() for p in model.parameters()), "shapes": {k: list(v) for k, v in shapes.items()},
           "epochs": budget + finetune, "seconds": time.time() - t, "engine": str(result).splitlines()[0]}
    log(f"[lenet5] group lasso {lam:g}: zeroed {zero} channels, error {err_sparse:.2%} -> removed {err_pruned:.2%} "
        f"-> fine-tuned {err:.2%}; MACs {macs0:,} -> {macs1:,} ({macs0 / macs1:.1f}x); layers {shapes}")
    return row


def reconstruction(name, ds, base, layer_index, ratios, calib, seed):
    """Remove input channels of the ``layer_index``-th Linear/Conv without fine-tuning."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.y_train), generator=g)[:calib]
    batches = [ds.x_train[idx[i:i + 500]] for i in range(0, calib, 500)]
    dense_err = 1 - evaluate(base, test_batches(ds))
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
            err = 1 - evaluate(model, test_batches(ds))
            rows.append({"layer": layer_index, "removed_ratio": ratio, "kept": n_keep, "of": c, "method": method,
                         "error": err, "dense_error": dense_err,
                         "output_rel_error": None if errs is None else errs["reconstructed"]})
            log(f"[{name}] remove {ratio:.0%} inputs of layer {layer_index}: {method}: error {err:.2%}")
    return rows


# ------------------------------------------------------------------------------------------ report


def table(title, head, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)] if rows else \
        [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(f"\n{title}\n{line(head)}\n{'-' * len(line(head))}")
    for r in rows:
        print(line(r))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(MODELS))
    ap.add_argument("--epochs", type=float, default=None, help="dense training epochs (default 5 / 2)")
    ap.add_argument("--prune-epochs", type=float, default=None,
                    help="training budget of each pruning method (default 5 / 1.5)")
    ap.add_argument("--rounds", type=int, default=8, help="iterative pruning rounds within the budget")
    ap.add_argument("--rate", type=float, default=0.4, help="fraction of surviving weights pruned per round")
    ap.add_argument("--gmp", type=float, nargs="+", default=None, help="GMP final sparsities")
    ap.add_argument("--lasso", type=float, nargs="+", default=[3e-4, 7e-4],
                    help="size-weighted group-lasso lambdas (LeNet-5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "mnist.json"))
    ap.add_argument("--parts", nargs="+", default=["unstructured", "reconstruction", "structured"],
                    choices=["unstructured", "reconstruction", "structured"])
    ap.add_argument("--finetune-epochs", type=float, default=None,
                    help="structured: fine-tuning after removal (default: the pruning budget)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_mnist()
    t0 = time.time()
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "threads": args.threads, "models": {}}
    defaults = {"lenet300": (5.0, 5.0, [0.9, 0.95, 0.98]), "lenet5": (2.0, 1.5, [0.9, 0.95])}
    summary = []
    for name in args.models:
        d_ep, p_ep, targets = defaults[name]
        d_ep = args.epochs if args.epochs is not None else d_ep
        p_ep = args.prune_epochs if args.prune_epochs is not None else p_ep
        targets = args.gmp or targets
        base, dres = dense(name, ds, d_ep, args.seed)
        bound = dres["error"] + 0.001
        res = {"dense": dres, "bound": bound, "budget_epochs": p_ep}
        out["models"][name] = res
        if "structured" in args.parts and name == "lenet5":
            ft = args.finetune_epochs if args.finetune_epochs is not None else p_ep
            res["structured"] = [structured_lenet5(ds, base, lam, p_ep, ft, args.seed) for lam in args.lasso]
        if "reconstruction" in args.parts:
            # layer 1: fc2's inputs (fc1 neurons) of LeNet-300-100, conv2's inputs (conv1 filters) of LeNet-5
            res["reconstruction"] = reconstruction(name, ds, base, 1, [0.5, 0.75],
                                                   5000 if name == "lenet300" else 1000, args.seed)
        if "unstructured" not in args.parts:
            continue
        res["gmp"] = gmp(name, ds, base, targets, p_ep, args.seed)
        res["iterative_secateur"] = iterative_secateur(name, ds, base, args.rounds, args.rate, p_ep, args.seed)
        res["iterative_torch"] = iterative_torch(name, ds, base, args.rounds, args.rate, p_ep, args.seed)
        for method, rows in (("secateur GMP", res["gmp"]), ("secateur iterative", res["iterative_secateur"]),
                             ("torch.nn.utils.prune iterative", res["iterative_torch"])):
            best = best_within(rows, bound)
            summary.append([name, method, f"{dres['error']:.2%}",
                            "-" if best is None else f"{best['compression']:.1f}x",
                            "-" if best is None else f"{best['error']:.2%}",
                            "-" if best is None else f"{best['nonzero']:,}/{best['weights']:,}",
                            f"{d_ep:g} + {p_ep:g}"])
            res.setdefault("best", {})[method] = best
    out["seconds"] = time.time() - t0
    if summary:
        table("Unstructured: compression at test error <= dense + 0.1 % (budget: dense epochs + pruning epochs)",
              ["model", "method", "dense err", "compression", "err", "non-zero/total", "epochs"], summary)
    for name, res in out["models"].items():
        if "gmp" in res:
            table(f"{name}: all runs", ["method", "sparsity", "err", "compression", "epochs"],
                  [["GMP", f"{1 - r['nonzero'] / r['weights']:.4f}", f"{r['error']:.2%}", f"{r['compression']:.1f}x",
                    f"{r['epochs']:g}"] for r in res["gmp"]] +
                  [[f"secateur iter r{r['round']}", f"{1 - r['nonzero'] / r['weights']:.4f}", f"{r['error']:.2%}",
                    f"{r['compression']:.1f}x", f"{r['epochs']:g}"] for r in res["iterative_secateur"]] +
                  [[f"torch iter r{r['round']}", f"{1 - r['nonzero'] / r['weights']:.4f}", f"{r['error']:.2%}",
                    f"{r['compression']:.1f}x", f"{r['epochs']:g}"] for r in res["iterative_torch"]])
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
    print(f"\ntotal {out['seconds']:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
