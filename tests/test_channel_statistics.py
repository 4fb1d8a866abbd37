"""Statistics over the channel dim reached op by op (graph/rules/reductions.py ``_statistic_site``): timm's RmsNorm2d
(``x.pow(2).mean(1)``), GlobalResponseNorm (the mean over channels of a spatial L2 norm), a hand-written
LayerNorm2d (mean and variance over dim 1), ``F.normalize`` over channels. Removal is not zeroing there (the pruned
model's statistic runs over the kept channels), so each is a noted norm site whose reference reruns the op on the
kept channels (``Plan.kept_norms``). Before, the channels were collapsed all-or-nothing: mobilenetv5_300m kept all
of its MACs at ratio 0.5, csatv2 0.85. Every test checks the pruned model against that reference *and* that plain
zeroing differs, so the reference is needed and the comparison can fail."""
import copy

import pytest
import torch
from torch import nn

import secateur
from secateur.metrics import count_macs
from secateur.structured import plan_channels
from helpers import pruned_vs_reference, zeroed_reference_pruned

timm = pytest.importorskip("timm")
from timm.layers import RmsNorm2d  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402

torch.set_num_threads(1)


class LayerNorm2dByHand(nn.Module):
    """ConvNeXt's original channels-first LayerNorm: mean and (biased) variance over dim 1."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = x.var(1, keepdim=True, unbiased=False)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + self.bias[:, None, None]


class L2Channels(nn.Module):
    def forward(self, x):
        return nn.functional.normalize(x, dim=1)


class ConvBlock(nn.Module):
    """conv -> norm over channels -> conv, twice, then a head: the norm's channels are the convs' channels."""

    def __init__(self, norm):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), norm(16)
        self.c2, self.n2 = nn.Conv2d(16, 24, 3, padding=1), norm(24)
        self.c3 = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.gelu(self.n1(self.c1(x)))
        x = nn.functional.gelu(self.n2(self.c2(x)))
        return self.head(self.c3(x).mean((2, 3)))


class ConvNeXtV2Block(nn.Module):
    """ConvNeXt-V2's MLP in channels-last: Linear -> GELU -> GRN (channels_last) -> Linear, on a residual stream."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1, self.grn, self.fc2 = nn.Linear(dim, 4 * dim), GlobalResponseNorm(4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.grn(nn.functional.gelu(self.fc1(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class MaxMeanGate(nn.Module):
    """A spatial gate from the max and the mean over channels (CBAM's statistics, without its conv)."""

    def forward(self, x):
        return x * torch.sigmoid(x.amax(1, keepdim=True) - x.mean(1, keepdim=True))


