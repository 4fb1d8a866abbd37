"""Count ties (graph/ties.py): attention that reads its inner width from its input's shape (timm's
``B, N, C = x.shape; ... reshape(B, N, C)``) gets the stream's kept count for its heads, and the plan still passes
the oracle; where the tie cannot be met (one head, pruned whole or not at all) both stay whole, with a note."""
import pytest
import torch
from torch import nn

from helpers import assert_oracle, pruned_vs_reference
from secateur.structured import proof as structured
from secateur.metrics import count_macs
from secateur.structured import plan_channels, prune_channels


class ShapeAttn(nn.Module):
    """timm style: the inner width is ``C`` from ``x.shape``, the head size an attribute."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ShapeAttn(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=48, heads=4, depth=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x).flatten(2).transpose(1, 2))).mean(1))


def _model(heads=4, dim=48, seed=0):
    torch.manual_seed(seed)
    return TinyViT(dim, heads).eval(), torch.randn(2, 3, 16, 16)


# the stream loses a quarter, the heads half: the counts differ unless tied
UNEVEN = {"embed": 0.25, "*qkv": 0.5, "*mlp.0": 0.5}


def _widths(model):
    return [(b.attn.num_heads * b.attn.head_dim, b.attn.qkv.in_features, b.attn.proj.in_features)
            for b in model.blocks]


def _untied(monkeypatch):
    monkeypatch.setattr(structured, "_tie_class", lambda *a, **k: None)


def test_untied_plan_is_caught_by_the_dry_run(monkeypatch):
    """The situation ties answer: without them the dry run has to keep the stream and the heads whole."""
    _untied(monkeypatch)
    m, x = _model()
    plan = plan_channels(m, x, ratio=UNEVEN)
    assert any("pruned forward failed" in n for n in plan.notes)
    assert not any(g.name == "embed" for g, _ in plan.choices)


@pytest.mark.parametrize("kw", [dict(ratio=UNEVEN), dict(ratio=UNEVEN, round_to=2), dict(ratio=0.5, scope="global")],
                         ids=["uneven", "round_to", "global"])
def test_tied_counts_pass_the_oracle(kw):
    m, x = _model()
    if kw.get("scope") == "global":  # big MLP weights: the global ranking takes from the stream and heads
        with torch.no_grad():
            for b in m.blocks:
                b.mlp[0].weight.mul_(20)
    plan = assert_oracle(m, x, **kw)
    names = {g.name for g, _ in plan.choices}
    assert "embed" in names and "blocks.0.attn.qkv" in names  # stream and heads both pruned
    stream = m.embed.out_channels
    assert stream < 48
    for inner, qkv_in, proj_in in _widths(m):
        assert inner == proj_in == stream == qkv_in  # the tie held, in the sizes the forward reads
    if kw.get("round_to"):
        assert stream % 2 == 0
    assert any("count ties" in n for n in plan.notes)


def test_tied_plan_saves_and_reloads(tmp_path):
    from secateur.io import load, save
    m, x = _model()
    res = prune_channels(m, x, ratio=UNEVEN)
    assert res.macs_after < res.macs_before
    save(m, tmp_path / "m.sct")
    fresh = load(_model()[0], tmp_path / "m.sct")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    assert _widths(fresh) == _widths(m)
    assert [b.attn.num_heads for b in fresh.blocks] == [b.attn.num_heads for b in m.blocks]


def test_target_macs_respects_ties():
    m, x = _model()
    macs0 = count_macs(m, x)
    ref = _model()[0]
    res = prune_channels(m, x, target_macs=0.5)
    assert res.macs_after <= 0.5 * macs0 + 1
    for inner, qkv_in, proj_in in _widths(m):
        assert inner == qkv_in == proj_in == m.embed.out_channels
    plan = res.plans[0]
    base, want, got = pruned_vs_reference(ref, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_one_head_prunes_its_dims_with_the_stream():
    """One head cannot lose a head, but its dims can go with the stream: the size search sets ``head_dim``
    48 -> 24 (shapes then match) and the numeric proof (``structured/proof.py _exact``) accepts it, since the softmax scale
    is the stored ``self.scale`` (unchanged, as in the reference) and the reference zeroes the q/k dims at their
    producers (contracted in ``q @ k^T``, graph/rules/matmul.py ``_matmul``). Before that zeroing the reference kept
    their term, the proof failed and the stream and head stayed whole."""
    m, x = _model(heads=1)
    plan = assert_oracle(m, x, ratio=0.5)
    w = m.embed.out_channels
    assert w < 48 and _widths(m) == [(w, w, w)] * 2
    assert [b.attn.head_dim for b in m.blocks] == [w, w]
    assert any("blocks.0.attn.head_dim: 48 ->" in n for n in plan.notes)  # never silent


def test_last_head_views_where_two_heads_copied(monkeypatch):
    """Two heads -> one: ``q @ k^T`` reshapes q to 3-D by a copy (clone + _unsafe_view) with two heads and by a
    view with one. Same shapes, so the dry run must not call it a different op sequence (it kept the stream and
    heads whole before)."""
    from secateur.graph import verify
    m, x = _model(heads=2)
    plan = assert_oracle(m, x, ratio=0.5)
    assert [b.attn.num_heads for b in m.blocks] == [1, 1] and m.embed.out_channels == 24
    assert not any("ran clone" in n for n in plan.notes)
    monkeypatch.setattr(verify, "_copy_step", lambda trace, i, op: (trace[i][0], i))  # the check without it
    m, x = _model(heads=2)
    plan = plan_channels(m, x, ratio=0.5)
    assert any("ran clone" in n for n in plan.notes)


# ---------------------------------------------------------------- timm
TIMM_FAST = ["pvt_v2_b0"]
TIMM_SLOW = ["edgenext_small", "davit_tiny", "nest_tiny", "crossvit_18_240", "swinv2_cr_tiny_224"]
TIMM_COPY = ["hieradet_small", "twins_svt_small"]  # needed the reshape-copy alignment (a last head), not ties


def _timm(name):
    timm = pytest.importorskip("timm")
    import zoo_models as Z
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    return m, Z.timm_input(m)


def _macs_fraction(name, monkeypatch=None):
    m, x = _timm(name)
    macs0 = count_macs(m, x)
    plan = plan_channels(m, x, ratio=0.5)
    base, want, got = pruned_vs_reference(m, x, plan)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return count_macs(m, x) / macs0, plan


def _check_timm(name, monkeypatch):
    after, plan = _macs_fraction(name)
    assert any("count ties" in n for n in plan.notes)
    with monkeypatch.context() as mp:
        _untied(mp)
        before, _ = _macs_fraction(name)
    assert after < before - 0.05, (after, before)


@pytest.mark.parametrize("name", TIMM_FAST)
def test_timm_ties(name, monkeypatch):
    _check_timm(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_SLOW)
def test_timm_ties_slow(name, monkeypatch):
    _check_timm(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_COPY)
def test_timm_last_head_copy_slow(name):
    after, plan = _macs_fraction(name)
    assert not any("ran clone" in n for n in plan.notes)
    assert after < 0.5
