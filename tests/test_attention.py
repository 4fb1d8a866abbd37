"""Attention pruning: nn.MultiheadAttention (whole heads, head dims, embed dim), heads="head_dim" on Hugging Face
q/k/v/o attention, grouped-query attention. Every plan is checked with the oracle: the original model with the
chosen slices zeroed where they enter their consumers (q/k rows for q.k) computes what the pruned model computes,
and the zeroing really changes the output (so the comparison is not vacuous)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import pruned_vs_reference
from secateur.errors import PruningError
from secateur.graph.mha import PrunedMultiheadAttention, _mha
from secateur.graph.modules import snapshot
from secateur.structured import apply_structure, plan_channels, prune_channels

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _run(model, x):
    return _first(model(**x) if isinstance(x, dict) else model(x))


def oracle(model, x, rtol=1e-4, **kw):
    model.eval()
    plan = plan_channels(model, x, **kw)
    assert plan.choices, plan.notes
    base, want, got = pruned_vs_reference(model, x, plan, _run)
    assert got.shape == want.shape == base.shape
    scale = want.abs().max()
    assert (base - want).abs().max() > 1e-3 * scale, "zeroing changed nothing: the check would be vacuous"
    err = (got - want).abs().max() / scale
    assert err < rtol, f"relative error {err:.2e}"
    return plan


def _even_per_head(plan):
    """heads='head_dim': every head-dim group loses the same number of dims in every head, and keeps some."""
    n = 0
    for g, chans in plan.choices:
        if g.block is None:
            continue
        n += 1
        per = torch.bincount(g.block[chans], minlength=int(g.block.max()) + 1)
        size = torch.bincount(g.block)
        assert per.unique().numel() == 1 and bool((per < size).all()), (g.name, per.tolist())
    return n


# ---------------------------------------------------------------- the pruned module's forward
def _as_pruned(mha):
    """The same module as PrunedMultiheadAttention, nothing removed (its forward must equal the stock one)."""
    p = copy.deepcopy(mha)
    _mha(p, snapshot(p))
    assert type(p) is PrunedMultiheadAttention
    return p


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(kdim=6, vdim=5), dict(add_bias_kv=True),
                                dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)])
def test_pruned_forward_equals_stock_forward_on_every_path(batch_first, kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw).eval()
    pruned = _as_pruned(mha)
    b, t, s = 3, 4, 5
    q = torch.randn(b, t, 8)
    k, v = torch.randn(b, s, kw.get("kdim", 8)), torch.randn(b, s, kw.get("vdim", 8))
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, -2:] = True
    per_head = torch.rand(b * 2, t, s) > 0.7
    per_head[..., 0] = False  # no fully masked row (NaN on both sides)
    masks = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(t, s)),
             dict(attn_mask=per_head, key_padding_mask=kpm)]
    for m in masks:
        for need in (True, False):
            for avg in (True, False):
                with torch.no_grad():
                    want = mha(q, k, v, need_weights=need, average_attn_weights=avg, **m)
                    got = pruned(q, k, v, need_weights=need, average_attn_weights=avg, **m)
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
                if need:
                    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
                else:
                    assert got[1] is None
    with torch.no_grad():  # unbatched input; a causal mask with the is_causal hint (self-attention)
        one = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])
        torch.testing.assert_close(pruned(one(q), one(k), one(v))[0], mha(one(q), one(k), one(v))[0],
                                   rtol=1e-5, atol=1e-6)
        if "kdim" not in kw:
            causal = nn.Transformer.generate_square_subsequent_mask(t)
            torch.testing.assert_close(pruned(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)[0],
                                       mha(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)[0],
                                       rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- oracle on MHA models
class MHANet(nn.Module):
    """Residual stream without LayerNorm, so embed-dim pruning is allowed; masks and attention weights used."""

    def __init__(self, batch_first=True, bias=True, kdim=None, add_bias_kv=False):
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.kin = nn.Linear(6, 16), nn.Linear(6, kdim or 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim,
                                         add_bias_kv=add_bias_kv)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, kv = self.inp(x), self.kin(x)
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        n = x.size(1)
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        kpm = torch.zeros(x.size(0), n, dtype=torch.bool, device=x.device)
        kpm[0, -1] = True
        a, w = self.att(h, kv, kv, attn_mask=mask, key_padding_mask=kpm, need_weights=True)
        y = self.out(a + h)
        y = y if self.batch_first else y.transpose(0, 1)
        return y + w.sum(-1, keepdim=True)  # the attention weights are used too


@pytest.mark.parametrize("heads", ["heads", "head_dim"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(kdim=8), dict(add_bias_kv=True)])
def test_mha_oracle(heads, batch_first, kw):
    torch.manual_seed(0)
    m = MHANet(batch_first, **kw)
    plan = oracle(m, torch.randn(2, 5, 6), ratio=0.5, heads=heads)
    assert not any("not verified" in n for n in plan.notes)  # the pruned forward was dry-run on meta
    att = m.att
    assert type(att) is PrunedMultiheadAttention and isinstance(att, nn.MultiheadAttention)
    assert att.embed_dim == 8 and att.out_proj.out_features == 8  # the residual stream was pruned with it
    if heads == "heads":
        assert (att.num_heads, att.head_dim, att.v_head_dim) == (2, 4, 4)
    else:
        assert (att.num_heads, att.head_dim, att.v_head_dim) == (4, 2, 2) and _even_per_head(plan) == 2
    assert att.scaling == pytest.approx(4 ** -0.5)  # the original scale: removal equals zeroing


def test_mha_never_pruned_to_zero_heads_or_dims():
    torch.manual_seed(0)
    for heads, want in (("heads", (1, 4)), ("head_dim", (4, 1))):
        m = MHANet()
        oracle(m, torch.randn(2, 5, 6), ratio=0.99, heads=heads)
        assert (m.att.num_heads, m.att.head_dim) == want


def test_transformer_encoder_oracle_and_reload():
    """A plain nn.TransformerEncoder (LayerNorm keeps the embed dim): heads go; the pruned layers never take
    PyTorch's fused fast path (it assumes the unpruned layout), also in eval under no_grad."""
    torch.manual_seed(0)
    make = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
    enc = make()
    x = torch.randn(2, 5, 16)
    oracle(enc, x, ratio=0.5)
    assert all(layer.self_attn.num_heads == 2 for layer in enc.layers)
    fresh = apply_structure(make().eval(), enc._secateur_structure)
    fresh.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), enc(x))
    assert type(fresh.layers[0].self_attn) is PrunedMultiheadAttention


