"""Zoo coverage: the pruning oracle on real architectures, driven by the zoos' own model lists.

Default: a fast representative subset. ``-m slow``: every torchvision classification model (minus the listed
giants), segmentation models, one model per timm module, and the Hugging Face families."""
import copy
import re
import warnings

import pytest
import torch

from secateur.metrics import count_macs, count_params
from secateur.structured import plan_channels, prune_channels
from helpers import first_output as _first
from zoo_models import (HF_FAMILIES, HF_UNBUILT, TIMM_GIANTS, hf_auto_model, hf_causal_lm_types, hf_inputs, hf_model,
                        timm_input, timm_one_per_module)

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
tv = pytest.importorskip("torchvision")

# too big for a 2-core CI box in the slow budget (weights alone take 2-2.6 GB and 30+ s to initialise)
GIANTS = {"vit_h_14": "632M params", "regnet_y_128gf": "645M params", "vit_l_16": "304M params",
          "vit_l_32": "306M params", "regnet_y_32gf": "145M params, 30 s to build"}


def oracle(model, x, ratio=0.5, rtol=1e-4, **kw):
    """Removal == zeroing the chosen channels at their consumers (the original model), output shape kept."""
    model.eval()
    with torch.no_grad():  # zero-initialised heads (torchvision ViT) would make the comparison vacuous
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    plan = plan_channels(model, x, ratio=ratio, **kw)
    ref = copy.deepcopy(model)
    plan.zero_consumers(ref)
    with torch.no_grad(), plan.kept_norms(ref):  # norms over pruned channels: statistics over the kept ones
        want = _first(ref(**x) if isinstance(x, dict) else ref(x))
    with torch.no_grad():
        plan.apply(model)
        got = _first(model(**x) if isinstance(x, dict) else model(x))
    assert got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert err < rtol, f"relative error {err:.2e}"
    return plan




def _tv_input(model, sizes=(32, 64, 224)):
    for s in sizes:
        x = torch.randn(1, 3, s, s)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - some models need larger inputs
            continue
    pytest.fail("no input size works")


FAST_TV = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf",
           "efficientnet_b0", "densenet121", "swin_t", "resnext50_32x4d", "mnasnet0_5"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", FAST_TV)
def test_torchvision_fast(name):
    torch.manual_seed(0)
    plan = oracle(tv.models.get_model(name), _tv_input(tv.models.get_model(name), (32, 64)))
    assert plan.choices


