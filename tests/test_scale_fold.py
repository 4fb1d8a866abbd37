"""Head dims of attention whose softmax scale follows the head size (graph/scale_fold.py): SDPA without ``scale``
computes 1/sqrt(d') once q/k lose dims, so the engine multiplies q's kept producer rows by sqrt(d'/d). Every plan
here is made on random weights and checked on *sharpened* ones (q/k rows scaled up, softmax far from uniform as in
trained weights), where a wrong scale moves the output far beyond the tolerance: the oracle can fail."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_reloads, pruned_vs_reference
from secateur.metrics import count_macs
from secateur.structured import plan_channels


class Attn(nn.Module):
    """Multi-head self-attention then an MLP. ``fused``: one qkv Linear (else q, k, v Linears); ``eager``:
    ``(q * q.size(-1) ** -0.5) @ k^T`` with the scale computed at run time (else SDPA without ``scale``);
    ``q_norm``: a LayerNorm over the head dims of q and k (timm's ``qk_norm``); ``act``: a GELU on q (not
    linear: no fold can pass it)."""

    def __init__(self, dim=32, heads=4, fused=True, bias=True, eager=False, q_norm=False, act=False):
        super().__init__()
        self.num_heads, self.head_dim, self.fused, self.eager, self.act = heads, dim // heads, fused, eager, act
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.q_norm = nn.LayerNorm(self.head_dim) if q_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if q_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (f(x).view(b, n, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.act:
            q = F.gelu(q)
        if self.eager:
            q = q * q.size(-1) ** -0.5
            y = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(torch.relu(self.fc1(x)))


def _sharpened(m, factor=30.0):
    big = copy.deepcopy(m)
    with torch.no_grad():
        if big.fused:
            dim = big.qkv.in_features
            big.qkv.weight[:2 * dim] *= factor
            if big.qkv.bias is not None:
                big.qkv.bias[:2 * dim] *= factor
        else:
            for lin in (big.q, big.k):
                lin.weight *= factor
                if lin.bias is not None:
                    lin.bias *= factor
        for norm in (big.q_norm, big.k_norm):  # a norm on q / k undoes the rows' scale: sharpen after it
            if isinstance(norm, nn.LayerNorm):
                norm.weight *= factor ** 0.5
                norm.bias *= factor ** 0.5
    return big


def _folds(plan):
    return [n for n in plan.notes if "scaled by sqrt(" in n]


def _check(m, x, plan):
    """The plan applied to a sharpened copy computes the reference there; returns the pruned copy."""
    big = _sharpened(m)
    with torch.no_grad():  # the sharpening matters: the attention is far from uniform
        assert (big(x) - m(x)).abs().max() > 1e-2
    _, want, got = pruned_vs_reference(big, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return big


@pytest.mark.parametrize("fused,bias", [(True, True), (False, True), (False, False)])
def test_sdpa_default_scale_prunes_head_dims_with_q_rows_scaled(fused, bias):
    torch.manual_seed(0)
    m, x = Attn(fused=fused, bias=bias).eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert _folds(plan) and "sqrt(4/8)" in _folds(plan)[0], plan.notes
    assert not any("q/k head dims are kept" in n for n in plan.notes)
    big = _check(m, x, plan)
    rows = big.qkv.out_features if fused else big.q.out_features + big.k.out_features + big.v.out_features
    assert rows == 48 and big.proj.in_features == 16  # q, k and v lost half their dims in every head


def test_without_the_fold_the_sharpened_model_differs():
    """Negative control: the same plan with the fold's factor undone is caught by the sharpened oracle (so the tests
    above can fail), and by the plan's own logits proof on the random weights."""
    torch.manual_seed(0)
    m, x = Attn().eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    for g, _ in plan.choices:
        g.scale_fold = None
    from secateur.structured.proof import _exact
    assert _exact(m, x, plan) is False
    big = _sharpened(m)
    _, want, got = pruned_vs_reference(big, x, plan)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_a_wrong_fold_is_refused_by_the_logits_proof():
    """A GELU on q is not linear: scaling q's producer rows does not scale q. The logits proof refuses the fold,
    and the plan keeps those q/k dims (noted); the result still computes the reference."""
    torch.manual_seed(0)
    m, x = Attn(act=True).eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert not _folds(plan)
    assert any("was not proven" in n for n in plan.notes), plan.notes
    _check(m, x, plan)


