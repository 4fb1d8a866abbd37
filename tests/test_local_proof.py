"""Size-attribute updates on models the whole-model proof cannot run (meta, over ``verify.HERE_BYTES``) are proven on a
CPU copy of the module holding them (graph/local_proof.py): taken where that module computes the oracle's reference,
refused where it does not, and not taken where code outside the module reads the attribute."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph import build_graph, local_proof, verify
from secateur.structured import plan_channels, prune_channels
from secateur.structured.proof import LOCAL_NOTE


class _Attn(nn.Module):
    """Fused q/k/v viewed with the head size it stores; ``numeric``: that size also scales q (a number, not a
    shape: a stale or updated value changes what it computes)."""

    def __init__(self, d=16, heads=2, numeric=False):
        super().__init__()
        self.nh, self.dk, self.numeric = heads, d // heads, numeric
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nh, self.dk).permute(2, 0, 3, 1, 4)
        if self.numeric:
            q = q * self.dk ** -0.5
        y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


class _Net(nn.Module):
    """``outside``: the parent reads the attention's head size as a number (a use the module alone does not run)."""

    def __init__(self, numeric=False, outside=False):
        super().__init__()
        self.attn, self.outside = _Attn(numeric=numeric), outside
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = self.attn(x)
        if self.outside:
            x = x * (self.attn.dk / 8)
        return x + self.down(torch.relu(self.up(x)))


def _plan(model, x):
    return plan_channels(model, x, ratio=0.5, importance=lambda g: torch.arange(g.size, dtype=torch.float),
                         heads="head_dim")


def _head_dims_pruned(plan):
    return plan.attrs.get("attn", {}).get("dk")


@pytest.fixture
def too_big(monkeypatch):
    """Every model counts as too large for the whole-model proof (its dry runs go to meta)."""
    monkeypatch.setattr(verify, "HERE_BYTES", 0)


@pytest.mark.parametrize("numeric,outside,taken", [(False, False, True), (True, False, False),
                                                   (False, True, False)])
def test_the_whole_model_proof_decides_on_a_model_that_runs_here(numeric, outside, taken):
    """The reference for the cases below: the update is taken exactly where the pruned model is the oracle's."""
    torch.manual_seed(0)
    m, x = _Net(numeric, outside).eval(), torch.randn(2, 5, 16)
    plan = _plan(m, x)
    assert (_head_dims_pruned(plan) == 4) == taken, plan.notes
    assert LOCAL_NOTE not in plan.notes


@pytest.mark.parametrize("numeric,outside,taken", [(False, False, True), (True, False, False),
                                                   (False, True, False)])
def test_a_model_too_big_to_run_gets_the_same_answer_from_one_module(too_big, numeric, outside, taken):
    torch.manual_seed(0)
    m, x = _Net(numeric, outside).eval(), torch.randn(2, 5, 16)
    plan = _plan(m, x)
    assert (_head_dims_pruned(plan) == 4) == taken, plan.notes
    assert (LOCAL_NOTE in plan.notes) == taken
    if taken:  # and the plan it takes is exact: applied, the model computes the oracle's reference
        err = plan.apply_checked(m, x)
        assert err < 1e-5


@pytest.mark.parametrize("numeric,outside,taken", [(False, False, True), (True, False, False),
                                                   (False, True, False)])
def test_a_model_on_meta_gets_the_same_answer_from_one_module_with_random_weights(numeric, outside, taken):
    with torch.device("meta"):
        m = _Net(numeric, outside).eval()
    plan = _plan(m, torch.randn(2, 5, 16, device="meta"))
    assert (_head_dims_pruned(plan) == 4) == taken, plan.notes
    assert (LOCAL_NOTE in plan.notes) == taken


def _proof_of(model, x, attrs):
    """``local_proof.prove`` of the plan without updates, given ``attrs`` as its updates."""
    graph = build_graph(model, x, heads="head_dim")
    plan = plan_channels(model, x, ratio=0.5, importance=lambda g: torch.arange(g.size, dtype=torch.float),
                         heads="head_dim", graph=graph, verify=False)
    plan.attrs = attrs
    return local_proof.prove(model, x, plan, graph)


def test_the_proof_answers_true_false_and_none():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    assert _proof_of(_Net().eval(), x, {"attn": {"dk": 4}}) is True
    assert _proof_of(_Net(numeric=True).eval(), x, {"attn": {"dk": 4}}) is False
    assert _proof_of(_Net().eval(), x, {"attn": {"dk": 3}}) is False  # a wrong size: the forward fails
    assert _proof_of(_Net(outside=True).eval(), x, {"attn": {"dk": 4}}) is None  # read by the parent
    assert _proof_of(_Net().eval(), x, {}) is None


