"""timm window / relative-position attentions that were kept whole (issue #3): a relative position table in a
bias module without ``num_heads`` (``RelPosBias``: MaxViT ``*_rw``, GCViT), and Swin V2's per-head ``logit_scale``
reaching the attention through ``clamp().exp()``. Oracle (``assert_oracle``: removal == zeroing at the consumers,
norms over the kept channels) and exact reload on small inputs; unit captures show the heads are separate units,
and a per-head-dim table (SAM style, not heads) still stays a constant (negative)."""
import math

import pytest
import torch
from torch import nn

import secateur
from secateur.graph.groups import build_graph
from secateur.metrics import count_macs

from helpers import assert_oracle

timm = pytest.importorskip("timm")
torch.set_num_threads(1)


class _ScaledHeads(nn.Module):
    """q.k per head scaled by ``clamp(logit_scale).exp()`` ([heads, 1, 1], as in Swin V2) then softmax, v, proj."""

    def __init__(self, dim=24, heads=3, per_dim=False):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        shape = (1, 1, dim // heads) if per_dim else (heads, 1, 1)  # per_dim: one scale per head dim, all heads
        self.logit_scale = nn.Parameter(torch.rand(shape) + 1.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = (q * scale if scale.size(0) == 1 else q) @ k.transpose(-2, -1)
        attn = (attn if scale.size(0) == 1 else attn * scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def _groups(m, x):
    return {g.name: g.size for g in build_graph(m, x).groups}


def test_logit_scale_through_clamp_exp_is_sliced_per_head():
    m = _ScaledHeads().eval()
    x = torch.randn(2, 5, 24)
    assert _groups(m, x)["qkv"] == 3  # three heads, not one unit
    plan = assert_oracle(m, x, ratio=0.5)
    assert m.logit_scale.shape == (2, 1, 1) and m.qkv.out_features == 48
    assert not [n for n in plan.notes if "failed" in n]


def test_per_dim_scale_is_not_per_head():
    """Negative: a scale over head dims, shared by every head, ties the heads' dims together (one unit per dim,
    all heads at once), never a per-head slice; the oracle still holds."""
    m = _ScaledHeads(per_dim=True).eval()
    x = torch.randn(2, 5, 24)
    assert _groups(m, x)["qkv"] != 3
    assert_oracle(m, x, ratio=0.5)


def _check(name, kw, size, bound, tmp_path):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # zero-initialised biases / tables would make the comparison vacuous
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.02)
    x = torch.randn(1, 3, size, size)
    before = count_macs(m, x)
    plan = assert_oracle(m, x, ratio=0.5)
    assert not [n for n in plan.notes if "failed" in n or "differ" in n], plan.notes
    frac = count_macs(m, x) / before
    assert 0.15 < frac < bound, frac
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(timm.create_model(name, pretrained=False, **kw).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    return m


# Bounds: at ratio 0.5 these reach 0.26-0.28 of dense MACs at their pretrained sizes (benchmarks/bench_zoo_depth.py);
# before: maxvit_nano_rw_256 0.84 (RelPosBias' table a constant), gcvit_tiny 0.73 (same), swinv2 0.69 (logit_scale).
def test_maxvit_nano_rw_relpos_bias(tmp_path):
    m = _check("maxvit_nano_rw_256", {"img_size": 64}, 64, 0.36, tmp_path)
    rel = m.stages[0].blocks[0].attn_block.attn.rel_pos
    assert rel.bias_shape[-1] == rel.relative_position_bias_table.shape[1] == 1  # 2 heads -> 1


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name,kw", [("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 4}),
                                     ("gcvit_tiny", {"img_size": 64}),
                                     ("maxvit_rmlp_nano_rw_256", {"img_size": 64})])  # RelPosMlp: 0.62 before
def test_swinv2_and_gcvit(name, kw, tmp_path):
    _check(name, kw, 64, 0.36, tmp_path)


def test_unsaved_buffer_rebuilt_only_when_uniform():
    """secateur.io rebuilds a pruned non-persistent buffer (Swin V2's zero ``k_bias``) by truncation only where that
    is exact; one that varies along its pruned dim is refused with a PruningError naming it."""
    from secateur.errors import PruningError
    from secateur.io import _uniform_unsaved
    m = nn.Module()
    m.register_buffer("zero", torch.zeros(4), persistent=False)
    m.register_buffer("ramp", torch.arange(4.0), persistent=False)
    assert _uniform_unsaved(m, "", "zero", [2])
    assert _uniform_unsaved(m, "", "ramp", [4])  # not pruned: nothing to rebuild
    with pytest.raises(PruningError, match="ramp"):
        _uniform_unsaved(m, "", "ramp", [2])
