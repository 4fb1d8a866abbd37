"""One-shot LLM pruning: Wanda/SparseGPT against direct references, the layer-wise driver against
full-model forwards, SparseGPT's reconstruction advantage, pattern validity and bad input."""
import copy

import pytest
import torch
from torch import nn

from helpers import layer_inputs
from secateur.errors import PruningError
from secateur.llm import prune_llm
from secateur.llm.sparsegpt import sparsegpt_prune
from secateur.llm.wanda import magnitude_mask, wanda_mask
from secateur.masks import finalize, get_mask, is_pruned, masks_of, set_mask
from secateur.patterns import NM, Element


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.gate = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x, scale=None):
        y = self.norm(x)
        y = self.down(torch.relu(self.gate(y)) * self.up(y))
        return x + (y if scale is None else y * scale)


class Tiny(nn.Module):
    """Embedding -> blocks -> head; the model passes a keyword argument to every block."""

    def __init__(self, vocab=50, d=16, h=32, n=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x, scale=0.5)
        return self.head(x)


def _calib(vocab=50, n=3, b=4, t=12):
    return [torch.randint(0, vocab, (b, t)) for _ in range(n)]


def _reference(model, batches, prune_layer):
    """Sequential reference: block by block, statistics from a full-model forward of the model whose
    earlier blocks are already pruned; all layers of a block see the block's unpruned inputs."""
    for block in model.blocks:
        lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
        xs = [layer_inputs(model, m, batches) for m in lins]
        for m, x in zip(lins, xs):
            prune_layer(m, x)


@pytest.mark.parametrize("pattern", ["element", "2:4", "4:8"])
def test_wanda_masks_equal_direct_reference_through_full_model(pattern):
    model = Tiny().eval()
    ref = copy.deepcopy(model)
    batches = _calib()

    def wanda_ref(m, x):
        score = m.weight.detach().abs() * x.norm(dim=0)  # |W_ij| * ||X_j||
        if pattern == "element":
            k = m.in_features // 2  # keep the top half of every row
            kth = score.topk(k, dim=1).values[:, -1:]
            keep = score >= kth
        else:
            n, mm = map(int, pattern.split(":"))
            g = score.reshape(score.shape[0], -1, mm)
            kth = g.topk(n, dim=2).values[..., -1:]
            keep = (g >= kth).reshape(score.shape)
        set_mask(m, "weight", keep)

    _reference(ref, batches, wanda_ref)
    prune_llm(model, batches, method="wanda", pattern=pattern, progress=False)
    got, want = masks_of(model), masks_of(ref)
    assert got.keys() == want.keys() and len(got) == 9
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sparsegpt_driver_equals_full_model_sequential_reference():
    model = Tiny().eval()
    ref = copy.deepcopy(model)
    batches = _calib(n=4, b=8, t=16)

    def sgpt_ref(m, x):
        h = 2 * x.T @ x / x.shape[0]
        w, pruned, _ = sparsegpt_prune(m.weight.detach(), h, Element(), 0.5)
        with torch.no_grad():
            m.weight.copy_(w)
        set_mask(m, "weight", ~pruned)

    _reference(ref, batches, sgpt_ref)
    prune_llm(model, batches, method="sparsegpt", progress=False)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    for k, v in masks_of(ref).items():
        assert torch.equal(masks_of(model)[k], v)


