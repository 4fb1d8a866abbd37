"""Depth pruning (structured/depth.py): which blocks are droppable, their scores against a hand-made oracle, the
dropped model against the original run with those blocks skipped, save/load, and bad input that changes nothing."""
import copy
import math

import pytest
import torch
from torch import nn

import secateur
from secateur import PruningError, drop_blocks, prune_channels
from secateur.structured import Skipped, droppable_blocks, score_blocks

tv = pytest.importorskip("torchvision")


class Res(nn.Module):
    def __init__(self, d, inplace=False, tuple_out=False):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.inplace, self.tuple_out = inplace, tuple_out

    def forward(self, x):
        if self.inplace:
            y = self.f(x)
            y += x
        else:
            y = x + self.f(x)
        return (y, None) if self.tuple_out else y


class CloneRes(Res):
    def forward(self, x):  # the skip is a copy of the input: not recognised, so not droppable
        return x.clone() + self.f(x)


class Stack(nn.Module):
    def __init__(self, blocks, d=8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            y = b(x)
            x = y[0] if isinstance(y, tuple) else y
        return self.out(x)


def _skip_reference(model, names):
    """The original model with ``names`` skipped by hooks (each returns its input, in the block's output form)."""
    ref = copy.deepcopy(model)
    for n in names:
        def hook(mod, args, out):
            return (args[0],) + (None,) * (len(out) - 1) if isinstance(out, tuple) else args[0]
        ref.get_submodule(n).register_forward_hook(hook)
    return ref


def test_candidates_are_the_residual_blocks_of_torchvision_models():
    x = torch.randn(1, 3, 64, 64)
    m = tv.models.resnet50().eval()
    want = [f"{ln}.{i}" for ln in ("layer1", "layer2", "layer3", "layer4")
            for i, b in enumerate(getattr(m, ln)) if b.downsample is None]
    assert droppable_blocks(m, x) == want and len(want) == 12
    m = tv.models.mobilenet_v2().eval()
    assert droppable_blocks(m, x) == [f"features.{i}" for i, b in enumerate(m.features)
                                      if getattr(b, "use_res_connect", False)]
    m = tv.models.convnext_tiny().eval()  # the blocks, not the stages that hold them (nothing nested)
    assert droppable_blocks(m, x) == [f"features.{s}.{i}" for s in (1, 3, 5, 7) for i in range(len(m.features[s]))]
    assert droppable_blocks(tv.models.densenet121().eval(), x) == []  # concatenation is no skip connection


def test_only_own_input_added_counts():
    model = Stack([Res(8), CloneRes(8), Res(8, inplace=True), Res(8, tuple_out=True)]).eval()
    x = torch.randn(5, 4)
    assert droppable_blocks(model, x) == ["blocks.0", "blocks.2", "blocks.3"]
    with pytest.raises(PruningError, match=r"\[blocks.1\].*does not add its own input"):
        drop_blocks(model, x, blocks=["blocks.1"])
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert droppable_blocks(plain, torch.randn(2, 4)) == []


@pytest.mark.parametrize("name,count", [("resnet18", 3), ("mobilenet_v2", 5), ("convnext_tiny", 6), ("vit_b_16", 4)])
def test_dropped_model_is_the_original_with_blocks_skipped(name, count):
    torch.manual_seed(0)
    model = getattr(tv.models, name)().eval()
    x = torch.randn(2, 3, 224, 224) if name == "vit_b_16" else torch.randn(2, 3, 96, 96)
    if name == "vit_b_16":
        with pytest.raises(PruningError, match="outputs are all zeros"):  # torchvision zeroes the head
            drop_blocks(model, x, count=count)
        nn.init.normal_(model.heads.head.weight)
    before = copy.deepcopy(model)
    res = drop_blocks(model, x, count=count)
    assert len(res.dropped) == count
    assert all(isinstance(model.get_submodule(n), Skipped) for n in res.dropped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _skip_reference(before, res.dropped)(x), rtol=0, atol=0)
    assert res.macs_after < res.macs_before and res.params_after < res.params_before
    # the dropped ones are the lowest scores
    assert sorted(res.scores.values())[:count] == [res.scores[n] for n in res.dropped]


def test_output_score_is_the_relative_change_of_the_outputs():
    model = Stack([Res(8) for _ in range(4)]).eval()
    x = torch.randn(16, 4)
    scores = score_blocks(model, x)
    with torch.no_grad():
        ref = model(x)
        for n in scores:
            got = _skip_reference(model, [n])(x)
            want = float((got.double() - ref.double()).norm() / ref.double().norm())
            assert math.isclose(scores[n], want, rel_tol=1e-9)


def test_cosine_score_is_block_influence():
    model = Stack([Res(8) for _ in range(3)]).eval()
    x = torch.randn(16, 4)
    scores = score_blocks(model, x, criterion="cosine")
    with torch.no_grad():
        h = model.inp(x)
        for i, b in enumerate(model.blocks):
            y = b(h)
            want = float((1 - nn.functional.cosine_similarity(h.double(), y.double(), dim=1)).mean())
            assert math.isclose(scores[f"blocks.{i}"], want, rel_tol=1e-9)
            h = y
    res = drop_blocks(model, x, count=1, criterion="cosine")
    assert res.dropped == (min(scores, key=scores.get),) and res.criterion == "cosine"


def test_a_block_that_does_nothing_scores_zero_and_goes_first():
    model = Stack([Res(8) for _ in range(4)]).eval()
    nn.init.zeros_(model.blocks[2].f[2].weight)
    nn.init.zeros_(model.blocks[2].f[2].bias)
    x = torch.randn(16, 4)
    res = drop_blocks(model, x, count=1)
    assert res.dropped == ("blocks.2",) and res.scores["blocks.2"] == 0.0


def test_target_macs_drops_the_fewest_lowest_scored_blocks():
    model = tv.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 96, 96)
    res = drop_blocks(copy.deepcopy(model), x, target_macs=0.8)
    assert res.macs_ratio <= 0.8
    order = sorted(res.scores, key=res.scores.get)
    assert list(res.dropped) == order[:len(res.dropped)]
    fewer = drop_blocks(copy.deepcopy(model), x, count=len(res.dropped) - 1)
    assert fewer.macs_ratio > 0.8
    with pytest.raises(PruningError, match="does not reach the MACs target"):
        drop_blocks(copy.deepcopy(model), x, target_macs=0.1)


