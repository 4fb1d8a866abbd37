"""The structural engine's fast paths (issue #3, speed) change no result. ``prune_channels`` applies each plan once
(the slices the dry run made on its twin are moved into the model), takes the pruned MACs from the dry run, and
counts the dense MACs in the capture's own dispatch mode (``metrics.MacTally``); the dry run's copy is made by
``verify.deepcopy_module``. Each is compared with the plain path of the same code: ``plan_channels`` +
``Plan.apply`` (slicing from scratch), ``count_macs`` (FlopCounterMode), ``copy.deepcopy``."""
import copy

import pytest
import torch
from torch import nn

from secateur.graph.verify import deepcopy_module
from secateur.metrics import MacTally, count_macs
from secateur.structured import plan_channels, prune_channels

torch.set_num_threads(1)
tv = pytest.importorskip("torchvision")


class _BNNet(nn.Module):
    """Conv-BN blocks with a residual add, run in training mode: the dry run's forward updates its twin's
    BatchNorm statistics, which must not reach the pruned model."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.b1(self.c1(x)).relu()
        y = y + self.b2(self.c2(y)).relu()
        return self.fc(y.mean((2, 3)))


def _tv(name):
    return lambda: (tv.models.get_model(name).eval(), torch.randn(1, 3, 64, 64))


CASES = {
    **{n: _tv(n) for n in ("resnet18", "mobilenet_v3_small", "regnet_x_400mf", "efficientnet_b0",
                           "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "googlenet", "resnext50_32x4d",
                           "convnext_tiny", "swin_t")},
    "transformer_encoder": lambda: (nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
                                                          2).eval(), torch.randn(2, 5, 32)),
    "bn_train_mode": lambda: (_BNNet().train(), torch.randn(4, 3, 16, 16)),
}


def _kept(plan):
    return [(g.name, g.size, c.tolist()) for g, c in plan.choices]


@pytest.mark.parametrize("name", sorted(CASES))
def test_prune_channels_equals_plan_then_plain_apply(name):
    torch.manual_seed(0)
    model, x = CASES[name]()
    with torch.no_grad():  # non-trivial norm statistics, so a stale or updated buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    slow, fast = copy.deepcopy(model), copy.deepcopy(model)
    dense = count_macs(copy.deepcopy(model).eval() if name != "bn_train_mode" else copy.deepcopy(model), x)
    plan = plan_channels(slow, x, ratio=0.5)
    plan.apply(slow)
    res = prune_channels(fast, x, ratio=0.5)
    assert res.plans and _kept(res.plans[0]) == _kept(plan)  # the same kept indices, group by group
    a, b = slow.state_dict(), fast.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # bit-identical tensors, BatchNorm statistics included
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert [type(m) for m in slow.modules()] == [type(m) for m in fast.modules()]
    assert res.macs_before == dense
    assert res.macs_after == count_macs(fast, x) == count_macs(slow, x) < dense
    assert res.params_after == sum(p.numel() for p in slow.parameters())
    slow.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(slow(x), fast(x))


def test_two_steps_count_like_count_macs():
    torch.manual_seed(0)
    model, x = _tv("mobilenet_v3_small")()
    dense = count_macs(model, x)
    res = prune_channels(model, x, ratio=0.6, steps=2)
    assert len(res.plans) == 2 and res.macs_before == dense and res.macs_after == count_macs(model, x) < dense


class _Shared(nn.Module):
    """What deepcopy must keep: a submodule reached twice, a tied weight, a plain tensor attribute, a list of
    ints, a forward hook, a child with its own ``__deepcopy__``."""

    class Custom(nn.Linear):
        def __deepcopy__(self, memo):
            new = nn.Linear.__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            new.copied_by_hand = True
            return new

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight
        self.d = _Shared.Custom(4, 4)
        self.table = torch.arange(3)
        self.sizes = [1, 2, 3]
        self.a.register_forward_hook(lambda m, i, o: o)


def _same(a, b, seen):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, nn.Module):
        if id(a) not in seen:
            seen.add(id(a))
            assert a.__dict__.keys() == b.__dict__.keys()
            for k in a.__dict__:
                _same(a.__dict__[k], b.__dict__[k], seen)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k], seen)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, seen)
    elif isinstance(a, (int, float, str, bool, type(None))):
        assert a == b


@pytest.mark.parametrize("name", ["shared", "swin_t", "regnet_x_400mf", "transformer_encoder"])
def test_deepcopy_module_is_deepcopy(name):
    model = _Shared() if name == "shared" else CASES[name]()[0]
    memo = {id(p): p for p in model.parameters()}  # as twin(): parameters handed in, the rest copied
    want, got = copy.deepcopy(model, dict(memo)), deepcopy_module(model, dict(memo))
    _same(want, got, set())
    originals = {id(m) for m in model.modules()}
    assert not any(id(m) in originals for m in got.modules())  # every module is new...
    assert [id(p) for p in got.parameters()] == [id(p) for p in model.parameters()]  # ...parameters as handed in
    if name == "shared":
        assert got.a is got.b and got.c.weight is got.a.weight and got.d.copied_by_hand
        assert got.table is not model.table and got.sizes is not model.sizes
        assert got.a._forward_hooks.keys() == model.a._forward_hooks.keys()


def test_mac_tally_gives_up_where_flop_counter_mode_would_decompose_and_count():
    aten = torch.ops.aten
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    tally = MacTally()
    tally.add(aten.mm.default, (x, w.t()), {}, x @ w.t())
    assert tally.total == 2 * 3 * 4  # FlopCounterMode's formula: 2*m*k*n FLOPs, halved
    norm = (torch.randn(1, 3, 2, 2), None, None, torch.zeros(3), torch.ones(3), False, 0.1, 1e-5)
    tally.add(aten.native_batch_norm.default, norm, {}, aten.native_batch_norm.default(*norm))
    assert tally.total == 2 * 3 * 4  # a decomposition that counts nothing counts nothing
    tally.add(aten.linear.default, (x, w), {}, x @ w.t())  # decomposes into a counted matmul: cannot tell
    assert tally.total is None


def test_union_of_big_labels_keeps_the_same_edge_set():
    """``Atoms.union`` folds the repeated pairs of a big label as they arrive: the set of edges (hence the
    components) must be the plain one: every elementwise pair of atoms, -1 and self-pairs left out."""
    from secateur.graph.labels import Atoms
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        atoms = Atoms()
        atoms.count = 50
        shape = [int(torch.randint(2, 40, (1,), generator=gen)) for _ in range(2 + trial % 2)]
        a, b = torch.randint(-1, 50, shape, generator=gen), torch.randint(-1, 50, shape, generator=gen)
        if trial % 3 == 0:  # a token stream: the same atoms along a dim
            a = a[..., :1].expand_as(a).contiguous()
        atoms.union(a, b)
        got = {tuple(sorted(e)) for e in torch.cat(atoms.edges, 1).t().tolist()} if atoms.edges else set()
        keep = (a >= 0) & (b >= 0) & (a != b)
        assert got == {tuple(sorted(e)) for e in torch.stack([a[keep], b[keep]]).t().tolist()}


def test_compress_shrinks_exactly_the_constant_dims():
    from secateur.graph.labels import compress
    gen = torch.Generator().manual_seed(1)
    for trial in range(100):
        shape = [1, 1, 1]
        shape[trial % 3] = int(torch.randint(1, 6, (1,), generator=gen))
        lab = torch.randint(-1, 3, shape, generator=gen)
        got = compress(lab)
        if bool((lab < 0).all()):
            assert got is None
            continue
        assert torch.equal(got.expand(lab.shape), lab)  # the same label...
        for d in range(lab.dim()):  # ...with every constant dim shrunk to 1, and no other
            assert (got.size(d) == 1) == bool((lab == lab.narrow(d, 0, 1)).all())


# ---- one plan's dry runs are remembered by what they run (structured/proof.py _DryRuns): the same plans, fewer runs
def _search_cases():
    """Small models that take each branch of ``_verified``: count ties (a timm-style attention reading its width
    from its input), size-attribute searches (a stored view shape, split sizes, a number that is not a size),
    a size written in the model's own forward (the culprit bisection), a stale head count
    (shape mismatch, the same role in every layer)."""
    import test_count_ties as ties
    import test_size_attributes as sa
    import test_verify_shapes as vs

    def sa_case(cls):
        def make():
            torch.manual_seed(0)
            return cls().eval(), sa._x()
        return make
    return {"tied_vit": lambda: ties._model(), "tied_vit_uneven": lambda: (*ties._model(), ties.UNEVEN),
            "scale": sa_case(sa.ScaleNet), "split_gate": sa_case(sa.SplitGate), "literal": sa_case(sa.Literal),
            "stale_heads": lambda: vs._net(depth=3)}


def _dry_runs(monkeypatch):
    from secateur.graph import verify
    calls = [0]
    real = verify.check

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(verify, "check", counted)
    return calls


def _plan_record(plan):
    return _kept(plan), repr(plan.attrs), plan.notes


@pytest.mark.parametrize("name", ["tied_vit", "tied_vit_uneven", "scale", "split_gate", "literal", "stale_heads"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_remembered_dry_runs_give_the_same_plans(name, device, monkeypatch):
    """``_MEMO`` off is the plain path: every dry run runs, every apply slices from scratch. The plan (kept
    indices, attribute updates, notes) and the pruned model must be the same, and the memo never runs more."""
    from secateur.structured import proof as structured
    from secateur.graph import verify
    for k in ("HERE_BYTES", "HERE_BYTES_APPLIED"):  # where the dry runs run: a CPU twin, or a meta skeleton
        monkeypatch.setattr(verify, k, 2 ** 40 if device == "cpu" else 0)
    case = _search_cases()[name]()
    model, x = case[:2]
    ratio = case[2] if len(case) > 2 else 0.5
    calls = _dry_runs(monkeypatch)
    got, runs = {}, {}
    for memo in (False, True):
        monkeypatch.setattr(structured, "_MEMO", memo)
        calls[0] = 0
        m = copy.deepcopy(model)
        plan = plan_channels(m, x, ratio=ratio)
        runs[memo] = calls[0]
        res = prune_channels(m, x, ratio=ratio)
        got[memo] = (_plan_record(plan), _plan_record(res.plans[0]) if res.plans else None, res.macs_after,
                     {k: v.clone() for k, v in m.state_dict().items()})
    assert got[True][:3] == got[False][:3]
    assert got[True][3].keys() == got[False][3].keys()
    assert all(torch.equal(got[True][3][k], got[False][3][k]) for k in got[True][3])
    assert runs[True] <= runs[False]
    assert got[True][0][0] or got[True][0][2]  # something pruned, or kept with a note: not vacuous


def test_the_memo_saves_repeated_dry_runs(monkeypatch):
    """The size-attribute search starts from the plan the first loop refused (its first dry run is that loop's
    failing one), and a trial that sets a value back to the model's own is the plan without it."""
    from secateur.structured import proof as structured
    calls = _dry_runs(monkeypatch)
    for name in ("scale", "stale_heads"):
        model, x = _search_cases()[name]()
        runs = {}
        for memo in (False, True):
            monkeypatch.setattr(structured, "_MEMO", memo)
            calls[0] = 0
            plan_channels(copy.deepcopy(model), x, ratio=0.5)
            runs[memo] = calls[0]
        assert runs[True] < runs[False], name


