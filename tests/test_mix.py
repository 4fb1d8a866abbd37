"""prune_fastest (structured/mix.py): depth or width chosen by measurement.

Timings are real (and noisy), so no test asserts which candidate wins; they check what holds whatever the clock says:
the kept option is the fastest *reported* among those ``accept`` took, the model afterwards is exactly that candidate
(rebuilt independently with drop_blocks + prune_channels), every candidate meets the MACs target, the shares give the
blocks drop_blocks would choose, drift is the outputs' relative change, and bad input changes nothing."""
import copy
import math

import pytest
import torch
from torch import nn

import secateur
from secateur import PruningError, drop_blocks, prune_channels, prune_fastest
from secateur.latency_model import LatencyTable, layer_specs
from secateur.metrics import count_macs
from secateur.structured import Skipped, droppable_blocks

torch.set_num_threads(1)


class ConvRes(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class ResCNN(nn.Module):
    """A stem, four droppable residual blocks, a head."""

    def __init__(self, c=16, blocks=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvRes(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    m = ResCNN().eval()
    with torch.no_grad():
        for i, b in enumerate(m.blocks):  # blocks of clearly different weight, so scores differ
            b.conv2.weight.mul_(0.2 + 0.4 * i)
            b.bn.running_var.uniform_(0.5, 2.0)
    return m, torch.randn(2, 3, 12, 12)


def _rebuilt(model, x, option, target, **kw):
    """The candidate ``option`` built independently: drop its blocks, then prune channels for the rest."""
    m = copy.deepcopy(model)
    if option.dropped:
        drop_blocks(m, x, blocks=list(option.dropped))
    left = target * count_macs(model, x) / count_macs(m, x)
    if left < 1:
        prune_channels(m, x, target_macs=left, **kw)
    return m


def test_keeps_the_fastest_accepted_option_and_the_model_is_that_candidate():
    model, x = _model()
    orig = copy.deepcopy(model)
    res = prune_fastest(model, x, target_macs=0.5, depth=(0, 0.5, 1), repeats=3, round_to=4)
    assert res.kept in res.options
    assert res.kept.speedup == max(o.speedup for o in res.options if o.accepted)
    rebuilt = _rebuilt(orig, x, res.kept, 0.5, round_to=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x), rtol=0, atol=0)
    assert res.macs_after == count_macs(model, x) <= 0.5 * res.macs_before * (1 + 1e-9)
    assert res.macs_before == count_macs(orig, x)
    for o in res.options:
        assert o.macs <= 0.5 + 1e-9 and 0 < o.params <= 1
        assert all(isinstance(model.get_submodule(n), Skipped) for n in res.kept.dropped)
    assert res.options[0].share == 0 and res.options[0].dropped == () and res.options[0].width == "uniform"


def _expected_blocks(model, x, target, share):
    """The blocks a share should drop, worked out here: lowest output-change score first, until the model is at
    most ``g = 1 - share * (1 - target)`` of its MACs, passing over a block that would take it below g / 1.05."""
    from secateur.metrics import macs_by_layer
    from secateur.structured import score_blocks
    scores, per, total = score_blocks(model, x), macs_by_layer(model, x), count_macs(model, x)
    goal, macs, chosen = (1 - share * (1 - target)) * total, total, []
    floor = goal / 1.05
    for n in sorted(scores, key=scores.get):
        if macs <= goal:
            break
        if macs - per[n] >= floor:
            chosen.append(n)
            macs -= per[n]
    return chosen


def test_shares_drop_the_blocks_worked_out_here_and_same_sets_are_built_once():
    model, x = _model()
    full, part = _expected_blocks(model, x, 0.4, 1.0), _expected_blocks(model, x, 0.4, 0.5)
    assert len(full) > len(part) > 0  # the model is made so the shares differ
    res = prune_fastest(copy.deepcopy(model), x, target_macs=0.4, depth=(1.0, 0.5, 0.0, 0.5), repeats=3)
    by = {o.share: o for o in res.options}
    # share 0.5's channels (16 per layer here) land more than 5 % past the target: noted, not timed
    assert sorted(by) == [0.0, 1.0] and set(by[1.0].dropped) == set(full)
    assert [n.split(" keeps")[0] for n in res.notes if n.endswith("not timed")] == [
        f"depth share 0.5 ({len(part)} blocks, uniform channels)"]
    assert str(res).endswith("\nnote: " + res.notes[-1])  # what was not timed is said where the table is
    res = prune_fastest(copy.deepcopy(model), x, target_macs=0.45, depth=(1.0, 0.5, 0.0, 0.5), repeats=3)
    assert [o.share for o in res.options] == [0.5] and set(res.kept.dropped) == set(_expected_blocks(model, x, 0.45,
                                                                                                     0.5))
    same = prune_fastest(copy.deepcopy(model), x, target_macs=0.4, depth=(0.0, 0.01), repeats=3)
    assert len(same.options) == 1 and any("same blocks" in n for n in same.notes)


def test_blocks_may_meet_the_target_alone_but_never_pass_it_by_more_than_5_percent():
    """Each block of ResCNN holds the same MACs: with a target a hair under what dropping two blocks leaves, share
    1 drops two and prunes no channel; with a target that two blocks would pass by more than 5 %, it drops one."""
    model, x = _model()
    total = count_macs(model, x)
    one = count_macs(model.blocks[0], torch.randn(2, 16, 12, 12))
    two_left = (total - 2 * one) / total
    res = prune_fastest(copy.deepcopy(model), x, target_macs=two_left * 1.01, depth=(1,), repeats=3)
    assert len(res.kept.dropped) == 2 and res.kept.width == "none" and res.kept.macs == pytest.approx(two_left)
    assert "2 blocks dropped, no channels" in str(res)
    res = prune_fastest(copy.deepcopy(model), x, target_macs=two_left * 1.1, depth=(1,), repeats=3)
    assert len(res.kept.dropped) == 1 and res.kept.width == "uniform"
    assert res.kept.macs <= two_left * 1.1 + 1e-9


def test_drift_is_the_relative_change_of_the_outputs():
    model, x = _model()
    orig = copy.deepcopy(model)
    res = prune_fastest(model, x, target_macs=0.6, depth=(0, 1), repeats=3)
    with torch.no_grad():
        ref = orig(x)
        for o in res.options:
            out = _rebuilt(orig, x, o, 0.6)(x)
            assert o.drift == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-5)


def test_accept_passes_over_candidates_and_refusing_all_changes_nothing():
    model, x = _model()
    res = prune_fastest(model, x, target_macs=0.4, depth=(0, 1), repeats=3,
                        accept=lambda m: not any(isinstance(s, Skipped) for s in m.modules()))
    assert res.kept.dropped == () and [o.accepted for o in res.options] == [True, False]
    assert not any(isinstance(s, Skipped) for s in model.modules())
    model, x = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="accept took none"):
        prune_fastest(model, x, target_macs=0.4, depth=(0, 1), repeats=3, accept=lambda m: False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.state_dict().keys() == \
        before.keys()


@pytest.mark.parametrize("kw, match", [
    (dict(target_macs=0), "target_macs"), (dict(target_macs=1.0), "target_macs"),
    (dict(target_macs=True), "target_macs"), (dict(target_macs=0.5, depth=()), "depth"),
    (dict(target_macs=0.5, depth=(0, 1.5)), "depth"), (dict(target_macs=0.5, depth="ab"), "depth"),
    (dict(target_macs=0.5, criterion="norm"), "criterion"), (dict(target_macs=0.5, repeats=2), "repeats"),
    (dict(target_macs=0.5, ratio=0.3), "unknown channel option"), (dict(target_macs=0.5, round_to=0), "round_to"),
    (dict(target_macs=0.5, latency_table="cpu"), "LatencyTable"), (dict(target_macs=0.5, accept=3), "accept"),
    (dict(target_macs=0.5, scope="everywhere"), "scope"), (dict(target_macs=0.5, threads=0), "threads"),
    (dict(target_macs=0.5, compile="yes"), "compile"),
])
def test_bad_input_changes_nothing(kw, match):
    model, x = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=match):
        prune_fastest(model, x, **kw)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_residual_blocks_gets_channels_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    res = prune_fastest(model, torch.randn(4, 8), target_macs=0.5, repeats=3)
    assert [o.dropped for o in res.options] == [()]
    assert any("no droppable residual block" in n for n in res.notes)


