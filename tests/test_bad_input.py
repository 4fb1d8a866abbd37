"""Bad input to the structural, depth and latency calls: a PruningError naming the value, and the model unchanged.
(Found by an audit of 521 probes; each case here was a raw TypeError / RuntimeError / AttributeError, or a call that
went through and did something other than asked.)"""
import copy
import math

import pytest
import torch
from torch import nn

import secateur
from secateur import PruningError
from secateur.latency import benchmark_latency, compare_latency
from secateur.latency_model import LatencyTable
from secateur.structured import drop_blocks, droppable_blocks, score_blocks

torch.set_num_threads(1)


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(Res(8), Res(8), Res(8)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


X = torch.randn(2, 3, 8, 8)
WRONG = torch.randn(2, 4, 8, 8)


def _unchanged(m, before):
    assert m.state_dict().keys() == before.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), before.state_dict().values()))
    assert repr(m) == repr(before)


CASES = {
    "model None": (lambda m: secateur.prune_channels(None, X), "nn.Module"),
    "inputs None": (lambda m: secateur.prune_channels(m, None), "example_inputs"),
    "empty batch": (lambda m: secateur.prune_channels(m, torch.randn(0, 3, 8, 8)), "empty"),
    "ratio str": (lambda m: secateur.prune_channels(m, X, ratio="0.5"), "ratio"),
    "ratio None": (lambda m: secateur.prune_channels(m, X, ratio=None), "ratio"),
    "ratio list": (lambda m: secateur.prune_channels(m, X, ratio=[0.5]), "ratio"),
    "ratio bool": (lambda m: secateur.prune_channels(m, X, ratio=True), "ratio"),
    "ratio dict value": (lambda m: secateur.prune_channels(m, X, ratio={"0": "a"}), "ratio"),
    "ratio dict empty": (lambda m: secateur.prune_channels(m, X, ratio={}), "empty"),
    "ratio key activation": (lambda m: secateur.prune_channels(m, X, ratio={"2": 0.5}), "no module with output"),
    "ratio key output layer": (lambda m: secateur.prune_channels(m, X, ratio={"4": 0.5}), "always kept"),
    "target str": (lambda m: secateur.prune_channels(m, X, target_macs="x"), "target_macs"),
    "threshold str": (lambda m: secateur.prune_channels(m, X, threshold="x"), "threshold"),
    "threshold nan": (lambda m: secateur.prune_channels(m, X, threshold=math.nan), "threshold"),
    "two targets": (lambda m: secateur.prune_channels(m, X, target_macs=0.5, target_params=0.5), "one target"),
    "threshold and target": (lambda m: secateur.prune_channels(m, X, target_macs=0.5, threshold=0.1), "threshold"),
    "round_to bool": (lambda m: secateur.prune_channels(m, X, round_to=True), "round_to"),
    "steps bool": (lambda m: secateur.prune_channels(m, X, steps=True), "steps"),
    "ignore int": (lambda m: secateur.prune_channels(m, X, ignore=5), "ignore"),
    "graph str": (lambda m: secateur.plan_channels(m, X, graph="g"), "Graph"),
    "wrong input shape": (lambda m: secateur.prune_channels(m, WRONG), "failed"),
    "nan importance": (lambda m: secateur.prune_channels(m, X, importance=lambda g: torch.full((g.size,), math.nan)),
                       "NaN"),
    "drop_blocks inputs None": (lambda m: drop_blocks(m, None, count=1), "example_inputs"),
    "drop_blocks target bool": (lambda m: drop_blocks(m, X, target_macs=True), "target_macs"),
    "drop_blocks nan inputs": (lambda m: drop_blocks(m, torch.full_like(X, math.nan), count=1), "NaN"),
    "drop_blocks model None": (lambda m: drop_blocks(None, X, count=1), "nn.Module"),
    "score_blocks empty": (lambda m: score_blocks(m, torch.randn(0, 3, 8, 8)), "empty"),
    "droppable model str": (lambda m: droppable_blocks("resnet", X), "nn.Module"),
    "fastest wrong shape": (lambda m: secateur.prune_fastest(m, WRONG, target_macs=0.5, repeats=3), "failed"),
    "fastest compile str": (lambda m: secateur.prune_fastest(m, X, target_macs=0.5, compile="yes"), "compile"),
    "benchmark wrong shape": (lambda m: benchmark_latency(m, WRONG, repeats=2), "failed"),
    "compare list": (lambda m: compare_latency([m], X), "mapping"),
    "compare one wrong": (lambda m: compare_latency({"a": m, "b": nn.Conv2d(4, 2, 1)}, X, repeats=2), "Conv2d"),
    "table wrong shape": (lambda m: LatencyTable.build(m, WRONG, progress=False, cache=False), "failed"),
    "export_onnx inputs None": (lambda m: secateur.export_onnx(m, None, "/tmp/never.onnx"), "example_inputs"),
    "export_onnx model None": (lambda m: secateur.export_onnx(None, X, "/tmp/never.onnx"), "nn.Module"),
    "apply_checked wrong shape": (lambda m: secateur.plan_channels(m, X).apply_checked(m, WRONG), "failed"),
}