def test_exact_leaves_the_model_alone_and_answers_as_with_deep_copies(monkeypatch):
    """``_exact`` builds the oracle's reference on a twin whose zeroed tensors are its own copies: the model's
    weights are untouched, and the answer is the one deep copies give, for a plan that computes the reference
    and one that does not."""
    from secateur.structured import proof as structured
    model, x = _search_cases()["tied_vit"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_channels(model, x, ratio=0.5)
    assert structured._exact(model, x, plan) is True
    wrong = structured.Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms)
    wrong.zero_consumers = lambda ref: None  # a reference that zeroes nothing: the pruned model differs
    got = structured._exact(model, x, wrong)
    monkeypatch.setattr(structured, "_writable_twin", lambda m, p: copy.deepcopy(m))
    assert structured._exact(model, x, wrong) is got is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_collapse_unions_as_on_the_materialised_label():
    """``Atoms.collapse`` narrows the dims a label is constant along before its unions (a token stream): the
    components and the returned label must be those of the plain union over every position."""
    from secateur.graph import labels
    gen = torch.Generator().manual_seed(2)
    for trial in range(40):
        shape = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(3 + trial % 2)]
        lab = torch.randint(-1, 30, shape, generator=gen)
        if trial % 2 == 0:  # constant along a dim, as a broadcast label materialised
            d = trial % len(shape)
            lab = lab.narrow(d, 0, 1).expand(shape).contiguous()
        dims = [trial % len(shape)] + ([len(shape) - 1] if trial % 3 == 0 else [])
        fast, plain = labels.Atoms(), labels.Atoms()
        fast.count = plain.count = 30
        got = fast.collapse(lab, dims)
        orig = labels._constant_dims_to_one
        labels._constant_dims_to_one = lambda t, _: t
        try:
            want = plain.collapse(lab, dims)
        finally:
            labels._constant_dims_to_one = orig
        assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(fast.components(), plain.components())


