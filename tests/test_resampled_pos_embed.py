"""A position embedding resampled to the input's grid (timm's ``resample_abs_pos_embed_nhwc``: a [1, H, W, C]
parameter permuted to [1, C, H, W], interpolated, permuted back, added to the stream). The interpolated constant
varies along the stream's channels; before, that made the whole stream all-or-nothing (samvit_base_patch16 at
64x64 kept its stream: 0.50 of its MACs at ratio 0.5). Interpolation treats dim 1 as channels, each on its own, so
the parameter is sliced along its channel dim with the stream (graph/rules/reductions.py ``_resampled_param``)."""
import copy

import pytest
import torch
from torch import nn

import secateur
from secateur.metrics import count_macs
from secateur.structured import plan_channels
from helpers import pruned_vs_reference, zeroed_reference_pruned

torch.set_num_threads(1)


class ResampledPos(nn.Module):
    def __init__(self, dim=16, grid=4, mode="bicubic"):
        super().__init__()
        self.mode = mode
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, grid, grid, dim))
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)  # NHWC, as in samvit
        pos = self.pos.permute(0, 3, 1, 2)
        kw = {"antialias": True} if self.mode == "bicubic" else {}
        pos = nn.functional.interpolate(pos, size=x.shape[1:3], mode=self.mode, **kw).permute(0, 2, 3, 1)
        x = x + pos
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_resampled_position_embedding_is_sliced_with_the_stream(mode):
    torch.manual_seed(0)
    m, x = ResampledPos(mode=mode).eval(), torch.randn(2, 3, 8, 8)  # a 2x2 grid: the 4x4 embedding is resampled
    plan = plan_channels(m, x, ratio=0.5)
    zeroed, want, got = zeroed_reference_pruned(m, x, plan)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - zeroed).abs().max() > 1e-3 * want.abs().max()  # the LayerNorm: removal is not zeroing
    assert m.patch.out_channels == 8 and m.pos.shape == (1, 4, 4, 8) and m.norm.normalized_shape == (8,)


def test_reload_is_exact(tmp_path):
    torch.manual_seed(0)
    m, x = ResampledPos().eval(), torch.randn(2, 3, 8, 8)
    secateur.prune_channels(m, x, ratio=0.5)
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(ResampledPos().eval(), tmp_path / "m.safetensors")
    assert fresh.pos.shape == (1, 4, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)


def test_a_square_parameter_is_matched_by_stride_and_the_oracle_holds():
    """A [4, 4] parameter viewed [1, 4, 4, 1] and interpolated: both of its dims have the view's dim-1 size; the
    stride says which one it is (dim 0). What it is then added to mixes those positions with the stream's
    channels, so the stream stays whole there, and the oracle holds either way."""

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
            self.p = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):  # x: [B, 4, 4, 3]
            q = nn.functional.interpolate(self.p[None, :, :, None], size=(4, 1), mode="nearest")[..., 0]
            return self.b(self.a(x) + q[:, None])

    m = Square().eval()
    plan = plan_channels(m, torch.randn(2, 4, 4, 3), ratio=0.5)
    ref = copy.deepcopy(m)
    plan.zero_consumers(ref)
    x = torch.randn(2, 4, 4, 3)
    with torch.no_grad():
        want = ref(x)
        plan.apply(m)
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_samvit_prunes_its_stream_at_a_small_input():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m, x = timm.create_model("samvit_base_patch16", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    dense = copy.deepcopy(m)
    plan = plan_channels(m, x, ratio=0.5)
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert m.pos_embed.shape[-1] < dense.pos_embed.shape[-1]
    assert count_macs(m, x) < 0.35 * count_macs(dense, x)  # 0.50 while the resampled embedding kept the stream
