"""Attention whose softmax scale is or is not kept by the pruned model: a one-head attention prunes its head dims
under heads="heads" where the scale is stated (graph/rules/attention.py ``sdpa``), and an SDPA call that derives the
scale from the head size folds the change into q's rows in its fused and its math path alike (``MathAttention``,
graph/scale_fold.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import pruned_vs_reference
from secateur.structured import plan_channels


class OneHead(nn.Module):
    """One attention head of 16 dims through SDPA (the CPU's flash kernel: q, k, v contiguous), then an MLP."""

    def __init__(self, stated_scale=True):
        super().__init__()
        self.head_dim = 16
        self.scale = self.head_dim ** -0.5 if stated_scale else None
        self.qkv, self.o = nn.Linear(24, 48), nn.Linear(16, 24)
        self.up, self.down = nn.Linear(24, 32), nn.Linear(32, 24)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 1, self.head_dim).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(torch.relu(self.up(x)))


def test_a_one_head_attention_prunes_its_head_dims_under_heads():
    """A whole head is one unit, never pruned (a group is never removed whole): its head dims are the only way to
    prune it. With the scale stated (a float the engine leaves as it is) q/k dims go together and v dims with o's
    inputs; the plan says so; the pruned model computes the oracle's reference."""
    torch.manual_seed(0)
    m, x = OneHead().eval(), torch.randn(2, 5, 24)
    plan = plan_channels(m, x, ratio=0.5)
    assert any("one attention head: its head dims are pruned" in n for n in plan.notes), plan.notes
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert m.qkv.out_features == 24 and m.o.in_features == 8 and m.head_dim == 8 and m.scale == 16 ** -0.5


def test_a_one_head_attention_whose_scale_follows_its_size_folds_it_into_q():
    """SDPA without ``scale`` derives it from q's head size: removing q/k dims changes it, so the engine multiplies
    q's kept rows by sqrt(d'/d) (graph/scale_fold.py). The plan made on random weights is checked on sharpened ones,
    where a wrong scale would show."""
    torch.manual_seed(0)
    m, x = OneHead(stated_scale=False).eval(), torch.randn(2, 5, 24)
    plan = plan_channels(m, x, ratio=0.5)
    assert any("one attention head" in n for n in plan.notes)
    assert any("scaled by sqrt(8/16)" in n for n in plan.notes), plan.notes
    big = _sharpened(m, heads=1, head_dim=16)
    _, want, got = pruned_vs_reference(big, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert big.qkv.out_features == 24 and big.head_dim == 8
    assert big.up.out_features == 16  # the rest of the model still prunes


class StridedHeads(nn.Module):
    """timm cpubone's ConvAttention in a Linear model: q, k, v are chunks of a permuted projection, not contiguous
    in their last dim, so the CPU runs SDPA's math decomposition, which multiplies q and k by
    ``head_dim ** -0.25`` computed from their size (no ``scale`` is passed)."""

    def __init__(self, heads=1):
        super().__init__()
        self.num_heads, self.head_dim = heads, 16
        self.qkv, self.o = nn.Linear(24, 3 * 16 * heads), nn.Linear(16 * heads, 24)
        with torch.no_grad():  # q and k rows tiny: q.k near 0 at init (timm inits with std 0.02)
            self.qkv.weight.view(heads, 3, 16, 24)[:, :2] *= 0.01
            self.qkv.bias.view(heads, 3, 16)[:, :2] *= 0.01

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).transpose(1, 2).contiguous()  # [b, channels, t], as a conv's output
        qkv = qkv.reshape(b, self.num_heads, 3 * self.head_dim, t).permute(0, 1, 3, 2)
        q, k, v = qkv.chunk(3, dim=3)
        assert q.stride(-1) != 1  # the math path (not the flash kernel)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


def _sharpened(m, factor=100.0, heads=None, head_dim=None):
    """The same model with q and k rows scaled up: softmax far from uniform, as in trained weights, where a changed
    softmax scale shows (at this init, q.k is so small that a proof on random weights does not see it)."""
    big = copy.deepcopy(m)
    heads, head_dim = heads or big.num_heads, head_dim or big.head_dim
    with torch.no_grad():
        rows = big.qkv.weight.view(heads, 3, head_dim, -1)
        rows[:, :2] *= factor
        big.qkv.bias.view(heads, 3, head_dim)[:, :2] *= factor
    return big


@pytest.mark.parametrize("heads", [1, 2])
def test_a_scale_derived_from_the_head_size_on_the_math_path(heads):
    """The math decomposition's scale (``q.size(-1) ** -0.25`` on q and k) looked like a constant: head dims were
    units and a halved ``head_dim`` changed the softmax scale unseen by a proof on random weights. Now the call is
    read as the fused kernel's: two heads lose a whole head (the head size stays); one head prunes its head dims
    with the scale change folded into q's rows. The plan made on the random weights is checked on sharpened ones,
    where a changed scale would show."""
    torch.manual_seed(0)
    m, x = StridedHeads(heads).eval(), torch.randn(2, 6, 24)
    plan = plan_channels(m, x, ratio=0.5)
    big = _sharpened(m)
    _, want, got = pruned_vs_reference(big, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if heads == 1:
        assert any("scaled by sqrt(8/16)" in n for n in plan.notes), plan.notes
        assert big.head_dim == 8 and big.qkv.out_features == 24
    else:
        assert big.head_dim == 16 and big.num_heads == 1 and big.qkv.out_features == 48 and big.o.in_features == 16
