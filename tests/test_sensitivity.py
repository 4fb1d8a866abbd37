"""Sensitivity scan (exact restore, values against torch.nn.utils.prune) and allocation (target met,
minimax-optimal against brute force, align)."""
import copy
import itertools

import pytest
import torch
import torch.nn.utils.prune as tprune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateur
from secateur.errors import PruningError
from secateur.masks import masks_of
from secateur.sensitivity import SensitivityResult, allocate, as_sensitivity, sensitivity


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(32, 12)


def fidelity(ref_model):
    with torch.no_grad():
        ref = ref_model(X).clone()

    def metric(m):
        with torch.no_grad():
            return -float((m(X) - ref).pow(2).mean())
    return metric


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scan_restores_model_exactly_and_matches_torch_prune():
    m = mlp()
    before = snapshot(m)
    metric = fidelity(m)
    calls = []
    res = sensitivity(m, lambda mod: calls.append(1) or metric(mod), ratios=(0.25, 0.5, 0.75), progress=False)
    assert same_state(before, snapshot(m)) and not secateur.is_pruned(m)
    assert len(calls) == 1 + 3 * 3 and list(res.curves) == ["0", "2", "4"]
    assert res.baseline == 0.0
    for name in res.curves:
        for r in (0.25, 0.5, 0.75):
            twin = mlp()
            tprune.l1_unstructured(dict(twin.named_modules())[name], "weight", amount=r)
            assert res.curves[name][r] == pytest.approx(metric(twin), rel=1e-6, abs=1e-12)
    # more pruning of one layer never helps fidelity here
    for c in res.curves.values():
        assert c[0.25] >= c[0.5] >= c[0.75]


def test_scan_restores_existing_masks():
    m = mlp()
    secateur.prune(m, 0.3)
    masks = {k: v.clone() for k, v in masks_of(m).items()}
    before = snapshot(m)
    sensitivity(m, fidelity(m), ratios=(0.5, 0.9), progress=False)
    assert same_state(before, snapshot(m))
    assert all(torch.equal(masks[k], v) for k, v in masks_of(m).items())


def test_scan_restores_after_evaluate_raises():
    m = mlp()
    before = snapshot(m)
    n = [0]

    def flaky(mod):
        n[0] += 1
        if n[0] == 3:
            raise RuntimeError("metric failed")
        return 0.0
    with pytest.raises(RuntimeError):
        sensitivity(m, flaky, ratios=(0.5, 0.9), progress=False)
    assert same_state(before, snapshot(m)) and not secateur.is_pruned(m)


def test_structural_scan_matches_ln_structured():
    m = mlp()
    metric = fidelity(m)
    res = sensitivity(m, metric, ratios=(0.5,), structural=True, layers=["2"], progress=False)
    twin = mlp()
    tprune.ln_structured(twin[2], "weight", amount=0.5, n=1, dim=0)
    assert res.curves["2"][0.5] == pytest.approx(metric(twin), rel=1e-6)
    assert res.structural and res.rows["2"] == 16


def test_costs_recorded_with_inputs():
    m = mlp()
    res = sensitivity(m, fidelity(m), ratios=(0.5,), example_inputs=X[:2], progress=False)
    assert res.costs["params"]["2"] == 16 * 16
    assert res.costs["macs"]["2"] == 2 * 16 * 16
    assert set(res.costs["latency"]) == {"0", "2", "4"} and all(v > 0 for v in res.costs["latency"].values())


def test_table_json_and_plot(tmp_path):
    m = mlp()
    res = sensitivity(m, fidelity(m), ratios=(0.3, 0.6), progress=False)
    assert len(str(res).splitlines()) == 2 + 3 + 1
    back = as_sensitivity(res.to_dict())
    assert back.curves == res.curves and back.baseline == res.baseline
    res.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_scan_input():
    m = mlp()
    for ratios in ((0.0, 0.5), (1.0,), ()):
        with pytest.raises(PruningError):
            sensitivity(m, fidelity(m), ratios=ratios, progress=False)
    with pytest.raises(PruningError):
        sensitivity(m, "not callable", progress=False)
    with pytest.raises(PruningError):
        sensitivity(m, fidelity(m), layers=["nope"], progress=False)


@pytest.mark.parametrize("ratios, match", [
    (["a"], "ratios must be numbers in \\(0, 1\\).*'a'"),
    (["0.5"], "ratios must be numbers"),
    ([True], "ratios must be numbers"),
    (None, "ratios must be a list of numbers in \\(0, 1\\), not NoneType"),
    (0.5, "ratios must be a list of numbers"),
])
def test_scan_refuses_non_numeric_ratios_unchanged(ratios, match):
    m = mlp()
    before = snapshot(m)
    with pytest.raises(PruningError, match=match):
        sensitivity(m, fidelity(m), ratios=ratios, progress=False)
    assert same_state(before, snapshot(m))


# ------------------------------------------------------------------------------------------ allocate

GRID = (0.2, 0.4, 0.6, 0.8)


