"""Mixture-of-experts modules (transformers 5 fused experts, graph/moe.py): the residual stream and the experts'
intermediate width are pruned, the oracle holds in every layout and implementation, unknown layouts are kept."""
import copy
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

import secateur  # noqa: E402
from helpers import pruned_vs_reference  # noqa: E402
from secateur.metrics import count_macs  # noqa: E402
from secateur.structured import plan_channels  # noqa: E402

E, H, I = 4, 32, 16  # widths halve to multiples of 8 (grouped_mm alignment)


def _experts_class(concatenated=True, transposed=False, bias=False, gate=None, extra=False, gated=True):
    """A hand-written fused-experts module (Mixtral's layout by default, gpt_oss's with ``concatenated=False,
    transposed=True, bias=True``, nemotron_h's ``up_proj`` without a gate with ``gated=False``) behind
    transformers' dispatcher; its own forward is an eager loop."""
    up_name = "gate_up_proj" if gated else "up_proj"
    rows = 2 * I if gated else I

    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
            up, down = (E, H, rows), (E, I, H)
            setattr(self, up_name, nn.Parameter(torch.randn(*(up if transposed else (E, rows, H))) * 0.3))
            self.down_proj = nn.Parameter(torch.randn(*(down if transposed else (E, H, I))) * 0.3)
            if bias:
                setattr(self, f"{up_name}_bias", nn.Parameter(torch.randn(E, rows) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H) * 0.1)
            if extra:  # a tensor the layout does not account for
                self.expert_scale = nn.Parameter(torch.ones(E))
            self.act_fn = nn.SiLU()

        def forward(self, x, top_k_index, top_k_weights):
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                w_up = getattr(self, up_name)[e]
                h = nn.functional.linear(x[tok], w_up.t() if transposed else w_up,
                                         getattr(self, f"{up_name}_bias")[e] if bias else None)
                h = self._apply_gate(h) if gated else self.act_fn(h)
                w_down = self.down_proj[e].t() if transposed else self.down_proj[e]
                h = nn.functional.linear(h, w_down, self.down_proj_bias[e] if bias else None)
                out.index_add_(0, tok, h * top_k_weights[tok, pos, None])
            return out

    if gate is not None:
        Experts._apply_gate = gate
    elif not concatenated:
        def interleaved(self, h):
            return self.act_fn(h[..., ::2]) * h[..., 1::2]
        Experts._apply_gate = interleaved
    return use_experts_implementation(Experts, is_concatenated=concatenated, is_transposed=transposed,
                                      has_bias=bias, has_gate=gated)


class ToyMoE(nn.Module):
    """Embedding-like input projection, RMSNorm, router (a Linear reading H), top-2 routing, experts, residual add,
    output head."""

    def __init__(self, impl="grouped_mm", **layout):
        super().__init__()
        cfg = types.SimpleNamespace(_experts_implementation=impl)
        self.inp = nn.Linear(8, H)
        self.norm = nn.RMSNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = _experts_class(**layout)(cfg)
        self.head = nn.Linear(H, 5)

    def forward(self, x):
        h = self.inp(x)
        flat = self.norm(h).flatten(0, 1)
        probs = self.router(flat).softmax(-1)
        w, idx = probs.topk(2, dim=-1)
        y = h + self.experts(flat, idx, w / w.sum(-1, keepdim=True)).reshape(h.shape)
        return self.head(y)