def test_eager_scale_computed_at_run_time_falls_back_to_whole_heads():
    """``(q * q.size(-1) ** -0.5) @ k^T``: the scale is a number the capture sees as a constant, and the matmul over
    a head's dims makes each head one unit: whole heads go, the head size (and its scale) stays."""
    torch.manual_seed(0)
    m, x = Attn(eager=True).eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert not _folds(plan)
    big = _check(m, x, plan)
    assert big.qkv.out_features % (3 * 8) == 0 and big.qkv.out_features < 96  # whole heads of 8 dims


def test_a_norm_on_q_keeps_the_q_k_dims_with_a_note():
    """timm's ``qk_norm``: a LayerNorm over q's head dims sits between the producer and SDPA and would undo a scale
    there; no fold, the q/k dims stay (noted), v's dims still go."""
    torch.manual_seed(0)
    m, x = Attn(q_norm=True).eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert not _folds(plan)
    assert any("q/k head dims are kept" in n or "one unit" in n for n in plan.notes), plan.notes
    big = _check(m, x, plan)
    assert big.q_norm.normalized_shape == (8,)


def test_save_and_load_reproduce_the_folded_model(tmp_path):
    torch.manual_seed(0)
    m, x = Attn().eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    plan.apply(m)
    folds = m._secateur_structure["qkv"]["scale_folds"]
    assert folds["weight"]["factor"] == pytest.approx(0.5 ** 0.5) and folds["bias"]["dim"] == 0
    assert_reloads(lambda: Attn(), m, x, tmp_path)


def test_timm_vit_tiny_head_dims_with_the_fold():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m, x = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    macs0 = count_macs(m, x)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert len(_folds(plan)) == 12, plan.notes  # every block: SDPA without scale, q/k dims 64 -> 32
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert m.blocks[0].attn.qkv.out_features == 3 * 3 * 32
    assert count_macs(m, x) < 0.33 * macs0  # 0.432 with the q/k dims kept


def test_timm_vit_tiny_eager_path_agrees_with_the_folded_sdpa_path(tmp_path):
    """timm's Attention takes SDPA (no scale) when ``fused_attn``, else ``q * self.scale`` with the stored
    ``scale = head_dim ** -0.5``. The plan is made on the SDPA path (timm's default); the folded q rows alone would
    make the eager path compute ``q'.k' * sqrt(d'/d) / sqrt(d)``, so the stored scale becomes ``1/sqrt(d')`` too
    (recorded for reload): both paths then give the reference. Negative control: the old stored scale differs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m, x = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert all("stored `scale`" in n for n in _folds(plan)), plan.notes
    plan.apply(m)

    def eager(model, on=True):
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = not on
        return model

    with torch.no_grad():
        fused = m(x)
        torch.testing.assert_close(eager(m)(x), fused, rtol=1e-4, atol=1e-5)
        assert m.blocks[0].attn.scale == pytest.approx(32 ** -0.5)
        assert_reloads(lambda: eager(timm.create_model("vit_tiny_patch16_224", pretrained=False)), m, x, tmp_path)
        for blk in m.blocks:
            blk.attn.scale = 64 ** -0.5
        assert (m(x) - fused).abs().max() > 1e-3 * fused.abs().max()


def test_a_fold_whose_heads_were_collapsed_to_whole_heads_keeps_the_head_size():
    """Where a call's head dims were collapsed into whole heads (each head one unit), removing a head leaves the other
    heads' size, so the factor is 1 (timm cpubone_nano's 3-head stage under heads="head_dim" raised here before);
    heads that stay must still lose the same count."""
    from secateur.errors import PruningError
    from secateur.graph.scale_fold import ScaleFold
    whole = ScaleFold("a", 4, 3, torch.arange(3).repeat_interleave(4).view(3, 4))
    assert whole.kept(torch.tensor([1])) == 4 and whole.factor(torch.tensor([0, 2])) == 1.0
    dims = ScaleFold("a", 4, 2, torch.arange(8).view(2, 4))
    assert dims.kept(torch.tensor([0, 1, 4, 5])) == 2 and dims.kept(torch.tensor([0, 1, 2, 3, 5, 6])) == 2
    with pytest.raises(PruningError, match="lose different counts"):
        dims.kept(torch.tensor([0, 4, 5]))


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_timm_cpubone_nano_one_head_attention_folds(heads):
    """cpubone_nano's stage-2 attention has one head (its head dims are its only units) and SDPA without a scale:
    0.451 of its MACs at ratio 0.5 with that head kept whole; its 3-head stage is whole heads under "head_dim"."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m, x = timm.create_model("cpubone_nano", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    macs0 = count_macs(m, x)
    plan = plan_channels(m, x, ratio=0.5, heads=heads)
    assert len(_folds(plan)) == 1 and "sqrt(24/48)" in _folds(plan)[0], plan.notes
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert count_macs(m, x) < 0.35 * macs0
