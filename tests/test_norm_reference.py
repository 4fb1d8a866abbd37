"""Norms over the pruned channel dim: removal is not zeroing there, so the plan says so and the reference is the
original model (consumers zeroed) whose norms compute their statistics over the kept channels only
(``Plan.kept_norms``). Each test also checks that plain zeroing would *not* match, so the reference is needed
and the comparison can fail."""

import pytest
import torch
from torch import nn

from secateur.structured import plan_channels, prune_channels
from helpers import zeroed_reference_pruned

torch.set_num_threads(1)


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, nn.Parameter) and t.dim() == 1:
                    t.normal_(generator=g)
    return model


def _check(model, x, *, naive_differs=True, **kw):
    """Pruned model == reference; and (when asked) != plain zeroing. Returns the plan."""
    model.eval()
    plan = plan_channels(model, x, **kw)
    zeroed, want, got = zeroed_reference_pruned(model, x, plan)
    assert got.shape == want.shape
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale, f"{(got - want).abs().max() / scale:.2e}"
    if naive_differs:
        assert (got - zeroed).abs().max() > 1e-3 * scale  # removal is not zeroing here
    return plan


class LNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(5, 16), nn.LayerNorm(16)
        self.fc2, self.ln2 = nn.Linear(16, 16), nn.RMSNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.ln1(self.fc1(x)))
        return self.out(self.ln2(self.fc2(x)))


def test_layernorm_and_rmsnorm_mlp_pruned_against_the_kept_channel_reference():
    torch.manual_seed(0)
    m = _randomize_norms(LNMLP())
    plan = _check(m, torch.randn(4, 5), ratio=0.5)
    assert m.ln1.normalized_shape == (8,) and m.ln1.weight.shape == (8,) and m.ln1.bias.shape == (8,)
    assert m.ln2.normalized_shape == (8,) and m.ln2.weight.shape == (8,)
    notes = [n for n in plan.notes if "statistics" in n]
    assert any(n.startswith("ln1: LayerNorm") for n in notes) and any(n.startswith("ln2: RMSNorm") for n in notes)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class ViTLike(nn.Module):
    """Pre-norm transformer blocks on a residual stream with a cls token and position embedding (free
    parameters), then a final LayerNorm and a head: the stream's channels go through every LayerNorm."""

    def __init__(self, dim=32, heads=4, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), attn=Attention(dim, heads),
                ln2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 2 * dim), fc2=nn.Linear(2 * dim, dim))))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
        return self.head(self.norm(x)[:, 0])


def test_vit_like_residual_stream_pruned_through_its_layernorms():
    torch.manual_seed(0)
    m = _randomize_norms(ViTLike())
    plan = _check(m, torch.randn(2, 3, 32, 32), ratio=0.5)
    assert m.patch.out_channels == 16 and m.cls.shape == (1, 1, 16) and m.pos.shape == (1, 17, 16)
    assert m.norm.normalized_shape == (16,) and m.blocks[0]["ln1"].normalized_shape == (16,)
    assert m.blocks[1]["fc2"].out_features == 16 and m.head.in_features == 16
    assert m.blocks[0]["attn"].num_heads == 2 and m.blocks[0]["attn"].qkv.out_features == 48
    assert sum("statistics" in n for n in plan.notes) == 5  # 2 x 2 block norms + the final norm


def test_convnext_tiny_layernorm2d_at_op_level_and_layernorm_modules():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = _randomize_norms(tv.models.convnext_tiny())
    x = torch.randn(1, 3, 64, 64)
    plan = _check(m, x, ratio=0.5)
    stem_norm = m.features[0][1]  # LayerNorm2d: permute + F.layer_norm, reached at ATen level
    assert stem_norm.normalized_shape == (48,) and stem_norm.weight.shape == (48,)
    assert any("aten::native_layer_norm" in n and "statistics" in n for n in plan.notes)
    assert any(n.startswith("features.1.0.block.2: LayerNorm") for n in plan.notes)


