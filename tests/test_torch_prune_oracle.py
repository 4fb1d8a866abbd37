"""Where secateur overlaps torch.nn.utils.prune, the same inputs give the same masks."""
import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import secateur as S

ALL = dict(targets=lambda n, m: True)


def pair(shape_in=37, shape_out=23, conv=False, seed=0):
    torch.manual_seed(seed)
    a = nn.Conv2d(5, 7, 3) if conv else nn.Linear(shape_in, shape_out)
    b = nn.Conv2d(5, 7, 3) if conv else nn.Linear(shape_in, shape_out)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("conv", [False, True])
def test_l1_unstructured(amount, conv):
    a, b = pair(conv=conv)
    tprune.l1_unstructured(a, "weight", amount=amount)
    S.prune(b, amount, **ALL)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))


@pytest.mark.parametrize("amount", [0.2, 0.5, 0.75])
def test_random_unstructured_same_seed(amount):
    a, b = pair()
    torch.manual_seed(123)
    tprune.random_unstructured(a, "weight", amount=amount)
    S.prune(b, amount, criterion=S.Random(123), **ALL)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))


@pytest.mark.parametrize("n", [1, 2, float("inf")])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_ln_structured(n, dim, amount):
    a, b = pair(conv=True)
    tprune.ln_structured(a, "weight", amount=amount, n=n, dim=dim)
    S.prune(b, amount, criterion=S.Magnitude(n), pattern=S.Slices(dim), **ALL)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_random_structured_same_seed(amount):
    a, b = pair(conv=True)
    torch.manual_seed(7)
    tprune.random_structured(a, "weight", amount=amount, dim=0)
    S.prune(b, amount, criterion=S.Random(7), pattern=S.Slices(0), **ALL)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))


@pytest.mark.parametrize("amount", [0.2, 0.6, 0.95])
def test_global_unstructured(amount):
    torch.manual_seed(1)
    ma = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 9), nn.Linear(9, 4))
    mb = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 9), nn.Linear(9, 4))
    mb.load_state_dict(ma.state_dict())
    params = [(ma[0], "weight"), (ma[3], "weight"), (ma[4], "weight")]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    S.prune(mb, amount, scope="global")
    for i in (0, 3, 4):
        assert torch.equal(ma[i].weight_mask.bool(), S.get_mask(mb[i])), i


def test_global_unstructured_chunked_radix_path(monkeypatch):
    """Force the radix (histogram) selection with tiny chunks: it must agree with torch exactly."""
    import secateur.selection as sel
    monkeypatch.setattr(sel, "CHUNK", 64)
    torch.manual_seed(2)
    ma = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20))
    mb = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20))
    mb.load_state_dict(ma.state_dict())
    tprune.global_unstructured([(ma[0], "weight"), (ma[1], "weight")], pruning_method=tprune.L1Unstructured,
                               amount=0.77)
    S.prune(mb, 0.77, scope="global")
    for i in (0, 1):
        assert torch.equal(ma[i].weight_mask.bool(), S.get_mask(mb[i]))


def test_custom_mask():
    a, b = pair()
    mask = torch.rand_like(a.weight) > 0.4
    tprune.custom_from_mask(a, "weight", mask)
    S.set_mask(b, "weight", mask)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))
    x = torch.randn(3, 37)
    assert torch.equal(a(x), b(x))


def test_iterative_pruning_matches_torch_pruning_container():
    """torch's second call prunes `amount` of the *remaining* weights; secateur's ratio is a target of the
    whole tensor, so the equivalent target is 1 - (1 - a1)(1 - a2) expressed as an exact count."""
    a, b = pair()
    n = a.weight.numel()
    tprune.l1_unstructured(a, "weight", amount=0.3)
    tprune.l1_unstructured(a, "weight", amount=0.5)
    k1 = round(0.3 * n)
    k2 = k1 + round(0.5 * (n - k1))
    S.prune(b, count=k1, **ALL)
    S.prune(b, count=k2, **ALL)
    assert torch.equal(a.weight_mask.bool(), S.get_mask(b))


def test_remove_matches_finalize():
    a, b = pair()
    tprune.l1_unstructured(a, "weight", amount=0.6)
    tprune.remove(a, "weight")
    S.prune(b, 0.6, **ALL)
    S.finalize(b)
    assert torch.equal(a.weight, b.weight)