def _graph_record(graph):
    """Everything a plan is chosen from: the groups with their members' slices, blocks, links and notes."""
    def member(m):
        return (m.module, m.name, m.dim, m.kind, m.consumer, m.index.tolist(), m.channel.tolist())
    groups = [(g.name, g.size, None if g.block is None else g.block.tolist(), sorted(member(m) for m in g.members))
              for g in graph.groups]
    return groups, [(a.name, b.name) for a, b in graph.links], graph.notes, graph.root.tolist()


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval(),
            torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["tied_vit", "timm_vit", "swin_t", "transformer_encoder", "shufflenet_v2_x0_5"])
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_reshape_of_a_broadcast_label_builds_the_same_graph(name, heads, monkeypatch):
    """``rules._compressed_reshape`` reshapes a token stream's label without materialising the tokens; with it
    turned off every reshape runs on the full label. The groups (members, slices, heads), links, notes and the
    atoms' components must be the same."""
    from secateur.graph.rules import movement as rules
    from secateur.graph.groups import build_graph
    model, x = {"tied_vit": _search_cases()["tied_vit"], "timm_vit": _timm_vit}.get(name, CASES.get(name))()
    real, used = rules._compressed_reshape, [0]

    def counted(*a):
        ok = real(*a)
        used[0] += ok
        return ok
    monkeypatch.setattr(rules, "_compressed_reshape", counted)
    got = _graph_record(build_graph(model, x, heads, "channels"))
    monkeypatch.setattr(rules, "_compressed_reshape", lambda *a: False)
    want = _graph_record(build_graph(model, x, heads, "channels"))
    assert got == want
    assert got[0]  # groups were found: not vacuous
    assert used[0] or name not in ("tied_vit", "timm_vit")  # timm-style token streams take the fast path


