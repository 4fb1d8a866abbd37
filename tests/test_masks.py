"""Invariants of the masking engine: identity of all-ones masks, masked == finalized, zero gradients,
parameter identity, state_dict round trips, nothing half-applied on bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import secateur as S
from secateur.masks import original


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_all_ones_mask_changes_nothing():
    m = small_cnn().eval()
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    S.apply_masks(m, {"0.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)})
    assert S.is_pruned(m)
    assert torch.equal(m(x), y)


def test_amount_zero_is_identity():
    m = small_cnn().eval()
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    S.prune(m, 0.0)
    assert torch.equal(m(x), y)


def test_masked_equals_finalized_and_parameter_identity():
    m = small_cnn().eval()
    params = {n: p for n, p in m.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    S.prune(m, 0.7, scope="global")
    y = m(x)
    S.finalize(m)
    assert not S.is_pruned(m)
    assert type(m[0]) is nn.Conv2d  # parametrization class swap undone
    assert torch.equal(m(x), y)
    for n, p in m.named_parameters():
        assert p is params[n], n
    assert sorted(m.state_dict()) == sorted(small_cnn().state_dict())


def test_masked_weights_get_zero_grad_and_stay_zero_under_sgd_momentum():
    m = small_cnn()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # built before pruning
    S.prune(m, 0.5)
    mask = S.get_mask(m[5]).clone()
    for _ in range(5):
        loss = m(torch.randn(4, 3, 6, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        g = original(m[5], "weight").grad
        assert torch.all(g[~mask] == 0)
        opt.step()
        assert torch.all(m[5].weight[~mask] == 0)
    assert torch.equal(S.get_mask(m[5]), mask)


def test_state_dict_round_trip_restores_masks():
    m = small_cnn()
    S.prune(m, 0.6)
    sd = copy.deepcopy(m.state_dict())
    m2 = small_cnn()
    S.apply_masks(m2, {k: torch.ones_like(v) for k, v in S.masks_of(m).items()})
    m2.load_state_dict(sd)
    for k, v in S.masks_of(m).items():
        assert torch.equal(S.masks_of(m2)[k], v)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_target_semantics_reprune_reaches_exact_ratio_among_survivors():
    m = nn.Linear(50, 40)
    S.prune(m, 0.3, targets=lambda n, mod: True)
    first = S.get_mask(m).clone()
    out = S.prune(m, 0.8, targets=lambda n, mod: True)
    assert out["weight"] == pytest.approx(0.8)
    assert torch.all(S.get_mask(m) <= first)  # never regrows
    # lowering the ratio never regrows either
    S.prune(m, 0.1, targets=lambda n, mod: True)
    assert float((~S.get_mask(m)).float().mean()) == pytest.approx(0.8)


def test_defaults_skip_norms_biases_embeddings_and_bias_on_request():
    m = nn.ModuleDict({"emb": nn.Embedding(10, 8), "fc": nn.Linear(8, 8), "ln": nn.LayerNorm(8)})
    out = S.prune(m, 0.5)
    assert set(out) == {"fc.weight"}
    out = S.prune(m, 0.5, include_bias=True)
    assert set(out) == {"fc.weight", "fc.bias"}


def test_conv1x1_preset():
    m = small_cnn()
    assert set(S.prune(m, 0.5, targets="conv1x1")) == {"3.weight"}


def test_threshold_and_count_modes():
    m = nn.Linear(20, 10)
    w = m.weight.detach().clone()
    S.prune(m, threshold=0.1, targets=lambda n, mod: True)
    assert torch.equal(S.get_mask(m), w.abs() >= 0.1)
    m2 = nn.Linear(20, 10)
    S.prune(m2, count=37, targets=lambda n, mod: True)
    assert int((~S.get_mask(m2)).sum()) == 37


def test_per_layer_percentile_thresholds_like_the_seed():
    """The seed MLP tutorial prunes each layer below its own np.percentile(|w|, q)."""
    import numpy as np
    m = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    q = 60
    expected = {}
    for name, mod in (("0", m[0]), ("2", m[2])):
        w = mod.weight.detach().abs().numpy()
        expected[name] = torch.from_numpy(w >= np.percentile(w, q))
    S.prune(m, lambda name, t: q / 100)
    for name, mod in (("0", m[0]), ("2", m[2])):
        # percentile interpolates between order statistics: the kept sets agree exactly
        assert torch.equal(S.get_mask(mod), expected[name])


def test_global_floor_and_ceiling_keep_every_layer_alive():
    m = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2))
    with torch.no_grad():
        m[1].weight.mul_(1e-3)  # globally, the small layer would be emptied
    out = S.prune(m, 0.5, scope="global", max_sparsity=0.9)
    assert out["1.weight"] <= 0.9
    total = sum(int((~S.get_mask(l)).sum()) for l in m)
    assert total == round(0.5 * (100 * 100 + 200))


def test_optimizer_built_before_pruning_keeps_training():
    m = nn.Linear(10, 1)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    S.prune(m, 0.5, targets=lambda n, mod: True)
    x = torch.randn(64, 10)
    y = x @ torch.randn(10, 1)
    losses = []
    for _ in range(50):
        loss = (m(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize("call, needle", [
    (lambda m: S.prune(m, 1.5), "amount must be a ratio"),
    (lambda m: S.prune(m, -0.1), "amount must be a ratio"),
    (lambda m: S.prune(m, count=-3), "count"),
    (lambda m: S.prune(m, pattern="4:4"), "0 < N < M"),
    (lambda m: S.prune(m, pattern="2:8"), "not divisible by M=8"),
    (lambda m: S.prune(m, 0.5, pattern="block3x3"), "does not divide"),
    (lambda m: S.prune(m, 0.5, criterion="nope"), "unknown criterion"),
    (lambda m: S.prune(m, 0.5, targets=lambda n, mod: False), "selected no prunable tensor"),
    (lambda m: S.prune(m, 0.5, threshold=0.1), "exactly one"),
    (lambda m: S.prune(m, 0.5, scope="galaxy"), "scope"),
    (lambda m: S.prune(m, {"nope*": 0.5}), "matched no target"),
])
def test_bad_input_raises_and_changes_nothing(call, needle):
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    S.prune(m, 0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(S.PruningError, match=needle):
        call(m)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_weights_are_refused_naming_the_tensor():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
    with pytest.raises(S.PruningError, match=r"\[1.weight\].*NaN.*shape=\(4, 4\)"):
        S.prune(m, 0.5)
    assert not S.is_pruned(m)


def test_integer_tensor_is_refused():
    m = nn.Linear(4, 4)
    m.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(S.PruningError, match="non-floating"):
        S.prune(m, 0.5, targets=lambda n, mod: True)


def test_deepcopy_and_bf16():
    m = nn.Linear(16, 8).to(torch.bfloat16)
    S.prune(m, 0.5, targets=lambda n, mod: True)
    c = copy.deepcopy(m)
    assert torch.equal(S.get_mask(c), S.get_mask(m))
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(c(x), m(x))


def test_nm_runs_along_the_input_dim_of_conv_transpose():
    m = nn.ConvTranspose2d(8, 3, 2)  # weight (in=8, out=3, 2, 2)
    S.prune(m, pattern="2:4", targets=lambda n, mod: True)
    mask = S.get_mask(m)
    assert torch.all(mask.movedim(0, -1).reshape(-1, 4).sum(-1) == 2)


def test_finalizing_a_deepcopy_leaves_the_original_intact_and_vice_versa():
    m = small_cnn().eval()
    S.prune(m, 0.5)
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    c = copy.deepcopy(m)
    S.finalize(c)
    assert S.is_pruned(m) and torch.equal(m(x), y)
    S.prune(c, 0.5, include_bias=True)  # new parametrization on the copy only
    assert torch.equal(m(x), y) and S.get_mask(m[0], "bias") is None
    S.finalize(m)
    assert torch.equal(m(x), y) and S.is_pruned(c)


# ------------------------------------------------------------------ bad input: PruningError, model unchanged


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [(n, type(mod), parametrize.is_parametrized(mod)) for n, mod in m.named_modules()])


def _assert_unchanged(m, snap):
    sd, mods = snap
    after = m.state_dict()
    assert sd.keys() == after.keys()
    assert all(torch.equal(sd[k], after[k]) for k in sd if sd[k].device.type != "meta")
    assert [(n, type(mod), parametrize.is_parametrized(mod)) for n, mod in m.named_modules()] == mods


@pytest.mark.parametrize("call", [
    lambda x: S.prune(x, 0.5), lambda x: S.finalize(x), lambda x: S.is_pruned(x), lambda x: S.masks_of(x),
    lambda x: S.apply_masks(x, {}),
])
@pytest.mark.parametrize("model", [None, "model"])
def test_model_must_be_a_module(call, model):
    with pytest.raises(S.PruningError, match="model must be an nn.Module"):
        call(model)


@pytest.mark.parametrize("call, needle", [
    (lambda m: S.prune(m, 0.5, targets=42), r"\[targets\] targets must be .*not int"),
    (lambda m: S.prune(m, 0.5, targets=["0", 1]), r"\[targets\] .*value=1"),
    (lambda m: S.prune(m, 0.5, exclude=None), r"\[exclude\] exclude must be .*not NoneType"),
    (lambda m: S.prune(m, "0.5"), r"^\[amount\] amount must be a ratio"),
    (lambda m: S.prune(m, float("nan")), r"^\[amount\] amount must be a ratio"),
    (lambda m: S.prune(m, True), r"^\[amount\] amount must be a ratio"),
    (lambda m: S.prune(m, threshold=True), r"\[threshold\] threshold must be a number"),
    (lambda m: S.prune(m, count=2.0), r"\[count\] count must be a non-negative integer"),
    (lambda m: S.prune(m, 0.5, pattern=S.NM(2.0, 4)), r"\[NM\] N must be an integer \(value=2.0\)"),
    (lambda m: S.prune(m, 0.5, pattern=S.Block("a", 2)), r"\[Block\] block rows must be an integer"),
    (lambda m: S.prune(m, 0.5, pattern=S.Slices(1.5)), r"\[Slices\] the sliced dim must be an integer"),
    (lambda m: S.prune(m, 0.5, criterion=S.Magnitude(p="x")), r"\[Magnitude\] magnitude norm order"),
    (lambda m: S.prune(m, 0.5, criterion=S.Magnitude(p=True)), r"\[Magnitude\] magnitude norm order"),
    (lambda m: S.set_mask(m[0], "weight", torch.full((8, 12), float("nan"))), r"only 0 and 1 .*value=nan"),
    (lambda m: S.set_mask(m[0], "weight", torch.full((8, 12), 0.3)), r"only 0 and 1 .*shape=\(8, 12\), value=0.3"),
    (lambda m: S.set_mask(m[0], "weight", [[True] * 12] * 8), r"mask must be a torch.Tensor .*value='list'"),
    (lambda m: S.apply_masks(m, None), r"\[apply_masks\] masks must be a dict"),
    (lambda m: S.apply_masks(m, {"1.weight": torch.ones(4, 8, dtype=torch.bool),  # a good one first: not applied
                                 "0.weight": torch.full((8, 12), float("nan"))}), r"\[0.weight\] .*only 0 and 1"),
    (lambda m: S.apply_masks(m, {"0.weight": [[1] * 12] * 8}), r"\[0.weight\] mask must be a torch.Tensor"),
])
def test_bad_arguments_raise_before_any_change(call, needle):
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    S.prune(m[1:], 0.25)  # one layer masked, one not
    snap = _snapshot(m)
    with pytest.raises(S.PruningError, match=needle):
        call(m)
    _assert_unchanged(m, snap)


def test_float_masks_of_zeros_and_ones_are_accepted():
    m = nn.Linear(4, 3)
    keep = torch.rand(3, 4) > 0.5
    S.set_mask(m, "weight", keep.float())
    assert torch.equal(S.get_mask(m), keep)
    S.apply_masks(m, {"weight": (~keep).to(torch.int64)})
    assert torch.equal(S.get_mask(m), ~keep)


def test_numpy_scalars_are_accepted_like_python_numbers():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    b, c, d = copy.deepcopy(a), copy.deepcopy(a), copy.deepcopy(a)
    assert S.prune(a, np.float32(0.5)) == S.prune(b, 0.5)
    assert all(torch.equal(S.get_mask(x), S.get_mask(y)) for x, y in zip(a, b))
    assert S.prune(c, count=np.int64(5)) == S.prune(d, count=5)
    S.prune(copy.deepcopy(a), threshold=np.float32(0.1))
    assert S.NM(np.int64(2), 4).n == 2


@pytest.mark.parametrize("kw, needle", [
    (dict(amount=0.9, scope="global", max_sparsity=0.5), r"^\[amount\] .*cannot be met \(value=0.9\)"),
    (dict(amount=0.1, scope="global", min_sparsity=0.3), r"^\[amount\] .*cannot be met \(value=0.1\)"),
    (dict(count=90, scope="global", max_sparsity=0.5), r"\[count\] .*only 0 to 64 entries"),
    (dict(amount=0.9, max_sparsity=0.5), "global amount or count only"),  # local: the bound would be ignored
    (dict(threshold=0.1, scope="global", max_sparsity=0.5), "global amount or count only"),
])
def test_global_bounds_that_rule_out_the_target_are_refused(kw, needle):
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    snap = _snapshot(m)
    with pytest.raises(S.PruningError, match=needle):
        S.prune(m, **kw)
    _assert_unchanged(m, snap)
    assert S.prune(m, 0.5, scope="global", max_sparsity=0.5) == {"0.weight": 0.5, "1.weight": 0.5}


def test_meta_model_is_refused():
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4)).to("meta")
    snap = _snapshot(m)
    with pytest.raises(S.PruningError, match=r"\[0.weight\] masks need real weights.*meta device"):
        S.prune(m, 0.5)
    with pytest.raises(S.PruningError, match="meta device"):
        S.set_mask(m[0], "weight", torch.ones(8, 12, dtype=torch.bool))
    _assert_unchanged(m, snap)
    assert not S.is_pruned(m)


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_foreign_parametrization_is_refused_by_prune_and_set_mask():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    parametrize.register_parametrization(m[1], "weight", _Double())
    snap = _snapshot(m)
    for call in (lambda: S.prune(m, 0.5), lambda: S.prune(m, 0.5, targets=["1"]),
                 lambda: S.set_mask(m[1], "weight", torch.ones(4, 8, dtype=torch.bool)),
                 lambda: S.apply_masks(m, {"0.weight": torch.ones(8, 12, dtype=torch.bool),
                                           "1.weight": torch.ones(4, 8, dtype=torch.bool)})):
        with pytest.raises(S.PruningError, match=r"\[(1|ParametrizedLinear)\.weight\] cannot (prune|mask) a tensor "
                                                 r"under a parametrization secateur did not add \(value='_Double'\)"):
            call()
        _assert_unchanged(m, snap)
    assert S.prune(m, 0.5, exclude=["1"]) == {"0.weight": 0.5}


def test_finalize_removes_only_secateurs_parametrizations():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    parametrize.register_parametrization(m[1], "weight", _Double())
    S.prune(m, 0.5, exclude=["1"])
    parametrize.register_parametrization(m[2], "weight", _Double())  # registered after the mask
    x = torch.randn(3, 12)
    y = m(x)
    stored, keep = original(m[2], "weight"), S.get_mask(m[2]).clone()
    raw = stored.detach().clone()
    S.finalize(m)
    assert not S.is_pruned(m) and torch.equal(m(x), y)
    for i in (1, 2):  # the user's parametrizations stay, alone
        assert [type(p) for p in m[i].parametrizations.weight] == [_Double]
    assert not parametrize.is_parametrized(m[0])
    assert original(m[2], "weight") is stored and torch.equal(stored, raw * keep)  # the zeros baked in