LAYOUTS = {"mixtral": {}, "gpt_oss": dict(concatenated=False, transposed=True, bias=True),
           "transposed": dict(transposed=True), "bias": dict(bias=True), "no_gate": dict(gated=False, bias=True)}


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hand_written_experts_oracle(layout, impl):
    torch.manual_seed(0)
    m, x = ToyMoE(impl, **LAYOUTS[layout]).eval(), torch.randn(2, 5, 8)
    dense = copy.deepcopy(m)
    plan = plan_channels(m, x, ratio=0.5)
    base, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (base - got).abs().max() > 1e-3  # something was removed: the comparison can fail
    ex = m.experts
    t = LAYOUTS[layout].get("transposed", False)
    inter, hidden = ex.down_proj.shape[1 if t else 2], ex.down_proj.shape[2 if t else 1]
    assert inter == I // 2 and hidden == H // 2, ex.down_proj.shape
    up, rows = (ex.gate_up_proj, 2 * inter) if hasattr(ex, "gate_up_proj") else (ex.up_proj, inter)
    assert up.shape == ((E, hidden, rows) if t else (E, rows, hidden))
    assert (ex.intermediate_dim, ex.hidden_dim) == (inter, hidden)
    assert m.router.weight.shape == (E, hidden)  # the experts stay, the router reads the pruned stream
    assert count_macs(m, x) < 0.4 * count_macs(dense, x)


def _own_channels(m, sets):
    """Scale expert ``e``'s intermediate channels ``sets[e]`` (gate, up and down) by 10: its important ones (not
    more: the outputs grow as the square, and float32 sums of large terms would fail the oracle's tolerance)."""
    with torch.no_grad():
        for e, keep in enumerate(sets):
            keep = torch.tensor(keep)
            m.experts.down_proj[e][:, keep] *= 10
            m.experts.gate_up_proj[e][keep] *= 10
            m.experts.gate_up_proj[e][keep + I] *= 10