def _correlated(n=2048, d=128, seed=0, rank=32):
    """Activations like a transformer's: mostly low-rank (correlated features) plus noise, with
    uneven per-feature scales (outlier features)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return z * torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]


@pytest.mark.parametrize("pattern", [Element(), NM(2, 4), NM(4, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    x = _correlated()
    w = torch.randn(64, x.shape[1])
    h = 2 * x.T @ x / x.shape[0]
    new, pruned, _ = sparsegpt_prune(w, h, pattern, 0.5)
    err = lambda w2: (x @ (w - w2).T).pow(2).sum().item()  # ||WX - W'X||^2
    e_sgpt = err(new)
    e_wanda = err(w * ~wanda_mask(w, x.pow(2).sum(0), pattern, 0.5))
    e_mag = err(w * ~magnitude_mask(w, pattern, 0.5))
    assert e_sgpt < e_wanda < 0.2 * e_mag
    assert e_sgpt < 0.5 * err(w * ~pruned)  # the OBS update, not only the mask, does the work
    assert bool((new[pruned] == 0).all())
    assert int(pruned.sum()) == w.numel() // 2


@pytest.mark.parametrize("pattern", [Element(), NM(2, 4)])
def test_sparsegpt_loss_is_the_exact_obs_error_without_dampening(pattern):
    # OBS: each removal adds w_q^2 / (2 [H^-1]_qq) to E = 1/2 dW H dW^T = ||X dW^T||^2 / N (H = 2X^TX/N);
    # the sequential sweep's reported loss must therefore equal the true added error.
    x = _correlated(n=1024, d=96, rank=96)
    w = torch.randn(16, 96)
    new, _, loss = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], pattern, 0.5, damp=1e-8, block_size=32)
    true = (x.double() @ (w - new).double().T).pow(2).sum().item() / x.shape[0]
    assert loss == pytest.approx(true, rel=1e-3)


@pytest.mark.parametrize("shape,sparsity", [((8, 200), 0.5), ((5, 300), 0.3), ((3, 130), 0.77), ((4, 64), 0.0)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_unstructured_sparsity(shape, sparsity, method):
    x = _correlated(n=400, d=shape[1], seed=1)
    w = torch.randn(shape)
    if method == "sparsegpt":
        pruned = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], Element(), sparsity)[1]
        assert int(pruned.sum()) == round(sparsity * w.numel())
    elif method == "wanda":  # per output row
        pruned = wanda_mask(w, x.pow(2).sum(0), Element(), sparsity)
        assert (pruned.sum(1) == round(sparsity * shape[1])).all()
    else:
        pruned = magnitude_mask(w, Element(), sparsity)
        assert int(pruned.sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8), NM(1, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_validity(nm, method):
    x = _correlated(n=300, d=136, seed=2)  # 136 = 128 + 8: a partial SparseGPT column block
    w = torch.randn(12, 136)
    if method == "sparsegpt":
        pruned = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], nm, 0.0)[1]
    elif method == "wanda":
        pruned = wanda_mask(w, x.pow(2).sum(0), nm, 0.0)
    else:
        pruned = magnitude_mask(w, nm, 0.0)
    kept = (~pruned).reshape(12, -1, nm.m).sum(-1)
    assert (kept == nm.n).all()


def test_sparsegpt_dead_inputs_are_zeroed_and_finite():
    x = _correlated(n=500, d=32)
    x[:, [3, 17]] = 0  # features never active during calibration
    w = torch.randn(8, 32)
    new, pruned, _ = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], NM(2, 4), 0.0)
    assert torch.isfinite(new).all()
    assert (new[:, [3, 17]] == 0).all() and pruned[:, [3, 17]].all()


def test_masked_equals_finalized_and_magnitude_needs_no_calibration():
    model = Tiny().eval()
    ids = torch.randint(0, 50, (2, 10))
    prune_llm(model, _calib(), method="sparsegpt", pattern="2:4", progress=False)
    with torch.no_grad():
        masked = model(ids)
        finalize(model)
        assert not is_pruned(model)
        assert torch.equal(masked, model(ids))
    m2 = Tiny().eval()
    rep = prune_llm(m2, method="magnitude", sparsity=0.25, progress=False)
    assert rep.tokens == 0 and abs(rep.total_sparsity - 0.25) < 1e-9


def test_rollback_when_a_block_fails_midway():
    model = Tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(mod, args):  # blocks 0 and 1 are pruned (weights rewritten) by the time block 2 runs
        raise RuntimeError("user forward failed")

    model.blocks[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="user forward failed"):
        prune_llm(model, _calib(n=1), method="sparsegpt", progress=False)
    assert not is_pruned(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- bad input
def test_no_blocks_says_how_to_name_them():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(PruningError, match="blocks="):
        prune_llm(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    with pytest.raises(PruningError, match="nope"):
        prune_llm(Tiny(), _calib(), blocks="nope", progress=False)


@pytest.mark.parametrize("bad,match", [
    ([torch.randn(2, 8)], "integer token ids"),
    ([torch.zeros(8, dtype=torch.long)], "2-D"),
    ([torch.full((2, 4), 50)], "vocabulary"),
    ([{"attention_mask": torch.ones(2, 4)}], "input_ids"),
    ([], "empty"),
    (3, "iterable"),
])
def test_bad_calibration_is_rejected_before_any_change(bad, match):
    model = Tiny()
    with pytest.raises(PruningError, match=match):
        prune_llm(model, bad, method="wanda", progress=False)
    assert not is_pruned(model)


def test_nm_on_indivisible_dim_leaves_model_unchanged():
    model = Tiny(d=16, h=30)  # down: in_features 30, not divisible by 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"30 is not divisible by M=4"):
        prune_llm(model, _calib(), method="sparsegpt", pattern="2:4", progress=False)
    assert not is_pruned(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparsegpt_warns_with_the_numbers_when_tokens_are_few():
    model = Tiny(h=64)
    with pytest.warns(UserWarning, match=r"16 calibration tokens < 64 input features of blocks\.\d\.down"):
        prune_llm(model, [torch.randint(0, 50, (2, 8))], method="sparsegpt", progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(method="obs"), "unknown one-shot method"),
    (dict(pattern="2:4", sparsity=0.7), "fixes the sparsity"),
    (dict(sparsity=1.5), "sparsity"),
    (dict(pattern=NM(2, 4, dim=0)), "input dimension"),
    (dict(pattern="block4x4"), "element"),
    (dict(targets=["head"]), "no targeted Linear"),
])
def test_bad_options(kw, match):
    model = Tiny()
    with pytest.raises(PruningError, match=match):
        prune_llm(model, _calib(), progress=False, **kw)
    assert not is_pruned(model)


def test_explicit_blocks_and_targets():
    model = Tiny().eval()
    rep = prune_llm(model, _calib(), blocks=list(model.blocks[:2]), targets=lambda n, m: n.endswith("up"),
                    progress=False)
    assert [r.name for r in rep.layers] == ["blocks.0.up", "blocks.1.up"]
    assert get_mask(model.blocks[2].up) is None and get_mask(model.blocks[0].down) is None


@pytest.mark.parametrize("device, match", [
    ("xyz", "not a device"),
    ("meta", "meta device"),
    ("cuda:5" if torch.cuda.is_available() else "cuda", "no such CUDA device" if torch.cuda.is_available()
     else "device not available"),
])
def test_bad_device_is_refused_before_any_change(device, match):
    if device == "cuda:5" and torch.cuda.device_count() > 5:
        pytest.skip("this machine has a cuda:5")
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=match):
        prune_llm(model, _calib(), device=device, progress=False)
    assert not is_pruned(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
