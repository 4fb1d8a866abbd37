"""Grouped convolutions: the same local channels leave every conv group (``grouped="channels"``, default) or whole
groups go (``grouped="groups"``). Every case is checked against the oracle (removal == zeroing at the consumers), and
against the structure the mode promises (group count kept, equal widths, MACs below whole-group pruning)."""
import copy

import pytest
import torch
from torch import nn

from helpers import assert_oracle, pruned_vs_reference
import secateur
from secateur.errors import PruningError
from secateur.graph import build_graph, build_groups
from secateur.graph.modules import snapshot, update_attrs
from secateur.importance import group_scores
from secateur.metrics import count_macs
from secateur.structured import apply_structure, plan_channels

torch.set_num_threads(1)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
            for p in m.parameters(recurse=False):
                p.normal_(std=0.5, generator=g)  # outputs of order 1: the oracle's atol stays meaningful
    return model.eval()


class Block(nn.Module):
    """ResNeXt-like: 1x1 -> grouped 3x3 -> 1x1, with a residual around it."""

    def __init__(self, c=16, mid=32, groups=4, conv=nn.Conv2d, bn=nn.BatchNorm2d):
        super().__init__()
        self.stem = conv(3, c, 1)
        self.a = conv(c, mid, 1, bias=False)
        self.bn_a = bn(mid)
        self.b = conv(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn_b = bn(mid)
        self.c = conv(mid, c, 1)
        self.head = conv(c, 5, 1)

    def forward(self, x):
        x = self.stem(x).relu()
        y = self.bn_b(self.b(self.bn_a(self.a(x)).relu())).relu()
        return self.head((x + self.c(y)).relu())


class Concat(nn.Module):
    """A grouped conv fed by a concatenation of two producers (and the model's input, which is never pruned)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Conv2d(3, 8, 1)
        self.q = nn.Conv2d(3, 12, 1)
        self.g = nn.Conv2d(24, 16, 3, padding=1, groups=4)  # per group 6 inputs: the cat spans groups
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.g(torch.cat([self.p(x), x[:, :1].repeat(1, 4, 1, 1), self.q(x)], 1)).relu())


def _grouped_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1}


def _check_equal_local_channels(plan, model):
    """Every group of every grouped conv lost the same local input channels (what keeps one width per group)."""
    removed = plan.removed
    for name, m in _grouped_convs(model).items():
        if m.transposed or m.in_channels == m.groups:
            continue
        dims = removed.get((name, "weight"), {})
        assert 1 in dims or 0 in dims or not dims  # a local index (dim 1) or output rows (dim 0)
        if 0 in dims:
            width = m.out_channels // m.groups
            per = [set((dims[0][dims[0] // width == a] % width).tolist()) for a in range(m.groups)]
            assert all(p == per[0] for p in per), (name, per)


@pytest.mark.parametrize("make,x", [
    (lambda: Block(), torch.randn(2, 3, 6, 6)),
    (lambda: Block(conv=nn.Conv1d, bn=nn.BatchNorm1d), torch.randn(2, 3, 9)),
    (Concat, torch.randn(2, 3, 6, 6)),
], ids=["residual", "conv1d", "concat"])
def test_channels_mode_oracle_keeps_group_count_and_beats_whole_groups(make, x):
    macs = {}
    for grouped in ("groups", "channels"):
        m = _randomize(make())
        before = {n: c.groups for n, c in _grouped_convs(m).items()}
        macs0 = count_macs(m, x)
        probe = copy.deepcopy(m)
        plan = assert_oracle(m, x, ratio=0.5, grouped=grouped)
        assert not any("pruned shapes differ" in n or "forward failed" in n for n in plan.notes), plan.notes
        after = _grouped_convs(m)
        if grouped == "channels":
            _check_equal_local_channels(plan, probe)
        for n, c in after.items():
            assert c.weight.shape[0] == c.out_channels and c.weight.shape[1] * c.groups == c.in_channels
            if grouped == "channels":
                assert c.groups == before[n], n  # narrower groups, not fewer
        if grouped == "groups":
            assert any(c.groups < before[n] for n, c in after.items())
        macs[grouped] = count_macs(m, x) / macs0
    assert macs["channels"] < macs["groups"] < 1, macs


def test_residual_block_counts():
    """Block(16, 32, groups=4): b has 8 inputs and 8 outputs per group. Channel mode: a's outputs are 8 units of 4
    channels (local j of every group), b's outputs 8 more; half of each go, groups stay 4."""
    m = _randomize(Block())
    x = torch.randn(1, 3, 6, 6)
    groups = {g.name: g for g in build_groups(m, x)}
    assert groups["a"].size == 8 and groups["a"].unit == 4 and groups["a"].grouped == {"b": "channels"}
    assert groups["b"].size == 8 and groups["b"].unit == 4
    whole = {g.name: g for g in build_groups(m, x, grouped="groups")}
    assert whole["a"].size == 4 and whole["a"].unit == 8 and "b" not in whole  # a group's ins and outs together
    assert_oracle(m, x, ratio=0.5)
    assert (m.b.groups, m.b.in_channels, m.b.out_channels) == (4, 16, 16)
    assert m.a.out_channels == m.bn_a.num_features == 16 and m.c.in_channels == 16


@pytest.mark.parametrize("grouped", ["channels", "groups"])
def test_depthwise_multiplier_keeps_whole_groups(grouped):
    """groups == in_channels, out = 2 * in: one input per group, nothing to remove inside a group."""
    m = _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                                 nn.ReLU(), nn.Conv2d(16, 4, 1)))
    x = torch.randn(2, 3, 6, 6)
    assert build_graph(m, x, grouped=grouped).tracer.convs == {"2": "groups"}
    assert_oracle(m, x, ratio=0.5, grouped=grouped)
    assert (m[2].groups, m[2].in_channels, m[2].out_channels) == (4, 4, 8)


