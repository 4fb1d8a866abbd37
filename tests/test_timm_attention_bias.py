"""timm attentions whose heads were kept whole (issue #3): LeViT, TinyViT and EfficientFormerV2 add a bias gathered
from a table ``attention_biases[:, attention_bias_idxs]`` ([heads, offsets]) and split q / k / v with sizes they keep
(``key_dim``, ``val_dim``, ``num_heads``, ``dh``); CoaT reads its inner width from its input and splits its heads
into window-size sections (``channel_splits``) of a position encoding shared by a stage. Small instances of each
family: the oracle (removal == zeroing at the consumers, norms over the kept channels), MACs fall, heads really go
(the size attributes follow the sliced tensors), exact reload, the pruned model still trains; and negatives: a
table no ``num_heads`` names stays a constant, a conv that mixes positions does not pass channels through, and
without its declared count tie EfficientFormerV2 keeps its heads (the dry run's safety net), never a wrong model."""
import pytest
import torch
from torch import nn

import secateur
from secateur.graph.groups import build_graph
from secateur.metrics import count_macs

from helpers import assert_oracle

timm = pytest.importorskip("timm")
torch.set_num_threads(1)


def _levit(conv=False):
    from timm.models.levit import Levit
    return Levit(img_size=64, num_classes=10, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                 use_conv=conv)


def _tiny_vit():
    from timm.models.tiny_vit import TinyVit
    return TinyVit(num_classes=10, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                   window_sizes=(7, 7, 14, 7), mlp_ratio=2.0, drop_path_rate=0.0)


def _efficientformer_v2():
    from timm.models.efficientformer_v2 import EfficientFormerV2
    return EfficientFormerV2(depths=(1, 1, 2, 2), embed_dims=(16, 24, 32, 48), num_vit=1, img_size=64,
                             num_classes=10, mlp_ratios=2)


def _coat(parallel=True):
    from timm.models.coat import CoaT
    if parallel:  # coat_tiny-like: equal widths, parallel blocks, ``aggregate`` over the scales' class tokens
        return CoaT(img_size=64, patch_size=4, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1),
                    parallel_depth=1, num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=10)
    # heads in window-size sections of 2, 3 and 3 (CoaT's default ``crpe_window``)
    return CoaT(img_size=64, patch_size=4, embed_dims=(16, 32, 48, 64), serial_depths=(1, 1, 1, 1),
                num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=10)


