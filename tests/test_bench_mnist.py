"""The MNIST benchmark's own machinery: augmentation, the shared data stream that makes budgets equal,
the learning-rate schedule, the choice of the best run, and the torch.nn.utils.prune rounds matching
secateur's (same masks), plus a --quick smoke run (slow)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_mnist")

from secateur import get_mask, prune  # noqa: E402


def test_shift_zero_is_identity():
    x = torch.rand(4, 784)
    assert bench.shift_images(x, 0, torch.Generator().manual_seed(0)) is x


def test_shift_moves_each_image_by_its_own_offset():
    # one lit pixel in the middle of each image: after the shift it sits at (14 + dy, 14 + dx), |d| <= s
    x = torch.zeros(64, 28, 28)
    x[:, 14, 14] = 1.0
    y = bench.shift_images(x.reshape(64, 784), 2, torch.Generator().manual_seed(0)).reshape(64, 28, 28)
    assert torch.equal(y.sum((1, 2)), torch.ones(64))  # nothing lost, nothing duplicated
    pos = y.reshape(64, -1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert int((rows - 14).abs().max()) <= 2 and int((cols - 14).abs().max()) <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # offsets drawn per image, not per batch
    again = bench.shift_images(x.reshape(64, 784), 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, y.reshape(64, 784))


def test_streams_with_one_seed_give_the_same_batches():
    x, y = torch.rand(300, 784), torch.randint(0, 10, (300,))
    a = bench.Stream(x, y, seed=3, epochs=1.5, shift=1)
    b = bench.Stream(x, y, seed=3, epochs=1.5, shift=1)
    assert a.steps() == round(1.5 * math.ceil(300 / bench.BATCH))
    for _ in range(2):  # the second pass goes on where the first stopped, identically for both
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = torch.cat([yb for _, yb in bench.Stream(x, y, seed=3, epochs=1, shift=0)])
    assert sorted(labels.tolist()) == sorted(y.tolist())  # one epoch visits every image once


def test_cosine_schedule_runs_from_peak_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    on_step = bench.cosine(opt, 0.2, 10)
    seen = [opt.param_groups[0]["lr"]]
    for s in range(10):
        on_step(s, None)
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == 0.2 and seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_best_within_takes_the_highest_compression_under_the_bound():
    rows = [{"error": 0.010, "compression": 5}, {"error": 0.012, "compression": 50},
            {"error": 0.0109, "compression": 20}, {"error": 0.011, "compression": 30}]
    assert bench.best_within(rows, 0.011)["compression"] == 30
    assert bench.best_within(rows, 0.005) is None


def test_levels_are_geometric_and_end_at_final():
    rc = bench.RECIPES["lenet5"]
    lv = bench.levels(rc)
    assert len(lv) == rc.rounds and lv[-1] == pytest.approx(rc.final)
    kept = [1 - s for s in [0.0, *lv]]
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


def test_torch_rounds_give_the_same_masks_as_secateur_rounds():
    """The benchmark's torch.nn.utils.prune amounts (a fraction of the survivors) reach the same global
    masks as secateur's absolute sparsity targets, round after round."""
    torch.manual_seed(0)
    a = bench.lenet5()
    b = bench.lenet5()
    b.load_state_dict(a.state_dict())
    params = [(m, "weight") for m in bench.weights(b)]
    rc = bench.RECIPES["lenet5"]
    prev = 0.0
    for level in bench.levels(rc)[:4]:
        prune(a, amount=level, scope="global")
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=1 - (1 - level) / (1 - prev))
        prev = level
        for ma, mb in zip(bench.weights(a), bench.weights(b)):
            assert torch.equal(get_mask(ma, "weight"), mb.weight_mask.bool())


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mnist.json"
    bench.main(["--quick", "--models", "lenet300", "--parts", "unstructured", "--out", str(out)])
    res = json.loads(out.read_text())["models"]["lenet300"]
    assert res["bound"] == pytest.approx(res["dense"]["error"] + 0.001)
    for key in ("gmp", "iterative_secateur", "iterative_torch"):
        for r in res[key]:
            assert r["compression"] == pytest.approx(r["weights"] / r["nonzero"])
            assert 1 - r["nonzero"] / r["weights"] == pytest.approx(r["target"], abs=2e-3)
    assert (tmp_path / "mnist.png").stat().st_size > 0
    # a second run loads the cached dense model: same dense error, no retraining
    bench.main(["--quick", "--models", "lenet300", "--parts", "reconstruction", "--out", str(out)])
    again = json.loads(out.read_text())["models"]["lenet300"]
    assert again["dense"]["error"] == res["dense"]["error"] and "cached" in again["dense"]