def test_mha_save_load_round_trip(tmp_path):
    from secateur.io import load, save
    torch.manual_seed(0)
    m = MHANet(kdim=8)
    x = torch.randn(2, 5, 6)
    prune_channels(m.eval(), x, ratio=0.5, heads="head_dim")
    save(m, tmp_path / "m.sct")
    fresh = load(MHANet(kdim=8).eval(), tmp_path / "m.sct")
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    assert (fresh.att.num_heads, fresh.att.head_dim, fresh.att.kdim) == (m.att.num_heads, m.att.head_dim, 4)


@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_torchvision_vit_b_16(heads):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.vit_b_16()
    with torch.no_grad():  # torchvision zero-initialises the head: the comparison would be vacuous
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    plan = oracle(m, torch.randn(1, 3, 224, 224), ratio=0.5, rtol=1e-4, heads=heads)
    att = m.encoder.layers[0].self_attention
    assert (att.num_heads, att.head_dim) == ((6, 64) if heads == "heads" else (12, 32))
    if heads == "head_dim":
        assert _even_per_head(plan) == 24


# ---------------------------------------------------------------- Hugging Face
def _hf(name, **over):
    model, x = _hf_model(name, **over)
    with torch.no_grad():  # at the default init (std 0.02) attention is almost uniform: a wrong head layout would
        for p in model.parameters():  # pass a 1e-4 oracle; larger weights make every head matter
            if p.dim() > 1:
                p.normal_(std=0.3)
    return model, x


def _hf_model(name, **over):
    T = pytest.importorskip("transformers")
    if name == "bert":
        cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                   max_position_embeddings=32)
        return T.BertModel(T.BertConfig(**{**cfg, **over})), {"input_ids": torch.randint(0, 100, (1, 6))}
    if name == "vit":
        cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                   patch_size=8)
        return T.ViTForImageClassification(T.ViTConfig(**{**cfg, **over})), \
            {"pixel_values": torch.randn(1, 3, 32, 32)}
    if name == "gpt2":
        cfg = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(T.GPT2Config(**{**cfg, **over})), {"input_ids": torch.randint(0, 100, (1, 6))}
    if name == "t5":
        cfg = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        return T.T5Model(T.T5Config(**{**cfg, **over})), {"input_ids": torch.randint(0, 100, (1, 6)),
                                                          "decoder_input_ids": torch.randint(0, 100, (1, 5))}
    if name == "llama":
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
        return T.LlamaForCausalLM(T.LlamaConfig(**{**cfg, **over})), {"input_ids": torch.randint(0, 100, (1, 6))}
    raise KeyError(name)