def _make(make):
    torch.manual_seed(0)
    m = make().eval()
    with torch.no_grad():  # zero-initialised bias tables / layer scales would make the oracle vacuous
        for p in m.parameters():
            if not p.any() or (p.dim() == 1 and bool((p == p[0]).all())):
                p.normal_(std=0.02 if p.dim() > 1 else 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(std=0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _heads(m):
    """{attention module: num_heads} over the modules that keep one."""
    return {n: a.num_heads for n, a in m.named_modules() if isinstance(getattr(a, "num_heads", None), int)}


def _trains(m, x):
    """A few steps on one batch lower the loss (the pruned model is an ordinary, trainable module)."""
    m.train()
    y = torch.arange(x.shape[0]) % 10
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = m(x)
        loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    m.eval()
    assert losses[-1] < losses[0], losses


def _check(make, bound, tmp_path, x=None):
    m = _make(make)
    x = torch.randn(2, 3, 64, 64) if x is None else x
    dense, heads0 = count_macs(m, x), _heads(m)
    plan = assert_oracle(m, x, ratio=0.5)
    assert not [n for n in plan.notes if "failed" in n or "differ" in n], plan.notes
    frac = count_macs(m, x) / dense
    assert frac < bound, frac
    heads = _heads(m)
    assert any(heads[n] < h for n, h in heads0.items() if h > 1), (heads0, heads)  # heads really went
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(_make(make).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    assert _heads(fresh) == heads
    _trains(m, x)
    return m, plan


# Bounds: MACs after / dense at ratio 0.5 on these small instances (at the pretrained models' own sizes,
# benchmarks/bench_zoo_depth.py: levit_128s 0.402 -> 0.275, tiny_vit_5m_224 0.567 -> 0.354, efficientformerv2_s0
# 0.615 -> 0.276, coat_lite_tiny 0.650 -> 0.345, coat_tiny 0.689 -> 0.353)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_levit_heads(conv, tmp_path):
    m, _ = _check(lambda: _levit(conv), 0.4, tmp_path)
    for a in (m.stages[0].blocks[0].attn, m.stages[1].downsample.attn_downsample, m.stages[1].blocks[0].attn):
        heads = a.attention_biases.shape[0]  # the table's rows are the heads: every stored size follows them
        assert a.num_heads == heads and a.key_attn_dim == a.key_dim * heads and a.val_attn_dim == a.val_dim * heads
    assert m.stages[1].blocks[0].attn.num_heads < 3


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_tiny_vit_heads(fused, tmp_path):
    def make():
        m = _tiny_vit()
        for mod in m.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = fused  # sdpa with the table as attn_mask, or q @ k + bias
        return m
    m, plan = _check(make, 0.45, tmp_path)
    a = m.stages[3].blocks[0].attn
    assert a.num_heads == a.attention_biases.shape[0] < 4 and a.out_dim == a.val_dim * a.num_heads
    assert any("attn.norm" in n for n in plan.notes)  # the LayerNorm inside the attention: over kept channels


def test_efficientformer_v2_heads(tmp_path):
    m, _ = _check(_efficientformer_v2, 0.45, tmp_path)
    for n, a in m.named_modules():
        if type(a).__name__.startswith("Attention2d"):
            heads = a.attention_biases.shape[0]
            assert a.num_heads == heads < 8 and a.dh == a.v.conv.out_channels == a.d * heads, n
            if hasattr(a, "talking_head1"):  # the talking heads (1x1 convs across heads) keep as many
                assert a.talking_head1.in_channels == a.talking_head2.out_channels == heads


@pytest.mark.parametrize("parallel", [False, True], ids=["lite", "parallel"])
def test_coat_heads(parallel, tmp_path):
    m, _ = _check(lambda: _coat(parallel), 0.45, tmp_path)
    for i in range(1, 5):
        crpe = getattr(m, f"crpe{i}")
        assert crpe.channel_splits == [c.out_channels for c in crpe.conv_list]
        att = getattr(m, f"serial_blocks{i}")[0].factoratt_crpe
        assert sum(crpe.head_splits) == att.num_heads == sum(crpe.window.values())
        assert att.qkv.out_features == 3 * att.proj.in_features  # heads x head size == the stream's width
        assert all(h >= 1 for h in crpe.head_splits)  # a section never loses every head


def test_gathered_table_units():
    """Capture alone: LeViT's [heads, offsets] table gathered by columns (``table[:, idx]``) has one unit per head,
    sliced with the heads it meets."""
    m = _make(_levit)
    g = build_graph(m, torch.randn(1, 3, 64, 64))
    grp = next(gr for gr in g.groups if any(mm.qualname == "stages.1.blocks.0.attn.attention_biases"
                                            for mm in gr.members))
    assert grp.size == 3
    assert any(mm.qualname == "stages.1.blocks.0.attn.qkv.linear.weight" for mm in grp.members)


class _TableBias(nn.Module):
    """q.k per head plus a gathered [rows, offsets] table (LeViT style), softmax, v, proj. ``named``: the module
    keeps ``num_heads``, which names the table's rows as heads."""

    def __init__(self, dim=24, heads=3, n=5, named=True):
        super().__init__()
        self.h = heads
        if named:
            self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, n))
        idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) + self.attention_biases[:, self.attention_bias_idxs]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_table_rows_named_by_num_heads():
    m = _TableBias().eval()
    x = torch.randn(2, 5, 24)
    assert {g.name: g.size for g in build_graph(m, x).groups}["qkv"] == 3
    assert_oracle(m, x, ratio=0.5)
    assert m.attention_biases.shape == (2, 5) and m.qkv.out_features == 48


def test_table_without_num_heads_stays_a_constant():
    """Negative: with no ``num_heads`` naming its rows, the table is a constant that varies along the heads, so the
    heads it is added to are one unit (kept), never sliced out of step with it; the oracle still holds."""
    m = _TableBias(named=False).eval()
    x = torch.randn(2, 5, 24)
    assert {g.name: g.size for g in build_graph(m, x).groups}.get("qkv", 1) == 1
    assert_oracle(m, x, ratio=0.5)
    assert m.attention_biases.shape == (3, 5) and m.qkv.out_features == 72