def test_groupnorm_whole_groups_is_exact_and_op_level_groupnorm_too():
    class GNSub(nn.GroupNorm):  # own forward: reached at ATen level, num_groups still updated
        def forward(self, x):
            return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    class GN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8)
            self.c2, self.n2 = nn.Conv2d(8, 8, 1), GNSub(2, 8)
            self.c3 = nn.Conv2d(8, 8, 1)
            self.w, self.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
            self.c4 = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.c3(torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))))
            return self.c4(nn.functional.group_norm(x, 2, self.w, self.b))  # a count in the code: kept

    torch.manual_seed(0)
    m = _randomize_norms(GN())
    plan = _check(m, torch.randn(2, 3, 5, 5), ratio=0.5, naive_differs=False)  # whole groups: exact zeroing
    assert m.n1.num_groups == 2 and m.n1.num_channels == 4
    assert m.n2.num_groups == 1 and m.n2.num_channels == 4 and m.c2.out_channels == 4
    assert m.c3.out_channels == 8 and m.w.shape == (8,)
    assert any("native_group_norm" in n and "kept" in n for n in plan.notes)
    assert not any("statistics" in n for n in plan.notes)


class OneGroup(nn.GroupNorm):  # timm's GroupNorm1: its own forward, reached at ATen level
    def __init__(self, c):
        super().__init__(1, c)

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PoolFormerLike(nn.Module):
    """A residual stream normalised by one-group GroupNorms (PoolFormer's token mixer and MLP), called twice."""

    def __init__(self, op_level):
        super().__init__()
        norm = OneGroup if op_level else (lambda c: nn.GroupNorm(1, c))
        self.stem, self.n1, self.n2 = nn.Conv2d(3, 8, 1), norm(8), norm(8)
        self.fc1, self.fc2, self.head = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            y = self.n1(x)
            x = x + nn.functional.avg_pool2d(y, 3, 1, 1) - y
            x = x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("op_level", [False, True])
def test_groupnorm_with_one_group_prunes_its_channels_against_the_kept_channel_reference(op_level, tmp_path):
    """One group is a LayerNorm over channels and positions: the stream prunes, the plan says removal is not
    zeroing there, and the reference normalises over the kept channels (it kept every channel before)."""
    from helpers import assert_reloads
    torch.manual_seed(0)
    make = lambda: _randomize_norms(PoolFormerLike(op_level))  # noqa: E731
    m, x = make(), torch.randn(2, 3, 5, 5)
    plan = _check(m, x, ratio=0.5)
    assert m.stem.out_channels == 4 and m.n1.weight.shape == (4,) and m.n1.num_channels == 4
    assert m.n1.num_groups == 1 and m.n2.num_groups == 1
    assert sum("n1: " in n and "statistics" in n for n in plan.notes) == 1
    assert_reloads(make, m, x, tmp_path)


def test_layernorm_over_several_dims_and_without_affine_keeps_channels():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 3))
    plan = plan_channels(m, torch.randn(2, 4), ratio=0.5)
    assert plan.choices == [] and any("no affine weight" in n for n in plan.notes)
    m = nn.Sequential(nn.Conv2d(3, 6, 1), nn.LayerNorm([6, 4, 4]), nn.Conv2d(6, 2, 1))
    plan = plan_channels(m, torch.randn(1, 3, 4, 4), ratio=0.5)
    assert not any(g.name == "0" for g, _ in plan.choices) and any("shape (6, 4, 4)" in n for n in plan.notes)


def test_layernorm_over_a_non_channel_dim_passes_channels_through_exactly():
    """LayerNorm over the sequence dim of [B, C, L]: each channel is normalised on its own."""
    m = nn.Sequential(nn.Conv1d(3, 8, 1), nn.LayerNorm(5), nn.Conv1d(8, 2, 1))
    torch.manual_seed(0)
    plan = _check(_randomize_norms(m), torch.randn(2, 3, 5), ratio=0.5, naive_differs=False)
    assert m[0].out_channels == 4 and m[1].normalized_shape == (5,)
    assert not any("statistics" in n for n in plan.notes)


def test_prune_channels_result_notes_and_target_macs_with_layernorm():
    torch.manual_seed(0)
    m, x = ViTLike(), torch.randn(2, 3, 32, 32)
    res = prune_channels(m, x, target_macs=0.6)
    assert res.macs_after <= 0.6 * res.macs_before and len(res.plans) == 1
    assert any("statistics" in n for n in res.notes)
