"""torchvision's window attentions (Swin V1/V2, MaxViT): heads, MLP hidden channels and the residual stream are
pruned (secateur/graph/windows.py). Oracles: the pruned variants' forward against the stock forward on the same
weights; removal == zeroing at the consumers with norms over the kept channels (``assert_oracle``) on small
Swin models built from torchvision's own classes and on the real swin_t / swin_v2_t / maxvit_t; save/load is exact;
a pruned model trains."""
import copy

import pytest
import torch
import torch.nn.functional as F

import secateur
from secateur.graph.windows import pruned_class
from secateur.metrics import count_macs
from secateur.structured import plan_channels

from helpers import assert_oracle, pruned_vs_reference

tv = pytest.importorskip("torchvision")
from torchvision.models import maxvit as tv_maxvit  # noqa: E402
from torchvision.models import swin_transformer as tv_swin  # noqa: E402

torch.set_num_threads(1)


def _swin_attn(v2, window, shift):
    cls = tv_swin.ShiftedWindowAttentionV2 if v2 else tv_swin.ShiftedWindowAttention
    m = cls(24, window, shift, num_heads=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("window,shift,hw", [([4, 4], [2, 2], (9, 13)),  # padded, shifted, masked
                                             ([4, 4], [0, 0], (8, 8)),  # plain windows
                                             ([4, 5], [2, 2], (4, 11)),  # one dim as large as the window
                                             ([4, 4], [0, 2], (8, 8)),  # shifted along one dim only
                                             ([8, 8], [4, 4], (5, 6))])  # window covers all: no shift
def test_pruned_swin_forward_equals_stock_forward(v2, window, shift, hw):
    """The pruned variant computes what torchvision computes on unpruned weights (it only decouples the inner
    size from the input's channels), with every padding / shift / mask path taken."""
    stock = _swin_attn(v2, window, shift)
    mine = copy.deepcopy(stock)
    mine.__class__ = pruned_class("PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention")
    mine.head_dim = mine.v_head_dim = 8
    x = torch.randn(2, *hw, 24)
    with torch.no_grad():
        want, got = stock(x), mine(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(mine, type(stock))


def test_pruned_maxvit_forward_equals_stock_forward():
    stock = tv_maxvit.RelativePositionalMultiHeadAttention(24, 8, 16).eval()
    mine = copy.deepcopy(stock)
    mine.__class__ = pruned_class("PrunedRelativePositionalMultiHeadAttention")
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), stock(x), rtol=1e-5, atol=1e-5)


def _tiny_swin(v2):
    """A two-stage Swin from torchvision's own classes (fast); non-square input below exercises padding."""
    kw = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    m = tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=10, **kw).eval()
    with torch.no_grad():  # random LayerNorm affines: a norm bug cannot hide behind weight 1 / bias 0
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(std=0.5)
    return m


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_tiny_swin_oracle_prunes_heads_stream_and_mlp(v2, heads):
    m = _tiny_swin(v2)
    x = torch.randn(2, 3, 40, 56)
    assert_oracle(m, x, ratio=0.5, heads=heads)
    attn = m.features[1][0].attn
    assert type(attn).__name__.startswith("Pruned")
    if heads == "heads":  # 2 heads of 16 -> 1 head of 16; stage 2: 4 heads -> 2
        assert (attn.num_heads, attn.head_dim, attn.v_head_dim) == (1, 16, 16)
        assert m.features[3][0].attn.num_heads == 2
    else:  # every head keeps half its q/k and v dims
        assert (attn.num_heads, attn.head_dim, attn.v_head_dim) == (2, 8, 8)
        assert (m.features[3][0].attn.num_heads, m.features[3][0].attn.head_dim) == (4, 8)
    assert m.features[0][0].out_channels == 16  # the embed dim (residual stream) shrank
    assert m.features[1][0].mlp[0].out_features == 64  # MLP hidden 128 -> 64
    assert m.features[2].dim == 16


@pytest.mark.parametrize("v2", [False, True])
def test_tiny_swin_second_plan_on_pruned_model(v2, tmp_path):
    """A pruned attention is captured again (its class is a leaf too) and prunes further, in both modes; the
    softmax scale stays the original head size's, also after save / load into a fresh model."""
    m = _tiny_swin(v2)
    x = torch.randn(1, 3, 32, 32)
    assert_oracle(m, x, ratio=0.5, heads="head_dim")
    assert_oracle(m, x, ratio=0.5)
    attn = m.features[3][0].attn
    assert (attn.num_heads, attn.head_dim, attn.v_head_dim) == (2, 8, 8) and m.features[0][0].out_channels == 8
    assert v2 or attn.scale == 16 ** -0.5
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(_tiny_swin(v2), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_maxvit_head_dims_oracle():
    """MaxViT with heads="head_dim" (the tiny config torchvision's class allows: 2 stages, 64 px)."""
    m = tv_maxvit.MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[16, 32],
                         block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    assert_oracle(_randomize(m), x, ratio=0.5, heads="head_dim")
    attn = m.blocks[1].layers[0].layers.grid_attention.attn_layer[1]
    assert (attn.n_heads, attn.head_dim, attn.v_head_dim) == (4, 4, 4)


def _randomize(m):
    with torch.no_grad():  # zero-initialised parameters would make the comparison vacuous
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return m


def _check_zoo_model(name, size, bound, tmp_path):
    """Oracle at ratio 0.5, MACs under ``bound``, exact reload through secateur.io, one SGD step lowers the loss."""
    torch.manual_seed(0)
    m = _randomize(tv.models.get_model(name).eval())
    x = torch.randn(1, 3, size, size)
    before = count_macs(m, x)
    plan = plan_channels(m, x, ratio=0.5)
    _, want, got = pruned_vs_reference(m, x, plan)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    frac = count_macs(m, x) / before
    assert 0.2 < frac < bound, frac
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(tv.models.get_model(name).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    assert {type(a).__name__ for a in fresh.modules()} == {type(a).__name__ for a in m.modules()}
    xb, y = torch.randn(2, 3, size, size), torch.tensor([3, 7])
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    loss = F.cross_entropy(m(xb), y)  # eval mode: no stochastic depth, so the two losses compare
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    with torch.no_grad():
        assert F.cross_entropy(m(xb), y) < loss


# Bound for ratio 0.5: every group (each stage's embed dim, the heads of each block, each MLP hidden) keeps half,
# so a Linear between two pruned groups keeps 1/4 of its MACs, while the attention matmuls (heads only), the
# 3-channel patch embedding and the 1000-way classifier keep 1/2. The Linears are ~90 % of these models' MACs:
# ~0.25 * 0.9 + 0.5 * 0.1 = 0.275, so 0.32 leaves room for rounding. Before windows.py, swin_t stayed at 0.69.
@pytest.mark.zoo
def test_swin_t(tmp_path):
    _check_zoo_model("swin_t", 64, 0.32, tmp_path)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name,size", [("swin_v2_t", 64), ("maxvit_t", 224)])  # MaxViT's partitions need 224
def test_swin_v2_t_and_maxvit_t(name, size, tmp_path):
    _check_zoo_model(name, size, 0.32, tmp_path)