class _Scales(nn.Module):
    """Two branches of one stream whose class-like tokens are stacked [B, 2, C] and mixed by a Conv1d over the two
    (CoaT's ``aggregate``), then a classifier. ``k``: the conv's kernel along C (1 = per channel; 3 mixes them)."""

    def __init__(self, c=16, k=1):
        super().__init__()
        self.a, self.b = nn.Linear(8, c), nn.Linear(8, c)
        self.mix = nn.Conv1d(2, 1, kernel_size=k, padding=k // 2)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.mix(torch.stack([self.a(x), self.b(x)], dim=1)).squeeze(1))


def test_pointwise_conv_passes_length_channels():
    m = _Scales().eval()
    x = torch.randn(3, 8)
    sizes = {g.name: g.size for g in build_graph(m, x).groups}
    assert sizes["a"] == 16  # channel c of both branches is one unit, passed through the 1-wide conv
    assert_oracle(m, x, ratio=0.5)
    assert m.head.in_features == 8 and m.mix.in_channels == 2


def test_conv_mixing_positions_keeps_them():
    """Negative: a kernel of 3 along C mixes neighbouring channels, so nothing passes through: the branches' channels
    are kept whole (one unit) and the oracle holds."""
    m = _Scales(k=3).eval()
    x = torch.randn(3, 8)
    assert {g.name: g.size for g in build_graph(m, x).groups}.get("a", 1) == 1
    assert_oracle(m, x, ratio=0.5)
    assert m.head.in_features == 16


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "negative-untied"])
def test_efficientformer_v2_count_tie(tied, monkeypatch):
    """q/k heads and v heads are two groups sized by one ``num_heads``: with ratios that want different counts of
    them, the declared count tie makes both keep one count (and the heads go); without it (negative) the plan's
    counts differ, the dry run refuses it and the heads are kept (noted), never a wrong model. The oracle holds
    both ways."""
    from secateur.graph import ties
    from secateur.structured import plan_channels
    if not tied:
        for cls in [k for k in ties.COUNTED_BY if "efficientformer_v2" in k]:
            monkeypatch.delitem(ties.COUNTED_BY, cls)
    m = _make(_efficientformer_v2)
    x = torch.randn(2, 3, 64, 64)
    ratio = {"*token_mixer.q.conv": 0.5, "*token_mixer.v.conv": 0.25}
    raw = {g.name.rpartition(".")[0]: len(c) for g, c in plan_channels(m, x, ratio=ratio, verify=False).choices}
    assert (raw["stages.3.blocks.1.token_mixer.q"] == raw["stages.3.blocks.1.token_mixer.v"]) == tied
    plan = assert_oracle(m, x, ratio=ratio)
    a = m.stages[3].blocks[1].token_mixer
    assert a.num_heads == a.attention_biases.shape[0] == a.v.conv.out_channels // a.d
    assert (a.num_heads < 8) == tied
    assert tied or any("Attention2d" in n for n in plan.notes)


class _CascadedHeads(nn.Module):
    """EfficientViT-MSRA style: every head its own qkv module, each adding its own row ``bias[i]`` of one gathered
    table [heads, N, N] to its scores."""

    def __init__(self, dim=8, heads=2, n=5):
        super().__init__()
        self.num_heads = heads
        self.qkvs = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(heads))
        self.proj = nn.Linear(heads * dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, n))
        idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def forward(self, x):
        bias = self.attention_biases[:, self.attention_bias_idxs]
        outs = []
        for i, qkv in enumerate(self.qkvs):
            q, k, v = qkv(x).chunk(3, dim=-1)
            outs.append((q @ k.transpose(-2, -1) + bias[i]).softmax(-1) @ v)
        return self.proj(torch.cat(outs, -1))


def test_cascaded_head_row_is_a_constant():
    """A row picked by a constant index is one head's constant (cascaded heads are not units): it must not join the
    head's v channels into one unit (efficientvit_m0 went 0.29 -> 0.65 of dense MACs when it did)."""
    m = _CascadedHeads().eval()
    x = torch.randn(2, 5, 8)
    sizes = {g.name: g.size for g in build_graph(m, x).groups}
    assert sizes["qkvs.0"] > 1 and sizes["qkvs.1"] > 1, sizes
    assert_oracle(m, x, ratio=0.5)
    assert m.attention_biases.shape == (2, 5)