SETS = [list(range(0, 8)), list(range(8, 16)), list(range(0, 16, 2)), [1, 2, 3, 5, 7, 11, 13, 15]]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_each_expert_keeps_its_own_important_channels(scope):
    """Experts are trained apart: channel j of one has nothing to do with channel j of another. Each expert keeps
    its own top channels (the sets differ per expert here), the same count in each, and the oracle holds."""
    torch.manual_seed(0)
    m, x = ToyMoE().eval(), torch.randn(2, 5, 8)
    _own_channels(m, SETS)
    before = m.experts.down_proj.detach().clone()
    # global: the stream is ignored so the experts' 16 channels meet the ratio alone (their widths are multiples
    # of 8, so a ranking that takes 7 of them from the experts would round to none)
    plan = plan_channels(m, x, ratio=0.5, scope=scope, ignore=[m.inp] if scope == "global" else ())
    [(g, chans)] = [(g, c) for g, c in plan.choices if g.experts]
    assert g.experts == E and chans.shape == (E, I // 2)
    for e, keep in enumerate(SETS):
        assert chans[e].tolist() == sorted(set(range(I)) - set(keep))
    removed = plan.removed[("experts", "gate_up_proj")][1]
    assert removed.shape == (E, I) and all(r.tolist() == [*c.tolist(), *(c + I).tolist()]
                                           for r, c in zip(removed, chans))
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    kept = m.experts.down_proj  # each expert's own columns, in order (its hidden rows pruned as the stream is)
    hidden = [r for r in range(H) if r not in plan.removed[("experts", "down_proj")].get(1, torch.empty(0)).tolist()]
    for e, keep in enumerate(SETS):
        torch.testing.assert_close(kept[e], before[e][hidden][:, keep], rtol=0, atol=0)


def test_per_expert_sets_retain_at_least_the_shared_sets_importance():
    """The invariant that makes per-expert sets the default: each expert's kept channels are its own top ones, so
    the importance kept (sum over experts) is never below what one shared set keeps; both are exact (a 1-d choice
    on an experts group is still one set for all experts)."""
    from secateur.importance import expert_scores, group_scores
    from secateur.structured.plan import Plan
    torch.manual_seed(0)
    m, x = ToyMoE().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():  # experts of differing scales, channels of differing importance
        m.experts.gate_up_proj.mul_(torch.rand(E, 2 * I, 1) * torch.arange(1, E + 1).view(E, 1, 1))
    shared_m = copy.deepcopy(m)
    plan = plan_channels(m, x, ratio=0.5)
    [(g, chans)] = [(g, c) for g, c in plan.choices if g.experts]
    own = expert_scores(g, m).own
    shared_chans = torch.argsort(group_scores(g, m), stable=True)[:chans.size(1)].sort().values
    lost_own = float(own.gather(1, chans).sum())
    lost_shared = float(own[:, shared_chans].sum())
    assert lost_own < lost_shared  # strictly here: the experts' rankings differ
    shared = Plan(plan.groups, [(h, shared_chans) if h is g else (h, c) for h, c in plan.choices], heads=plan.heads,
                  norms=plan.norms)
    for p, model in ((plan, m), (shared, shared_m)):
        _, want, got = pruned_vs_reference(model, x, p)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert m.experts.down_proj.shape == shared_m.experts.down_proj.shape


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_expert_plans_save_and_load_exactly(layout, tmp_path):
    from helpers import assert_reloads

    def make():
        torch.manual_seed(0)
        m = ToyMoE(**LAYOUTS[layout]).eval()
        with torch.no_grad():
            for p in m.experts.parameters():
                p.mul_(torch.rand(p.shape[:2] + (1,) * (p.dim() - 2)) + 0.1)  # per-expert, per-row scales
        return m
    m, x = make(), torch.randn(2, 5, 8)
    plan = plan_channels(m, x, ratio=0.5)
    [(g, chans)] = [(g, c) for g, c in plan.choices if g.experts]
    assert len({tuple(c.tolist()) for c in chans}) > 1  # the experts' sets differ
    plan.apply(m)
    assert_reloads(make, m, x, tmp_path)


@pytest.mark.parametrize("importance", ["l2", "lamp", "fpgm", "random", "taylor", "expert_callable"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_per_expert_criteria_keep_the_oracle(importance, scope):
    torch.manual_seed(0)
    m, x = ToyMoE(**LAYOUTS["gpt_oss"]).eval(), torch.randn(2, 5, 8)
    if importance == "taylor":
        m(x).square().sum().backward()
    elif importance == "expert_callable":  # one score per expert and channel: the expert's own ranking is used
        order = torch.stack([torch.randperm(I, generator=torch.Generator().manual_seed(e)) for e in range(E)])

        def importance(group, model):
            return order.float() if group.experts else torch.arange(group.size).float()
    plan = plan_channels(m, x, ratio=0.5, scope=scope, importance=importance)
    per_expert = [c for g, c in plan.choices if g.experts]  # (a global ranking may keep all of them)
    assert len(per_expert) == 1 or scope == "global" and not per_expert
    for chans in per_expert:
        assert chans.shape[0] == E and 0 < chans.shape[1] < I
        if callable(importance):
            assert all(c.tolist() == sorted(o.argsort()[:c.numel()].tolist()) for c, o in zip(chans, order))
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_global_ranking_scores_a_slot_by_every_experts_loss():
    """A per-expert group enters a global ranking with one score per channel slot: the sum over experts of each
    one's r-th lowest score (what a shared channel's L1 score sums). Experts whose weights are all tiny lose
    more channels than a dense layer of larger weights; the counts match that ranking exactly."""
    from secateur.graph.moe import GROUPED_MM_ALIGN
    from secateur.importance import expert_scores, group_scores
    torch.manual_seed(0)
    m, x = ToyMoE().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():
        m.experts.gate_up_proj.mul_(0.01)
        m.experts.down_proj.mul_(0.01)
    plan = plan_channels(m, x, ratio=0.5, scope="global", verify=False)
    from secateur.structured.choose import _candidates
    from secateur.graph import build_graph
    graph = build_graph(m, x)
    cands = _candidates(m, graph, 0.5, False, "l1", (), (), "mean", None)
    flat = torch.cat([s.ranked if g.experts else s for g, s, _ in cands])
    k = int(sum(g.size * 0.5 for g, _, _ in cands))
    cut = flat.sort().values[k - 1]
    ex = next(g for g, _, _ in cands if g.experts)
    ranked = expert_scores(ex, m).ranked
    assert bool((ranked[1:] >= ranked[:-1]).all())  # slot scores never decrease
    [(g, chans)] = [(g, c) for g, c in plan.choices if g.experts]
    n = min(int((ranked <= cut).sum()), I - 1)
    assert n > I // 2  # the ranking takes more than half of the tiny experts' slots ...
    keep = -(-(I - n) // GROUPED_MM_ALIGN) * GROUPED_MM_ALIGN  # ... and their kept width rounds up to the alignment
    assert chans.size(1) == I - keep
    assert group_scores(ex, m).numel() == I


class _ExpertMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.w2 = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(nn.Module):
    """Experts as separate modules (Mixtral before transformers 5, SwitchTransformers / NLLB-MoE's ModuleDict): a
    loop over the experts, each reading its routed tokens."""

    def __init__(self):
        super().__init__()
        self.inp, self.router, self.head = nn.Linear(8, H), nn.Linear(H, E, bias=False), nn.Linear(H, 5)
        self.experts = nn.ModuleList(_ExpertMLP() for _ in range(E))

    def forward(self, x):
        h = self.inp(x).flatten(0, 1)
        w, idx = self.router(h).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            out.index_add_(0, tok, expert(h[tok]) * w[tok, pos, None])
        return self.head(h + out)


def test_experts_as_separate_modules_already_choose_their_own_channels():
    """One group per expert module: each expert's intermediate channels are ranked and kept on their own."""
    torch.manual_seed(0)
    m, x = ModuleListMoE().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():
        for e, keep in enumerate(SETS):
            for lin in (m.experts[e].w1, m.experts[e].w3):
                lin.weight[keep] *= 10
            m.experts[e].w2.weight[:, keep] *= 10
    plan = plan_channels(m, x, ratio=0.5)
    inner = {g.name: c for g, c in plan.choices if g.name.startswith("experts.")}
    assert sorted(inner) == [f"experts.{e}.w1" for e in range(E)]
    for e, keep in enumerate(SETS):
        assert sorted(inner[f"experts.{e}.w1"].tolist()) == sorted(set(range(I)) - set(keep))
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _mixing_gate(self, h):
    gate, up = h.chunk(2, dim=-1)
    return self.act_fn(gate) * up / (up.norm(dim=-1, keepdim=True) + 1)  # a statistic over the channels


@pytest.mark.parametrize("kw, reason", [(dict(gate=_mixing_gate), "mixes intermediate channels"),
                                        (dict(extra=True), "expert_scale")])
def test_unknown_layout_keeps_channels_with_a_note(kw, reason):
    torch.manual_seed(0)
    m, x = ToyMoE(**kw).eval(), torch.randn(2, 5, 8)
    shapes = {n: p.shape for n, p in m.experts.named_parameters()}
    plan = plan_channels(m, x, ratio=0.5)
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert {n: p.shape for n, p in m.experts.named_parameters()} == shapes
    assert m.router.weight.shape[1] == H  # the stream the experts read is kept too
    notes = [n for n in plan.notes if n.startswith("experts:")]
    assert len(notes) == 1 and "kept whole" in notes[0] and reason in notes[0], plan.notes


def test_grouped_mm_macs_are_counted():
    a, w = torch.randn(10, 8), torch.randn(3, 8, 12)  # the CPU kernel wants 16-byte strides
    offs = torch.tensor([4, 7, 10], dtype=torch.int32)
    from torch.utils.flop_counter import FlopCounterMode
    from secateur.metrics import mac_counter
    with mac_counter() as fc:
        torch._grouped_mm(a, w, offs=offs)
    assert fc.get_total_flops() // 2 == 10 * 8 * 12
    with FlopCounterMode(display=False) as plain:  # why the formula: torch's counter does not know the op
        torch._grouped_mm(a, w, offs=offs)
    assert plain.get_total_flops() == 0


# ---------------------------------------------------------------- Hugging Face tiny causal LMs
def _hf(model_type):
    import zoo_models as Z
    torch.manual_seed(0)
    m, x = Z.hf_auto_model(model_type)
    if m is None:
        pytest.skip(f"{model_type} does not build at the tiny size")
    return m, x


def _logits(m, x):
    return m(**x).logits


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
def test_hf_moe_prunes_reloads_and_trains(model_type, tmp_path):
    m, x = _hf(model_type)
    cfg0 = copy.deepcopy(m.config)
    dense = copy.deepcopy(m)
    experts0 = {n: tuple(p.shape) for n, p in m.named_parameters() if ".experts." in n}
    plan = plan_channels(m, x, ratio=0.5)
    base, want, got = pruned_vs_reference(m, x, plan, run=_logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any("experts" in n and "kept" in n for n in plan.notes), plan.notes
    assert all(tuple(p.shape) != experts0[n] for n, p in m.named_parameters() if ".experts." in n)
    assert count_macs(m, x) < 0.4 * count_macs(dense, x)  # 0.55-0.67 while the experts were kept whole
    # the config states the experts' width now (proven by a rebuild on meta)
    ex = next(mod for n, mod in m.named_modules() if n.endswith("mlp.experts"))
    width = getattr(ex, "intermediate_dim", getattr(ex, "intermediate_size", None))
    field = "moe_intermediate_size" if hasattr(cfg0, "moe_intermediate_size") and model_type == "qwen2_moe" \
        else "intermediate_size"
    assert getattr(m.config, field) == width < getattr(cfg0, field)
    # other experts implementations run the pruned experts too
    with torch.no_grad():
        for impl in ("eager", "batched_mm"):
            m.config._experts_implementation = impl
            torch.testing.assert_close(_logits(m, x), got, rtol=1e-4, atol=1e-5)
    m.config._experts_implementation = "grouped_mm"
    # reload onto a fresh dense model: exact

    def make():
        return type(m)(copy.deepcopy(cfg0))
    secateur.save(m, tmp_path / "m.safetensors")
    fresh = secateur.load(make().eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(_logits(fresh, x), _logits(m, x), rtol=0, atol=0)
    # still trains
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = m(**x, labels=x["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_hf_config_alone_rebuilds_the_pruned_mixtral():
    """Mixtral states its head size, so hidden and expert widths are both config fields: the pruned config builds
    a model of exactly the pruned shapes (save_pretrained / from_pretrained work)."""
    m, x = _hf("mixtral")
    secateur.prune_channels(m, x, ratio=0.5)
    with torch.device("meta"):
        rebuilt = type(m)(m.config)
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in m.named_parameters()}


# ---------------------------------------------------------------- experts modules of single models (moe_models.py)
def _make(model_type):
    import zoo_models as Z

    def make():
        return Z._causal_lm_class(model_type)(Z.hf_small_config(model_type)).eval()
    return make


def _shapes(m, part):
    return {n: tuple(p.shape) for n, p in m.named_parameters() if part in n}


@pytest.mark.parametrize("model_type, part, below", [("dbrx", ".experts.", 0.4), ("jetmoe", ".mlp.", 0.4),
                                                     ("longcat_flash", ".experts.", 0.45)])
def test_model_specific_experts_prune_stream_and_width(model_type, part, below, tmp_path):
    """DBRX (``[E*I, H]`` weights), JetMoE (ParallelExperts, index_add merge), LongCat-Flash (zero-compute identity
    experts): the oracle holds, MACs fall (they stayed at 1.0, 1.0, 0.71 with these modules traced op by op), every
    expert tensor loses width, the pruned model runs its own forward and reloads exactly."""
    from helpers import prune_causal_lm
    make = _make(model_type)
    before = _shapes(make(), part)
    m, plan = prune_causal_lm(make, tmp_path, below=below, low=3)
    after = _shapes(m, part)
    assert before.keys() == after.keys() and all(
        all(a < b for a, b in zip(after[n], before[n]) if a != b) and after[n] != before[n] for n in before), after
    assert not any("kept whole" in n or "index_add" in n or "scatter" in n for n in plan.notes), plan.notes


def test_inkling_router_with_shared_expert_rows_prunes_stream_and_width(tmp_path):
    """Inkling's router scores routed + shared experts (``weight [E + S, H]``, ``e_score_correction_bias [E]``, its
    ``num_experts`` / ``n_shared_experts`` / ``n_total_experts`` say so) and its shared experts are ``bmm`` with
    ``p.transpose(1, 2)``: the stream, the routed and the shared expert widths prune (inkling_text kept 0.506 of its
    MACs: the router was not recognised, the routing weights carried the stream); the router keeps its rows."""
    from helpers import prune_causal_lm
    from secateur.graph.moe import is_router
    make = _make("inkling_text")
    dense = make()
    names = [n for n, mod in dense.named_modules() if type(mod).__name__ == "InklingTopkRouter"]
    assert names and all(is_router(dense, n) for n in names)
    rows = {n: dense.get_submodule(n).weight.shape[0] for n in names}
    before = _shapes(dense, ".mlp.")
    m, plan = prune_causal_lm(make, tmp_path, below=0.4, low=3)
    after = _shapes(m, ".mlp.")
    for n in names:
        w = m.get_submodule(n).weight
        assert w.shape[0] == rows[n] and w.shape[1] < before[f"{n}.weight"][1], w.shape  # experts kept, stream not
    for part in (".experts.", ".shared_experts."):
        assert all(after[n] != before[n] for n in before if part in n), after
    assert not any("Inkling" in n and ("kept" in n or "needs every channel" in n) for n in plan.notes), plan.notes


class _ShiftyRouter(nn.Module):
    """A router-like module whose ``n_shared_experts`` does not account for its rows (E + 2 rows, it says 1)."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.n_shared_experts, self.n_total_experts = E, 1, E + 1
        self.weight = nn.Parameter(torch.randn(E + 2, H) * 0.3)

    def forward(self, x):
        return nn.functional.linear(x, self.weight)[..., :E]


def test_router_whose_rows_match_nothing_keeps_its_rows_with_a_note():
    """Rows neither one per expert nor proven routed + shared: not a router, so its rows are kept whole (never a
    guessed expert count) and a note says why; its columns are sliced with the stream it reads (exact: the oracle
    holds), so the stream still prunes (graph/rules/matmul.py ``_fixed_rows``)."""
    from secateur.graph.moe import is_router
    torch.manual_seed(0)
    m, x = ToyMoE().eval(), torch.randn(2, 5, 8)
    m.router = _ShiftyRouter()
    assert not is_router(m, "router")
    plan = plan_channels(m, x, ratio=0.5)
    _, want, got = pruned_vs_reference(m, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert m.router.weight.shape == (E + 2, m.experts.down_proj.shape[1]) and m.experts.down_proj.shape[1] < H
    assert any(n.startswith("router: _ShiftyRouter is not read as a router, its 6 rows") for n in plan.notes), plan.notes


def test_dbrx_experts_keep_each_expert_block():
    """Shared channel set: row ``e*I + i`` of each ``[E*I, H]`` weight goes with channel ``i`` of every expert, so
    each expert keeps the same local rows of its own block; the stored ``ffn_hidden_size`` (the forward views the
    weights with it) follows."""
    m = _make("dbrx")()
    ex = m.transformer.blocks[0].ffn.experts
    e, i, h = ex.num_experts, ex.ffn_hidden_size, ex.hidden_size
    w1 = ex.mlp.w1.detach().clone()
    x = {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    plan = plan_channels(m, x, ratio=0.5)
    rows, cols = (plan.removed[("transformer.blocks.0.ffn.experts.mlp", "w1")][d] for d in (0, 1))
    local = rows.view(e, -1) - torch.arange(e)[:, None] * i  # the removed rows, per expert block
    assert (local == local[0]).all() and (local >= 0).all() and (local < i).all()
    pruned_vs_reference(m, x, plan, run=_logits)  # applies the plan
    keep_i = [c for c in range(i) if c not in local[0].tolist()]
    keep_h = [c for c in range(h) if c not in cols.tolist()]
    assert ex.ffn_hidden_size == ex.mlp.ffn_hidden_size == len(keep_i) < i
    assert ex.hidden_size == ex.mlp.hidden_size == len(keep_h) < h
    torch.testing.assert_close(ex.mlp.w1.view(e, len(keep_i), -1), w1.view(e, i, h)[:, keep_i][:, :, keep_h])


def test_model_specific_experts_with_unproven_activation_are_kept():
    """A DBRX experts module whose activation mixes channels is kept whole with a note; the oracle still holds."""
    class Mixing(nn.Module):
        def forward(self, h):
            return h / (h.norm(dim=-1, keepdim=True) + 1)  # a statistic over the channels
    m = _make("dbrx")()
    for blk in m.transformer.blocks:
        blk.ffn.experts.mlp.activation_fn = Mixing()
    x = {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    shapes = _shapes(m, ".experts.")
    plan = plan_channels(m, x, ratio=0.5)
    _, want, got = pruned_vs_reference(m, x, plan, run=_logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _shapes(m, ".experts.") == shapes
    notes = [n for n in plan.notes if "DbrxExperts experts kept whole" in n]
    assert len(notes) == len(m.transformer.blocks) and "mixes channels" in notes[0], plan.notes


# ---------------------------------------------------------------- planning on the meta device
def _group_key(graph, attention=True):
    return sorted((g.name, g.size, tuple(sorted((m.module, m.name, m.dim) for m in g.members))) for g in graph.groups
                  if attention or "attn" not in g.name)


# attention whose groups differ on meta for reasons that are not the experts': LongCat's MLA keeps a size that only
# the CPU's numeric proof lets the size search update (DBRX's one-KV-head SDPA differed too until meta runs took the
# CPU's kernel: graph/meta_sdpa.py; it differs again since its query heads prune on the CPU through a size the
# size-attribute search finds, and meta plans run no such search)
_ATTENTION_DIFFERS = {"longcat_flash", "dbrx"}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss", "dbrx", "jetmoe", "longcat_flash"])
def test_moe_plans_on_meta_like_on_the_cpu(model_type):
    """A model built on meta (no weights) plans: the experts modules, whose transformers code cannot run on meta
    (grouped_mm's meta kernel refuses fp32, routing asks for values), run as stand-ins that give their output's
    shape. The groups are the CPU capture's, and the plan removes as many channels from each (random importance:
    meta has no values)."""
    from secateur.graph import build_graph
    import zoo_models as Z
    cfg, cls = Z.hf_small_config(model_type), Z._causal_lm_class(model_type)
    torch.manual_seed(0)
    cpu = cls(cfg).eval()
    with torch.device("meta"):
        meta = cls(cfg).eval()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    x, xm = {"input_ids": ids, "use_cache": True}, {"input_ids": ids.to("meta"), "use_cache": True}
    same_attention = model_type not in _ATTENTION_DIFFERS
    assert _group_key(build_graph(meta, xm), same_attention) == _group_key(build_graph(cpu, x), same_attention)
    plan_m = plan_channels(meta, xm, ratio=0.5, importance="random")
    plan_c = plan_channels(cpu, x, ratio=0.5, importance="random")
    counts = lambda p: {g.name: int(c.numel()) for g, c in p.choices}  # noqa: E731
    cm, cc = counts(plan_m), counts(plan_c)
    experts = [n for n in cc if "experts" in n or ".mlp." in n]
    assert experts and all(cm.get(n) == cc[n] for n in experts), (cm, cc)
    per_expert = lambda p: {g.name: (g.experts, tuple(c.shape)) for g, c in p.choices if g.experts}  # noqa: E731
    assert per_expert(plan_m) == per_expert(plan_c)  # each expert keeps its own channels on meta too
    assert bool(per_expert(plan_c)) == (model_type in ("mixtral", "qwen2_moe", "gpt_oss"))  # fused dispatcher experts
    stream = "transformer.wte" if model_type == "dbrx" else "model.embed_tokens"
    assert cm.get(stream) == cc.get(stream) is not None
    if same_attention:
        assert cm == cc
    assert not any(isinstance(p, torch.Tensor) and p.device.type != "meta" for p in meta.parameters())
    assert all("forward" not in vars(m) for m in meta.modules())  # the stand-ins are gone


def test_meta_stand_in_checks_the_shapes_its_forward_would():
    """The stand-in is no blank cheque: an input whose width the expert weights do not read fails as the module's
    own forward would, so a meta dry run of a bad plan still fails."""
    from secateur.graph.modules import leaf_rule
    from secateur.graph.moe import meta_stand_ins
    with torch.device("meta"):
        m = ToyMoE("grouped_mm").eval()
    rules = {mod: leaf_rule(mod) for mod in m.modules()}
    idx, w = torch.zeros(10, 2, dtype=torch.long, device="meta"), torch.ones(10, 2, device="meta")
    with meta_stand_ins(rules):
        out = m.experts(torch.empty(10, H, device="meta"), idx, w)
        assert out.shape == (10, H) and out.device.type == "meta"
        with pytest.raises(RuntimeError, match="shapes do not agree"):
            m.experts(torch.empty(10, H - 1, device="meta"), idx, w)
    assert "forward" not in vars(m.experts)
    with pytest.raises(RuntimeError):  # without the stand-in, transformers' code does not run on meta
        m.experts(torch.empty(10, H, device="meta"), idx, w)


def test_unproven_experts_on_meta_fail_with_a_pruning_error():
    """No stand-in where the layout is not proven (its output shape is not known): where its own code fails on meta,
    the error is a PruningError naming the module and the reason, not a meta kernel's."""
    with torch.device("meta"):
        m = ToyMoE("grouped_mm", extra=True).eval()
    with pytest.raises(secateur.PruningError, match="Experts does not run on the meta device.*expert_scale"):
        plan_channels(m, torch.empty(2, 5, 8, device="meta"), ratio=0.5, importance="random")


def test_global_ranking_keeps_grouped_mm_widths_aligned():
    """grouped_mm needs 16-byte row strides: a global ranking used to want widths like 25 there, the dry run then
    failed and dropped every group that touches the experts (nothing was pruned). Kept hidden and expert widths
    are now multiples of ``GROUPED_MM_ALIGN``, the experts prune and the oracle holds under grouped_mm."""
    from secateur.graph.moe import GROUPED_MM_ALIGN
    m, x = _hf("mixtral")
    assert m.config._experts_implementation == "grouped_mm"
    shapes0 = {n: tuple(p.shape) for n, p in m.named_parameters() if ".experts." in n}
    plan = plan_channels(m, x, ratio=0.5, scope="global")
    assert not any("forward failed" in n for n in plan.notes), plan.notes
    assert all(g.align % GROUPED_MM_ALIGN == 0 for g, _ in plan.choices if any(".experts" in mb.module
                                                                                for mb in g.members))
    base, want, got = pruned_vs_reference(m, x, plan, run=_logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for n, p in m.named_parameters():
        if ".experts." in n:
            assert tuple(p.shape) != shapes0[n] and all(s % GROUPED_MM_ALIGN == 0 for s in p.shape[1:]), (n, p.shape)


def test_experts_too_narrow_for_the_alignment_say_why_they_keep_every_channel():
    """Fused experts keep widths at multiples of 8 (grouped_mm): a tiny Mixtral at ratio 0.3 prunes nothing, and the
    plan says why instead of coming back empty without a word."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           head_dim=8)
    m = tr.MixtralForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(3, 100, (1, 6))}
    plan = plan_channels(m, x, ratio=0.3)
    assert not plan.choices
    said = [n for n in plan.notes if "multiple of 8" in n]
    assert any(n.startswith("model.layers.0.mlp.experts: keeps all 8 channels") for n in said), plan.notes
    plan = plan_channels(m, x, ratio=0.5)  # the hidden width can go to 8: pruned, and no longer noted
    assert plan.choices and not any(n.startswith("model.embed_tokens") for n in plan.notes if "multiple" in n)
