"""Modules the engine meets as plain tensor ops rather than by class: normalisations written by hand (Hugging
Face's many RMSNorm copies: their mean over the channels is a statistic site, graph/rules/reductions.py
``_statistic_site``)
and convs / embeddings with a custom forward that still use their own weight (timm's Conv2dSame, Gemma's scaled
embedding; graph/rules/weighted.py ``weighted_op``). Before, each made the channels it touched all-or-nothing: a
Mistral's
whole residual stream stayed while a Llama's, whose norm was registered by name, was pruned."""
import importlib
import inspect
import pkgutil
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import secateur
from helpers import assert_reloads, pruned_vs_reference, zeroed_reference_pruned
from secateur.structured import plan_channels

torch.set_num_threads(1)


class HandRMSNorm(nn.Module):
    """An RMSNorm in plain ops, as transformers writes it (float32 statistics, weight after the cast)."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)


class OneMinusNorm(HandRMSNorm):
    """Gemma's form: ``x_hat * (1 + weight)``."""

    def forward(self, x):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + self.weight.float())


class PrefixNorm(HandRMSNorm):
    """Not a channel norm: its statistic reads the first 4 channels only (fixed positions)."""

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x[..., :4].pow(2).mean(-1, keepdim=True) + 1e-6)


class GateNorm(HandRMSNorm):
    """Named a norm, mixes channels, channel-equivariant, but not scale-invariant (a softmax gate)."""

    def forward(self, x):
        return self.weight * x * torch.softmax(x, dim=-1)


class Stream(nn.Module):
    """A residual stream through hand-written norms: the stream prunes only if the norms are understood."""

    def __init__(self, norm=HandRMSNorm, width=16):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": norm(width), "up": nn.Linear(width, 32),
                                                   "down": nn.Linear(32, width)}) for _ in range(2))
        self.final = norm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](b["norm"](h))))
        return self.head(self.final(h))


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def _stream_group(plan, name="embed"):
    return next(g for g in plan.groups if g.name == name)


@pytest.mark.parametrize("norm", [HandRMSNorm, OneMinusNorm])
def test_hand_written_rmsnorm_stream_is_pruned_against_the_kept_channel_reference(norm, tmp_path):
    torch.manual_seed(0)
    model, x = _randomize(Stream(norm)).eval(), torch.randn(4, 5, 6)
    plan = plan_channels(model, x, ratio=0.5)
    assert _stream_group(plan).size == 16  # the stream is channels, not one unit
    assert sum("normalises over pruned channels" in n for n in plan.notes) == 3  # each norm site in the plan
    zeroed, want, got = zeroed_reference_pruned(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (zeroed - got).abs().max() > 1e-3  # plain zeroing is not removal here: the reference matters
    assert model.final.weight.shape == (8,) and model.embed.out_features == 8
    secateur.save(model, tmp_path / "m.safetensors")
    fresh = secateur.load(_randomize(Stream(norm)).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", [PrefixNorm, GateNorm])
def test_modules_named_norm_that_are_not_channel_norms_are_traced_op_by_op(norm):
    torch.manual_seed(0)
    model, x = _randomize(Stream(norm)).eval(), torch.randn(4, 5, 6)
    plan = plan_channels(model, x, ratio=0.5)
    assert _stream_group(plan).size == 1  # their ops make the stream one unit: kept, never wrongly pruned
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _transformers_rmsnorms():
    transformers = pytest.importorskip("transformers")
    found = []
    for info in pkgutil.iter_modules(transformers.models.__path__):
        if info.name not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "t5", "mixtral",
                             "olmo2", "cohere2", "granite", "starcoder2", "deepseek_v3", "glm4"):
            continue
        try:
            mod = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except ImportError:
            continue
        for name, cls in vars(mod).items():
            if (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == mod.__name__
                    and re.search(r"(RMSNorm|T5LayerNorm)$", name)):
                found.append(cls)
    return found


def test_transformers_rmsnorm_classes_prune_the_stream_they_normalise():
    """Driven by transformers' own modules (a fixed list of families, to stay quick): each family's RMSNorm class
    in the stream model above; the stream prunes and the oracle holds with the kept-channel reference."""
    classes = _transformers_rmsnorms()
    assert len(classes) >= 8
    for cls in classes:
        torch.manual_seed(0)
        model, x = _randomize(Stream(cls)).eval(), torch.randn(4, 5, 6)
        plan = plan_channels(model, x, ratio=0.5)
        assert _stream_group(plan).size == 16, cls.__name__
        _, want, got = pruned_vs_reference(model, x, plan)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=cls.__name__)


