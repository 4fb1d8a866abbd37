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
# them (or an alias of them), so one table serves Llama-, GPT-2-, MoE- and T5-style configs alike.
HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=100, max_position_embeddings=64, head_dim=8, n_positions=64, ffn_dim=64, d_ff=64, d_kv=8,
                moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
                n_routed_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class (its registry, not a list of ours)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def hf_auto_model(model_type: str, max_params: int = 20_000_000):
    """(model, inputs) for a registry causal LM at ``HF_SMALL`` size with random weights; inputs None when it does
    not build or run on the CPU that way (a config that needs more than these fields, a CUDA-only kernel), or when
    it stays over ``max_params`` (a multimodal model whose vision tower these fields do not shrink; counted on the
    meta device first, so it is never allocated)."""
    import transformers as T
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    x = {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    try:
        cfg = CONFIG_MAPPING[model_type]()
        for k, v in HF_SMALL.items():
            if hasattr(cfg, k) or k in getattr(cfg, "attribute_map", {}):
                try:
                    setattr(cfg, k, v)
                except (AttributeError, TypeError, ValueError):
                    pass
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) > 2:
            cfg.layer_types = cfg.layer_types[:2]
        cls = getattr(T, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        with torch.device("meta"):
            if sum(p.numel() for p in cls(cfg).parameters()) > max_params:
                return None, None
        model = cls(cfg).eval()
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