def _linear_table(model, x) -> LatencyTable:
    """A synthetic table: each layer's time in proportion to its MACs (no timing)."""
    specs = layer_specs(model, x)
    store = {s.key(): {"out": {c: 1e-4 + s.macs(c_out=c) * 1e-9 for c in range(1, s.out_channels + 1)},
                       "in": {c: 1e-4 + s.macs(c_in=c) * 1e-9 for c in range(1, s.in_channels + 1)}}
             for s in specs.values()}
    return LatencyTable.from_measurements(specs, store, device="synthetic")


def test_table_for_a_model_with_dropped_blocks_leaves_their_layers_out():
    model, x = _model()
    table = _linear_table(model, x)
    assert table.for_model(model) is table
    dropped = copy.deepcopy(model)
    drop_blocks(dropped, x, blocks=["blocks.1", "blocks.3"])
    with pytest.raises(PruningError, match="not found"):
        table.estimate(dropped)
    sub = table.for_model(dropped)
    assert sorted(sub.specs) == sorted(n for n in table.specs if not n.startswith(("blocks.1.", "blocks.3.")))
    gone = sum(table.latency(n, s.out_channels) for n, s in table.specs.items() if n not in sub.specs)
    assert sub.estimate(dropped) == pytest.approx(table.estimate(model) - gone)
    other = copy.deepcopy(model)
    other.blocks[0].conv1 = nn.Identity()  # missing for another reason: still an error
    with pytest.raises(PruningError):
        table.for_model(other).estimate(other)


