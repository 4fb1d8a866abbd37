"""Cuts of a channel dim at positions the model keeps in its own attributes (graph/splits.py, issue #3): unequal
splits whose sizes are attributes, slices at attribute positions (a partial residual, a dual path). Each section is
pruned within; the attributes follow, proven by the dry run; the pruned model computes the oracle's reference and
reloads exactly. A cut the engine cannot move (a size written in the code) keeps its channels."""
import pytest
import torch
from torch import nn

import secateur
from helpers import assert_oracle, assert_reloads
from secateur.graph import build_graph
from secateur.metrics import count_macs


class PartialConv(nn.Module):
    """FasterNet's ``Partial_conv3``: a 3x3 conv on the first ``dim_conv3`` channels, the rest passed through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim_conv3 = dim // 4
        self.dim_untouched = dim - self.dim_conv3
        self.conv = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, padding=1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.conv(x1), x2), 1)


class FasterBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = PartialConv(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.BatchNorm2d(2 * dim), nn.ReLU(),
                                 nn.Conv2d(2 * dim, dim, 1))

    def forward(self, x):
        return x + self.mlp(self.mix(x))


class FasterNet(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = nn.Sequential(FasterBlock(dim), FasterBlock(dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class QKVAttention(nn.Module):
    """LeViT / TinyViT: ``qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim], dim=3)``, the output
    reshaped with ``self.val_attn_dim`` (heads x val_dim) and a stored scale."""

    def __init__(self, dim: int, key_dim: int = 8, num_heads: int = 2, val_dim: int = 16) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.val_attn_dim = val_dim * num_heads
        self.scale = key_dim ** -0.5
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim))


class QKVNet(nn.Module):
    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = QKVAttention(dim)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.fc(h + self.attn(h))


class Cascaded(nn.Module):
    """EfficientViT's ``CascadedGroupAttention`` (without the depthwise q conv and the bias table)."""

    def __init__(self, dim: int = 32, key_dim: int = 8, num_heads: int = 2) -> None:
        super().__init__()
        self.key_dim, self.val_dim, self.scale = key_dim, dim // num_heads, key_dim ** -0.5
        self.qkvs = nn.ModuleList(nn.Conv2d(dim // num_heads, 2 * key_dim + self.val_dim, 1)
                                  for _ in range(num_heads))
        self.proj = nn.Conv2d(self.val_dim * num_heads, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        feats_in, feats_out = x.chunk(len(self.qkvs), dim=1), []
        feat = feats_in[0]
        for i, qkv in enumerate(self.qkvs):
            if i > 0:
                feat = feat + feats_in[i]
            q, k, v = qkv(feat).view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.val_dim, H, W)
            feats_out.append(feat)
        return self.proj(torch.relu(torch.cat(feats_out, 1)))


class CascadedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.attn = Cascaded()
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(s + self.attn(s))


class PartialResidual(nn.Module):
    """ReXNet: ``x[:, 0:self.in_channels] += shortcut``, a residual over the first channels only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.expand = nn.Conv2d(16, 24, 1)
        self.in_channels = 16
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.expand(torch.relu(s))
        y[:, 0:self.in_channels] += s
        return self.head(y)


class ReXBlock(nn.Module):
    """ReXNet's out-of-place form: ``cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]])``."""

    def __init__(self, cin: int = 16, cout: int = 24) -> None:
        super().__init__()
        self.in_channels = cin
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, 0:self.in_channels] + x, y[:, self.in_channels:]], dim=1)


class ReXNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.block = ReXBlock()
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.relu(self.stem(x)))))


class DualPath(nn.Module):
    """DPN: the residual path is the first ``num_1x1_c`` channels, the dense path the rest, concatenated."""

    def __init__(self, cin: int = 24, num_1x1_c: int = 16, inc: int = 8) -> None:
        super().__init__()
        self.num_1x1_c = num_1x1_c
        self.proj = nn.Conv2d(cin, num_1x1_c + inc, 1)
        self.body = nn.Sequential(nn.Conv2d(cin, 12, 1), nn.ReLU(), nn.Conv2d(12, num_1x1_c + inc, 1))

    def forward(self, x):
        x_s = self.proj(x)
        x_s1, x_s2 = x_s[:, :self.num_1x1_c], x_s[:, self.num_1x1_c:]
        y = self.body(x)
        out1, out2 = y[:, :self.num_1x1_c], y[:, self.num_1x1_c:]
        return torch.cat([x_s1 + out1, x_s2, out2], dim=1)


class DPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 1)
        self.block = DualPath()
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.relu(self.stem(x)))))


class LiteralSplit(nn.Module):
    """The sizes are written in the code: the engine cannot move them, so the dim stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x1, x2 = torch.split(self.conv1(x), [4, 12], dim=1)
        return self.head(torch.cat((self.a(x1), x2), 1))


class LiteralSlice(nn.Module):
    """``y[:, 0:8] += s`` with the 8 in the code: kept whole, as before."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.expand = nn.Conv2d(8, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.expand(torch.relu(s))
        y[:, 0:8] += s
        return self.head(y)


class SharedSize(nn.Module):
    """One attribute sizes two cuts whose sections lose different counts (SHViT's ``pdim``: the input's first part
    and v): no value of it fits both, so what the dry run cannot prove keeps its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.pdim, self.dim, self.qk = 8, 24, 16
        self.conv1 = nn.Conv2d(3, 24, 1)
        self.qkv = nn.Conv2d(8, 24, 1)
        self.proj = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x1, x2 = torch.split(self.conv1(x), [self.pdim, self.dim - self.pdim], dim=1)
        q, v = torch.split(self.qkv(torch.relu(x1)), [self.qk, self.pdim], dim=1)
        return self.proj(torch.cat([v * torch.sigmoid(q.mean(1, keepdim=True)), x2], 1))


def _img():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8)


def _reloads(make, model, x, tmp_path):
    assert_reloads(make, model, x, tmp_path)


def _pruned(make, x, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    dense = count_macs(model, x)
    plan = assert_oracle(model, x, ratio=0.5)
    _reloads(make, model, x, tmp_path)
    return model, plan, count_macs(model, x) / dense


def test_partial_conv_split_sizes_follow(tmp_path):
    model, plan, frac = _pruned(FasterNet, _img(), tmp_path)
    assert model.stem.out_channels < 32  # the stream is pruned through the partial conv's split
    for blk in model.blocks:
        mix = blk.mix
        assert mix.dim_conv3 == mix.conv.in_channels < 8
        assert mix.dim_conv3 + mix.dim_untouched == model.stem.out_channels
    assert any("dim_conv3" in n for n in plan.notes)  # never silent
    assert frac < 0.6


def test_qkv_split_with_heads_sizes_follow(tmp_path):
    """Eager ``q @ k`` over heads: whole heads are the units (rules/matmul.py ``_matmul``), so the q/k/v sizes stay and
    the head count and ``val_attn_dim`` follow; the cut is opened all the same (it no longer forces whole heads)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    model, plan, frac = _pruned(QKVNet, x, tmp_path)
    attn = model.attn
    width = attn.num_heads * (2 * attn.key_dim + attn.val_dim)
    assert attn.qkv.out_features == width < 64
    assert attn.val_attn_dim == attn.num_heads * attn.val_dim == attn.proj.in_features


def test_cascaded_qkv_split_sizes_follow(tmp_path):
    """EfficientViT's cascaded group attention: one qkv conv per head, split by ``[key_dim, key_dim, val_dim]``;
    q and k meet in ``q^T @ k`` (their channels one to one: equal counts), v feeds the next head's input."""
    model, plan, frac = _pruned(CascadedNet, _img(), tmp_path)
    attn = model.attn
    assert attn.key_dim < 8 and attn.val_dim < 16
    for qkv in attn.qkvs:
        assert qkv.out_channels == 2 * attn.key_dim + attn.val_dim
    assert any("key_dim: 8 ->" in n for n in plan.notes)
    assert attn.scale == 8 ** -0.5  # a stored scale stays (the oracle zeroes q/k channels: the same scale)
    assert frac < 0.6


