"""Register tokens: a free parameter ``[1, R, C]`` expanded to the batch and concatenated into the token stream
(timm's ``reg_token``: DINOv2-reg, every ``*_reg4`` ViT, naflexvit). It has two non-1 dims, so it used to stay
unlabelled, an unsliceable block in the stream: the whole residual stream was kept (vit_little_patch16_reg4_gap_256
0.531 of its MACs at ratio 0.5, naflexvit 0.503). Now the concatenation labels it along the channel dim the other
inputs carry (graph/rules/constants.py ``label_free_inputs``) and it is sliced with the stream."""
import pytest
import torch
from torch import nn

from helpers import assert_oracle, assert_reloads
from secateur.metrics import count_macs

torch.set_num_threads(1)


class RegTokens(nn.Module):
    def __init__(self, d=32, regs=4):
        super().__init__()
        self.patch = nn.Linear(12, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.reg_token = nn.Parameter(torch.randn(1, regs, d))
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x):  # x: [b, tokens, 12]
        h = self.patch(x)
        b = h.shape[0]
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), h], dim=1)
        h = h + self.mlp(h)
        return self.head(h[:, 0])


@pytest.mark.parametrize("batch", [1, 3])
def test_register_tokens_are_sliced_with_the_stream(batch, tmp_path):
    torch.manual_seed(0)
    model, x = RegTokens().eval(), torch.randn(batch, 7, 12)
    assert_oracle(model, x, ratio=0.5)
    assert model.reg_token.shape == (1, 4, 16) and model.patch.out_features == 16
    assert_reloads(RegTokens, model, x, tmp_path)


@pytest.mark.slow
def test_timm_reg4_vit_prunes_its_stream():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_little_patch16_reg4_gap_256", pretrained=False, num_classes=10, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    macs0 = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert count_macs(model, x) < 0.35 * macs0
