"""Regularisers: proximal maps against their closed forms, penalties against autograd-free formulas,
group lasso shrinking whole groups, network-slimming pruning by threshold and ratio."""
import copy

import pytest
import torch
from torch import nn

from secateur import PruningError, get_mask
from secateur.regularize import BNScaleL1, GroupLasso, LassoGroup, channel_groups, prune_bn_channels
from secateur.schedules import Linear


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))


def _bn_randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def test_bn_l1_proximal_is_soft_thresholding():
    model = _convnet()
    _bn_randomise(model)
    before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    BNScaleL1(lam=0.5).proximal_(model, lr=0.8)
    tau = 0.4
    for b, m in zip(before, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]):
        expect = torch.where(b > tau, b - tau, torch.where(b < -tau, b + tau, torch.zeros_like(b)))
        assert torch.equal(m.weight.detach(), expect)
        assert bool((m.weight[b.abs() <= tau] == 0).all())


def test_bn_l1_penalty_and_gradient():
    model = _convnet()
    _bn_randomise(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    p = BNScaleL1(lam=1e-2).penalty(model)
    assert float(p.detach()) == pytest.approx(1e-2 * sum(float(m.weight.detach().abs().sum()) for m in bns), rel=1e-6)
    p.backward()
    for m in bns:
        assert torch.allclose(m.weight.grad, 1e-2 * m.weight.detach().sign())


def test_lambda_schedule_and_negative_lambda():
    model = _convnet()
    _bn_randomise(model)
    reg = BNScaleL1(lam=Linear(final=1.0, start=0, end=10))  # a schedule is a callable step -> value
    assert float(reg.penalty(model, step=0).detach()) == 0.0
    assert float(reg.penalty(model, step=5).detach()) == pytest.approx(0.5 * float(BNScaleL1(1.0).penalty(model).detach()))
    with pytest.raises(PruningError, match="lambda"):
        BNScaleL1(lam=-1e-4)
    with pytest.raises(PruningError, match="lambda"):
        GroupLasso(groups=(), lam=-1.0)
    bad = BNScaleL1(lam=lambda step: -step)
    before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with pytest.raises(PruningError, match="lambda"):
        bad.proximal_(model, lr=0.1, step=3)
    after = [m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(PruningError, match="step size"):
        BNScaleL1(1e-4).proximal_(model, lr=-1)


def test_group_lasso_groups_cover_conv_and_bn():
    model = _convnet()
    model(torch.randn(2, 3, 10, 10))
    groups = channel_groups(model)
    assert [g.size for g in groups] == [8, 6]  # the classifier is excluded
    assert {(m[0], m[1]) for m in groups[0].members} == {("0", "weight"), ("0", "bias"), ("1", "weight"), ("1", "bias")}


def test_group_lasso_over_engine_groups_shrinks_coupled_slices():
    pytest.importorskip("secateur.graph.groups")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 10, 10)
    model.eval()
    groups = channel_groups(model, example_inputs=x)
    assert groups and all(g.size > 0 for g in groups)
    reg = GroupLasso(tuple(groups), lam=1.0)
    norms = reg.norms(model)
    # oracle for the 8-channel group: conv0 rows, conv0 bias, BN affine, conv3 input columns
    g8 = [i for i, g in enumerate(groups) if g.size == 8]
    assert g8
    ref = (model[0].weight.detach().reshape(8, -1).pow(2).sum(1) + model[0].bias.detach().pow(2)
           + model[1].weight.detach().pow(2) + model[1].bias.detach().pow(2)
           + model[3].weight.detach().transpose(0, 1).reshape(8, -1).pow(2).sum(1))
    assert torch.allclose(norms[g8[0]], ref.sqrt(), rtol=1e-5)
    # the 4-channel group crosses the flatten: each conv3 channel owns 36 columns of the Linear
    g4 = [i for i, g in enumerate(groups) if g.size == 4][0]
    ref4 = (model[3].weight.detach().reshape(4, -1).pow(2).sum(1) + model[3].bias.detach().pow(2)
            + model[5].weight.detach().reshape(5, 4, 36).pow(2).sum((0, 2)))
    assert torch.allclose(norms[g4], ref4.sqrt(), rtol=1e-5)
    tau = float(norms[g8[0]].detach().median())
    reg.proximal_(model, lr=tau)
    dead = norms[g8[0]] <= tau
    assert bool((model[3].weight[:, dead] == 0).all()) and bool((model[0].weight[dead] == 0).all())
    assert bool((model[1].weight[dead] == 0).all())


def test_group_lasso_shrinks_whole_groups_together():
    model = _convnet()
    model(torch.randn(2, 3, 10, 10))
    _bn_randomise(model)
    reg = GroupLasso.for_model(model, lam=1.0)
    norms = reg.norms(model)
    tau = float(torch.cat(norms).median())
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    reg.proximal_(model, lr=tau)
    new_norms = reg.norms(model)
    for g, old, new in zip(reg.groups, norms, new_norms):
        dead = old <= tau
        assert bool((new[dead] == 0).all())  # whole channel zero: conv rows, bias, BN scale and shift
        assert torch.allclose(new[~dead], old[~dead] - tau, atol=1e-5)  # survivors shrink by exactly tau
        for mod_name, param, dim, *_ in g.members:
            t = getattr(dict(model.named_modules())[mod_name], param).detach()
            rows = t.movedim(dim, 0).reshape(g.size, -1)
            assert bool((rows[dead] == 0).all())
            scale = (1 - tau / old[~dead]).unsqueeze(1)
            orig = snapshot[f"{mod_name}.{param}"].movedim(dim, 0).reshape(g.size, -1)
            assert torch.allclose(rows[~dead], orig[~dead] * scale, atol=1e-6)  # direction kept


def test_group_lasso_step_does_not_depend_on_the_order_of_overlapping_groups():
    """The structural engine's groups overlap (a conv's rows belong to its own group, its input columns to the
    previous one's): every group is thresholded from the values before the step, so reversing the groups gives the
    same model (the sequential step gave the later group norms of already-shrunk values)."""
    x = torch.randn(2, 3, 10, 10)
    torch.manual_seed(0)
    a = _convnet()
    a(x)
    _bn_randomise(a)
    b = copy.deepcopy(a)
    groups = channel_groups(a, example_inputs=x)
    tensors = [{(m[0], m[1]) for m in g.members} for g in groups]
    assert any(a & b for i, a in enumerate(tensors) for b in tensors[i + 1:])  # (a tensor in two groups)
    tau = float(torch.cat(GroupLasso(tuple(groups)).norms(a)).median())
    GroupLasso(tuple(groups), lam=1.0).proximal_(a, lr=tau)
    GroupLasso(tuple(reversed(groups)), lam=1.0).proximal_(b, lr=tau)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=k)