def synthetic(losses, costs, rows=None):
    """A SensitivityResult from per-layer loss lists on GRID (metric = -loss, baseline 0)."""
    curves = {n: {r: -l for r, l in zip(GRID, ls)} for n, ls in losses.items()}
    return SensitivityResult(curves, 0.0, True, False, {"macs": costs, "params": costs},
                             rows or {n: 16 for n in losses})


curve = st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4).map(lambda v: sorted(v))


@settings(max_examples=60, deadline=None)
@given(st.lists(curve, min_size=2, max_size=4), st.lists(st.integers(1, 50), min_size=4, max_size=4),
       st.floats(0.05, 0.75))
def test_allocation_meets_target_with_minimax_loss(curves, costs, fraction):
    names = [f"l{i}" for i in range(len(curves))]
    sens = synthetic(dict(zip(names, curves)), {n: float(c) for n, c in zip(names, costs)})
    total = sum(costs[:len(names)])
    saving = lambda rs: sum(rs[n] * c for n, c in zip(names, costs)) / total  # noqa: E731
    try:
        alloc = allocate(sens, "macs", fraction)
    except PruningError:
        assert saving({n: GRID[-1] for n in names}) < fraction  # only when even the top ratios fall short
        return
    assert saving(alloc.ratios) >= fraction - 1e-9
    assert all(0 <= r <= GRID[-1] for r in alloc.ratios.values())
    worst = max(max([0.0, *(sens.loss(n, r) for r in GRID if r <= alloc.ratios[n] + 1e-12)]) for n in names)
    # brute force over the measured grid: no combination meeting the target has a smaller worst loss
    best = min((max([0.0, *(sens.loss(n, r) for n, r in zip(names, combo) if r > 0)])
                for combo in itertools.product((0.0,) + GRID, repeat=len(names))
                if saving(dict(zip(names, combo))) >= fraction), default=None)
    assert best is not None and alloc.threshold <= best + 1e-6
    assert worst <= alloc.threshold + 1e-6 or worst <= best + 1e-6


def test_align_rounds_kept_rows_towards_more_pruning():
    sens = synthetic({"a": [0, 0.1, 0.2, 0.3], "b": [0, 0.05, 0.1, 0.5]}, {"a": 10.0, "b": 10.0},
                     rows={"a": 30, "b": 64})
    plain = allocate(sens, "macs", 0.35)
    aligned = allocate(sens, "macs", 0.35, align=8)
    for n, rows in (("a", 30), ("b", 64)):
        kept = round((1 - aligned.ratios[n]) * rows)
        assert kept % 8 == 0 or kept == rows
    assert any(aligned.ratios[n] != plain.ratios[n] for n in ("a", "b"))
    # rounding only ever adds pruning, so the aligned plan needs no higher loss threshold
    assert aligned.predicted_saving >= 0.35 and aligned.threshold <= plain.threshold + 1e-9


def test_allocation_errors():
    sens = synthetic({"a": [0, 0.1, 0.2, 0.3]}, {"a": 1.0})
    with pytest.raises(PruningError, match="fraction"):
        allocate(sens, "macs", 1.5)
    with pytest.raises(PruningError, match="unknown allocation target"):
        allocate(sens, "flops", 0.5)
    with pytest.raises(PruningError, match="only"):
        allocate(sens, "macs", 0.9)  # the scan stops at 0.8
    for bad in ("x", -1, 0, 1.5, float("nan"), True):
        with pytest.raises(PruningError, match=r"max_ratio .* must lie in \(0, 1\]"):
            allocate(sens, "macs", 0.3, max_ratio=bad)
    assert allocate(sens, "macs", 0.3, max_ratio=0.5).ratios["a"] <= 0.5
    sens.costs.pop("macs")
    with pytest.raises(PruningError, match="example_inputs"):
        allocate(sens, "macs", 0.5)


def test_allocate_and_apply_masks_end_to_end():
    m = mlp()
    res = sensitivity(m, fidelity(m), example_inputs=X[:4], progress=False)
    alloc = allocate(res, "params", 0.5)
    alloc.apply(m)
    pruned = sum(int((~mk).sum()) for mk in masks_of(m).values())
    total = sum(mod.weight.numel() for mod in m if isinstance(mod, nn.Linear))
    assert pruned >= 0.5 * total - 3  # per-layer rounding of counts
    # the most sensitive layer is pruned least
    ordered = sorted(alloc.ratios, key=lambda n: res.loss(n, 0.9))
    assert alloc.ratios[ordered[0]] >= alloc.ratios[ordered[-1]]


def test_allocate_and_apply_structural():
    pytest.importorskip("secateur.structured")
    m = mlp()
    res = sensitivity(m, fidelity(m), structural=True, layers=["0", "2"], example_inputs=X[:4], progress=False)
    alloc = allocate(res, "macs", 0.3)
    x = X[:4]
    from secateur.metrics import count_macs
    macs0 = count_macs(m, x)
    out = alloc.apply(m, x)
    assert out is m and not secateur.is_pruned(m)
    assert m[0].out_features < 16 or m[2].out_features < 16
    assert count_macs(m, x) < macs0
    with pytest.raises(PruningError):
        alloc.apply(copy.deepcopy(m))  # structural needs inputs
