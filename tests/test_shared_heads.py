"""Attention heads that used to become one all-or-nothing unit through something every head shares, and the exact
rule that keeps each head (or each head pair) a unit of its own instead:

* multi-head latent attention (DeepSeek-V2 / V3 and copies): one rotary key ``k_rot [b, 1, n, r]`` expanded to every
  head (rules/movement.py ``_repeat_to_heads``: each copy gets its head's atom, the source is kept whole); the
  head count and latent ranks follow (graph/mla.py), and the HF config with them, proven by a rebuild on meta;
* Falcon's multi-query fused projection ``qkv.view(b, n, heads + 2, d)`` read as ``[..., :-2, :]``, ``[..., [-2], :]``,
  ``[..., [-1], :]``: positions counted from the end stay valid whatever is removed before them (movement.py
  ``_from_end``), and the one key / value head broadcast in SDPA is kept whole (rules/attention.py);
* RoFormer's sinusoidal rotary table ``[n, head_dim]`` (an embedding of its own) multiplied into every head: kept
  whole in heads mode (rules/elementwise.py ``_shared_by_heads``), only where the dim it broadcasts over is the
  attention module's heads.

Each rule has a hand-written module checked by the oracle and a negative (the case the rule must leave alone)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_oracle, assert_reloads, prune_causal_lm, pruned_vs_reference
from secateur.structured import plan_channels

torch.set_num_threads(1)


# ---------------------------------------------------------------- multi-head latent attention
class LatentAttention(nn.Module):
    """DeepSeek's MLA in miniature: low-rank q, a compressed key/value with one rotary key shared by every head
    (``k_rot.expand(-1, heads, -1, -1)``), q/k = [nope | rope] per head. ``named``: the module keeps ``num_heads``
    (what the rule checks the expand against); without it the shared key still ties the heads (the negative)."""

    def __init__(self, d=32, heads=4, nope=8, rope=4, dv=8, q_rank=16, kv_rank=12, named=True):
        super().__init__()
        if named:
            self.num_heads = heads
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = nope, rope, dv
        self.q_lora_rank, self.kv_lora_rank = q_rank, kv_rank
        self.q_a_proj, self.q_b_proj = nn.Linear(d, q_rank), nn.Linear(q_rank, heads * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, kv_rank + rope)
        self.kv_b_proj = nn.Linear(kv_rank, heads * (nope + dv), bias=False)
        self.o_proj = nn.Linear(heads * dv, d)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_b_proj(F.gelu(self.q_a_proj(x))).view(b, n, -1, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q = q.transpose(1, 2)
        kv, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(F.gelu(kv)).view(b, n, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rot = k_rot.view(b, 1, n, self.qk_rope_head_dim).expand(-1, k_nope.shape[1], -1, -1)
        k = torch.cat([k_nope, k_rot], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, scale=0.25)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 32), attn, nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h))


def test_latent_attention_prunes_whole_heads(tmp_path):
    torch.manual_seed(0)
    model, x = Block(LatentAttention()).eval(), torch.randn(2, 6, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    a = model.attn
    assert a.q_b_proj.out_features == 2 * 12 and a.kv_b_proj.out_features == 2 * 16 and a.o_proj.in_features == 16
    assert a.num_heads == 2 and a.kv_lora_rank == a.kv_b_proj.in_features == 6  # sizes from the sliced tensors
    assert a.kv_a_proj_with_mqa.out_features == 6 + 4  # the rotary key is kept whole
    assert not any("one unit" in n for n in plan.notes), plan.notes
    torch.manual_seed(0)
    assert_reloads(lambda: Block(LatentAttention()), model, x, tmp_path)


def test_latent_attention_without_a_head_count_keeps_its_heads_together():
    """The negative: an expand the module does not name as its heads (no ``num_heads``) is not a copy per head;
    the shared key joins every head as before, and the plan is still exact."""
    torch.manual_seed(0)
    model, x = Block(LatentAttention(named=False)).eval(), torch.randn(2, 6, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert model.attn.q_b_proj.out_features == 4 * 12
    assert any("q_b_proj one unit" in n for n in plan.notes), plan.notes


def _deepseek(q_rank=16):
    T = pytest.importorskip("transformers")
    cfg = T.DeepseekV3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_rank, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                             max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return lambda: T.DeepseekV3ForCausalLM(cfg)


@pytest.mark.parametrize("q_rank", [16, None])
def test_transformers_deepseek_v3_prunes_heads_and_its_config_rebuilds_it(q_rank, tmp_path):
    """With a low-rank query (V3) and a plain ``q_proj`` (V2-Lite's layout, whose rows are heads x (nope + rope),
    not heads x the config's ``head_dim``: the generic q_proj rule would state twice the heads)."""
    model, plan = prune_causal_lm(_deepseek(q_rank), tmp_path, below=0.45 if q_rank else 0.6, low=3)
    attn = model.model.layers[0].self_attn
    q = attn.q_b_proj if q_rank else attn.q_proj
    assert q.out_features == 2 * 16 and attn.num_heads == 2
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    assert cfg.kv_lora_rank == attn.kv_b_proj.in_features
    assert cfg.q_lora_rank == (attn.q_b_proj.in_features if q_rank else None)
    fresh = type(model)(cfg).eval()  # the config alone builds the pruned shapes (what from_pretrained does)
    fresh.load_state_dict(model.state_dict())
    x = {"input_ids": torch.randint(3, 100, (1, 6))}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- positions counted from the end (Falcon MQA)
class MultiQuery(nn.Module):
    """Falcon's multi-query layout: ``qkv [b, n, (heads + 2) * d]`` viewed per head, the query heads ``[:-2]``, the one
    key and value head at ``[[-2]]`` / ``[[-1]]``, broadcast to every query head in SDPA. ``ends``: how the code
    names those rows; ``"start"`` reads them by positive numbers (``[[heads]]``: they move when a head before them
    goes), so the dim stays one unit (the negative)."""

    def __init__(self, d=32, heads=4, ends="end"):
        super().__init__()
        self.num_heads, self.hd, self.ends = heads, d // heads, ends
        self.qkv, self.o = nn.Linear(d, (heads + 2) * (d // heads)), nn.Linear(d, d)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, -1, self.hd)
        if self.ends == "end":
            q, k, v = qkv[..., :-2, :], qkv[..., [-2], :], qkv[..., [-1], :]
        else:
            h = self.num_heads
            q, k, v = qkv[..., :h, :], qkv[..., [h], :], qkv[..., [h + 1], :]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.3)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_rows_counted_from_the_end_leave_the_query_heads_free():
    torch.manual_seed(0)
    model, x = Block(MultiQuery()).eval(), torch.randn(2, 6, 5)
    assert_oracle(model, x, ratio=0.5)
    assert model.attn.qkv.out_features == (2 + 2) * 8 and model.attn.o.in_features == 16


def test_rows_named_from_the_start_keep_the_dim_whole():
    torch.manual_seed(0)
    model, x = Block(MultiQuery(ends="start")).eval(), torch.randn(2, 6, 5)
    assert_oracle(model, x, ratio=0.5)
    assert model.attn.qkv.out_features == (4 + 2) * 8  # whole: removing a head would move rows [h], [h + 1]


def test_transformers_falcon_prunes_query_heads(tmp_path):
    import zoo_models as Z
    pytest.importorskip("transformers")
    cfg, cls = Z.hf_small_config("falcon"), Z._causal_lm_class("falcon")
    assert cfg.multi_query and not cfg.new_decoder_architecture
    model, _ = prune_causal_lm(lambda: cls(cfg), tmp_path, below=0.4, low=3)
    attn = model.transformer.h[0].self_attention
    assert attn.num_heads == 2 and attn.query_key_value.out_features == (2 + 2) * attn.head_dim


# ---------------------------------------------------------------- a rotary table shared by every head (RoFormer)
class TableRotated(nn.Module):
    """q and k multiplied by a table ``[tokens, head_dim]`` from an embedding of its own (RoFormer's sinusoidal
    rotary positions), the same for every head. ``named``: the module keeps its head count."""

    def __init__(self, d=32, heads=4, tokens=6, named=True):
        super().__init__()
        if named:
            self.num_attention_heads = heads
        self.heads, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.positions = nn.Embedding(tokens, self.hd)

    def forward(self, h):
        b, n, _ = h.shape
        table = self.positions(torch.arange(n))  # [n, hd]
        q, k, v = (f(h).view(b, n, self.heads, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q * table, k * table, v)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_a_table_shared_by_the_heads_does_not_tie_them():
    torch.manual_seed(0)
    model, x = Block(TableRotated()).eval(), torch.randn(2, 6, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert model.attn.q.out_features == 16 and model.attn.positions.weight.shape == (6, 8)  # 2 of 4 heads
    assert any("positions.weight" in n and "aten::mul" in n for n in plan.notes), plan.notes


def test_a_table_in_a_module_without_a_head_count_keeps_the_union():
    """The negative: where the module names no head count, the broadcast dim is not known to be heads (SK-ResNet's
    path attention broadcast over its paths must keep its union); the heads stay one unit, exactly."""
    torch.manual_seed(0)
    model, x = Block(TableRotated(named=False)).eval(), torch.randn(2, 6, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert model.attn.q.out_features == 32
    assert any("one unit" in n for n in plan.notes), plan.notes


def test_transformers_roformer_prunes_heads(tmp_path):
    T = pytest.importorskip("transformers")
    cfg = T.RoFormerConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=32, is_decoder=True)
    model, plan = prune_causal_lm(lambda: T.RoFormerForCausalLM(cfg), tmp_path, below=0.4)
    attn = model.roformer.encoder.layer[0].attention.self
    assert attn.query.out_features == 16 and (attn.num_attention_heads, attn.all_head_size) == (2, 16)
    assert any("embed_positions.weight" in n for n in plan.notes), plan.notes  # the table: kept, and said so


# ---------------------------------------------------------------- differential attention (no new rule: the evidence)
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_transformers_diffllama_prunes_head_pairs_where_its_structure_has_them(kv_heads):
    """DiffLlama: V split in two halves along its heads, output head j combined with head j + heads/2. An output
    pair reads query heads j and j + heads/2 and key / value heads j // g and j // g + kv/2 (g = heads / kv), so the
    exact unit is a key/value-head pair with its query heads: kv / 2 units. With kv = 4 they prune; with kv = 2 (the
    zoo's config, the fewest the model allows) every output reads every key / value head, and the one unit is
    right (removing query pairs alone would need the GQA grouping to follow; not a rule here)."""
    T = pytest.importorskip("transformers")
    import zoo_models as Z
    cfg = Z.hf_small_config("diffllama")
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, kv_heads
    model, plan = prune_causal_lm(lambda: T.DiffLlamaForCausalLM(cfg), below=0.35 if kv_heads == 4 else 0.45, low=3)
    q = model.model.layers[0].self_attn.q_proj
    assert q.out_features == (16 if kv_heads == 4 else 32)