def test_integer_inputs_of_unknown_value_are_not_drawn_at_random():
    """Position ids from the inputs, on meta: their values are unknown there, and random ones could index out of
    range or hide a wrong size; no proof (the update is not taken) rather than a guess."""

    class WithPos(_Attn):
        def forward(self, x, pos):
            return super().forward(x) + pos.float().mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = WithPos()

        def forward(self, x, pos):
            return self.attn(x, pos)

    with torch.device("meta"):
        m = Net().eval()
    x = (torch.randn(2, 5, 16, device="meta"), torch.arange(5, device="meta").expand(2, 5) * 1)
    plan = _plan(m, x)
    assert not plan.attrs and LOCAL_NOTE not in plan.notes
    torch.manual_seed(0)  # on the CPU the same model proves the update on the whole model
    m = Net().eval()
    plan = _plan(m, (torch.randn(2, 5, 16), torch.arange(5).expand(2, 5)))
    assert _head_dims_pruned(plan) == 4


def test_a_too_big_falcon_keeps_pruning_its_query_heads(too_big):
    """Falcon's query heads need ``num_heads`` updated (the size-attribute search): on a CPU model over
    ``HERE_BYTES`` (a 7B one) they were kept whole; the attention module alone proves the update."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    import zoo_models as Z
    cfg, cls = Z.hf_small_config("falcon"), Z._causal_lm_class("falcon")
    torch.manual_seed(0)
    m = cls(cfg).eval()
    x = {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    res = prune_channels(m, x, ratio=0.5)
    plan = res.plans[-1]
    assert LOCAL_NOTE in plan.notes
    assert all(a.get("num_heads") == 2 for a in plan.attrs.values()) and len(plan.attrs) == 2
    assert m.transformer.h[0].self_attention.num_heads == 2
    with torch.no_grad():
        out = m(**x).logits
    assert out.shape == (1, 6, 100) and torch.isfinite(out).all()


class _Recurrent(_Attn):
    """Keeps q as state for the next call (as RecurrentGemma's RG-LRU keeps ``recurrent_states``), which its parent
    resets before every sequence."""

    def __init__(self):
        super().__init__()
        self.state = None

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nh, self.dk).permute(2, 0, 3, 1, 4)
        if self.state is not None:
            q = q + self.state
        self.state = q.detach()
        y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


class _Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Recurrent()

    def forward(self, x):
        self.attn.state = None
        return self.attn(x)


def test_state_a_forward_leaves_behind_is_reset_as_the_capture_saw_it(too_big):
    """After the capture the module holds the unpruned state of its last call; the module's copy starts from None,
    as the capture's call did (a stale full-width state made the proof fail: RecurrentGemma kept its blocks)."""
    torch.manual_seed(0)
    m, x = _Sequence().eval(), torch.randn(2, 5, 16)
    plan = _plan(m, x)
    assert _head_dims_pruned(plan) == 4 and LOCAL_NOTE in plan.notes, plan.notes
    assert plan.apply_checked(m, x) < 1e-5


def test_state_set_before_the_capture_is_not_guessed(too_big):
    """A tensor the module held when the capture called it cannot be rebuilt for the copy: no proof."""
    torch.manual_seed(0)
    m, x = _Recurrent().eval(), torch.randn(2, 5, 16)
    m.state = torch.zeros(2, 2, 5, 8)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = m

        def forward(self, x):
            return self.attn(x)

    outer = Outer().eval()
    plan = _plan(outer, x)
    assert _head_dims_pruned(plan) is None and LOCAL_NOTE not in plan.notes


class _FoldWrap(nn.Module):
    """test_scale_fold's attention one level down (a fold is proven on the module that calls the attention)."""

    def __init__(self, **kw):
        super().__init__()
        from test_scale_fold import Attn
        self.attn = Attn(**kw)

    def forward(self, x):
        return self.attn(x)


def _fold_notes(plan):
    return [n for n in plan.notes if "scaled by sqrt(" in n]


@pytest.mark.parametrize("act", [False, True])
def test_scale_folds_are_proven_on_the_module_where_the_model_cannot_run(too_big, act):
    """SDPA's default scale follows q's head size: pruning head dims folds sqrt(d'/d) into q's rows, taken only with
    the logits proven. A GELU on q makes the fold wrong: refused there as by the whole-model proof."""
    torch.manual_seed(0)
    m, x = _FoldWrap(act=act).eval(), torch.randn(2, 7, 32)
    plan = plan_channels(m, x, ratio=0.5, heads="head_dim")
    if act:
        assert not _fold_notes(plan) and any("was not proven" in n for n in plan.notes), plan.notes
        return
    assert _fold_notes(plan) and "logits proven on a CPU copy of the module" in _fold_notes(plan)[0], plan.notes
    assert LOCAL_NOTE in plan.notes
    with torch.no_grad():  # sharpened q/k (a softmax far from uniform, as trained weights give): a wrong scale shows
        m.attn.qkv.weight[:64] *= 30.0
        m.attn.qkv.bias[:64] *= 30.0
    assert plan.apply_checked(m, x) < 1e-5


def test_scale_folds_on_meta_match_the_cpu_plan():
    torch.manual_seed(0)
    cpu, x = _FoldWrap().eval(), torch.randn(2, 7, 32)
    with torch.device("meta"):
        meta = _FoldWrap().eval()
    by_position = lambda g: torch.arange(g.size, dtype=torch.float)  # noqa: E731
    want = plan_channels(cpu, x, ratio=0.5, heads="head_dim", importance=by_position)
    got = plan_channels(meta, x.to("meta"), ratio=0.5, heads="head_dim", importance=by_position)
    assert [c.tolist() for _, c in got.choices] == [c.tolist() for _, c in want.choices]
    assert len(_fold_notes(got)) == len(_fold_notes(want)) == 1


class _Two(nn.Module):
    """Two instances of one class, one of them down another branch (its bool switch ``numeric``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Attn(numeric=False), _Attn(numeric=True)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("where", ["cpu", "too_big", "meta"])
def test_instances_down_other_branches_are_proven_apart(monkeypatch, where):
    """Proving one instance of a class covers the others only where they run the same code: the one whose switch
    makes the head size a number too must be proven itself (and fails), as the whole-model proof says."""
    torch.manual_seed(0)
    if where == "too_big":
        monkeypatch.setattr(verify, "HERE_BYTES", 0)
    if where == "meta":
        with torch.device("meta"):
            m = _Two().eval()
        plan = _plan(m, torch.randn(2, 5, 16, device="meta"))
    else:
        m, x = _Two().eval(), torch.randn(2, 5, 16)
        plan = _plan(m, x)
        assert plan.apply_checked(m, x) < 1e-5
    assert "b" not in plan.attrs, plan.attrs


def test_a_proof_that_raises_is_no_proof_and_the_plan_goes_on(too_big, monkeypatch):
    """Model code run on random inputs may raise anything: the update is then not taken, the plan is made."""
    def boom(*a, **k):
        raise ValueError("model code refusing random inputs")
    monkeypatch.setattr(local_proof, "_prove_module", boom)
    torch.manual_seed(0)
    m, x = _Net().eval(), torch.randn(2, 5, 16)
    plan = _plan(m, x)
    assert "attn" not in plan.attrs and LOCAL_NOTE not in plan.notes
    assert plan.apply_checked(m, x) < 1e-5


def test_the_proofs_comparison_places_nan_and_infinities():
    from secateur.structured.proof import agree
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert agree(a, a.clone())
    assert not agree(a, torch.tensor([1.0, float("nan"), float("inf"), 5.0]))  # a NaN elsewhere proved this
    assert not agree(a, torch.tensor([1.0, 0.0, float("inf"), 2.0]))
    assert not agree(a, torch.tensor([1.0, float("nan"), float("-inf"), 2.0]))
    assert agree(torch.full((3,), float("nan")), torch.full((3,), float("nan")))
    assert not agree(torch.zeros(2), torch.zeros(3))
    assert agree(torch.arange(3), torch.arange(3)) and not agree(torch.arange(3), torch.arange(1, 4))


class _NaNTail(nn.Module):
    """The attention whose head size is also a number, its output flattened with one NaN after it (a masked
    position, a padding value): the NaN made the whole-model proof's largest difference NaN, which passed."""

    def __init__(self):
        super().__init__()
        self.net = _Net(numeric=True)

    def forward(self, x):
        return torch.cat([self.net(x).flatten(), torch.full((1,), float("nan"))])


@pytest.mark.parametrize("where", ["cpu", "too_big"])
def test_a_nan_in_the_output_proves_nothing(monkeypatch, where):
    if where == "too_big":
        monkeypatch.setattr(verify, "HERE_BYTES", 0)
    torch.manual_seed(0)
    m, x = _NaNTail().eval(), torch.randn(2, 5, 16)
    plan = _plan(m, x)
    assert "net.attn" not in plan.attrs, plan.notes