@pytest.mark.parametrize("grouped", ["channels", "groups"])
def test_grouped_conv_transpose(grouped):
    m = _randomize(nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), nn.ConvTranspose2d(12, 16, 3, groups=4),
                                 nn.ReLU(), nn.Conv2d(16, 4, 1)))
    x = torch.randn(2, 3, 5, 5)
    macs0 = count_macs(m, x)
    assert_oracle(m, x, ratio=0.5, grouped=grouped)
    t = m[2]
    assert t.weight.shape[0] == t.in_channels and t.weight.shape[1] * t.groups == t.out_channels
    if grouped == "channels":
        assert (t.groups, t.in_channels, t.out_channels) == (4, 8, 8)
    else:
        assert (t.groups, t.in_channels, t.out_channels) == (2, 6, 8)
    assert count_macs(m, x) < macs0


def test_input_concat_with_model_input_is_never_pruned():
    """Channels of the model's input reach a weight's inputs beside prunable ones (dense and grouped): those
    positions are kept, the others prune (this raised an internal slot error before)."""
    m = _randomize(Concat())
    x = torch.randn(1, 3, 6, 6)
    assert_oracle(m, x, ratio=0.5)
    assert m.g.groups == 4 and m.g.in_channels < 24


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor", "fpgm", "lamp", "random"])
def test_importances_on_channel_units(importance):
    m = _randomize(Block())
    x = torch.randn(2, 3, 6, 6)
    if importance == "taylor":
        m(x).square().sum().backward()
    plan = assert_oracle(m, x, ratio=0.5, importance=importance)
    assert m.b.groups == 4 and m.b.out_channels == 16 and len(plan.choices) >= 2


def test_l1_score_sums_the_coupled_slices_of_every_group():
    """a (dense 3 -> 8) feeds b (groups=2, 4 inputs each): unit j is a's outputs j and 4 + j, and b's input j."""
    m = _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(6, 2, 1)))
    x = torch.randn(1, 3, 5, 5)
    g = next(g for g in build_groups(m, x) if g.name == "0")
    w, b, wb = m[0].weight.detach(), m[0].bias.detach(), m[1].weight.detach()
    want = torch.stack([w[j].abs().sum() + w[4 + j].abs().sum() + b[j].abs() + b[4 + j].abs()
                        + wb[:, j].abs().sum() for j in range(4)])
    torch.testing.assert_close(group_scores(g, m, "l1", reduce="sum"), want)


@pytest.mark.parametrize("mid,groups,round_to,kept", [
    (32, 4, 8, 16),   # width 8, unit 4: k * 4 % 8 == 0 -> k even: 4 of 8 per group kept
    (16, 2, 8, 8),    # width 8, unit 2: k multiple of 4 -> 4 of 8 per group
    (32, 8, 8, 16),   # width 4, unit 8: any k -> 2 of 4 per group (round_to per group would keep all 4)
    (12, 4, 16, 12),  # width 3, unit 4: k multiple of 4 -> nothing can go but the whole width: all kept
])
def test_round_to_counts_a_layers_channels(mid, groups, round_to, kept):
    m = _randomize(Block(c=8, mid=mid, groups=groups))
    x = torch.randn(1, 3, 6, 6)
    assert_oracle(m, x, ratio=0.5, round_to=round_to)
    assert m.b.groups == groups and m.b.in_channels == kept
    assert m.b.in_channels % round_to == 0 or m.b.in_channels == mid


