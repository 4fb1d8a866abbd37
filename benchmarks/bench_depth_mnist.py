"""Depth vs width on a trained residual CNN and real MNIST: accuracy and CPU speedup at the same MACs.

A small ResNet (stem, 3 residual blocks at 32 channels, a downsampling block, 3 residual blocks at 64 channels) is
trained on the 60k MNIST training images; then each method prunes a copy to the same MACs target:
  * width: ``prune_channels(target_macs=1/t)``, one uniform L1 ratio (no ``round_to``: at 32-64 channels a multiple
    of 8 is a 12-25 % step, which would overshoot the target);
  * depth first: ``drop_blocks(target_macs=1/t, stay_above=True)`` (lowest output change on 1,024 training images
    first, every block that fits above the target) then ``prune_channels`` for the rest of the target;
  * Torch-Pruning 1.6.1 (L1, iterative steps to the target), when installed.
Pruned without fine-tuning, all three fall to chance on this BatchNorm net (removing channels shifts what the next
BatchNorm sees), so the comparison is after the recovery fine-tuning, which is the same for all.
Each pruned copy is scored on the 10k test images before and after the same recovery fine-tuning (SGD + Nesterov,
cosine learning rate), and timed interleaved with the dense model on the CPU (batch 1 and 8, 2 threads).

    .venv/bin/python benchmarks/bench_depth_mnist.py [--targets 2 3] [--epochs 3] [--ft-epochs 1]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from secateur.data import load_mnist
from secateur.metrics import count_macs, count_params
from secateur.structured import drop_blocks, droppable_blocks, prune_channels
from _results import write_results


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet_mnist() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Sequential(Block(32, 32), Block(32, 32), Block(32, 32)),
                         nn.Sequential(Block(32, 64, 2), Block(64, 64), Block(64, 64), Block(64, 64)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def batches(x, y, size, gen=None):
    order = torch.randperm(len(x), generator=gen) if gen is not None else torch.arange(len(x))
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def train(model, data, epochs, lr, seed, log):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * math.ceil(len(data.x_train) / 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for ep in range(epochs):
        t0, total, n = time.perf_counter(), 0.0, 0
        for xb, yb in batches(data.images(data.x_train), data.y_train, 128, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + float(loss.detach()), n + 1
        log(f"    epoch {ep + 1}/{epochs}: loss {total / n:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    hits = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in batches(data.images(data.x_test),
                                                                           data.y_test, 1000))
    return hits / len(data.y_test)


@torch.no_grad()
def timings(models: dict[str, nn.Module], batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, 1, 28, 28)
    times = {k: [] for k in models}
    for m in models.values():
        for _ in range(5):
            m(x)
    names = list(models)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotated, interleaved
            t = time.perf_counter()
            models[k](x)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def prune_tp(model, x, target):
    import torch_pruning as tp
    base = count_macs(model, x)
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.9,
                                  iterative_steps=90, ignored_layers=[model[-1]])
    for _ in range(90):
        pruner.step()
        if base / count_macs(model, x) >= target:
            return model
    raise RuntimeError(f"Torch-Pruning did not reach {target}x")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "depth_mnist.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    data = load_mnist(merge_val=True)
    torch.manual_seed(args.seed)
    dense = resnet_mnist()
    log(f"training the dense ResNet on {len(data.x_train)} MNIST images, {args.epochs} epochs")
    train(dense, data, args.epochs, 0.05, args.seed, log)
    calib = data.images(data.x_train[:1024])
    x1 = calib[:1]
    base_macs, base_acc = count_macs(dense, x1), accuracy(dense, data)
    log(f"dense: {base_macs / 1e6:.2f} M MACs, {count_params(dense):,} params, test accuracy {base_acc:.4f}; "
        f"droppable blocks: {droppable_blocks(dense, x1)}")
    methods = {
        "width": lambda m, t: prune_channels(m, calib, target_macs=1 / t),
        "depth first": lambda m, t: _depth_first(m, calib, t),
    }
    try:
        import torch_pruning  # noqa: F401
        methods["Torch-Pruning"] = lambda m, t: prune_tp(m, x1, t)
    except ImportError:
        log("torch-pruning not installed: its rows are left out")
    rows, pruned = [], {"dense": dense}
    for t in args.targets:
        for name, fn in methods.items():
            m = copy.deepcopy(dense)
            fn(m, t)
            m.eval()
            acc0 = accuracy(m, data)
            train(m, data, args.ft_epochs, 0.01, args.seed + 1, log)
            acc1 = accuracy(m, data)
            blocks = sum(1 for b in (*m[3], *m[4]) if isinstance(b, Block))
            row = dict(target=t, method=name, macs_reduction=base_macs / count_macs(m, x1), params=count_params(m),
                       blocks=blocks, acc_pruned=acc0, acc_fine_tuned=acc1)
            rows.append(row)
            pruned[f"{name} {t:g}x"] = m
            log(f"  {t:g}x {name:<14} MACs /{row['macs_reduction']:.2f}, {blocks} blocks: accuracy {acc0:.4f} "
                f"-> {acc1:.4f} after {args.ft_epochs} epoch(s) of fine-tuning")
    for batch in (1, 8):
        med = timings(pruned, batch, args.repeats)
        for r in rows:
            k = f"{r['method']} {r['target']:g}x"
            r[f"speedup_b{batch}"] = med["dense"] / med[k]
            r[f"efficiency_b{batch}"] = r[f"speedup_b{batch}"] / r["macs_reduction"]
    log(f"\ndense test accuracy {base_acc:.4f} ({base_macs / 1e6:.2f} M MACs)")
    log(f"{'target':>6} {'method':<14} {'MACs red':>8} {'blocks':>6} {'acc pruned':>10} {'acc ft':>7} "
        f"{'sp b1 (eff)':>13} {'sp b8 (eff)':>13}")
    for r in rows:
        log(f"{r['target']:>5g}x {r['method']:<14} {r['macs_reduction']:>7.2f}x {r['blocks']:>6d} "
            f"{r['acc_pruned']:>10.4f} {r['acc_fine_tuned']:>7.4f} {r['speedup_b1']:>6.2f}x ({r['efficiency_b1']:.2f})"
            f" {r['speedup_b8']:>6.2f}x ({r['efficiency_b8']:.2f})")
    result = dict(dense=dict(macs=base_macs, params=count_params(dense), accuracy=base_acc),
                  args=vars(args), rows=rows, torch=torch.__version__, machine=platform.machine(),
                  python=sys.version.split()[0])
    write_results(args.out, result)
    return result


def _depth_first(model, calib, target):
    """Blocks first (lowest output change first, as many as the target needs), then width for the rest."""
    base = count_macs(model, calib[:1])
    drop_blocks(model, calib, target_macs=1 / target, stay_above=True)
    left = base / (target * count_macs(model, calib[:1]))
    if left < 1:
        prune_channels(model, calib, target_macs=left)


if __name__ == "__main__":
    main()