def test_nan_weights_are_refused_before_anything_changes():
    m = _model()
    with torch.no_grad():
        m[0].weight[3, 0, 0, 0] = math.nan
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match=r"\[0\] importance 'l1' gave NaN.*1 of 8 channels"):
        secateur.prune_channels(m, X, ratio=0.5)
    assert repr(m) == repr(before) and m[0].weight.shape == (8, 3, 3, 3)


def test_l1_on_the_meta_device_says_which_importance_works_there():
    with torch.device("meta"):
        m = _model()
    with pytest.raises(PruningError, match="meta device.*importance='random' or a callable"):
        secateur.plan_channels(m, torch.randn(2, 3, 8, 8, device="meta"), ratio=0.5)
    plan = secateur.plan_channels(m, torch.randn(2, 3, 8, 8, device="meta"), ratio=0.5, importance="random")
    assert plan.channels > 0


@pytest.mark.parametrize("other", [
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)),  # modules the plan names are missing
    lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Sequential(Res(2), Res(2), Res(2)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4)),  # narrower: positions missing
    lambda: nn.Sequential(nn.ReLU(), nn.Sequential(Res(8), Res(8), Res(8)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)),  # a module without the tensor
], ids=["missing module", "narrower", "no such tensor"])
def test_a_plan_applied_to_another_architecture_is_refused(other):
    plan = secateur.plan_channels(_model(), X, ratio=0.5)
    m = other()
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match="plan"):
        plan.apply(m)
    _unchanged(m, before)


def test_an_unreachable_latency_target_names_prune_channels_options():
    m = _model()
    table = LatencyTable.build(m, X, progress=False, cache=False, repeats=1, max_points=3, in_points=2, tail=False)
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match="target_latency cannot be reached") as e:
        secateur.prune_channels(m, X, target_latency=0.001, latency_table=table, verify="estimate")
    assert "min_keep" not in str(e.value).split("the allocator said")[0]
    _unchanged(m, before)


# ---- found by the second pass of the audit (107 new probes)
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_a_plan_is_not_applied_to_a_masked_model():
    plan = secateur.plan_channels(_cnn(), X, ratio=0.5)
    m = _cnn()
    secateur.prune(m, 0.5)
    before = copy.deepcopy(m)
    for call in (lambda: plan.apply(m), lambda: plan.apply_checked(m, X)):
        with pytest.raises(PruningError, match="without masks"):
            call()
        _unchanged(m, before)
    assert m(X).shape == (2, 4)
    with pytest.raises(PruningError, match="nn.Module"):
        plan.apply(None)


def test_apply_checked_on_another_architecture_is_refused_before_the_reference_is_built():
    plan = secateur.plan_channels(_cnn(), X, ratio=0.5)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 4))
    before = copy.deepcopy(other)
    with pytest.raises(PruningError, match="plan"):
        plan.apply_checked(other, X)
    _unchanged(other, before)