def _hf(name):
    T = pytest.importorskip("transformers")
    kw = dict(vocab_size=100, max_position_embeddings=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
    make = {"mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**kw)),
            "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**kw)),
            "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **kw)),
            "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, bos_token_id=0, eos_token_id=0, **kw))}
    return make[name]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma", "phi3"])
def test_hf_causal_lms_prune_their_residual_stream(family, tmp_path):
    """Mistral / Qwen2 / Phi-3 RMSNorms and Gemma's (1 + weight) norm and scaled, tied embedding: the hidden size
    halves, the oracle holds, and the file reloads onto a fresh model exactly."""
    make = _hf(family)
    torch.manual_seed(0)
    model = make().eval()
    x = {"input_ids": torch.randint(0, 100, (1, 6))}
    plan = plan_channels(model, x, ratio=0.5)
    assert _stream_group(plan, "model.embed_tokens").size == 32
    run = lambda m, x: m(**x).logits  # noqa: E731
    _, want, got = pruned_vs_reference(model, x, plan, run)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.model.embed_tokens.weight.shape == (100, 16) and model.lm_head.in_features == 16
    if family == "gemma":  # embed_scale = hidden_size ** 0.5 at build time: the config keeps it, the record reloads
        assert model.config.hidden_size == 32
    elif getattr(model.config, "head_dim", None):  # where the config states the head size, hidden_size can follow
        assert model.config.hidden_size == 16  # (else it derives head_dim from it: the structure record reloads)
    assert_reloads(make, model, x, tmp_path, run)


class PadSameConv(nn.Conv2d):
    """timm's Conv2dSame pattern: pad for 'same' output, then F.conv2d with the module's own weight."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaskedConv(nn.Conv2d):
    """A computed weight (masked): cannot be sliced where it is made, so its channels are kept."""

    def forward(self, x):
        return F.conv2d(x, self.weight * (self.weight.abs() > 0.01), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 3.0


class OpLevel(nn.Module):
    def __init__(self, conv=PadSameConv):
        super().__init__()
        self.stem = conv(3, 16, 2, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.dw = conv(16, 16, 3, groups=16)
        self.pw = conv(16, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pw(torch.relu(self.dw(x)))
        return self.head(x.mean((2, 3)))


def test_conv_with_custom_forward_on_its_own_weight_prunes_like_a_conv(tmp_path):
    torch.manual_seed(0)
    model, x = OpLevel().eval(), torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    plan = plan_channels(model, x, ratio=0.5)
    assert {g.name: g.size for g in plan.groups} == {"stem": 16, "pw": 24}
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.dw.weight.shape == (8, 1, 3, 3) and model.dw.groups == 8 and model.pw.in_channels == 8
    secateur.save(model, tmp_path / "m.safetensors")
    fresh = secateur.load(OpLevel().eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_conv_with_a_computed_weight_keeps_its_channels_with_a_note():
    torch.manual_seed(0)
    model, x = OpLevel(MaskedConv).eval(), torch.randn(2, 3, 17, 17)
    plan = plan_channels(model, x, ratio=0.5)
    assert not any(g.size > 1 for g in plan.groups)
    assert any("not a parameter used as it is" in n for n in plan.notes)
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_embedding_with_custom_forward_produces_channels():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.out = ScaledEmbedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.emb(ids))))

    torch.manual_seed(0)
    model, x = Tok().eval(), torch.randint(0, 50, (2, 7))
    plan = plan_channels(model, x, ratio=0.5)
    assert _stream_group(plan, "emb").size == 16
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.emb.weight.shape == (50, 8) and model.emb.embedding_dim == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_mixnet_s"])
def test_timm_same_padding_convs_prune(name):
    """timm's Conv2dSame (the tf_* ports) used to keep every channel it read: MACs after / dense at ratio 0.5
    went 0.361 -> 0.283 (tf_efficientnet_b0, equal to efficientnet_b0's) and 0.427 -> 0.303 (tf_mixnet_s)."""
    timm = pytest.importorskip("timm")
    from secateur.metrics import count_macs
    torch.manual_seed(0)
    model, x = timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 96, 96)
    macs0 = count_macs(model, x)
    plan = plan_channels(model, x, ratio=0.5)
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert count_macs(model, x) / macs0 < 0.32
    assert not any("not a parameter used as it is" in n for n in plan.notes)


def test_masked_fill_with_a_tensor_value_is_elementwise():
    """``masked_fill(x, mask, torch.tensor(v))`` (cpmant's attention) has no pointwise tag in torch; it is
    elementwise, so the channels it passes stay prunable and the oracle holds."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(torch.relu(h.masked_fill(h < -0.5, torch.tensor(0.25))))

    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(4, 6)
    plan = plan_channels(model, x, ratio=0.5)
    assert _stream_group(plan, "fc1").size == 16
    assert not any("masked_fill" in n for n in plan.notes)
    _, want, got = pruned_vs_reference(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.fc1.out_features == 8