# ---- issue #3 speed, second round: the numeric proof reuses the dry run's outputs, meta dry runs take the CPU's
# attention kernel, old objects are frozen out of the garbage collector, label tests stop at the first difference
def test_exact_reuses_the_dry_runs_outputs(monkeypatch):
    """``_exact`` with the memo of the plan's dry runs takes the pruned outputs from the CPU dry run (seeded as
    ``_exact`` seeds its own forward): the outputs are bit-identical to a fresh pruned copy's, the answer is the
    same for a plan that computes the reference and one that does not, and one copy fewer is made."""
    from secateur.structured import proof as structured
    from secateur.graph import verify
    from secateur.graph.capture import _flat_tensors
    from secateur.graph.groups import build_graph
    model, x = _search_cases()["tied_vit"]()
    graph = build_graph(model, x)
    plan = plan_channels(model, x, ratio=0.5, graph=graph)
    memo: dict = {}
    dry = structured._DryRuns(model, x, graph, verify._shapes(graph.tracer.output), memo)
    assert dry.check(plan)[0]
    kept = memo[("outputs", *structured._DryRuns.plan_key(plan))]
    fresh = verify.twin(model)
    plan.apply(fresh)
    with torch.no_grad():
        torch.manual_seed(0)
        want = _flat_tensors(fresh(x))
    assert len(kept) == len(want) and all(torch.equal(a, b) for a, b in zip(kept, want))
    twins = [0]
    real = verify.twin

    def counted(m):
        twins[0] += 1
        return real(m)
    monkeypatch.setattr(verify, "twin", counted)
    answers = {}
    for use in (None, memo):
        twins[0] = 0
        wrong = structured.Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms)
        wrong.zero_consumers = lambda ref: None  # zeroes nothing: the pruned model differs from it
        answers[use is None] = (structured._exact(model, x, plan, use), structured._exact(model, x, wrong, use),
                                twins[0])
    assert answers[True][:2] == answers[False][:2] == (True, False)
    assert answers[False][2] == answers[True][2] - 2  # one pruned copy fewer per proof