def test_group_lasso_penalty_gradient_training_shrinks_groups():
    torch.manual_seed(0)
    model = _convnet()
    x = torch.randn(16, 3, 10, 10)
    model(x)
    reg = GroupLasso.for_model(model, lam=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = sum(float(n.sum()) for n in reg.norms(model))
    for _ in range(20):
        opt.zero_grad()
        reg.penalty(model).backward()
        opt.step()
    assert sum(float(n.sum()) for n in reg.norms(model)) < start - 0.05 * 0.1 * 20 * 0.5


def test_group_lasso_bad_group_is_refused_before_change():
    model = _convnet()
    model(torch.randn(2, 3, 10, 10))
    good = channel_groups(model)[0]
    bad = LassoGroup(good.members + (("3", "weight", 0),), good.size)  # conv 3 has 6 rows, not 8
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="does not hold 8 channels"):
        GroupLasso((good, bad), lam=1.0).proximal_(model, lr=1.0)
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


def test_group_lasso_with_explicit_indices():
    lin = nn.Sequential(nn.Linear(4, 6))
    with torch.no_grad():
        lin[0].weight.copy_(torch.arange(24.0).reshape(6, 4))
    grp = LassoGroup((("0", "weight", 0, (1, 3)), ("0", "weight", 1, (0, 2))), size=2)
    n = GroupLasso((grp,), lam=1.0).norms(lin)[0]
    w = torch.arange(24.0).reshape(6, 4)
    expect = torch.sqrt(w[[1, 3]].pow(2).sum(1) + w[:, [0, 2]].pow(2).sum(0))
    assert torch.allclose(n, expect)


