"""Weight-standardised convolutions (timm StdConv2d / ScaledStdConv2d, graph/std_conv.py): their output channels
are removed exactly, their input channels with the standardisation over the kept columns (a noted site whose
reference is the layer run on the kept inputs). Before, a whole BiT / NFNet backbone stayed dense."""
import copy

import pytest
import torch
from torch import nn

import secateur
from helpers import pruned_vs_reference, zeroed_reference_pruned
from secateur.metrics import count_macs
from secateur.structured import plan_channels

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402


class Net(nn.Module):
    def __init__(self, groups: int = 1, scaled: bool = False):
        super().__init__()
        conv = ScaledStdConv2d if scaled else StdConv2d
        self.a = conv(3, 16, 3, padding=1)
        self.b = conv(16, 24, 3, padding=1, groups=groups)
        self.c = StdConv2dSame(24, 32, 3, stride=2)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x)) + 0.1
        x = torch.relu(self.c(x))
        return self.head(x.mean((2, 3)))


def _net(**kw):
    torch.manual_seed(0)
    m = Net(**kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # break the init's symmetry (ScaledStdConv gains are all one)
    return m


@pytest.mark.parametrize("kw", [{}, {"scaled": True}, {"groups": 2}, {"groups": 4, "scaled": True}])
def test_oracle_with_standardisation_over_kept_inputs(kw):
    m, x = _net(**kw), torch.randn(2, 3, 12, 12)
    dense = copy.deepcopy(m)
    plan = plan_channels(m, x, ratio=0.5)
    assert any("weight standardisation" in n for n in plan.notes)
    base, want, got = pruned_vs_reference(m, x, plan)
    assert got.shape == base.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert m.b.weight.shape[0] < dense.b.weight.shape[0] and m.c.weight.shape[1] < dense.c.weight.shape[1]
    assert m.b.out_channels == m.b.weight.shape[0] and m.c.in_channels == m.c.weight.shape[1]
    if kw.get("scaled"):
        assert m.a.gain.shape[0] == m.a.weight.shape[0]
        assert m.b.scale == dense.b.scale  # the pruned layer keeps its original scale


def test_zeroing_alone_is_not_the_reference():
    """The site is needed: zeroing the raw columns leaves them in each row's mean and variance."""
    m, x = _net(), torch.randn(2, 3, 12, 12)
    plan = plan_channels(m, x, ratio=0.5)
    zeroed, _, got = zeroed_reference_pruned(m, x, plan)
    assert (zeroed - got).abs().max() > 1e-3


def test_reload_is_exact_and_it_trains(tmp_path):
    m, x = _net(scaled=True), torch.randn(4, 3, 12, 12)
    secateur.prune_channels(m, x, ratio=0.5)
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(Net(scaled=True).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    y = torch.randint(0, 5, (4,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "nf_regnet_b0"])
def test_timm_backbones_prune_deeply(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = copy.deepcopy(m)
    plan = plan_channels(m, x, ratio=0.5)
    base, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert count_macs(m, x) < 0.35 * count_macs(dense, x)  # nf_regnet_b0: 0.96 while StdConv was a constant