def test_with_a_latency_table_the_width_plan_is_the_tables_choice():
    model, x = _model()
    orig = copy.deepcopy(model)
    res = prune_fastest(model, x, target_macs=0.4, depth=(0, 1), latency_table=_linear_table(orig, x), repeats=3)
    assert {o.width for o in res.options} <= {"uniform", "greedy", "latency", "none"}
    assert res.options[-1].dropped and res.macs_after <= 0.4 * res.macs_before * (1 + 1e-9)
    with pytest.raises(PruningError, match="heads='heads'"):
        prune_fastest(orig, x, target_macs=0.5, latency_table=_linear_table(orig, x), heads="head_dim")


def test_the_result_saves_and_loads_exactly(tmp_path):
    model, x = _model()
    fresh = copy.deepcopy(model)
    prune_fastest(model, x, target_macs=0.5, depth=(1,), repeats=3, round_to=4)
    path = tmp_path / "m.safetensors"
    secateur.save(model, path)
    loaded = secateur.load(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_torchvision_resnet_meets_the_target_and_matches_its_candidate():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    orig = copy.deepcopy(model)
    res = prune_fastest(model, x, target_macs=0.5, repeats=3, round_to=8)
    # resnet18's 4 blocks without downsample; a candidate more than 5 % past the target is noted, not timed
    untimed = [n for n in res.notes if n.endswith("not timed")]
    assert len(res.options) + len(untimed) == 3 and res.options[-1].dropped
    assert all(o.macs * 1.05 >= 0.5 for o in res.options)
    assert set(res.options[-1].dropped) <= set(droppable_blocks(orig, x))
    assert res.macs_after <= 0.5 * res.macs_before * (1 + 1e-9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _rebuilt(orig, x, res.kept, 0.5, round_to=8)(x), rtol=0, atol=0)
    assert "kept depth share" in str(res) and res.table().count("\n") == len(res.options)
    assert not math.isnan(res.kept.drift)


@pytest.mark.slow
def test_compiled_timing_keeps_the_fastest_compiled_candidate_and_the_model_stays_a_module():
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters
    model, x = _model()
    orig = copy.deepcopy(model)
    counters.clear()
    try:
        res = prune_fastest(model, x, target_macs=0.5, depth=(0, 1), repeats=3, compile=True, round_to=4)
    except PruningError:
        raise
    except Exception as e:  # pragma: no cover - environment without a C++ toolchain
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert counters["stats"]["unique_graphs"] >= 1 + len(res.options)  # the model and every candidate compiled
    assert res.kept.speedup == max(o.speedup for o in res.options)
    assert type(model) is ResCNN and not hasattr(model, "_orig_mod")
    with torch.no_grad():
        torch.testing.assert_close(model(x), _rebuilt(orig, x, res.kept, 0.5, round_to=4)(x), rtol=0, atol=0)


@pytest.mark.parametrize("fastest", ["first", "uniform"])
def test_under_compile_the_uniform_width_plan_is_a_candidate_beside_the_eager_pick(monkeypatch, fastest):
    """Eager timings pick a share's width plan among the table's options; compiled, another may win, so under
    ``compile`` the uniform plan is built too (when the eager pick was not uniform) and is exactly prune_channels'
    own plan for the rest of the target."""
    import time
    import secateur.fastest_plan as fp
    from secateur.structured.mix import _build
    from test_fastest_plan import _model as _net, _table

    model, x = _net()
    table = _table(model, x, lambda n, c: 1e-4 + {"conv1": 1e-5, "conv2": 1e-7, "conv3": 1e-5, "fc": 0.0}[n] * c,
                   lambda n, c: 1.0 + {"conv1": 0.0, "conv2": 0.1, "conv3": 0.001, "fc": 1.0}[n] * c)
    timed = []

    def fake(m, ex, plans, repeats=10):  # the options come in the table's order, uniform last
        timed.append(len(plans))
        win = 0 if fastest == "first" else len(plans) - 1
        return [0.5 if i == win else 0.9 for i in range(len(plans))]

    monkeypatch.setattr(fp, "measured_fractions", fake)
    macs0 = count_macs(model, x)
    built = {c: _build(model, x, {(): 0.0}, macs0, 0.6 * macs0, table, {}, [], lambda m: None, time.perf_counter(),
                       c) for c in (False, True)}
    assert timed and timed[0] >= 2  # the situation under test: the table offered more than the uniform plan
    eager, compiled = [[b[2] for b in built[c]] for c in (False, True)]
    if fastest == "first":
        assert eager[0] != "uniform" and compiled == [eager[0], "uniform"]
        uni = copy.deepcopy(model)
        prune_channels(uni, x, target_macs=0.6)
        with torch.no_grad():
            torch.testing.assert_close(built[True][1][4](x), uni(x), rtol=0, atol=0)
        assert built[True][1][3] == count_macs(uni, x) <= 0.6 * macs0
    else:
        assert eager == compiled == ["uniform"]
    assert all(b[3] <= 0.6 * macs0 for c in built for b in built[c])


def test_a_candidate_more_than_5_percent_past_the_target_is_not_timed():
    """Faster only because it removes more is not an answer to the target: a candidate that keeps more than 5 %
    less than the goal is passed over with a note when another is closer; with none closer, every one stays."""
    from secateur.structured.mix import OVERSHOOT, _near_target
    net = nn.Linear(2, 2)
    built = [(0.0, (), "greedy", 480, net), (0.5, ("blocks.1",), "uniform", 287, net), (1.0, ("b",), "none", 500, net)]
    notes = []
    assert _near_target(built, 500, 1000, notes, lambda m: None) == [built[0], built[2]]
    assert notes == [f"depth share 0.5 (1 blocks, uniform channels) keeps 0.287 of the MACs for a target of 0.500, "
                     f"more than {OVERSHOOT:.0%} below it: not timed"]
    assert _near_target(built[1:2], 500, 1000, notes, lambda m: None) == built[1:2] and len(notes) == 1
    edge = [(0.0, (), "uniform", math.ceil(500 / (1 + OVERSHOOT)), net)]  # exactly 5 % below: kept
    assert _near_target(edge + built[1:2], 500, 1000, notes, lambda m: None) == edge