@pytest.mark.parametrize("name,groups", [("bert", 4), ("vit", 4), ("gpt2", 2), ("t5", 6)])
def test_hf_head_dim_oracle_and_reload(name, groups, tmp_path):
    """groups: head-dim groups expected (q/k and v per attention; GPT-2's fused c_attn splits q, k, v at the
    same offsets, so its q/k/v dims go together)."""
    from secateur.io import load, save
    torch.manual_seed(0)
    model, x = _hf(name)
    plan = oracle(model, x, ratio=0.5, heads="head_dim")
    assert _even_per_head(plan) == groups
    assert any("scale" in n for n in plan.notes)
    q = [mod for n, mod in model.named_modules() if n.endswith(("self.query", "attention.q_proj", "Attention.q"))]
    assert all(m.out_features == 16 for m in q)
    heads = getattr(model.config, "num_attention_heads", None) or model.config.num_heads
    assert heads == 4  # head counts stay
    if name == "t5":  # a config that states the head size follows it, so the config alone rebuilds the model
        assert model.config.d_kv == 4
        type(model)(model.config).load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        got = _run(model, x)
    # a fresh model from the config, resized by the structure record (head size and the original scale)
    fresh = apply_structure(type(model)(model.config).eval(), model._secateur_structure)
    fresh.load_state_dict(model.state_dict(), strict=True)
    save(model, tmp_path / "m.sct")
    loaded = load(type(model)(model.config).eval(), tmp_path / "m.sct")
    with torch.no_grad():
        torch.testing.assert_close(_run(fresh, x), got)
        torch.testing.assert_close(_run(loaded, x), got)


def test_hf_head_dim_eager_attention_is_safe():
    """The eager path (q @ k^T * a scale the capture cannot tell from q's size) is not split per dim: there the
    plan falls back to whole heads, and the head count (not the head size) shrinks."""
    torch.manual_seed(0)
    model, x = _hf("bert", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    plan = oracle(model, x, ratio=0.5, heads="head_dim")
    assert _even_per_head(plan) == 0
    att = model.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.attention_head_size, att.query.out_features) == (2, 8, 16)


def test_hf_llama_head_dim_refused_for_rope_and_model_unchanged():
    torch.manual_seed(0)
    model, x = _hf("llama")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="rotary"):
        prune_channels(model, x, ratio=0.5, heads="head_dim")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


@pytest.mark.parametrize("heads,kv,ratio,want", [(4, 2, 0.5, (2, 1)), (8, 2, 0.5, (4, 1)), (8, 4, 0.25, (6, 3)),
                                                  (4, 2, 0.99, (2, 1))])
def test_llama_gqa_whole_heads_keep_the_grouping(heads, kv, ratio, want):
    """Whole-head pruning of grouped-query attention removes whole kv groups (a kv head with all its query
    heads), never a group to zero, and the pruned model runs its own forward and reloads from its config."""
    torch.manual_seed(0)
    model, x = _hf("llama", num_attention_heads=heads, num_key_value_heads=kv, hidden_size=64)
    oracle(model, x, ratio=ratio, rtol=1e-4)
    hd = model.config.head_dim
    for layer in model.model.layers:
        att = layer.self_attn
        nq, nk = att.q_proj.out_features // hd, att.k_proj.out_features // hd
        assert (nq, nk) == want and att.v_proj.out_features // hd == nk and nq % nk == 0
        assert nq // nk == heads // kv  # query heads per kv head unchanged
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == want
    alone = type(model)(model.config).eval()
    alone.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("explicit", [False, True])
def test_sdpa_scale_from_the_head_size_is_folded_into_q(explicit):
    """A module that lets sdpa derive the scale from q's size, or computes it from its head size in forward:
    removing q/k dims changes it, so q's kept rows are multiplied by sqrt(d'/d) (graph/scale_fold.py, noted) and
    the oracle holds, checked on sharpened q/k weights where a wrong scale shows."""

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim = 4
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
            scale = self.head_dim ** -0.5 if explicit else None
            y = nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
            return self.o(y.transpose(1, 2).reshape(b, t, -1))

    torch.manual_seed(0)
    m = Att()
    x = torch.randn(2, 5, 16)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    assert any("scale follows" in n and "scaled by sqrt(2/4)" in n for n in plan.notes), plan.notes
    assert any(mem.module in ("q", "k") for g, _ in plan.choices for mem in g.members)
    with torch.no_grad():
        for lin in (m.q, m.k):
            lin.weight *= 10
            lin.bias *= 10
    ref = copy.deepcopy(m)
    plan.zero_consumers(ref)
    with torch.no_grad():
        want = ref(x)
        plan.apply(m)
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    assert m.head_dim == 2