def test_prune_bn_channels_threshold_and_ratio():
    model = _convnet()
    x = torch.randn(4, 3, 10, 10)
    model(x)
    _bn_randomise(model)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    kept = prune_bn_channels(model, threshold=0.5)
    for (name, k), bn in zip(kept.items(), bns):
        assert k == max(1, int((bn.weight.detach().abs() >= 0.5).sum()))
    # masked channel output is exactly zero after BN
    h = model[1](model[0](x))
    dead = ~get_mask(model[1], "weight")
    assert bool((h[:, dead] == 0).all())
    # ratio is global over all BN scales
    model2 = _convnet()
    model2(x)
    _bn_randomise(model2)
    scales = torch.cat([m.weight.detach().abs() for m in model2.modules() if isinstance(m, nn.BatchNorm2d)])
    kept = prune_bn_channels(model2, ratio=0.5)
    assert sum(kept.values()) == 14 - 7
    cut = scales.sort().values[6]
    for m in [m for m in model2.modules() if isinstance(m, nn.BatchNorm2d)]:
        assert torch.equal(get_mask(m, "weight"), m.parametrizations.weight.original.detach().abs() > cut)
    with pytest.raises(PruningError, match="exactly one"):
        prune_bn_channels(model2)
    with pytest.raises(PruningError, match="ratio"):
        prune_bn_channels(model2, ratio=1.5)


def test_prune_bn_channels_threshold_below_float32_resolution():
    """A zero scale is below a threshold of 1e-233 although float32(1e-233) == 0 (found by the training fuzzer:
    the threshold was cast into the scales' dtype before comparing)."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.0, 0.5, -0.25]))
    assert prune_bn_channels(model, threshold=2.5667333503637356e-233) == {"1": 2}
    assert get_mask(model[1], "weight").tolist() == [False, True, True]

def test_size_weighted_group_lasso_thresholds_by_sqrt_size():
    lin = nn.Sequential(nn.Linear(9, 2), nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.fill_(1.0)   # each row: 9 entries of 1, norm 3 (bias 0)
        lin[0].bias.zero_()
    grp = LassoGroup((("0", "weight", 0), ("0", "bias", 0)), size=2)
    # sqrt(10 entries per channel) * tau = 3.16 * 0.9 = 2.85 < 3: shrinks but survives
    GroupLasso((grp,), lam=1.0, size_weighted=True).proximal_(lin, lr=0.9)
    assert torch.allclose(lin[0].weight, torch.full((2, 9), 1 - 0.9 * 10 ** 0.5 / 3))
    GroupLasso((grp,), lam=1.0, size_weighted=True).proximal_(lin, lr=1.0)
    assert bool((lin[0].weight == 0).all())


def test_prune_bn_channels_engine_path_matches_mask_path():
    pytest.importorskip("secateur.structured")
    import copy
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5))
    _bn_randomise(model)
    model.eval()
    x = torch.randn(4, 3, 10, 10)
    masked, physical = copy.deepcopy(model), copy.deepcopy(model)
    kept = prune_bn_channels(masked, threshold=0.6)
    kept_phys = prune_bn_channels(physical, threshold=0.6, example_inputs=x)
    assert kept == kept_phys
    assert [m.num_features for m in physical.modules() if isinstance(m, nn.BatchNorm2d)] == list(kept.values())
    with torch.no_grad():
        assert torch.allclose(masked(x), physical(x), atol=1e-5)


def _built_convnet():
    model = _convnet()
    model(torch.randn(2, 3, 10, 10))  # materialise the LazyLinear
    return model


def _snap(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], v) for k, v in snap.items())


def test_prune_bn_channels_ratio_prunes_exactly_the_count_on_tied_scales():
    model = _convnet()  # fresh BNs: every scale is 1.0
    kept = prune_bn_channels(model, ratio=0.5)
    assert sum(kept.values()) == 14 - 7
    # ties go to the earlier layer, then the lower index (as secateur.selection ranks); min_channels keeps
    # the first layer's lowest-index channel
    assert kept == {"1": 1, "4": 6}
    assert get_mask(model[1], "weight").tolist() == [True] + [False] * 7
    assert bool(get_mask(model[4], "weight").all())


class _DefinedOutOfOrder(nn.Module):
    """conv1, conv2, bn1, bn2 defined in that order; forward runs bn2(conv2(relu(bn1(conv1(x)))))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_prune_bn_channels_pairs_each_bn_with_the_layer_that_feeds_it():
    torch.manual_seed(0)
    model = _DefinedOutOfOrder().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.rand(8))
    keep1 = model.bn1.weight.detach().abs() >= 0.5
    assert 0 < int(keep1.sum()) < 8
    kept = prune_bn_channels(model, threshold=0.5)
    assert kept == {"bn1": int(keep1.sum()), "bn2": 8}
    assert torch.equal(get_mask(model.conv1, "weight").flatten(1).all(1), keep1)  # bn1's rows on conv1
    assert bool(get_mask(model.conv2, "weight").all())  # conv2 feeds bn2, whose channels all stay
    x = torch.randn(2, 3, 6, 6)
    h = model.bn1(model.conv1(x))
    assert bool((h[:, ~keep1] == 0).all())


