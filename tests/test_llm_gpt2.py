"""GPT-2 style ``Conv1D`` layers (weight stored ``(in, out)``, ``y = x @ W + b``) in one-shot pruning and
in the masking engine, on a tiny random GPT-2, against references computed directly from full-model
forwards and against a twin whose Conv1D layers are converted to ``nn.Linear``."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import secateur  # noqa: E402
from helpers import layer_inputs
from secateur.errors import PruningError  # noqa: E402
from secateur.llm import prune_llm  # noqa: E402
from secateur.llm.sparsegpt import sparsegpt_prune  # noqa: E402
from secateur.masks import finalize, masks_of, set_mask  # noqa: E402
from secateur.patterns import NM, Element  # noqa: E402
from secateur.targets import is_hf_conv1d  # noqa: E402

VOCAB = 80


def _gpt2(n_layer=2, seed=0):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n_layer, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _calib(n=4, b=2, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def _conv1ds(block):
    return [m for m in block.modules() if is_hf_conv1d(m)]


def _sequential_reference(model, batches, prune_layer):
    """Block by block: every layer's statistics from full forwards of the model whose earlier blocks are
    pruned (the layers of one block all see that block's unpruned inputs)."""
    for block in model.transformer.h:
        mods = _conv1ds(block)
        xs = [layer_inputs(model, m, batches) for m in mods]
        for m, x in zip(mods, xs):
            prune_layer(m, x)


@pytest.mark.parametrize("pattern", ["element", "2:4"])
def test_wanda_on_conv1d_equals_direct_reference(pattern):
    model = _gpt2()
    ref = copy.deepcopy(model)
    batches = _calib()

    def wanda_ref(m, x):
        score = m.weight.detach().abs() * x.norm(dim=0).reshape(-1, 1)  # (in, out): norm per input ROW here
        if pattern == "element":  # each output unit (a column of the stored weight) keeps its top half
            kth = score.topk(score.shape[0] // 2, dim=0).values[-1:, :]
            keep = score >= kth
        else:  # groups of 4 consecutive inputs (down the stored rows) keep 2
            g = score.reshape(-1, 4, score.shape[1])
            keep = (g >= g.topk(2, dim=1).values[:, -1:, :]).reshape(score.shape)
        set_mask(m, "weight", keep)

    _sequential_reference(ref, batches, wanda_ref)
    rep = prune_llm(model, batches, method="wanda", pattern=pattern, progress=False)
    assert rep.blocks == "transformer.h" and len(rep.layers) == 8
    got, want = masks_of(model), masks_of(ref)
    assert got.keys() == want.keys() and len(got) == 8
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("pattern", [Element(), NM(2, 4)])
def test_sparsegpt_on_conv1d_equals_direct_reference(pattern):
    model = _gpt2()
    ref = copy.deepcopy(model)
    batches = _calib(n=6, t=32)  # 384 tokens > 128 inputs of mlp.c_proj

    def sgpt_ref(m, x):
        h = 2 * x.T @ x / x.shape[0]
        w, pruned, _ = sparsegpt_prune(m.weight.detach().T, h, pattern, 0.5)  # the (out, in) view
        with torch.no_grad():
            m.weight.copy_(w.T)
        set_mask(m, "weight", ~pruned.T)

    _sequential_reference(ref, batches, sgpt_ref)
    prune_llm(model, batches, method="sparsegpt", pattern=pattern, progress=False)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    for k, v in masks_of(ref).items():
        assert torch.equal(masks_of(model)[k], v), k


def _linear_twin(model):
    """The same network with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if is_hf_conv1d(m):
            lin = nn.Linear(m.weight.shape[0], m.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, lin)
    return twin


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["element", "2:4", "4:8"])
def test_conv1d_gives_the_transpose_of_the_linear_twin(method, pattern):
    model = _gpt2()
    twin = _linear_twin(model)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits)
    batches = _calib(n=6)
    prune_llm(model, batches, method=method, pattern=pattern, progress=False)
    prune_llm(twin, batches, method=method, pattern=pattern, progress=False)
    got, want = masks_of(model), masks_of(twin)
    assert got.keys() == want.keys() and len(got) == 8
    for k in want:
        assert torch.equal(got[k], want[k].T), k
        if pattern != "element":
            n, m = map(int, pattern.split(":"))
            assert bool((got[k].reshape(-1, m, got[k].shape[1]).sum(1) == n).all()), k
        else:
            assert int((~got[k]).sum()) == got[k].numel() // 2
    with torch.no_grad():
        a = model(ids).logits
        torch.testing.assert_close(a, twin(ids).logits, rtol=1e-4, atol=1e-5)
        finalize(model)
        assert torch.equal(a, model(ids).logits)


def test_nm_along_the_output_dim_of_a_conv1d_is_refused_and_nothing_changes():
    model = _gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="input dimension"):
        prune_llm(model, _calib(), method="wanda", pattern=NM(2, 4, dim=1), progress=False)
    assert not secateur.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # dim=0 IS the input dimension of a Conv1D weight: accepted
    prune_llm(model, _calib(), method="wanda", pattern=NM(2, 4, dim=0), progress=False)
    w = model.transformer.h[0].attn.c_attn.weight
    assert bool(((w != 0).reshape(-1, 4, w.shape[1]).sum(1) <= 2).all())


def test_nm_dim_none_resolves_to_the_input_dim_of_conv1d_masked_or_not():
    c = transformers.pytorch_utils.Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    assert NM(2, 4).for_module(c).dim == 0
    set_mask(c, "weight", torch.ones(8, 12, dtype=torch.bool))  # class becomes ParametrizedConv1D
    assert type(c).__name__ != "Conv1D" and is_hf_conv1d(c) and NM(2, 4).for_module(c).dim == 0
    assert NM(2, 4).for_module(nn.Linear(8, 12)).dim == 1


def test_masking_engine_on_gpt2_conv1d_report_finalize_save_load(tmp_path):
    model = _gpt2()
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.warns(UserWarning, match="lm_head.weight"):  # tied to the embedding: skipped
        out = secateur.prune(model, pattern="4:8")
    assert set(out) == {f"transformer.h.{i}.{n}.weight" for i in range(2)
                        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    for k, m in masks_of(model).items():
        assert bool((m.reshape(-1, 8, m.shape[1]).sum(1) == 4).all()), k  # groups down the inputs (dim 0)
    rep = secateur.report(model, ids)
    row = next(r for r in rep.rows if r.name == "transformer.h.0.mlp.c_fc")
    bias_zeros = int((model.transformer.h[0].mlp.c_fc.bias == 0).sum())
    assert row.params == 32 * 128 + 128 and row.zeros == 32 * 128 // 2 + bias_zeros
    assert row.macs == 2 * 8 * 32 * 128 and row.macs_nonzero == row.macs // 2  # masked Conv1D still counted
    with torch.no_grad():
        masked = model(ids).logits
    path = tmp_path / "gpt2.safetensors"
    secateur.save(model, path)
    back = secateur.load(_gpt2(seed=5), path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, masked)
        finalize(model)
        assert torch.equal(model(ids).logits, masked)


def test_second_prune_llm_on_masked_gpt2_keeps_pruned_weights_pruned():
    model = _gpt2()
    prune_llm(model, _calib(), method="wanda", sparsity=0.25, progress=False)
    first = masks_of(model)
    prune_llm(model, _calib(seed=7), method="wanda", pattern="2:4", progress=False)
    for k, m in masks_of(model).items():
        assert bool((m.reshape(-1, 4, m.shape[1]).sum(1) <= 2).all()), k
        assert not bool((m & ~first[k]).any()), k  # a weight pruned before is never revived


def test_calibration_longer_than_the_position_limit_is_refused_before_any_change():
    model = _gpt2()  # n_positions=64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"sequence length 65 exceeds the model's position limit 64 "
                                           r"\(config.n_positions\)"):
        prune_llm(model, [torch.randint(0, VOCAB, (1, 65))], progress=False)
    assert not secateur.is_pruned(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    prune_llm(model, [torch.randint(0, VOCAB, (1, 64))], progress=False)  # at the limit: fine