SECOND = {
    "nan example inputs": (lambda m: secateur.prune_channels(m, torch.full_like(X, math.nan)), "NaN"),
    "stay_above str": (lambda m: drop_blocks(m, X, target_macs=0.5, stay_above="yes"), "stay_above"),
    "progress str": (lambda m: secateur.prune_fastest(m, X, target_macs=0.5, progress="x"), "progress"),
    "opset 1": (lambda m: secateur.export_onnx(m, X, "/tmp/never.onnx", opset=1), "opset"),
    "opset str": (lambda m: secateur.export_onnx(m, X, "/tmp/never.onnx", opset="x"), "opset"),
    "opset bool": (lambda m: secateur.export_onnx(m, X, "/tmp/never.onnx", opset=True), "opset"),
    "input_names too many": (lambda m: secateur.export_onnx(m, X, "/tmp/never.onnx", input_names=["a", "b"]),
                             "input_names"),
    "dynamic_axes str": (lambda m: secateur.export_onnx(m, X, "/tmp/never.onnx", dynamic_axes="x"), "dynamic_axes"),
    "table multiple 0": (lambda m: LatencyTable.build(m, X, multiple=0, progress=False, cache=False), "multiple"),
    "table repeats 0": (lambda m: LatencyTable.build(m, X, repeats=0, progress=False, cache=False), "repeats"),
    "table tolerance nan": (lambda m: LatencyTable.build(m, X, tolerance=math.nan, progress=False, cache=False),
                            "tolerance"),
}


CASES.update(SECOND)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_and_changes_nothing(name):
    call, match = CASES[name]
    m = _model()
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match=match):
        call(m)
    _unchanged(m, before)


def test_reconstruction_refuses_nan_and_empty_calibration_data():
    from secateur.reconstruct import capture_inputs, fit_weights, reconstruct_
    layer = nn.Linear(8, 4)
    before = copy.deepcopy(layer)
    keep = torch.arange(8) < 4
    for bad, match in ((torch.full((10, 8), math.nan), "NaN"), (torch.randn(0, 8), "empty")):
        with pytest.raises(PruningError, match=match):
            reconstruct_(layer, bad, keep)
        _unchanged(layer, before)
    with pytest.raises(PruningError, match="same number of rows"):
        fit_weights(torch.randn(10, 8), torch.randn(9, 4))
    m = _model()
    with pytest.raises(PruningError, match="batches"):
        capture_inputs(m, m[0], None)
    with pytest.raises(PruningError, match="not part of the model"):
        capture_inputs(m, nn.Linear(2, 2), [X])


def test_a_failing_round_of_iterative_pruning_is_undone():
    from secateur.training import iterative_prune
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match="Optimizer"):
        iterative_prune(m, data, data, make_optimizer=lambda model: None)
    assert not secateur.is_pruned(m)
    _unchanged(m, before)
    with pytest.raises(PruningError, match="max_rounds"):
        iterative_prune(m, data, data, make_optimizer=lambda model: None, max_rounds=0)


def test_is_2_4_names_a_non_tensor():
    from secateur.semi_structured import is_2_4
    with pytest.raises(PruningError, match="tensor"):
        is_2_4("x")


def test_masking_and_finalizing_keep_the_parameter_order():
    m = _cnn()
    order = [n for n, _ in m.named_parameters()]
    secateur.prune(m, 0.5)
    secateur.finalize(m)
    assert [n for n, _ in m.named_parameters()] == order and list(m.state_dict()) == list(_cnn().state_dict())


# ---- what the audit left (session 21)
def _wide():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.Sequential(Res(12), Res(12), Res(12)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))