class GQAttention(nn.Module):
    """Grouped-query attention written out (4 query heads, 2 kv heads), scale passed explicitly."""

    def __init__(self, enable_gqa=True):
        super().__init__()
        self.head_dim, self.scaling, self.enable_gqa = 8, 8 ** -0.5, enable_gqa
        self.inp = nn.Linear(6, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.o = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        b, t, _ = h.shape
        q, k, v = (f(h).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        if not self.enable_gqa:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling, enable_gqa=self.enable_gqa)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("enable_gqa", [True, False])
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_gqa_keeps_groups_consistent(enable_gqa, heads):
    """Whole heads: a kv head goes with all its query heads. Head dims: q/k dim d of a kv group is one unit
    shared by the group's query heads; every head keeps the same size."""
    torch.manual_seed(0)
    m = GQAttention(enable_gqa)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(std=0.5)
    plan = oracle(m, torch.randn(2, 5, 6), ratio=0.5, heads=heads)
    if heads == "heads":
        assert (m.q.out_features, m.k.out_features, m.v.out_features, m.head_dim) == (16, 8, 8, 8)
    else:
        assert (m.q.out_features, m.k.out_features, m.v.out_features, m.head_dim) == (16, 8, 8, 4)
        assert _even_per_head(plan) == 2


def _random_mha_net(g):
    """A random small attention block: embed size, heads, kdim, bias, bias_kv, zero_attn, layout."""
    heads = int(torch.randint(1, 5, (1,), generator=g))
    hd = int(torch.randint(1, 5, (1,), generator=g))
    kdim = [None, 3, 7][int(torch.randint(0, 3, (1,), generator=g))]
    flags = torch.rand(4, generator=g) < 0.5

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            e = heads * hd
            self.inp, self.kin = nn.Linear(5, e), nn.Linear(5, kdim or e)
            self.att = nn.MultiheadAttention(e, heads, bias=bool(flags[0]), add_bias_kv=bool(flags[1]),
                                             add_zero_attn=bool(flags[2]), kdim=kdim, vdim=kdim,
                                             batch_first=bool(flags[3]))
            self.out = nn.Linear(e, 2)

        def forward(self, x):
            h, kv = self.inp(x), self.kin(x)
            if not self.att.batch_first:
                h, kv = h.transpose(0, 1), kv.transpose(0, 1)
            a = self.att(h, kv, kv, need_weights=False)[0] + h
            return self.out(a if self.att.batch_first else a.transpose(0, 1))

    return Net()


@pytest.mark.parametrize("seed", range(12))
def test_random_mha_blocks_pass_the_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = _random_mha_net(g).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.7)
    heads = ["heads", "head_dim"][seed % 2]
    ratio = 0.3 + float(torch.rand(1, generator=g)) * 0.6
    x = torch.randn(2, 4, 5, generator=g)
    plan = plan_channels(m, x, ratio=ratio, heads=heads)
    ref = copy.deepcopy(m)
    plan.zero_consumers(ref)
    h0, d0 = m.att.num_heads, m.att.head_dim
    with torch.no_grad():
        want = ref(x)
        plan.apply(m)
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    att = m.att
    assert att.num_heads >= 1 and att.head_dim >= 1 and getattr(att, "v_head_dim", 1) >= 1
    if heads == "heads":
        assert m.att.num_heads <= h0 and m.att.head_dim == d0
    else:
        assert m.att.num_heads == h0 and m.att.head_dim <= d0


def test_pruned_mha_trains_and_deepcopies():
    torch.manual_seed(0)
    m = MHANet()
    x, y = torch.randn(8, 5, 6), torch.randn(8, 5, 3)
    prune_channels(m, x, ratio=0.5, heads="head_dim")
    m.train()
    c = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    first = None
    for _ in range(20):
        loss = (m(x) - y).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    assert type(c.att) is PrunedMultiheadAttention and c.att.head_dim == m.att.head_dim


