"""The dry run compares every intermediate shape with what the plan predicts (graph/verify.py): model code that
re-splits a pruned dim with a size of its own, where a ``-1`` absorbs the smaller size, runs after pruning with the
right output shape but computes something else. Those groups must be refused (with a note naming the op, the
module and both shapes), never returned in a plan; models without such code prune the same groups as without the
check. Every pruned model is compared with the oracle (consumers zeroed, norms over the kept channels). Every test
runs twice: with the dry run on the CPU (a twin sharing the weights: the default for small CPU models) and on meta
(the default for large or meta models); both must pass the same assertions."""
import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import pruned_vs_reference
from secateur.graph import verify
from secateur.structured import apply_structure, plan_channels, prune_channels

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


@pytest.fixture(autouse=True, params=["cpu", "meta"])
def dry_run_device(request, monkeypatch):
    """Where the dry run runs (``runs_here`` decides from the model's size): forced by the size budget."""
    monkeypatch.setattr(verify, "HERE_BYTES", 2 ** 40 if request.param == "cpu" else 0)
    monkeypatch.setattr(verify, "HERE_BYTES_APPLIED", 2 ** 40 if request.param == "cpu" else 0)
    real = verify.run
    seen = set()

    def run(*args, here=False, **kw):
        seen.add("cpu" if here else "meta")
        return real(*args, here=here, **kw)

    monkeypatch.setattr(verify, "run", run)
    yield request.param
    if "both" not in request.node.name:
        assert seen <= {request.param}, seen  # the dry run ran where the test says (meta trace unused on CPU)


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state


def _run(model, x):
    return _first(model(**x) if isinstance(x, dict) else model(x))


def _oracle_error(model, x, plan):
    """Relative error of the pruned model against the reference; also checks the reference differs from the
    unpruned model (else the comparison says nothing). ``model`` is pruned in place."""
    base, want, got = pruned_vs_reference(model, x, plan, _run)
    assert got.shape == want.shape == base.shape
    scale = want.abs().max()
    assert (base - want).abs().max() > 1e-3 * scale, "the plan changes nothing: the check would be vacuous"
    return float((got - want).abs().max() / scale)


class StaleHeads(nn.Module):
    """Attention that keeps its head count under a private name (the engine never updates ``_`` attributes, see
    graph/size_attrs.py; a public one it now updates where the dry run proves it) and lets ``-1`` take the rest."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self._n_h = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self._n_h, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.attn = StaleHeads(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, depth=1):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 32), nn.Linear(32, 5)
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def _net(depth=1):
    torch.manual_seed(0)
    model = Net(depth).eval()
    with torch.no_grad():  # weights large enough that every head matters
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.5)
    return model, torch.randn(2, 6, 8)


def test_stale_head_count_behind_view_minus_one_is_refused():
    """Before the shape check, the heads group was pruned and the model was silently wrong (about 4e-3 error)."""
    model, x = _net()
    plan = plan_channels(model, x, ratio=0.5)
    kept = {g.name for g, _ in plan.choices}
    assert "blocks.0.attn.qkv" not in kept  # the heads: refused
    assert {"inp", "blocks.0.fc1"} <= kept  # the residual stream and the MLP: still pruned
    note = next(n for n in plan.notes if "differ" in n)
    assert "blocks.0.attn" in note and "view" in note and "[2, 6, 3, 4, 4]" in note and "[2, 6, 3, 2, 8]" in note
    assert _oracle_error(model, x, plan) < 1e-5


def test_every_layer_of_the_same_class_is_refused_in_one_round():
    """The layers run the same code: the heads of all of them are refused at once, nothing else."""
    model, x = _net(depth=3)
    plan = plan_channels(model, x, ratio=0.5)
    names = {g.name for g, _ in plan.choices}
    assert not any(n.endswith("attn.qkv") for n in names)
    assert {f"blocks.{i}.fc1" for i in range(3)} | {"inp"} <= names
    assert sum("differ" in n for n in plan.notes) == 1
    assert _oracle_error(model, x, plan) < 1e-5


def test_without_verification_the_model_is_wrong():
    """The bug the check exists for: the same plan without the dry run is accepted and the model is wrong."""
    model, x = _net()
    plan = plan_channels(model, x, ratio=0.5, verify=False)
    assert any(g.name == "blocks.0.attn.qkv" for g, _ in plan.choices)
    assert _oracle_error(model, x, plan) > 1e-4


def test_target_macs_and_steps_never_return_a_mismatching_plan():
    for kw in (dict(target_macs=0.6), dict(ratio=0.5, steps=2)):
        model, x = _net(depth=2)
        ref = copy.deepcopy(model)
        res = prune_channels(model, x, **kw)
        assert res.groups_pruned and any("differ" in n for n in res.notes)
        assert all(b.attn.qkv.out_features == 96 for b in model.blocks)  # heads kept whole
        # every plan's reference, chained: the model still computes what the zeroed original computes
        for plan in res.plans:
            plan.zero_consumers(ref)
            ref_pruned = copy.deepcopy(ref)
            with torch.no_grad():
                plan.apply(ref_pruned)
            ref = ref_pruned
        with torch.no_grad():
            want, got = ref(x), model(x)
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max())


class Branchy(nn.Module):
    """Control flow on a stored size: after pruning ``fc1`` the branch is no longer taken, yet every shape the
    model outputs stays right. The op sequence differs: refused. (The size is private: a public one the engine
    updates, since the dry run then runs the unpruned op sequence; tests/test_size_attributes.py.)"""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self._width = 16

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.shape[-1] == self._width:
            h = h * 2.0 + 1.0
        return self.fc2(h)


def test_shape_dependent_control_flow_is_refused_with_a_note():
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(3, 8)
    plan = plan_channels(model, x, ratio=0.5)
    assert not plan.choices
    assert any("control flow depends on a pruned size" in n for n in plan.notes), plan.notes


def test_a_size_the_model_reads_back_correctly_is_fine():
    """The same attention reading its head count from a known attribute (``num_heads``, updated by the engine):
    nothing is refused, and the oracle holds."""
    model, x = _net()
    for m in model.modules():
        if isinstance(m, StaleHeads):
            m.num_heads = m._n_h
            m.forward = _known_heads.__get__(m)
    plan = plan_channels(model, x, ratio=0.5)
    assert any(g.name == "blocks.0.attn.qkv" for g, _ in plan.choices), plan.notes
    assert not any("differ" in n or "failed" in n for n in plan.notes)
    assert _oracle_error(model, x, plan) < 1e-5


def _known_heads(self, x):
    b, t, _ = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, t, -1))


# ---------------------------------------------------------------- ordinary models keep their groups
def _same_groups(model, x, **kw):
    """The verified plan keeps every group the unverified plan picks, and no shape note appears."""
    plain = plan_channels(model, x, verify=False, **kw)
    plan = plan_channels(model, x, **kw)
    assert [(g.name, c.tolist()) for g, c in plan.choices] == [(g.name, c.tolist()) for g, c in plain.choices]
    assert not any("differ" in n or "failed" in n or "not verified" in n for n in plan.notes), plan.notes
    return plan


def _hf(kind, heads="heads"):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
        model = T.LlamaForCausalLM(cfg)
    else:
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=32)
        model = T.BertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return model.eval(), {"input_ids": torch.randint(0, 100, (1, 6))}


@pytest.mark.parametrize("kind,heads", [("llama", "heads"), ("bert", "heads"), ("bert", "head_dim")])
def test_hf_models_prune_the_same_groups(kind, heads):
    """SDPA runs another kernel on meta than on CPU: the meta trace is aligned with the capture's, not refused."""
    model, x = _hf(kind)
    plan = _same_groups(model, x, ratio=0.5, heads=heads)
    assert plan.choices
    assert _oracle_error(model, x, plan) < 1e-4


