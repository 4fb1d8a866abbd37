"""The zoo selections the tests and benchmarks share (one place, so the benchmark measures what the tests check).

Importable without pytest: ``benchmarks/bench_zoo_depth.py`` puts this folder on ``sys.path``."""
from __future__ import annotations

import re

import torch

# a name that looks small: the cheapest representative of a timm module
_SMALL = re.compile(r"(atto|femto|pico|nano|tiny|small|_xs|_xxs|_s\b|b0|mobile|18|_t\b|_xt|lite|_0_5|_050|_100)")

TIMM_GIANTS = {"deepseek_vit_412m": "412M params: over the per-test time limit on 2 cores"}

HF_FAMILIES = ["bert", "gpt2", "llama", "mistral", "vit", "bart", "t5"]


def timm_one_per_module() -> list[str]:
    """One model per timm module: the shortest small-looking name, else the shortest name."""
    import timm
    out = []
    for mod in timm.list_modules():
        names = timm.list_models(module=mod)
        if names:
            out.append(sorted([n for n in names if _SMALL.search(n)] or names, key=len)[0])
    return out


def timm_input(model: torch.nn.Module) -> torch.Tensor | None:
    """The smallest input the model accepts: 64x64, else its pretrained size; None when neither runs."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    for hw in ((64, 64), tuple(size[1:])):
        try:
            with torch.no_grad():
                model(torch.randn(1, size[0], *hw))
            return torch.randn(1, size[0], *hw)
        except Exception:  # noqa: BLE001 - some models need their own size
            continue
    return None


def hf_model(name: str):
    """A small Hugging Face model with random weights and the kind of input it takes."""
    import transformers as T
    kw = dict(vocab_size=100, max_position_embeddings=32)
    if name == "bert":
        return T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, **kw)), "ids"
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                              bos_token_id=0, eos_token_id=0)), "ids"
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **kw)), "ids"
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, **kw)), "ids"
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, image_size=32, patch_size=8)), "px"
    if name == "bart":
        return T.BartModel(T.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        **kw)), "seq2seq"
    if name == "t5":
        return T.T5Model(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)), \
            "seq2seq"
    raise KeyError(name)


# A tiny configuration for any decoder in transformers' own registry: the fields are set only where the config has
# them (or an alias of them), in the config and in each of its sub-configs (text / vision / audio towers, encoder and
# decoder parts), so one table serves Llama-, GPT-2-, T5-, BART-, MoE-, MLA-, SSM-hybrid and multimodal configs alike.
# Sizes agree with each other: 4 heads of 8 = 32; Mamba's 2 x 32 = 64 inner channels = 4 heads of 16; MLA's query /
# key head = 8 without position + 8 with (RoPE), its value head 8.
HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=100, max_position_embeddings=64, head_dim=8, n_positions=64, ffn_dim=64, d_ff=64, d_kv=8,
                moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
                n_routed_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                # GPT-2 / encoder-decoder names of the same sizes
                n_embd=32, n_layer=2, n_head=4, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                num_layers=2, num_heads=4, embedding_dim=32, embed_dim=32, n_layers=2, n_heads=4,
                decoder_start_token_id=2, max_target_positions=64, max_source_positions=64,
                # partial rotary (GPT-J, CodeGen): at most the head size
                rotary_dim=4,
                # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, GLM-MoE-lite, LongCat): ranks and head parts
                qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16,
                index_head_dim=8, index_n_heads=2, index_topk=4,
                # MoE variants: one expert group, shared experts small, the first layer dense
                n_group=1, topk_group=1, first_k_dense_replace=1, moe_num_experts=4, num_experts_per_token=2,
                shared_experts_intermediate_size=32, shared_intermediate_size=32,
                moe_shared_expert_intermediate_size=32, dense_intermediate_size=64, expert_ffn_hidden_size=32,
                # linear attention (Qwen3-Next gated delta net, Kimi), SSMs (Mamba-2, Bamba, Jamba, Nemotron-H, Zamba)
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_head_dim=8, linear_num_heads=4,
                mamba_d_state=8, state_size=8, ssm_state_size=8, mamba_n_heads=4, mamba_num_heads=4, n_mamba_heads=4,
                mamba_d_ssm=64, mamba_d_head=16, mamba_head_dim=16, mamba_headdim=16, mamba_dt_rank=4, time_step_rank=4,
                n_groups=1,
                # hybrid attention blocks (Zamba, RecurrentGemma, RWKV)
                attention_hidden_size=64, attention_head_dim=16, lru_width=32, kv_channels=8, num_query_groups=2,
                adapter_rank=8, ffn_hidden_size=64,
                # hybrids that place attention (and MoE) layers by period and offset (Jamba): layer 1 of 2
                attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                # byte latent transformer (BLT): its global transformer's width and the hashed byte n-gram table
                hidden_size_global=32, encoder_hash_byte_group_vocab=100,
                # per-layer inputs and AltUp (Gemma-3n)
                hidden_size_per_layer_input=8, vocab_size_per_layer_input=100, laurel_rank=4, num_kv_shared_layers=0,
                use_cache=False)  # a single forward: no cache (hybrid caches index layers of types we shrink away)

# Per-type fixes the table cannot express (each: why). A dict value applies to that sub-config.
HF_OVERRIDES = {
    "mamba2": dict(num_heads=4, head_dim=16),  # its "num_heads / head_dim" are the SSM's: 4 x 16 = 2 x hidden
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # its default leaves layer_types None: cannot build
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),  # its attention reads both (no longer
             # fields with a default: rope_theta is absent, clip_qkv None breaks its clamp)
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,  # the sparse
                      indexer_compress_ratio=2),  # indexer's sizes default to None, which its attention cannot build
    "reformer": dict(is_decoder=True, axial_pos_shape=[2, 3], axial_pos_embds_dim=[16, 16],  # an LM head needs a
                     local_attn_chunk_length=3, lsh_attn_chunk_length=3),  # decoder; axial positions span 6 tokens
    # its default states no RoPE parameters for its (full attention) layers; its rotary embedding needs them
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # its shared transformer block is tied across hybrid layers: two of them, or its tie pattern matches nothing
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"]),
}
HF_OVERRIDES["qwen4_exp_text"] = HF_OVERRIDES["qwen4_exp"]
# Dots3's sliding-window layers take their attention sizes from swa_* arguments (a per-layer config), not the table's
HF_OVERRIDES["dots3_note"] = HF_OVERRIDES["dots3_note_text"] = dict(
    swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16, swa_head_dim=16,
    swa_qk_nope_head_dim=8, swa_v_head_dim=8)


# What the recipe still does not build, and why (measured: benchmarks/results/hf_causal_lm.json).
HF_UNBUILT = {
    "gemma3n": "its vision tower is a timm MobileNetV5 chosen by name (294 M parameters): no config field sizes it",
    "gemma4_assistant": "a draft model: every layer reads the key/value cache of a target Gemma 4 (no standalone "
                        "forward); its default config fails its own validation",
    "gemma4_unified_assistant": "a draft model: every layer reads the key/value cache of a target model",
}


def _causal_lm_class(model_type: str):
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return getattr(T, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _one_of_each(types: list) -> list:
    """The first layer of each kind, in model order: a hybrid keeps an attention layer and a recurrent one."""
    out = []
    for t in types:
        if t not in out:
            out.append(t)
    return out if len(out) > 1 else out * 2


def _build(cfg_cls, kw: dict):
    """``cfg_cls(**kw)``; where its constructor rejects them, its defaults with ``kw`` set one by one."""
    try:
        return cfg_cls(**kw)
    except Exception:  # noqa: BLE001 - a config whose validation rejects a combination: set what it accepts
        cfg = cfg_cls()
        for k, v in kw.items():
            try:
                setattr(cfg, k, v)
            except (AttributeError, TypeError, ValueError):
                pass
        return cfg


def _small(cfg, extra: dict):
    """A copy of ``cfg`` (an instance with its defaults) with ``HF_SMALL`` and ``extra`` set, sub-configs alike."""
    alias, fields = getattr(cfg, "attribute_map", {}), set(cfg.to_dict())
    have = fields | set(alias)
    kw = {}
    for k, v in HF_SMALL.items():  # by the field's own name: some configs derive fields from it as they are built
        if k in have:
            kw[alias[k] if k in alias and alias[k] in fields else k] = v
    if "kv_lora_rank" in have:  # multi-head latent attention: every head has its own keys (no grouped KV heads)
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    if "num_codebooks" in have:  # MusicGen reads input_ids as (batch x codebooks, tokens): one codebook
        kw["num_codebooks"] = 1
    if "n_shared_experts" in have and not getattr(cfg, "n_shared_experts", 1):  # None in Dots1's default
        kw["n_shared_experts"] = 1
    types = getattr(cfg, "layer_types", None)
    derived = isinstance(getattr(type(cfg), "layer_types", None), property)  # Jamba: from attn_layer_period
    if isinstance(types, list) and types and not derived:
        kw[alias.get("layer_types", "layer_types")] = types = _one_of_each(types)
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if k in kw:
                kw[k] = len(types)
    subs = getattr(cfg, "sub_configs", {}) or {}
    kw.update({k: v for k, v in extra.items() if k not in subs})
    for name in subs:
        sub = getattr(cfg, name, None)
        if hasattr(sub, "to_dict"):
            kw[name] = _small(sub, extra.get(name, {}))
    return _build(type(cfg), kw)


def hf_small_config(model_type: str):
    """The registry's config for ``model_type`` at ``HF_SMALL`` size. The causal-LM class's own config class where
    the registry's is a multimodal wrapper (Llama-4, Qwen3.5, MusicGen: their ``ForCausalLM`` is the text part)."""
    from transformers import CONFIG_MAPPING
    cfg_cls = type(CONFIG_MAPPING[model_type]())
    own = getattr(_causal_lm_class(model_type), "config_class", None)
    if isinstance(own, type) and own is not cfg_cls and getattr(cfg_cls, "sub_configs", None):
        cfg_cls = own
    return _small(cfg_cls(), HF_OVERRIDES.get(model_type, {}))


def hf_causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class (its registry, not a list of ours)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def hf_auto_model(model_type: str, max_params: int = 20_000_000):
    """(model, inputs) for a registry causal LM at ``HF_SMALL`` size with random weights; inputs None when it does
    not build or run on the CPU that way (a config that needs more than these fields, a CUDA-only kernel), or when
    it stays over ``max_params`` (counted on the meta device first, so it is never allocated)."""
    x = {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    try:
        cfg, cls = hf_small_config(model_type), _causal_lm_class(model_type)
        with torch.device("meta"):
            if sum(p.numel() for p in cls(cfg).parameters()) > max_params:
                return None, None
        model = cls(cfg).eval()
        if hasattr(model, "set_default_language"):  # X-MOD's adapters are per language: take the first
            model.set_default_language(cfg.languages[0])
        with torch.no_grad():
            model(**x)
    except Exception:  # noqa: BLE001 - the registry holds models this generic recipe cannot build
        return None, None
    return model, x


def hf_inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "px":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    x = {"input_ids": torch.randint(0, 100, (1, 6), generator=g)}
    if kind == "seq2seq":
        x["decoder_input_ids"] = torch.randint(0, 100, (1, 5), generator=g)
    return x