def test_a_plan_applied_to_a_wider_model_of_the_same_layout_is_refused():
    """Its positions are all in range there, so only the recorded sizes tell: slicing would run and compute
    something else."""
    plan = secateur.plan_channels(_model(), X, ratio=0.5)
    for apply in (lambda m: plan.apply(m), lambda m: plan.apply_checked(m, X)):
        m = _wide()
        before = copy.deepcopy(m)
        with pytest.raises(PruningError, match=r"made for a tensor of size 8 along dim 0 \(shape=\(12, 3, 3, 3\)\)"):
            apply(m)
        _unchanged(m, before)
    fresh = _model()  # the model it was made for (a fresh copy) still takes it
    plan.apply(fresh)
    assert fresh[0].weight.shape[0] == 4


def test_fine_tune_refuses_an_optimizer_of_other_parameters_or_stale_state_before_any_step():
    from secateur.training import fine_tune
    m = _cnn()
    data = [(X, torch.tensor([0, 1]))]
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match="holds none of the model's parameters"):
        fine_tune(m, data, torch.optim.SGD(_cnn().parameters(), lr=0.1))  # another model's
    _unchanged(m, before)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    fine_tune(m, data, opt)  # momentum buffers of the full-size tensors
    secateur.prune_channels(m, X, ratio=0.5)  # the same Parameter objects, sliced
    before = copy.deepcopy(m)
    with pytest.raises(PruningError, match=r"\[0.weight\] the optimizer's 'momentum_buffer'.*stepped before the "
                                           r"model was pruned \(shape=\(4, 3, 3, 3\), value=\(8, 3, 3, 3\)\)"):
        fine_tune(m, data, opt)
    _unchanged(m, before)
    fine_tune(m, data, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))  # a new one trains
    with pytest.raises(PruningError, match="torch.optim.Optimizer"):
        fine_tune(m, data, "sgd")
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="1 tensors that are not parameters of the model"):
        fine_tune(m, data, torch.optim.SGD(list(m.parameters()) + [extra], lr=0.1))


def test_fine_tune_stops_at_a_non_finite_loss_before_the_step():
    from secateur.training import fine_tune
    m = _cnn()
    good = (X, torch.tensor([0, 1]))
    bad = (torch.full_like(X, math.nan), torch.tensor([0, 1]))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(PruningError, match=r"loss is nan at step 1 \(epoch 1\).*taken the 1 steps before it"):
        fine_tune(m, [good, bad], opt)
    assert all(torch.isfinite(p).all() for p in m.parameters())  # the NaN batch stepped nothing
    assert m.training


def test_fine_tune_checks_the_regularizer_before_the_first_step():
    from secateur.regularize import BNScaleL1
    from secateur.training import fine_tune
    m = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))  # no BatchNorm: L1 on BN scales has nothing to act on
    before = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    data = [(X, torch.tensor([0, 1]))]
    with pytest.raises(PruningError, match="no affine BatchNorm"):
        fine_tune(m, data, opt, regularizer=BNScaleL1(1e-4))
    _unchanged(m, before)
    with pytest.raises(PruningError, match="no affine BatchNorm"):
        BNScaleL1(1e-4).proximal_(m, 0.1)
    with pytest.raises(PruningError, match="proximal_"):
        fine_tune(m, data, opt, regularizer=object())
    _unchanged(m, before)


def test_a_latency_cache_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    m = _model()
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for path, match in ((afile / "table.json", "cannot be written.*is a file"), (tmp_path, "directory"),
                        (3, "cache_path")):
        with pytest.raises(PruningError, match=match):
            LatencyTable.build(m, X, cache_path=path, progress=False, repeats=1, max_points=2, in_points=2)
    (tmp_path / "list.json").write_text("[1, 2]")  # not a cache file: ignored and overwritten, not an AttributeError
    table = LatencyTable.build(m, X, cache_path=tmp_path / "list.json", progress=False, repeats=1, max_points=2,
                               in_points=2, tail=False)
    assert table.specs
    with pytest.raises(PruningError, match="specs maps layer names"):
        LatencyTable.from_measurements("x", {})
    with pytest.raises(PruningError, match="store maps"):
        LatencyTable.from_measurements(table.specs, None)
