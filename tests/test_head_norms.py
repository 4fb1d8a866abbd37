"""A LayerNorm over each head's dims (q/k LayerNorm as Persimmon, OLMo-2 style models write it: one
``nn.LayerNorm(head_dim)`` applied to ``[batch, tokens, heads, head_dim]``). Its module rule used to collapse the
input's labels across every other dim, which tied dim j of every head into one unit: all heads all-or-nothing
(persimmon 0.418 of its MACs at ratio 0.5, with no note). In heads mode a head is now whole there (its dims one
unit, the norm inside it, the shared weight never cut); a stream with a class token keeps the old rule."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_oracle, prune_causal_lm

torch.set_num_threads(1)


class QKNormAttention(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3 * self.hd).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 32), QKNormAttention(), nn.Linear(32, 3)
        with torch.no_grad():
            for m in (self.attn.q_norm, self.attn.k_norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h))


def test_head_layernorm_leaves_heads_free():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6, 5)
    assert_oracle(model, x, ratio=0.5)
    assert model.attn.qkv.out_features == 48 and model.attn.q_norm.weight.shape == (8,)  # 2 of 4 heads left


def test_head_dim_mode_keeps_the_shared_dims_rule():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6, 5)
    assert_oracle(model, x, ratio=0.5, heads="head_dim")


def test_transformers_persimmon_prunes_heads():
    T = pytest.importorskip("transformers")
    model, _ = prune_causal_lm(lambda: T.PersimmonForCausalLM(T.PersimmonConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32)))
    assert model.model.layers[0].self_attn.query_key_value.out_features == 48


class OffsetRMSNorm(nn.Module):
    """Gemma / Qwen3-Next's RMSNorm: ``x * (1 + weight)``, the weight [head_dim] shared by every head. ``1 + weight``
    is computed from the weight alone before it meets the heads; that op labelled the weight, so the product unioned
    dim j of every head with the weight's j and, with the per-head statistic, made every head one unit."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) - 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class OffsetNormNet(Net):
    def __init__(self):
        super().__init__()
        self.attn.q_norm, self.attn.k_norm = OffsetRMSNorm(8), OffsetRMSNorm(8)


def test_head_rmsnorm_with_one_plus_weight_leaves_heads_free():
    torch.manual_seed(0)
    model, x = OffsetNormNet().eval(), torch.randn(2, 6, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert model.attn.qkv.out_features == 48 and model.attn.q_norm.weight.shape == (8,)  # 2 of 4 heads left
    assert not any("one unit" in n for n in plan.notes)


def test_head_rmsnorm_with_one_plus_weight_head_dim_mode():
    torch.manual_seed(0)
    model, x = OffsetNormNet().eval(), torch.randn(2, 6, 5)
    assert_oracle(model, x, ratio=0.5, heads="head_dim")


def test_transformers_gemma3_prunes_heads():
    """Gemma3's q_norm / k_norm (``1 + weight``): 0.38 of dense MACs at ratio 0.5 when they kept every head."""
    T = pytest.importorskip("transformers")
    model, _ = prune_causal_lm(lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32, sliding_window=4)), below=0.33)
    assert model.model.layers[0].self_attn.q_proj.out_features == 16
