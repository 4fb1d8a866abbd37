"""Randomised tests over shapes, ratios and patterns: exact counts, N:M validity, block validity, ties."""
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn

import secateur as S
from secateur.selection import below, lowest

ALL = dict(targets=lambda n, m: True)
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(out=st.integers(1, 24), inp=st.integers(1, 24), ratio=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_exact_count_local(out, inp, ratio, seed):
    torch.manual_seed(seed)
    m = nn.Linear(inp, out)
    S.prune(m, ratio, **ALL)
    assert int((~S.get_mask(m)).sum()) == round(ratio * out * inp)


@SETTINGS
@given(n_layers=st.integers(1, 4), ratio=st.floats(0, 1), seed=st.integers(0, 10**6),
       quantise=st.booleans())
def test_global_exact_count_and_kept_dominate_pruned(n_layers, ratio, seed, quantise):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(*[nn.Linear(int(torch.randint(1, 9, (1,), generator=g)) * 3, 6) for _ in range(n_layers)])
    with torch.no_grad():
        for layer in m:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.in_features = layer.weight.shape[1]
            if quantise:  # many exact ties
                layer.weight.copy_(torch.round(layer.weight * 2) / 2)
    S.prune(m, ratio, scope="global")
    total = sum(l.weight.numel() for l in m)
    pruned = [l.parametrizations.weight.original[~S.get_mask(l)].abs() for l in m]
    kept = [l.parametrizations.weight.original[S.get_mask(l)].abs() for l in m]
    assert sum(p.numel() for p in pruned) == round(ratio * total)
    if any(p.numel() for p in pruned) and any(k.numel() for k in kept):
        assert torch.cat(pruned).max() <= torch.cat(kept).min()


@SETTINGS
@given(nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 8)]), groups=st.integers(1, 6),
       out=st.integers(1, 10), seed=st.integers(0, 10**6), conv=st.booleans())
def test_nm_validity(nm, groups, out, seed, conv):
    n, mm = nm
    torch.manual_seed(seed)
    layer = nn.Conv2d(groups * mm, out, 2) if conv else nn.Linear(groups * mm, out)
    S.prune(layer, pattern=S.NM(n, mm), **ALL)
    mask = S.get_mask(layer)
    per_group = mask.movedim(1, -1).reshape(-1, mm).sum(-1)
    assert torch.all(per_group == n)
    # the kept ones are the largest of their group
    w = layer.parametrizations.weight.original.detach().abs().movedim(1, -1).reshape(-1, mm)
    km = mask.movedim(1, -1).reshape(-1, mm)
    kept_min = torch.where(km, w, torch.full_like(w, math.inf)).amin(-1)
    pruned_max = torch.where(~km, w, torch.full_like(w, -math.inf)).amax(-1)
    assert torch.all(kept_min >= pruned_max)


@SETTINGS
@given(r=st.sampled_from([1, 2, 4]), c=st.sampled_from([1, 2, 4]), br=st.integers(1, 5), bc=st.integers(1, 5),
       ratio=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_block_validity(r, c, br, bc, ratio, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(bc * c, br * r)
    S.prune(layer, ratio, pattern=S.Block(r, c), **ALL)
    mask = S.get_mask(layer).reshape(br, r, bc, c)
    block_any = mask.any(dim=(1, 3))
    block_all = mask.all(dim=(1, 3))
    assert torch.equal(block_any, block_all)  # every block all-kept or all-pruned
    assert int((~block_all).sum()) == round(ratio * br * bc)


@SETTINGS
@given(values=st.lists(st.sampled_from([-2.0, -1.0, 0.0, -0.0, 0.5, 1.0, -1e-45, 1e-45, float("-inf")]), min_size=1, max_size=60),
       k=st.integers(0, 60), split=st.integers(1, 59))
@example(values=[0.0, -0.0], k=1, split=1)
@example(values=[-1e-45, -0.0, 0.0, 1e-45], k=2, split=2)
def test_lowest_selection_exact_with_ties_single_and_split(values, k, split):
    s = torch.tensor(values)
    k = min(k, s.numel())
    one = lowest([s], k)[0]
    assert int(one.sum()) == k
    if 0 < k < s.numel():
        assert s[one].max() <= s[~one].min()
    split = min(split, s.numel())
    parts = lowest([s[:split], s[split:]], k)
    # deterministic tie-break: earliest tensor, lowest index -> same as the single-tensor answer (-0.0 and 0.0 are
    # equal scores: the radix select once ranked -0.0 first)
    assert torch.equal(torch.cat(parts), one)


@pytest.mark.parametrize("p", [0.5, 3.0, 50.0, 400.0])
def test_high_order_norms_rank_groups_without_underflow(p):
    """|w| ** p of small weights underflows float32 for a large p (1e-2 ** 50): every row used to score 0 and the
    rows were pruned in index order. Scaled by each group's largest entry, the ranking is float64's."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-2)
    w = lin.weight.detach().double().abs()
    top = w.amax(1, keepdim=True)
    ref = top.squeeze(1) * (w / top).pow(p).sum(1).pow(1 / p)  # float64, scaled too (no underflow at 1e-2 ** 400)
    S.prune(lin, 0.5, pattern="rows", criterion=S.Magnitude(p))
    pruned = ~S.masks_of(lin)["weight"].all(1)
    assert torch.equal(pruned, torch.isin(torch.arange(12), torch.argsort(ref)[:6]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(values=st.lists(st.floats(allow_nan=False, width=32) | st.sampled_from([0.0, -0.0, 1e-45, 0.1]), min_size=1,
                       max_size=20),
       threshold=st.floats(allow_nan=False) | st.sampled_from([2.5667333503637356e-233, 1e-40, 0.1, -1e-300, 1e300]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
@example(values=[0.0], threshold=2.5667333503637356e-233, dtype=torch.float32)
def test_below_compares_the_exact_numbers(values, threshold, dtype):
    """``below`` decides ``score < threshold`` on the exact values (a Python float is a float64), never on the
    threshold rounded into the scores' dtype: 0.0 is below 1e-233 although float32(1e-233) == 0."""
    s = torch.tensor(values, dtype=torch.float64).to(dtype)
    want = [float(v) < threshold for v in s.double()]
    assert below(s, threshold).tolist() == want


def test_threshold_prune_keeps_exact_order_for_tiny_thresholds():
    """A zero weight is below a threshold of 1e-46 (which float32 rounds to 0 when the threshold is cast)."""
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0, 2.0, 3.0], [1e-45, 0.5, 0.0, 1.0]]))
    S.prune(lin, threshold=1e-46)
    assert S.get_mask(lin, "weight").tolist() == [[False, True, True, True], [True, True, False, True]]
