"""``torch.bmm(x, W)`` with ``W`` a model parameter ``[E, K, M]`` used as it is: a batch of Linears sharing their
channels (Llama 4's text experts, ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``; graph/rules/matmul.py
``_batched_weight``). Before, the weight was a constant the channels met, so the stream and the expert width
were all-or-nothing (llama4_text: 0.866 of its MACs at ratio 0.5 after the RoPE rule, 0.265 now)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_oracle, prune_causal_lm
from secateur.metrics import count_macs

torch.set_num_threads(1)


class BmmExperts(nn.Module):
    def __init__(self, experts=3, d=16, inner=24):
        super().__init__()
        self.hidden_size = d
        self.gate_up = nn.Parameter(torch.randn(experts, d, 2 * inner) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, inner, d) / inner ** 0.5)

    def forward(self, h):  # h: [experts * tokens, d], the tokens repeated per expert
        h = h.view(self.gate_up.shape[0], -1, self.hidden_size)
        gate, up = torch.bmm(h, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(up * F.silu(gate), self.down).view(-1, self.hidden_size)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.experts, self.head = nn.Linear(5, 16), BmmExperts(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        y = self.experts(h.repeat(3, 1))
        y = y.view(3, -1, y.shape[-1]).sum(0)
        return self.head(h + y)


def test_bmm_on_a_parameter_prunes_like_a_batch_of_linears():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(7, 5)
    macs0 = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert model.experts.gate_up.shape == (3, 8, 24) and model.experts.down.shape == (3, 12, 8)
    assert model.experts.hidden_size == 8  # proven by the dry run and the oracle (size_attrs)
    assert count_macs(model, x) < 0.4 * macs0


def test_transformers_llama4_text_prunes_experts_and_stream(tmp_path):
    T = pytest.importorskip("transformers")

    def make():
        cfg = T.Llama4TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 num_local_experts=4, max_position_embeddings=32)
        return T.Llama4ForCausalLM(cfg).eval()
    prune_causal_lm(make, tmp_path)


class BlockGate(nn.Module):
    """RecurrentGemma's RG-LRU gate: a block-diagonal Linear per head, ``baddbmm(b[:, None, :], x, W)`` with
    ``W [heads, block_width, block_width]`` and ``b [heads, block_width]``; lane j of every head is one unit."""

    def __init__(self, heads=3, bw=4):
        super().__init__()
        self.inp, self.out = nn.Linear(5, heads * bw), nn.Linear(heads * bw, 3)
        self.w = nn.Parameter(torch.randn(heads, bw, bw) / bw ** 0.5)
        self.b = nn.Parameter(torch.randn(heads, bw))
        self.heads, self.block_width = heads, bw

    def forward(self, x):
        h = self.inp(x)
        b, t, c = h.shape
        a = h.reshape(b * t, self.heads, self.block_width).permute(1, 0, 2)
        g = torch.baddbmm(self.b[:, None, :], a, self.w)
        return self.out(h * torch.sigmoid(g.transpose(0, 1).reshape(b, t, c)))


def test_baddbmm_with_a_bias_row_per_block_prunes_lanes():
    torch.manual_seed(0)
    model, x = BlockGate().eval(), torch.randn(2, 7, 5)
    assert_oracle(model, x, ratio=0.5)
    assert model.w.shape == (3, 2, 2) and model.b.shape == (3, 2) and model.inp.out_features == 6
    assert model.block_width == 2  # proven by the dry run (size_attrs)


def test_transformers_recurrent_gemma_prunes_its_lru(tmp_path):
    """0.451 of its MACs at ratio 0.5 before the block-diagonal gates and the per-step scan writes were followed."""
    pytest.importorskip("transformers")
    from zoo_models import _causal_lm_class, hf_small_config
    model, _ = prune_causal_lm(lambda: _causal_lm_class("recurrent_gemma")(hf_small_config("recurrent_gemma")),
                               tmp_path, below=0.4)
    assert model.model.layers[0].temporal_block.rg_lru.recurrent_param.numel() < 32