def test_stay_above_passes_over_blocks_that_cross_the_target():
    from secateur.metrics import macs_by_layer
    model = tv.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 96, 96)
    per = macs_by_layer(model, x)
    res = drop_blocks(copy.deepcopy(model), x, target_macs=0.8, stay_above=True)
    assert 0.8 <= res.macs_ratio < 1 and res.dropped
    left = res.macs_after
    for n in res.scores:  # every block left would have crossed the target
        if n not in res.dropped:
            assert left - per[n] < 0.8 * res.macs_before
    with pytest.raises(PruningError, match="stay_above applies to target_macs"):
        drop_blocks(model, x, count=1, stay_above=True)


def test_bad_input_changes_nothing():
    model = tv.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = [type(m) for m in model.modules()]
    cases = [
        (dict(blocks=["layer2.0"]), r"\[layer2.0\].*output is not a tensor shaped like its input"),
        (dict(blocks=["layer1.0.conv1"]), r"\[layer1.0.conv1\].*not an element of an nn.Sequential"),
        (dict(blocks=["nope"]), r"\[nope\]"),
        (dict(blocks=["layer1.0", "layer1.0"]), "named twice"),
        (dict(count=6), "only 5 blocks"),
        (dict(count=-1), "count is a number"),
        (dict(count=1, blocks=["layer1.0"]), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(target_macs=1.5), "target_macs"),
        (dict(count=1, criterion="taylor"), "unknown block criterion"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(PruningError, match=msg):
            drop_blocks(model, x, **kwargs)
    assert [type(m) for m in model.modules()] == mods
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert drop_blocks(model, x, count=0).dropped == ()


@pytest.mark.parametrize("order", ["depth_then_width", "width_then_depth"])
def test_save_load_round_trip_with_channel_pruning(tmp_path, order):
    torch.manual_seed(0)
    model = tv.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    if order == "depth_then_width":
        drop_blocks(model, x, count=2)
        prune_channels(model, x, ratio=0.4)
    else:
        prune_channels(model, x, ratio=0.4)
        drop_blocks(model, x, blocks=["layer1.1", "layer3.1"])
    path = tmp_path / "m.safetensors"
    secateur.save(model, path)
    fresh = secateur.load(tv.models.resnet18().eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert [type(m).__name__ for m in fresh.modules()] == [type(m).__name__ for m in model.modules()]
    with pytest.raises(PruningError):
        secateur.load(tv.models.resnet50().eval(), path)


def test_hugging_face_decoder_layers_drop_and_generate():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    assert droppable_blocks(model, {"input_ids": ids}) == [f"model.layers.{i}" for i in range(4)]
    before = copy.deepcopy(model)
    res = drop_blocks(model, {"input_ids": ids}, blocks=["model.layers.0", "model.layers.2"])
    ref = copy.deepcopy(before)
    for n in res.dropped:  # HF calls its layers with hidden_states first
        ref.get_submodule(n).register_forward_hook(lambda mod, args, kwargs, out: args[0] if args
                                                   else kwargs["hidden_states"], with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # the cache still lines up with the first layer dropped: cached and uncached greedy decoding agree
    a = model.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=True)
    b = model.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_skip_record_refuses_a_different_block():
    from secateur.structured.depth import skip_recorded
    model = Stack([Res(8), Res(8)])
    with pytest.raises(PruningError, match=r"\[blocks.1\] the structure dropped a different block"):
        skip_recorded(model, {"blocks.1": {"skipped": {"was": "Bottleneck", "arg": 0, "tuple_len": None}}})
    with pytest.raises(PruningError, match=r"\[blocks.7\] a dropped block of the structure is not in this model"):
        skip_recorded(model, {"blocks.7": {"skipped": {"was": "Res", "arg": 0, "tuple_len": None}}})


def test_zero_outputs_refuse_the_output_score_but_not_named_blocks():
    model = Stack([Res(8), Res(8)]).eval()
    nn.init.zeros_(model.out.weight)
    nn.init.zeros_(model.out.bias)
    x = torch.randn(4, 4)
    with pytest.raises(PruningError, match="outputs are all zeros.*criterion='cosine'"):
        drop_blocks(model, x, count=1)
    assert drop_blocks(model, x, count=1, criterion="cosine").dropped
    res = drop_blocks(model, x, blocks=["blocks.0"])
    assert res.scores == {} and len(res.dropped) == 1 and "dropped 1 blocks" in str(res)


class Outer(nn.Module):
    """A residual block whose branch is a stack of residual blocks: outer and inner are both droppable."""

    def __init__(self, d):
        super().__init__()
        self.inner = nn.Sequential(Res(d), Res(d))

    def forward(self, x):
        return x + self.inner(x)


def test_nested_blocks_are_never_dropped_together():
    model = Stack([Outer(8), Res(8)]).eval()
    x = torch.randn(6, 4)
    found = droppable_blocks(model, x)
    assert found == ["blocks.0", "blocks.0.inner.0", "blocks.0.inner.1", "blocks.1"]
    with pytest.raises(PruningError, match=r"\[blocks.0\] a block inside another dropped block"):
        drop_blocks(model, x, blocks=["blocks.0", "blocks.0.inner.1"])
    before = copy.deepcopy(model)
    res = drop_blocks(model, x, count=3)
    assert len(res.dropped) == 3 and not any(a != b and b.startswith(a + ".") for a in res.dropped
                                             for b in res.dropped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _skip_reference(before, res.dropped)(x), rtol=0, atol=0)
    model = copy.deepcopy(before)
    res = drop_blocks(model, x, target_macs=0.2)
    assert not any(b.startswith(a + ".") for a in res.dropped for b in res.dropped)


def test_droppable_blocks_is_a_top_level_name():
    assert secateur.droppable_blocks is droppable_blocks and "droppable_blocks" in secateur.__all__


def test_a_shared_block_is_named_by_either_of_its_names():
    """One block object held at two places is listed under its first name; its second name means the same block
    (it used to be refused as 'not an element of an nn.Sequential')."""
    shared = Res(8)
    model = nn.Sequential(nn.Linear(8, 8), shared, Res(8), shared)
    x = torch.randn(4, 8)
    assert droppable_blocks(model, x) == ["1", "2"]
    assert score_blocks(model, x, ["3"])["3"] == score_blocks(model, x, ["1"])["1"]
    with pytest.raises(PruningError, match="named twice"):
        drop_blocks(copy.deepcopy(model), x, blocks=["1", "3"])
    res = drop_blocks(model, x, blocks=["3"])
    assert res.dropped == ("1",)
    assert isinstance(model[1], Skipped) and isinstance(model[3], Skipped) and isinstance(model[2], Res)


class Peeking(Stack):
    """Model code that reaches into its blocks (RecurrentGemma sets up ``layer.temporal_block``'s cache)."""

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            b.f  # noqa: B018 - the model's own code reads the block's insides
            x = b(x)
        return self.out(x)


@pytest.mark.parametrize("how", [dict(count=1), dict(blocks=["blocks.1"], criterion="cosine"),
                                 dict(target_macs=0.5, criterion="cosine")])
def test_model_code_that_reads_a_dropped_blocks_insides_is_refused_unchanged(how):
    model, x = Peeking([Res(8), Res(8)]).eval(), torch.randn(3, 4)
    before = copy.deepcopy(model.state_dict())
    assert droppable_blocks(model, x) == ["blocks.0", "blocks.1"]  # found by their skips
    with pytest.raises(PruningError, match="cannot run with this block skipped.*has no attribute 'f'"):
        drop_blocks(model, x, **how)
    assert all(isinstance(b, Res) for b in model.blocks)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recurrent_gemma_layers_are_refused_not_broken():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.RecurrentGemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=1, lru_width=32,
                                  attention_window_size=16, block_types=["recurrent", "attention"])
    model, x = tr.RecurrentGemmaForCausalLM(cfg).eval(), {"input_ids": torch.randint(3, 100, (1, 6))}
    with pytest.raises(PruningError, match="temporal_block"):
        drop_blocks(model, x, count=1)
    assert not any(isinstance(m, Skipped) for m in model.modules())


@pytest.mark.parametrize("cache", [None, "static"])
def test_first_layer_dropped_keeps_cached_decoding_of_a_padded_batch(cache):
    """Models and generate read the past length from cache slot 0: a dropped first layer must keep its slot as long
    as the sequence (dynamic or static cache), or positions and masks go wrong from the second token on."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tr.Qwen2ForCausalLM(cfg).eval()
    x = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    ref = copy.deepcopy(model)
    ref.model.layers[0].register_forward_hook(lambda mod, args, out: args[0])  # runs, fills its slot, hands x on
    drop_blocks(model, {"input_ids": x}, blocks=["model.layers.0"])
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    if cache:
        kw["cache_implementation"] = cache
    assert torch.equal(model.generate(x, **kw), ref.generate(x, **kw))
