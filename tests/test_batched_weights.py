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


class GroupedOut(nn.Module):
    """DeepSeek-V4's grouped output projection: the heads' output in ``groups`` slices, slice ``g`` through rows
    ``g * rank .. (g + 1) * rank`` of one ``[groups * rank, width]`` weight (``weight.view(groups, -1, width)``,
    ``bmm``), then one Linear over all ``groups * rank`` results."""

    def __init__(self, groups=4, width=6, rank=10):
        super().__init__()
        self.groups = groups
        self.inp = nn.Linear(5, groups * width)
        self.o_a = nn.Linear(width, groups * rank, bias=False)
        self.o_b = nn.Linear(groups * rank, 3)

    def forward(self, x):
        h = self.inp(x)
        lead, width = h.shape[:-1], h.shape[-1] // self.groups
        w = self.o_a.weight.view(self.groups, -1, width).transpose(1, 2)
        y = torch.bmm(h.reshape(-1, self.groups, width).transpose(0, 1), w).transpose(0, 1)
        return self.o_b(y.reshape(*lead, self.groups, -1).flatten(-2))


def test_grouped_projection_rows_prune_the_same_per_group():
    """Lane ``r`` of every group is one unit, so each group keeps ``rank / 2`` rows and the view still holds; input
    lane ``k`` of every group is one unit (a column of the shared weight). Before, the view was a constant: nothing
    between ``o_a`` and ``o_b`` pruned (graph/rules/matmul.py ``_grouped_weight``)."""
    torch.manual_seed(0)
    model, x = GroupedOut().eval(), torch.randn(2, 7, 5)
    assert_oracle(model, x, ratio=0.5)
    assert model.o_a.weight.shape == (4 * 5, 3) and model.o_b.in_features == 20 and model.inp.out_features == 12


def test_grouped_projection_plans_on_meta_like_on_the_cpu():
    """The rule reads only shapes, strides and the view's base: a meta skeleton gets the same groups and choices."""
    pytest.importorskip("transformers")
    from test_meta_plans import _record
    torch.manual_seed(0)
    cpu = GroupedOut().eval()
    with torch.device("meta"):
        meta = GroupedOut().eval()
    x = torch.randn(2, 7, 5)
    want, got = _record(cpu, x), _record(meta, x.to("meta"))
    assert got == want and want[1]


def test_grouped_projection_whose_rows_are_read_otherwise_is_not_that_view():
    """The same bmm on ``weight.view(groups, width, -1)`` (no transpose: rows are not one block per group) keeps
    to the general matmul rule, and the oracle still holds."""
    class Other(GroupedOut):
        def forward(self, x):
            h = self.inp(x)
            lead, width = h.shape[:-1], h.shape[-1] // self.groups
            w = self.o_a.weight.reshape(self.groups, width, -1)
            y = torch.bmm(h.reshape(-1, self.groups, width).transpose(0, 1), w).transpose(0, 1)
            return self.o_b(y.reshape(*lead, -1))

    torch.manual_seed(0)
    model, x = Other(width=6, rank=6).eval(), torch.randn(2, 7, 5)
    assert_oracle(model, x, ratio=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,below", [("deepseek_v4", 0.25), ("hy_v4", 0.4)])
def test_transformers_hyper_connection_models_prune_stream_and_grouped_rank(tmp_path, model_type, below):
    """deepseek_v4: 0.98 of its MACs at ratio 0.5 before (hyper-connection matrix a constant, the verify loop
    dropping the stream with a failing compressor), 0.55 with those, 0.17 with the grouped ``o_a_proj`` rows;
    hy_v4 0.60 -> 0.33. The pruned model runs its own forward and reloads bit-exact."""
    pytest.importorskip("transformers")
    from zoo_models import _causal_lm_class, hf_small_config
    cls = _causal_lm_class(model_type)
    if cls is None:
        pytest.skip(f"transformers has no {model_type}")
    prune_causal_lm(lambda: cls(hf_small_config(model_type)), tmp_path, below=below, low=3)


@pytest.mark.slow
def test_deepseek_v4_without_the_grouped_rule_still_prunes_its_stream(monkeypatch):
    """With ``o_a_proj`` read as a constant (the grouped rule off), the heads are held by the grouped output
    projection and the compressor's pruned forward fails: the verify loop must then drop only what fails there and
    the size updates found for it (structured/proof.py ``_outside``, ``_without_module``), and take the plan
    without ties (``_verified``). Each of those off gave 0.98 of dense MACs; all on, 0.55."""
    pytest.importorskip("transformers")
    import secateur.graph.rules.matmul as M
    from zoo_models import _causal_lm_class, hf_small_config
    cls = _causal_lm_class("deepseek_v4")
    if cls is None:
        pytest.skip("transformers has no deepseek_v4")
    monkeypatch.setattr(M, "_grouped_weight", lambda tr, x, w: None)
    model, _ = prune_causal_lm(lambda: cls(hf_small_config("deepseek_v4")), below=0.6, low=3)
    assert model.model.layers[0].self_attn.o_b_proj.in_features == 8192  # the rank stays whole that way