def test_graph_of_the_other_mode_is_refused():
    from secateur.graph import build_graph
    m = MHANet()
    x = torch.randn(2, 5, 6)
    with pytest.raises(PruningError, match="heads= mode"):
        plan_channels(m, x, heads="head_dim", graph=build_graph(m, x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_32", "swin_t"])
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_torchvision_other_transformers(name, heads):
    """vit_b_32 uses nn.MultiheadAttention like vit_b_16; Swin has its own attention (eager q @ k^T): there a
    head_dim plan keeps whole heads."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.get_model(name)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    oracle(m, torch.randn(1, 3, 224, 224) if name.startswith("vit") else torch.randn(1, 3, 64, 64), heads=heads)


def test_pruned_mha_is_captured_again():
    """A second plan on an already pruned MHA (head dims, then whole heads; then both again, global scope)."""
    torch.manual_seed(0)
    m = MHANet()
    x = torch.randn(2, 5, 6)
    oracle(m, x, ratio=0.5, heads="head_dim")
    oracle(m, x, ratio=0.5, heads="heads")
    assert (m.att.num_heads, m.att.head_dim, m.att.v_head_dim) == (2, 2, 2)
    res = prune_channels(m, x, ratio=0.4, heads="head_dim", scope="global", steps=2)
    assert res.channels_pruned > 0 and m.att.num_heads == 2


@pytest.mark.parametrize("kw", [dict(scope="global"), dict(threshold=7.7), dict(ratio={"*value*": 0.5,
                                                                                      "*query*": 0.25})])
def test_hf_head_dim_selection_modes_keep_q_and_v_sizes_equal(kw):
    """BERT reads one head size for q, k and v: global ranking, thresholds and per-layer ratios must still remove
    the same number of dims from q/k and from v in every head (the smaller of the two)."""
    torch.manual_seed(0)
    model, x = _hf("bert")
    kw = {"ratio": 0.5, **kw}
    plan = oracle(model, x, heads="head_dim", **kw)
    for layer in model.encoder.layer:
        att = layer.attention.self
        assert att.query.out_features == att.key.out_features == att.value.out_features
        assert att.all_head_size == att.query.out_features == 4 * att.attention_head_size
    assert plan.choices


def test_pruned_mha_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from secateur.io import export_onnx
    torch.manual_seed(0)
    m = MHANet().eval()
    x = torch.randn(2, 5, 6)
    prune_channels(m, x, ratio=0.5, heads="head_dim")
    export_onnx(m, x, tmp_path / "m.onnx")
    s = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_pruned_mha_under_torch_compile():
    torch.manual_seed(0)
    m = MHANet().eval()
    x = torch.randn(2, 5, 6)
    prune_channels(m, x, ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m)(x), m(x), rtol=1e-5, atol=1e-6)


def test_transformer_encoder_with_padding_mask_and_nested_tensors():
    """The default encoder turns padded batches into nested tensors in eval (a fused path that assumes the
    unpruned layout): the pruned encoder stops doing so. PyTorch's fast path leaves padded positions at zero,
    the layer-by-layer path computes them, so only real positions are compared."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)

        def forward(self, x):
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            pad[0, -2:] = True
            return self.enc(x, src_key_padding_mask=pad)

    real = torch.ones(2, 5, dtype=torch.bool)
    real[0, -2:] = False
    for heads in ("heads", "head_dim"):
        torch.manual_seed(0)
        m = Padded().eval()
        x = torch.randn(2, 5, 16)
        plan = plan_channels(m, x, ratio=0.5, heads=heads)
        ref = copy.deepcopy(m)
        plan.zero_consumers(ref)
        with torch.no_grad():
            want = ref(x)
            plan.apply(m)
            got = m(x)
        assert plan.choices and m.enc.use_nested_tensor is False
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
        fresh = apply_structure(Padded().eval(), m._secateur_structure)
        fresh.load_state_dict(m.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), got)


def test_bad_heads_options_raise_and_change_nothing():
    torch.manual_seed(0)
    m = MHANet()
    x = torch.randn(2, 5, 6)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for kw in (dict(heads="per_dim"), dict(heads="head_dim", target_latency=0.5), dict(heads=None)):
        with pytest.raises(PruningError):
            prune_channels(m, x, **kw)
    assert type(m.att) is nn.MultiheadAttention
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_head_dim_target_macs_reaches_the_target():
    torch.manual_seed(0)
    m = MHANet()
    x = torch.randn(2, 5, 6)
    res = prune_channels(m, x, heads="head_dim", target_macs=0.6)
    assert res.macs_after <= 0.6 * res.macs_before and m.att.num_heads == 4
