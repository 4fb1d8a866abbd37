"""Forward passes that leave the model's state alone (secateur/modes.py): a model in training mode keeps its
BatchNorm running statistics and every module's own mode through planning, pruning, dropping blocks, timing and
errors, and a branch that runs only in training mode is still pruned consistently."""
import copy

import pytest
import torch
from torch import nn

import secateur
from secateur import PruningError
from secateur.latency import benchmark_latency, compare_latency
from secateur.metrics import count_macs
from secateur.modes import statistics_kept

torch.set_num_threads(1)


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """BatchNorms, residual blocks and an auxiliary head that runs only in training mode (as GoogLeNet's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Res(16), Res(16), Res(16))
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(3))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        out = self.head(x.mean((2, 3)))
        return (out, self.aux(x)) if self.training else out


def _net():
    torch.manual_seed(0)
    m = Net()
    m(torch.randn(2, 3, 8, 8))  # materialise the lazy layer (and move the statistics once)
    m.train()
    m.blocks[1].bn.eval()  # a module in its own mode: it must come back so
    return m, torch.randn(4, 3, 8, 8) * 3 + 1


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, {n: s.training for n, s in m.named_modules()}


def _same(m, state):
    sd, modes = state
    assert m.state_dict().keys() == sd.keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert {n: s.training for n, s in m.named_modules()} == modes
    assert all(b.track_running_stats for b in m.modules() if isinstance(b, nn.BatchNorm2d))


@pytest.mark.parametrize("call", [
    lambda m, x: secateur.plan_channels(m, x, ratio=0.5),
    lambda m, x: secateur.structured.score_blocks(m, x),
    lambda m, x: secateur.structured.droppable_blocks(m, x),
    lambda m, x: benchmark_latency(m, x, repeats=2, warmup=1),
    lambda m, x: compare_latency({"a": m, "b": m}, x, repeats=2, warmup=1),
    lambda m, x: count_macs(m, x),
    lambda m, x: secateur.report(m, x),
], ids=["plan_channels", "score_blocks", "droppable_blocks", "benchmark_latency", "compare_latency", "count_macs",
        "report"])
def test_looking_at_a_training_model_changes_nothing(call):
    m, x = _net()
    state = _state(m)
    call(m, x)
    _same(m, state)


@pytest.mark.parametrize("call", [
    lambda m, x: secateur.prune_channels(m, x, ratio=0.5, importance=lambda *a, **k: torch.zeros(1)),
    lambda m, x: secateur.drop_blocks(m, x, target_macs=0.01),
    lambda m, x: secateur.prune_fastest(m, x, target_macs=0.5, repeats=3, accept=lambda c: False),
], ids=["prune_channels", "drop_blocks", "prune_fastest"])
def test_a_call_that_raises_leaves_a_training_model_as_it_was(call):
    m, x = _net()
    state = _state(m)
    with pytest.raises(PruningError):
        call(m, x)
    _same(m, state)


@pytest.mark.parametrize("call", [
    lambda m, x: secateur.prune_channels(m, x, ratio=0.5),
    lambda m, x: secateur.drop_blocks(m, x, count=1),
    lambda m, x: secateur.prune_fastest(m, x, target_macs=0.5, depth=(0, 1), repeats=3),
], ids=["prune_channels", "drop_blocks", "prune_fastest"])
def test_pruning_a_training_model_keeps_its_modes_and_its_statistics_untouched(call):
    m, x = _net()
    ref = copy.deepcopy(m)
    call(m, x)
    modes = {n: s.training for n, s in ref.named_modules()}
    for n, s in m.named_modules():  # kept modules keep their mode; a Skipped stand-in takes its parent's
        assert s.training == modes.get(n, modes[n.rpartition(".")[0]]), n
    assert m.blocks[1].bn.training is False or isinstance(m.blocks[1], secateur.structured.Skipped)
    assert m.stem[1].num_batches_tracked == ref.stem[1].num_batches_tracked
    assert all(b.track_running_stats for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    out, aux = m(x)  # the training-only branch was pruned with the rest: the training forward runs
    assert out.shape == aux.shape == (4, 3)


def test_statistics_kept_restores_by_name_when_modules_are_swapped_in():
    m, x = _net()
    with statistics_kept(m, eval=True):
        assert not m.training and m.stem[1].track_running_stats is False
        new = copy.deepcopy(m.blocks)  # built inside: its norms do not track, its modules are in eval mode
        m.blocks = new
        m.extra = nn.BatchNorm2d(4)
    assert m.blocks.training and m.blocks[0].bn.training and not m.blocks[1].bn.training
    assert all(b.track_running_stats for b in m.blocks.modules() if isinstance(b, nn.BatchNorm2d))
    assert m.extra.training and m.extra.track_running_stats


def test_a_norm_that_did_not_track_still_does_not():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).train()
    with statistics_kept(m):
        m(torch.randn(2, 3, 4, 4))
    assert m[1].track_running_stats is False and m[1].running_mean is None


def test_a_plan_made_in_eval_mode_names_the_modules_that_did_not_run():
    m, x = _net()
    m.eval()
    plan = secateur.plan_channels(m, x, ratio=0.5)
    note = [n for n in plan.notes if "did not run" in n]
    assert len(note) == 1 and "aux.0" in note[0] and "aux.3" in note[0] and "model.train()" in note[0]
    m.train()
    assert not [n for n in secateur.plan_channels(m, x, ratio=0.5).notes if "did not run" in n]
