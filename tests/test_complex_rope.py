"""Rotary embeddings written with complex numbers (Llama 4, Meta's reference Llama code): ``view_as_complex`` pairs
the reals of each head dim pair, the rotation is a complex product with a frequency buffer, and ``view_as_real``
turns it back (graph/rules/movement.py). Before, ``view_as_complex`` had no rule and every channel reaching it was
kept; now whole heads prune (a head's dims all rotate together) and the oracle holds."""
import torch
from torch import nn
from torch.nn import functional as F

from helpers import pruned_vs_reference
from secateur.structured import plan_channels

torch.set_num_threads(1)


class ComplexRopeAttention(nn.Module):
    def __init__(self, d=32, heads=4, tokens=6):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        angles = torch.outer(torch.arange(tokens).float(), 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / 8))
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rope(self, x):  # [b, n, heads, head_dim]
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * self.freqs[None, :, None, :]).flatten(3).type_as(x)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.rope(self.q(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.rope(self.k(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 32), ComplexRopeAttention(), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h))


def test_complex_rope_heads_prune_and_match_the_reference():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 6, 5)
    plan = plan_channels(model, x, ratio=0.5)
    assert not [n for n in plan.notes if "view_as_complex" in n], plan.notes
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.attn.q.out_features == 16 and model.attn.k.out_features == 16  # 2 of 4 heads, 8 dims each