def test_resnet18_prunes_the_same_groups():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18().eval()
    plan = _same_groups(model, torch.randn(1, 3, 64, 64), ratio=0.5)
    assert len(plan.choices) == len(plan.groups) == 12  # every group (the classifier's outputs are none)


# ---------------------------------------------------------------- torchvision ViT: hidden_dim follows
def _vit(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model(name).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: the comparison would be vacuous
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32"])
def test_torchvision_vit_hidden_size_is_pruned_and_reloads(name):
    """``VisionTransformer._process_input`` reshapes with ``self.hidden_dim``: the engine updates it, so the hidden
    size (residual stream, class token, position embedding) is pruned too, checked against the oracle with the
    LayerNorms over the kept channels; MACs fall to about 40 % (0.78 when the hidden size stayed)."""
    tv = pytest.importorskip("torchvision")
    from secateur.metrics import count_macs
    model = _vit(name)
    x = torch.randn(1, 3, 224, 224)
    macs0 = count_macs(model, x)
    plan = _same_groups(model, x, ratio=0.5)
    assert len(plan.choices) == 25  # 12 MLPs, 12 attentions, the hidden size
    assert _oracle_error(model, x, plan) < 1e-4
    assert model.hidden_dim == 384 and model.class_token.shape[-1] == 384
    assert count_macs(model, x) / macs0 < 0.45
    fresh = apply_structure(tv.models.get_model(name).eval(), model._secateur_structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------- where the dry run runs
def test_dry_runs_on_both_devices_give_the_same_plans(dry_run_device, monkeypatch):
    """The CPU twin is a faster path only: the same plans, choices and notes as on meta, on models the check
    refuses (stale heads, shape-dependent control flow) and one it accepts."""
    if dry_run_device == "meta":
        pytest.skip("compares both devices itself")
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    cases = [_net(depth=2), (Branchy().eval(), torch.randn(3, 8)),
             (tv.models.mobilenet_v3_small().eval(), torch.randn(1, 3, 64, 64))]
    for model, x in cases:
        plans = []
        for budget in (2 ** 40, 0):
            monkeypatch.setattr(verify, "HERE_BYTES", budget)
            plan = plan_channels(model, x, ratio=0.5)
            plans.append(([(g.name, c.tolist()) for g, c in plan.choices], plan.notes))
        assert plans[0] == plans[1]


def test_cpu_dry_run_leaves_the_model_and_the_rng_alone(dry_run_device):
    """The twin shares the parameters' memory: a dry run in training mode (BatchNorm statistics updated in place,
    dropout drawing random numbers) must change neither the model nor the random stream."""
    if dry_run_device == "meta":
        pytest.skip("the CPU twin only")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    plan = plan_channels(model.eval(), x, ratio=0.5, verify=False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    rng = torch.get_rng_state()
    ok, _, err, _ = verify.check(model, x, plan.apply)
    assert ok and err is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