def _sdpa_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    assert any(getattr(m, "fused_attn", False) for m in model.modules())  # F.scaled_dot_product_attention
    return model, torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_meta_dry_run_takes_the_cpu_attention_kernel(heads, monkeypatch):
    """A dry run on meta (a model over ``HERE_BYTES``) runs SDPA as the CPU capture did (its flash kernel) instead of
    the decomposition: no meta reference trace is made, and the plan (kept indices, sizes, notes) and the pruned
    model are the ones of the meta run without the shortcut, and of the CPU dry run. Under heads="head_dim" the plan
    also folds the scale change into q's rows (graph/scale_fold.py), which only a numeric proof admits: on the
    whole model on the CPU, on a CPU copy of each attention module from meta (graph/local_proof.py)."""
    from secateur.graph import verify
    model, x = _sdpa_vit()
    traces = [0]
    real = verify._meta_trace

    def counted(*a):
        traces[0] += 1
        return real(*a)
    monkeypatch.setattr(verify, "_meta_trace", counted)
    got = {}
    for case in ("cpu", "meta", "meta_plain"):
        for k in ("HERE_BYTES", "HERE_BYTES_APPLIED"):
            monkeypatch.setattr(verify, k, 2 ** 40 if case == "cpu" else 0)
        if case == "meta_plain":
            from secateur.graph import meta_sdpa
            monkeypatch.setattr(meta_sdpa, "cpu_flash", lambda call: False)
        traces[0] = 0
        m = copy.deepcopy(model)
        plan = plan_channels(m, x, ratio=0.5, heads=heads)
        plan.apply(m)
        got[case] = (_plan_record(plan), traces[0], {k: v.clone() for k, v in m.state_dict().items()})
    assert got["meta"][0] == got["meta_plain"][0]
    assert got["meta"][0][0]  # something pruned: not vacuous
    assert got["meta"][1] == 0 and got["meta_plain"][1] == 1  # the shortcut is what spares the meta trace
    assert all(torch.equal(got["meta"][2][k], v) for k, v in got["meta_plain"][2].items())
    if heads == "heads":
        assert got["cpu"][0] == got["meta"][0]
        assert all(torch.equal(got["cpu"][2][k], v) for k, v in got["meta"][2].items())
    else:  # the fold, proven on the whole model on the CPU, on a CPU copy of each attention module from meta
        assert any("logits proven on the example input" in n for n in got["cpu"][0][2]), got["cpu"][0][2]
        assert any("logits proven on a CPU copy of the module" in n for n in got["meta"][0][2]), got["meta"][0][2]
    assert got["cpu"][0][:2] == got["meta"][0][:2]
    assert all(torch.equal(got["cpu"][2][k], v) for k, v in got["meta"][2].items())


def test_plans_freeze_old_objects_and_give_them_back():
    """During ``plan_channels`` / ``prune_channels`` the objects that existed before are frozen out of the garbage
    collector; after, they are back (also after an error), and a caller's own freeze is left as it was."""
    import gc
    model, x = _tv("resnet18")()
    seen = []

    def score(group):
        seen.append(gc.get_freeze_count())
        return torch.arange(group.size, dtype=torch.float)
    assert gc.get_freeze_count() == 0
    plan_channels(model, x, ratio=0.5, importance=score)
    assert seen and min(seen) > 0 and gc.get_freeze_count() == 0
    with pytest.raises(Exception):
        prune_channels(model, x, ratio=2.0)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        prune_channels(copy.deepcopy(model), x, ratio=0.5, importance=score)
        # nothing more frozen, nothing given back (frozen objects freed meanwhile only lower the count)
        assert 0 < gc.get_freeze_count() <= frozen and max(seen) <= frozen
    finally:
        gc.unfreeze()


def test_constant_along_is_the_plain_test():
    from secateur.graph.labels import constant_along
    gen = torch.Generator().manual_seed(3)
    for trial in range(200):
        shape = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(1 + trial % 4)]
        lab = torch.randint(-1, 3 if trial % 2 else 30, shape, generator=gen)
        d = trial % len(shape)
        if trial % 3 == 0:
            lab = lab.narrow(d, 0, 1).expand(shape).contiguous()
        assert constant_along(lab, d) == bool((lab == lab.narrow(d, 0, 1)).all())