def test_prune_bn_channels_refuses_a_model_it_cannot_trace_unchanged():
    class Branchy(_DefinedOutOfOrder):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = x + 1
            return super().forward(x)

    model = Branchy()
    snap = _snap(model)
    with pytest.raises(PruningError, match=r"\[bn1\] cannot tell which layer produces.*example_inputs"):
        prune_bn_channels(model, ratio=0.5)
    assert _unchanged(model, snap) and get_mask(model.bn1, "weight") is None


def test_prune_bn_channels_bn_after_a_sum_masks_the_bn_only():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    model = Residual()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.1, 1.0, 0.2, 1.0]))
    assert prune_bn_channels(model, threshold=0.5) == {"bn": 2}
    assert get_mask(model.a, "weight") is None and get_mask(model.b, "weight") is None
    assert get_mask(model.bn, "weight").tolist() == [False, True, False, True]


@pytest.mark.parametrize("kw, match", [
    ({"ratio": 0.5, "min_channels": -1}, "min_channels must be an integer >= 1"),
    ({"ratio": 0.5, "min_channels": 0}, "min_channels"),
    ({"ratio": 0.5, "min_channels": "a"}, "min_channels"),
    ({"threshold": True}, "threshold must be a number"),
])
def test_prune_bn_channels_refuses_bad_options_unchanged(kw, match):
    model = _built_convnet()
    snap = _snap(model)
    with pytest.raises(PruningError, match=match):
        prune_bn_channels(model, **kw)
    assert _unchanged(model, snap)


def test_prune_bn_channels_refuses_nan_scales_unchanged():
    model = _built_convnet()
    with torch.no_grad():
        model[4].weight[2] = float("nan")
    snap = _snap(model)
    with pytest.raises(PruningError, match=r"\[4.weight\] BatchNorm scales are not all finite"):
        prune_bn_channels(model, ratio=0.5)
    assert all(torch.equal(v.nan_to_num(7.0), snap[k].nan_to_num(7.0)) for k, v in model.state_dict().items())
    assert get_mask(model[1], "weight") is None and get_mask(model[0], "weight") is None


def test_channel_groups_pairs_by_data_flow_and_refuses_unknown_exclude():
    groups = channel_groups(_DefinedOutOfOrder(), exclude=())
    members = [{(m[0], m[1]) for m in g.members} for g in groups]
    assert members == [{("conv1", "weight"), ("conv1", "bias"), ("bn1", "weight"), ("bn1", "bias")},
                       {("conv2", "weight"), ("conv2", "bias"), ("bn2", "weight"), ("bn2", "bias")}]
    with pytest.raises(PruningError, match="exclude entries matched no layer.*'zz'"):
        GroupLasso.for_model(_built_convnet(), exclude=["zz"])
    with pytest.raises(PruningError, match="exclude entries matched no layer"):
        channel_groups(_built_convnet(), exclude=["1"])  # a BN: the simple grouping excludes producers
    assert [g.size for g in channel_groups(_built_convnet(), exclude="3")] == [8, 5]  # one name, not letters