class CBAMSpatial(nn.Module):
    """CBAM's spatial attention (csatv2): mean and max over channels, a conv to one channel, broadcast as a gate
    over every channel (graph/rules/elementwise.py ``_broadcast_gate``: the gate's channel is kept, the others stay
    separate)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(s))


NORMS = {
    "max_mean_gate": lambda c: MaxMeanGate(),
    "cbam_spatial": lambda c: CBAMSpatial(),
    "rmsnorm2d": RmsNorm2d,
    "rmsnorm2d_no_affine": lambda c: RmsNorm2d(c, affine=False),
    "grn_channels_first": lambda c: GlobalResponseNorm(c, channels_last=False),
    "layernorm2d_by_hand": LayerNorm2dByHand,
    "l2_normalize": lambda c: L2Channels(),
}


def _randomize(model):
    """Random norm weights (GRN's init is zero, which would make it an identity and the check vacuous)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _check(model, x, **kw):
    """Pruned == kept-channel reference, and != plain zeroing. Returns the plan."""
    plan = plan_channels(model, x, **kw)
    zeroed, want, got = zeroed_reference_pruned(model, x, plan)
    scale = want.abs().max()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * scale, f"{((got - want).abs().max() / scale).item():.2e}"
    assert (got - zeroed).abs().max() > 1e-3 * scale  # removal is not zeroing here: the reference matters
    return plan


@pytest.mark.parametrize("kind", list(NORMS))
def test_statistic_over_channels_prunes_against_the_kept_channel_reference(kind):
    torch.manual_seed(0)
    m = _randomize(ConvBlock(NORMS[kind]))
    plan = _check(m, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert m.c1.out_channels == 8 and m.c2.out_channels == 12 and m.c3.in_channels == 12
    if hasattr(m.n1, "weight") and m.n1.weight is not None:
        assert m.n1.weight.shape == (8,) and m.n2.weight.shape == (12,)
    assert any(n.startswith("n1: aten::") and "statistics now cover the kept channels" in n for n in plan.notes)


def test_grn_channels_last_in_a_convnextv2_mlp():
    torch.manual_seed(0)
    m = _randomize(ConvNeXtV2Block())
    plan = _check(m, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert m.fc1.out_features == 32 and m.grn.weight.shape == (32,) and m.fc2.in_features == 32
    assert any(n.startswith("grn: aten::mean") for n in plan.notes)


def test_reload_is_exact(tmp_path):
    torch.manual_seed(0)
    m, x = _randomize(ConvBlock(RmsNorm2d)), torch.randn(2, 3, 8, 8)
    secateur.prune_channels(m, x, ratio=0.5)
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(ConvBlock(RmsNorm2d).eval(), tmp_path / "m.safetensors")
    assert fresh.n1.weight.shape == (8,) and fresh.n1.normalized_shape == m.n1.normalized_shape
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)


class MaxWithIndices(nn.Module):
    """``torch.max(x, 1)`` also returns the argmax, a channel position that removal renumbers: not a statistic
    site, so the channels stay all-or-nothing (``amax`` returns values only, and is one)."""

    def forward(self, x):
        return x * torch.sigmoid(torch.max(x, 1, keepdim=True).values)


def test_a_max_with_indices_over_channels_still_keeps_them():
    m = ConvBlock(lambda c: MaxWithIndices()).eval()
    plan = plan_channels(m, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert not any(g.name in ("c1", "c2") for g, _ in plan.choices)


def test_a_statistic_over_two_channel_dims_is_not_a_site():
    """Channels spread over two reduced dims (a reshape into groups): the kept positions are no single index
    along one dim, so the statistic keeps the generic all-or-nothing rule."""

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = self.c1(x)
            s = y.reshape(y.size(0), 4, 4, *y.shape[2:]).mean((1, 2))
            return self.c2(y * s[:, None])

    plan = plan_channels(Grouped().eval(), torch.randn(2, 3, 5, 5), ratio=0.5)
    assert not any(g.name == "c1" for g, _ in plan.choices)
    assert not any(s.kind == "reduce" for s in plan.norms)


def _timm_case(name, x):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for p in m.parameters():  # zero-initialised GRN gains / heads would make the check vacuous
            if not p.any():
                p.normal_(std=0.02 if p.dim() > 1 else 0.5)
    dense = copy.deepcopy(m)
    plan = _check(m, x, ratio=0.5)
    return count_macs(m, x) / count_macs(dense, x), plan


def test_csatv2_grn_prunes():
    frac, plan = _timm_case("csatv2", torch.randn(1, 3, 64, 64))
    assert frac < 0.35  # 0.85 while GRN's mean and the spatial attention's mean / max / gate kept the channels
    assert any(".grn: aten::mean" in n for n in plan.notes)
    assert any(".attn: aten::amax" in n for n in plan.notes)


@pytest.mark.slow
def test_mobilenetv5_rmsnorm2d_prunes():
    frac, plan = _timm_case("mobilenetv5_300m", torch.randn(1, 3, 64, 64))
    assert frac < 0.4  # 1.0 while RmsNorm2d's mean kept every channel
    assert any("aten::mean" in n and "statistics" in n for n in plan.notes)


class QKNormAttention(nn.Module):
    """gemma4_vit's pattern, op by op: q and k RMS-normalised over each head's dims with a weight [head_dim] shared
    by every head, then scaled dot-product attention. Whole heads are removed; the shared weights stay whole."""

    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.stem = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.qn, self.kn = nn.Parameter(torch.randn(self.head_dim)), nn.Parameter(torch.randn(self.head_dim))
        self.head = nn.Linear(dim, 3)

    @staticmethod
    def _rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        x = self.stem(x)
        b, n, _ = x.shape
        q = self._rms(self.q(x).view(b, n, self.num_heads, self.head_dim), self.qn).transpose(1, 2)
        k = self._rms(self.k(x).view(b, n, self.num_heads, self.head_dim), self.kn).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(x + self.o(y))


def test_a_weight_shared_by_every_head_leaves_the_heads_separate():
    """Before, slicing the shared qk-norm weight with the channels linked dim d of every head, and the per-head
    statistic then made all heads one all-or-nothing group (gemma4_vit_167m kept every head)."""
    torch.manual_seed(0)
    m, x = QKNormAttention().eval(), torch.randn(2, 5, 6)
    plan = plan_channels(m, x, ratio=0.5)
    heads = [g for g, _ in plan.choices if g.name == "q"]
    assert heads and heads[0].size == 4  # one unit per head
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert m.num_heads == 2 and m.q.out_features == 16 and m.qn.shape == (8,)


def test_a_token_conditioning_with_channels_of_its_own_still_pairs_with_the_stream():
    """[B, 1, C] added to tokens whose labels vary along the token dim (a cls token): not a one-channel gate, so
    its channels pair with the stream's (union), and the stream still prunes."""

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.cond = nn.Linear(6, 16), nn.Linear(4, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x, c):
            t = torch.cat([self.cls.expand(x.size(0), -1, -1), self.embed(x)], 1) + self.cond(c)[:, None]
            t = t + self.fc2(torch.relu(self.fc1(t)))
            return self.head(t[:, 0])

    torch.manual_seed(0)
    m, x, c = Cond().eval(), torch.randn(2, 5, 6), torch.randn(2, 4)
    plan = plan_channels(m, (x, c), ratio=0.5)
    ref = copy.deepcopy(m)
    plan.zero_consumers(ref)
    with torch.no_grad():
        want = ref(x, c)
        plan.apply(m)
        torch.testing.assert_close(m(x, c), want, atol=1e-5, rtol=1e-4)
    assert m.embed.out_features == 8 and m.cond.out_features == 8 and m.cls.shape == (1, 1, 8)