def test_never_prunes_a_group_width_to_zero():
    for round_to, kept in ((None, 4), (4, 4), (3, 8)):  # width 2 in 4 groups; 3 divides no count but the full one
        m = _randomize(Block(c=8, mid=8, groups=4))
        x = torch.randn(1, 3, 6, 6)
        assert_oracle(m, x, ratio=0.99, round_to=round_to)
        assert m.b.groups == 4 and m.b.in_channels == m.b.out_channels == kept  # one channel per group stays


def test_updater_needs_the_recorded_mode():
    """Shapes alone cannot tell 'same channels from every group' from 'whole groups': it must be recorded."""
    c = nn.Conv2d(8, 8, 3, groups=2)
    old = snapshot(c)
    c.weight.data = c.weight.data[:4]
    with pytest.raises(PruningError, match="grouped mode"):
        update_attrs(c, old)
    assert update_attrs(c, {**old, "_grouped": "groups"})["groups"] == 1
    assert update_attrs(c, {**old, "_grouped": "channels"})["groups"] == 2


def test_bad_mode_and_mismatched_graph():
    m, x = Block(), torch.randn(1, 3, 6, 6)
    with pytest.raises(PruningError, match="grouped"):
        plan_channels(m, x, grouped="group")
    with pytest.raises(PruningError, match="grouped= mode"):
        plan_channels(m, x, grouped="groups", graph=build_graph(m, x))


# ---------------------------------------------------------------- torchvision models
tv = pytest.importorskip("torchvision")


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"])
def test_zoo_channels_mode_oracle_macs_and_reload(name, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    macs = {}
    for grouped in ("groups", "channels"):
        m = tv.models.get_model(name).eval()
        before = {n: c.groups for n, c in _grouped_convs(m).items()}
        macs0 = count_macs(m, x)
        plan = plan_channels(m, x, ratio=0.5, grouped=grouped)
        assert not any("pruned shapes differ" in n or "forward failed" in n for n in plan.notes), plan.notes
        probe = copy.deepcopy(m)
        _, want, got = pruned_vs_reference(m, x, plan)
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-4, err
        macs[grouped] = count_macs(m, x) / macs0
        if grouped == "channels":
            _check_equal_local_channels(plan, probe)
            after = _grouped_convs(m)
            assert {n: c.groups for n, c in after.items()} == before
            assert all(c.in_channels < probe.get_submodule(n).in_channels for n, c in after.items())
            secateur.save(m, tmp_path / "m.safetensors")
            fresh = secateur.load(tv.models.get_model(name).eval(), tmp_path / "m.safetensors")
            structure = apply_structure(tv.models.get_model(name).eval(), m._secateur_structure)
            structure.load_state_dict(m.state_dict())
            with torch.no_grad():
                assert torch.equal(fresh(x), m(x)) and torch.equal(structure(x), m(x))
    assert macs["channels"] < macs["groups"], macs


def test_latency_table_macs_follow_channel_units():
    """The allocator's MACs model (LatencyTable.cost_fn) of a channel-mode plan equals the pruned model's count:
    one local input of a grouped conv is one input channel of each of its groups."""
    from secateur.latency_model import LatencyTable
    from secateur.structured import Plan
    m = _randomize(Block())
    x = torch.randn(1, 3, 6, 6)
    groups = build_groups(m, x)
    table = LatencyTable.shapes_only(m, x)
    cost = table.cost_fn(table.members_of(groups), "macs", sizes=[g.size for g in groups])
    keep = [max(1, g.size // 2 - 1) for g in groups]
    macs0 = count_macs(m, x)
    Plan(groups, [(g, torch.arange(g.size - k)) for g, k in zip(groups, keep)]).apply(m)
    assert m.b.groups == 4 and m.b.in_channels < 32
    assert cost([g.size for g in groups]) - cost(keep) == macs0 - count_macs(m, x)


def test_fpgm_compares_all_filters_of_a_unit():
    """FPGM on channel units: the distance between units j and k is between all their filters (one per group),
    side by side. Summing them instead would make two units whose filters cancel look identical."""
    m = _randomize(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(6, 2, 1)))
    x = torch.randn(1, 3, 5, 5)
    g = next(g for g in build_groups(m, x) if g.name == "1")  # b's outputs: unit j = rows j and 3 + j
    w = m[1].weight.detach()
    units = torch.stack([torch.cat([w[j].flatten(), w[3 + j].flatten()]) for j in range(3)])
    want_w = torch.cdist(units, units).sum(1)
    got = group_scores(g, m, "fpgm", reduce="first")  # the first member is b.weight (dim 0, out)
    assert g.members[0].qualname == "1.weight" and g.members[0].dim == 0
    torch.testing.assert_close(got, want_w)