def test_partial_residual_in_place(tmp_path):
    model, plan, _ = _pruned(PartialResidual, _img(), tmp_path)
    assert model.stem.out_channels < 16 and model.expand.out_channels < 24
    assert model.in_channels == model.stem.out_channels


def test_partial_residual_cat(tmp_path):
    model, plan, _ = _pruned(ReXNet, _img(), tmp_path)
    blk = model.block
    assert blk.conv.out_channels < 24 and blk.in_channels == model.stem.out_channels < 16


def test_dual_path(tmp_path):
    model, plan, _ = _pruned(DPNet, _img(), tmp_path)
    blk = model.block
    assert blk.proj.out_channels < 24 and blk.num_1x1_c < 16
    assert blk.proj.out_channels == blk.body[2].out_channels
    assert model.head.in_channels == blk.proj.out_channels + blk.body[2].out_channels - blk.num_1x1_c


def test_a_cut_named_by_attributes_is_opened_a_literal_one_is_not():
    x = _img()
    assert build_graph(FasterNet().eval(), x).cuts
    assert not build_graph(LiteralSplit().eval(), x).cuts


def test_a_literal_split_keeps_its_channels():
    torch.manual_seed(0)
    model, x = LiteralSplit().eval(), _img()
    assert_oracle(model, x, ratio=0.5)
    assert model.conv1.out_channels == 16 and model.a.in_channels == 4


def test_a_literal_slice_keeps_its_channels():
    torch.manual_seed(0)
    model, x = LiteralSlice().eval(), _img()
    assert not build_graph(model, x).cuts
    plan = assert_oracle(model, x, ratio=0.5)
    assert not plan.attrs
    assert model.stem.out_channels == 8 and model.expand.out_channels == 12


def test_an_attribute_two_cuts_disagree_on_is_proven_or_kept():
    torch.manual_seed(0)
    model, x = SharedSize().eval(), _img()
    g = build_graph(model, x)
    assert len(g.cuts) == 2
    plan = assert_oracle(model, x, ratio={"conv1": 0.25, "qkv": 0.75})  # x1 and v lose different counts
    # pdim is the width of both x1 and v (q, one unit through its mean, keeps its 16): never one without the other
    assert model.qkv.in_channels == model.pdim == model.qkv.out_channels - 16
    assert model.dim == model.conv1.out_channels
    assert any("kept" in n for n in plan.notes)  # what could not be proven is said


# timm model -> the cut that kept it near dense (MACs after / dense at ratio 0.5 before graph/splits.py, the zoo's
# input size: benchmarks/results/zoo_depth.json)
TIMM = {
    "efficientvit_m0": "CascadedGroupAttention split [key_dim, key_dim, val_dim] (0.771)",
    "rexnet_100": "x[:, 0:self.in_channels] + shortcut (0.478)",
    "shvit_s1": "SHSA split [pdim, dim - pdim] (0.440)",
    "dpn68": "x[:, :self.num_1x1_c] dual path (0.481)",
    "fasternet_s": "Partial_conv3 split [dim_conv3, dim_untouched] (0.511)",
    "mambaout_tiny": "GatedConvBlock split(self.split_indices) (0.484)",
}


def _timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.zoo
@pytest.mark.slow  # 12-48 s each on the shared 2-core machine
@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_cuts_at_attribute_positions(name):
    from test_zoo import oracle
    model, x = _timm(name)
    dense = count_macs(model, x)
    plan = oracle(model, x)
    assert plan.attrs, "no cut size was updated"
    assert count_macs(model, x) < 0.4 * dense, TIMM[name]


@pytest.mark.zoo
def test_timm_rexnet_reloads(tmp_path):
    import timm
    model, x = _timm("rexnet_100")
    secateur.prune_channels(model, x, ratio=0.5)
    secateur.save(model, tmp_path / "m.safetensors")
    fresh = secateur.load(timm.create_model("rexnet_100", pretrained=False).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
