"""Kept channels always come with a reason (graph/kept.py), and the index-write rules (graph/rules/scatter.py):
channels that ride along a scatter / index_put / log_sigmoid are pruned exactly (numeric oracle), and channels the
rules cannot follow are kept with a note naming the op."""
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_oracle
from secateur.graph import build_graph
from secateur.structured import plan_channels


def _pruned(plan, name):
    return any(g.name == name and c.numel() for g, c in plan.choices)


class LogSigmoidMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.logsigmoid(self.a(x)))


def test_log_sigmoid_is_pointwise():
    torch.manual_seed(0)
    plan = assert_oracle(LogSigmoidMLP().eval(), torch.randn(3, 8), ratio=0.5)
    assert _pruned(plan, "a") and not [n for n in plan.notes if "kept" in n], plan.notes


class ScatterPatches(nn.Module):
    """BLT's patch reduction: token features max-reduced into patches by ``patch_ids`` expanded over channels."""

    def __init__(self, along_channels=False, src_index=False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.along_channels, self.src_index = along_channels, src_index

    def forward(self, x):
        h = self.a(x)  # [B, T, C]
        if self.along_channels:  # channel dim written at fixed positions: not exact under removal
            idx = torch.arange(h.size(-1)).flip(0).expand_as(h)
            return self.b(torch.zeros_like(h).scatter(-1, idx, h))
        ids = torch.tensor([0, 0, 1, 2, 2, 2])
        if self.src_index:  # positions computed from channel values (Reformer's buckets)
            ids = h.sum(-1)[0].argsort() // 2
        idx = ids[None, :, None].expand(h.size(0), -1, h.size(-1))
        p = torch.zeros(h.size(0), 3, h.size(-1)).scatter_reduce(1, idx, h, reduce="amax", include_self=False)
        return self.b(p)


def test_scatter_reduce_channels_ride_along():
    torch.manual_seed(0)
    plan = assert_oracle(ScatterPatches().eval(), torch.randn(2, 6, 8), ratio=0.5)
    assert _pruned(plan, "a"), plan.choices
    assert not [n for n in plan.notes if "scatter" in n], plan.notes


def test_scatter_along_channels_or_by_channel_values_keeps_them():
    torch.manual_seed(0)
    for model, why in [(ScatterPatches(along_channels=True), "channel dim"),
                       (ScatterPatches(src_index=True), "computed from channel values")]:
        plan = assert_oracle(model.eval(), torch.randn(2, 6, 8), ratio=0.5)
        assert not _pruned(plan, "a"), plan.choices
        assert any("aten::scatter" in n and why in n for n in plan.notes), plan.notes


class MaskedAdapter(nn.Module):
    """X-MOD's per-language adapters: ``new[mask] = adapter(h[mask])`` into ``zeros_like(h)``."""

    def __init__(self, into_table=False):
        super().__init__()
        self.a, self.ad, self.b = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.into_table = into_table
        self.register_buffer("table", torch.randn(6, 16))

    def forward(self, x):
        h = self.a(x)
        new = (self.table.expand_as(h).clone() if self.into_table else torch.zeros_like(h))
        mask = torch.tensor([True, False, True, True, False, True]).expand(h.shape[:2])
        new[mask] = self.ad(h[mask])
        return self.b(new + h)


def test_index_put_with_a_mask_carries_the_values_channels():
    torch.manual_seed(0)
    plan = assert_oracle(MaskedAdapter().eval(), torch.randn(2, 6, 8), ratio=0.5)
    assert _pruned(plan, "a"), plan.choices
    assert not [n for n in plan.notes if "index_put" in n], plan.notes


def test_index_put_into_a_constant_keeps_the_channels():
    torch.manual_seed(0)
    plan = assert_oracle(MaskedAdapter(into_table=True).eval(), torch.randn(2, 6, 8), ratio=0.5)
    assert not _pruned(plan, "a"), plan.choices
    assert any("index_put" in n and "constant" in n for n in plan.notes), plan.notes


class GatherChannels(nn.Module):
    """ProphetNet's relative position rows: channels read at positions a fixed index names."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        idx = torch.tensor([0, 3, 3, 5, 9, 15]).expand(*h.shape[:-1], -1)
        return self.b(h.gather(-1, idx))


def test_gather_at_fixed_channel_positions_keeps_them():
    torch.manual_seed(0)
    plan = assert_oracle(GatherChannels().eval(), torch.randn(2, 5, 8), ratio=0.5)
    assert not _pruned(plan, "a"), plan.choices  # the ten channels never read renumbered the others before
    assert any(n.startswith("<root>: aten::gather makes the 16 channels of a one unit") for n in plan.notes), \
        plan.notes


class GatherPerHead(nn.Module):
    """ProphetNet's relative position rows [heads x buckets]: each head's buckets read at fixed positions, the heads
    themselves removable whole (with what they are added to)."""

    def __init__(self):
        super().__init__()
        self.a, self.rel, self.b = nn.Linear(8, 16), nn.Linear(8, 4 * 6), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x).view(x.size(0), -1, 4)  # [B, heads, head_dim]
        r = self.rel(x).view(x.size(0), -1, 6)  # [B, heads, buckets]
        idx = torch.tensor([0, 3, 3, 5]).expand(x.size(0), r.size(1), -1)
        return self.b((h * r.gather(-1, idx)).flatten(1))


def test_gather_per_head_keeps_whole_rows_prunable():
    torch.manual_seed(0)
    plan = assert_oracle(GatherPerHead().eval(), torch.randn(2, 8), ratio=0.5)
    assert _pruned(plan, "a"), plan.choices  # heads go with their relative position rows
    rows = plan.removed[("rel", "weight")][0]  # whole heads: all six buckets of each removed head
    assert rows.numel() == 12 and torch.bincount(rows // 6).tolist().count(6) == 2, rows


# ---------------------------------------------------------------- every kept group is explained
class ReturnsStream(nn.Module):
    """XLNet / Moshi: the model returns its residual stream besides the logits."""

    def __init__(self):
        super().__init__()
        self.emb, self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16), \
            nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.down(F.relu(self.up(h)))
        return self.head(h), h


class SumGate(nn.Module):
    """A statistic that is not a norm (a sum over the channels, times the channels) ties every channel."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * h.sum(-1, keepdim=True))


def _kept_producers(graph):
    """Producer slots that no group can remove (blocked), or that are one unit of several channels."""
    root, tr = graph.root, graph.tracer
    out = set()
    for s in tr.slots.values():
        if s["kind"] == "out" and bool((root[s["atoms"]] == root[0]).any()):
            out.add(s["module"])
    for g in graph.groups:
        if g.size == 1 and max(m.index.numel() for m in g.members if m.kind == "out") > 1:
            out.add(g.name)
    return out


def test_every_kept_group_has_a_note():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    graph = build_graph(ReturnsStream().eval(), x)
    assert {"emb", "down"} <= _kept_producers(graph)
    assert any(n.startswith("<model output>: output 1 (2, 16)") and "emb.weight" in n for n in graph.notes), \
        graph.notes
    graph = build_graph(SumGate().eval(), x)
    assert "a" in _kept_producers(graph)
    assert any(n.startswith("<root>: aten::sum makes the 16 channels of a one unit") for n in graph.notes), \
        graph.notes


def test_final_outputs_and_prunable_models_get_no_note():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    for model in (LogSigmoidMLP(), ReturnsStream()):
        model.eval()
        plan = plan_channels(model, x, ratio=0.5)
        kept = [n for n in plan.notes if "kept" in n and not n.startswith("<model output>")]
        assert not kept, plan.notes  # the head's outputs are kept by design, silently
    plan = plan_channels(ReturnsStream().eval(), x, ratio=0.5)
    assert _pruned(plan, "up") and not _pruned(plan, "emb")


def test_notes_name_every_op_that_blocks_across_models():
    """Property: for each model here, every kept producer (except a head read by nothing) is named in a note."""
    torch.manual_seed(0)
    cases = [(ReturnsStream(), torch.randn(2, 8)), (SumGate(), torch.randn(2, 8)),
             (ScatterPatches(src_index=True), torch.randn(2, 6, 8)), (MaskedAdapter(into_table=True),
                                                                      torch.randn(2, 6, 8)),
             (GatherChannels(), torch.randn(2, 5, 8))]
    for model, x in cases:
        graph = build_graph(model.eval(), x)
        heads = {"head", "b"}
        for name in _kept_producers(graph) - heads:
            assert any(name + "." in n or f"of {name} " in n or f"of {name}," in n or "the channels it reads" in n
                       for n in graph.notes), (type(model).__name__, name, graph.notes)


class SharedTable(nn.Module):
    """RoFormer's pattern: per-head units (a statistic over each head's dims), then a table over head dims shared
    by every head multiplies them, which joins the heads: the op to name is that ``mul``, not the reduction."""

    def __init__(self):
        super().__init__()
        self.a, self.table, self.b = nn.Linear(8, 16), nn.Embedding(1, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x).view(x.size(0), 4, 4)
        h = h * h.sum(-1, keepdim=True)
        h = h * self.table(torch.zeros(1, dtype=torch.long))[0]
        return self.b(h.flatten(1))


def test_the_note_names_the_op_that_joined_the_unit():
    torch.manual_seed(0)
    graph = build_graph(SharedTable().eval(), torch.randn(2, 8))
    notes = [n for n in graph.notes if "one unit" in n]
    assert len(notes) == 1 and notes[0].startswith("<root>: aten::mul makes the 16 channels of a one unit"), notes