@pytest.mark.zoo
def test_seed_deeplabv3_mobilenet_v3_large_half():
    torch.manual_seed(0)
    m = tv.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    x = torch.randn(1, 3, 64, 64)
    ref = copy.deepcopy(m)
    res = prune_channels(m, x, ratio=0.5)
    assert res.params_after < 0.5 * res.params_before and res.macs_after < 0.5 * res.macs_before
    assert res.params_after == count_params(m) and res.macs_after == count_macs(m, x)
    for p in res.plans:
        p.zero_consumers(ref)
    with torch.no_grad():
        got, want = m(x)["out"], ref(x)["out"]
    assert got.shape == want.shape == (1, 21, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---------------------------------------------------------------- Hugging Face, random weights
def _hf(name):
    pytest.importorskip("transformers")
    return hf_model(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", HF_FAMILIES)
def test_huggingface_prunes_heads_and_mlp_and_reloads_from_config(name):
    torch.manual_seed(0)
    model, kind = _hf(name)
    x = hf_inputs(kind)
    plan = oracle(model, x)
    pruned_attn = [g for g, _ in plan.choices if re.search(r"(q_proj|query|c_attn|\.q$)", g.name)]
    assert pruned_attn, "attention heads were not pruned"
    # save/load contract: a fresh model from the (updated) config, resized by the structure record
    from secateur.structured import apply_structure
    fresh = apply_structure(type(model)(model.config).eval(), model._secateur_structure)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_first(fresh(**x)), _first(model(**x)))
    if name in ("llama", "mistral", "t5"):  # configs that state head_dim: the config alone rebuilds the model
        alone = type(model)(model.config).eval()
        alone.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.zoo
def test_llama_gqa_heads_stay_grouped():
    torch.manual_seed(0)
    model, kind = _hf("llama")
    x = hf_inputs(kind)
    prune_channels(model, x, ratio=0.5)
    att = model.model.layers[0].self_attn
    hd = model.config.head_dim
    q, k = att.q_proj.out_features // hd, att.k_proj.out_features // hd
    assert (q, k) == (2, 1) and model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


# the generic registry recipe (tests/zoo_models.py hf_auto_model): a decoder-only part of an encoder-decoder (BART),
# partial rotary (GPT-J's rotary_dim), a multimodal wrapper whose text tower is the LM (Gemma 3)
HF_AUTO_FAST = ["bart", "gptj", "gemma3"]


def _hf_auto(model_type):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = hf_auto_model(model_type)
    if x is None:
        pytest.skip(f"{model_type}: does not build or run on CPU at the tiny size: "
                    f"{HF_UNBUILT.get(model_type, 'not known why (tests/zoo_models.py)')}")
    return model, x


@pytest.mark.zoo
@pytest.mark.parametrize("model_type", HF_AUTO_FAST)
def test_hf_registry_recipe_fast(model_type):
    model, x = _hf_auto(model_type)
    assert oracle(model, x).choices


@pytest.mark.zoo
def test_hf_config_keeps_a_size_its_forward_reads_as_a_value():
    """MiniCPM3 divides its logits by ``config.logits_scaling`` = hidden_size / dim_model_base, read at every forward:
    the pruned model keeps the config's hidden size (the structure record carries the new one), else its logits are
    off by the pruning ratio (relative error 1.0)."""
    model, x = _hf_auto("minicpm3")
    scaling = model.config.logits_scaling
    oracle(model, x)
    assert model.model.embed_tokens.embedding_dim < 32 and model.config.logits_scaling == scaling


@pytest.mark.zoo
def test_hf_per_layer_config_prunes():
    """Gemma 4's config refuses to state a global head_dim (transformers' per-layer configs raise on reading it):
    the config update treats it as not stated, instead of failing after the plan."""
    model, x = _hf_auto("gemma4_text")
    assert oracle(model, x).choices


def _registry_types():
    try:
        return hf_causal_lm_types()
    except ImportError:  # transformers missing
        return []


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("model_type", _registry_types())
def test_hf_causal_lm_registry(model_type):
    """Every causal LM type in transformers' registry at a tiny random size prunes and passes the oracle, or is
    refused with a PruningError."""
    model, x = _hf_auto(model_type)
    from secateur.errors import PruningError
    try:
        oracle(model, x)
    except PruningError as e:
        pytest.xfail(f"refused: {e}")


# ---------------------------------------------------------------- timm
timm_names = ["resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224", "mobilevitv2_050",
              "regnetx_002", "ghostnet_100"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", timm_names[:3])
def test_timm_fast(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    oracle(timm.create_model(name, pretrained=False), torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- the whole zoos (slow)
def _tv_names():
    return [n for n in tv.models.list_models(module=tv.models)]


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", _tv_names())
def test_torchvision_classification_zoo(name):
    if name in GIANTS:
        pytest.skip(f"giant: {GIANTS[name]}")
    torch.manual_seed(0)
    m = tv.models.get_model(name)
    oracle(m, _tv_input(m.eval(), (64, 224)))


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", tv.models.list_models(module=tv.models.segmentation))
def test_torchvision_segmentation_zoo(name):
    torch.manual_seed(0)
    m = tv.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)
    oracle(m, torch.randn(1, 3, 64, 64))


try:
    TIMM_ZOO = timm_one_per_module()
except BaseException:  # noqa: BLE001 - timm missing
    TIMM_ZOO = []



@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", TIMM_ZOO)
def test_timm_zoo(name):
    """Every timm model either prunes and passes the oracle, or is refused with a PruningError."""
    if name in TIMM_GIANTS:
        pytest.skip(f"giant: {TIMM_GIANTS[name]}")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = timm_input(m)
    if x is None:
        pytest.skip("model does not run on CPU with random inputs")
    from secateur.errors import PruningError
    try:
        oracle(m, x)
    except PruningError as e:
        pytest.xfail(f"refused: {e}")