# ---- issue #3 speed, third round (small CNNs): label work per op cut without changing a graph
def _graph_and_reasons(model, x):
    from secateur.graph.groups import build_graph
    graph = build_graph(model, x)
    reasons = [(site, kind, lab.tolist(), n) for site, kind, lab, n in graph.tracer.atoms.reasons]
    return _graph_record(graph), reasons


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "regnet_x_400mf"])
def test_depthwise_pairs_are_the_collapse(name, monkeypatch):
    """``modules._depthwise_pairs`` adds a depthwise conv's (input, output) edges and its tie reason directly; with it
    turned off every grouped conv runs the plain ``collapse``. The groups, links, notes, components and the kept
    reasons must be the same (regnet: grouped, not depthwise: the fast path must not apply)."""
    from secateur.graph import modules
    real, used = modules._depthwise_pairs, [0]

    def counted(*a):
        ok = real(*a)
        used[0] += ok
        return ok
    monkeypatch.setattr(modules, "_depthwise_pairs", counted)
    model, x = _tv(name)()
    got = _graph_and_reasons(model, x)
    monkeypatch.setattr(modules, "_depthwise_pairs", lambda *a: False)
    assert got == _graph_and_reasons(model, x)
    assert got[0][0]
    assert (used[0] > 0) == (name != "regnet_x_400mf")


def test_union_pairs_are_the_masked_edges():
    """``Atoms.union`` (and ``collapse``'s clean path) add the same edge batches as the plain masked pairs, with
    -1s, equal pairs and broadcasts."""
    from secateur.graph.labels import Atoms
    gen = torch.Generator().manual_seed(4)
    for trial in range(200):
        shape = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(1 + trial % 3)]
        a = torch.randint(-1 if trial % 2 else 0, 12, shape, generator=gen)
        b = torch.randint(-1 if trial % 3 else 0, 12, shape, generator=gen)
        if trial % 4 == 0:
            b = b.narrow(0, 0, 1)
        atoms = Atoms()
        atoms.count = 12
        atoms.union(a, b)
        A, B = torch.broadcast_tensors(a, b)
        keep = (A >= 0) & (B >= 0) & (A != B)
        want = [torch.stack([A[keep], B[keep]])] if keep.any() else []
        assert len(atoms.edges) == len(want) and all(torch.equal(e, w) for e, w in zip(atoms.edges, want))
        lab = torch.randint(-1 if trial % 2 else 0, 12, shape + [3], generator=gen)
        fast, plain = Atoms(), Atoms()
        fast.count = plain.count = 12
        fast.site = plain.site = ("m", "op")
        out = fast.collapse(lab, [lab.dim() - 1])
        plain.union(lab, lab.max(dim=-1, keepdim=True).values)  # the plain collapse's edges
        n = len(plain.edges)  # (a -1 beside an atom then blocks that row: a batch of its own, after)
        assert [e.tolist() for e in fast.edges[:n]] == [e.tolist() for e in plain.edges]
        assert len(fast.edges) == n or bool((lab < 0).any())
        assert torch.equal(out.squeeze(-1), lab.max(dim=-1).values)


def test_capture_leaves_the_function_mode_stack_as_it_was(monkeypatch):
    """Leaf rules run with the capture's ``MathAttention`` popped off the torch-function mode stack
    (``capture._popped``): a caller's own mode below it stays, and the stack is as before after a capture, also
    one that fails inside a leaf rule."""
    from torch.overrides import TorchFunctionMode

    from secateur.errors import PruningError
    from secateur.graph import modules
    from secateur.graph.capture import capture

    class Outer(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model, x = _tv("resnet18")()
    with Outer() as outer:
        assert capture(model, x).slots
        assert torch._C._len_torch_function_stack() == 1 and torch._C._get_function_stack_at(0) is outer

    def failing(tr, mod, args, kwargs, out):
        raise RuntimeError("leaf rule failed")
    real = modules.leaf_rule
    monkeypatch.setattr(modules, "leaf_rule", lambda m: failing if real(m) is not None else None)
    with pytest.raises(PruningError, match="leaf rule failed"):
        capture(model, x)
    assert torch._C._len_torch_function_stack() == 0
