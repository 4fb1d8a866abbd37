"""Recurrent layers: hidden-size and input-size pruning of nn.LSTM / GRU / RNN (and cells), checked against the
zeroing oracle (the original with the removed units zeroed where they enter: weight_hh columns, the next layer's
weight_ih columns, the consumer's columns)."""
import copy

import pytest
import torch
from torch import nn

from helpers import assert_oracle
from secateur.graph import build_groups
from secateur.structured import plan_channels, prune_channels

torch.set_num_threads(1)

KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class Tagger(nn.Module):
    """Linear -> recurrent -> Linear on every step, plus the last hidden state added in (h_n is used too)."""

    def __init__(self, kind, layers, bidir, batch_first, proj=0, hidden=8):
        super().__init__()
        kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
        if proj:
            kw["proj_size"] = proj
        self.batch_first, self.dirs = batch_first, 2 if bidir else 1
        self.inp = nn.Linear(5, 6)
        self.rnn = KINDS[kind](6, hidden, **kw)
        width = proj or hidden
        self.head = nn.Linear(self.dirs * width, 3)
        self.last = nn.Linear(width, 3)

    def forward(self, x):
        y, state = self.rnn(torch.tanh(self.inp(x)))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(y) + self.last(h[-1]).unsqueeze(1 if self.batch_first else 0)


_oracle = assert_oracle


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)  # distinct magnitudes, biases too: the oracle must be able to fail
    return model


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_hidden_and_input_size_pruning_matches_zeroing(kind, layers, bidir, batch_first):
    torch.manual_seed(0)
    m = _randomize(Tagger(kind, layers, bidir, batch_first)).eval()
    x = torch.randn(2, 7, 5) if batch_first else torch.randn(7, 2, 5)
    plan = _oracle(m, x, ratio=0.5)
    r = m.rnn
    assert r.hidden_size == 4 and r.input_size == 3 == m.inp.out_features
    for layer in range(layers):
        for sfx in ("", "_reverse")[: 2 if bidir else 1]:
            assert getattr(r, f"weight_ih_l{layer}{sfx}").shape == (GATES[kind] * 4, 3 if layer == 0 else
                                                                     4 * (2 if bidir else 1))
            assert getattr(r, f"weight_hh_l{layer}{sfx}").shape == (GATES[kind] * 4, 4)
            assert getattr(r, f"bias_hh_l{layer}{sfx}").shape == (GATES[kind] * 4,)
    assert m.head.in_features == 4 * (2 if bidir else 1) and m.last.in_features == 4
    assert any(g.name == "rnn" for g, _ in plan.choices)


def test_gate_rows_are_the_same_units_in_every_gate():
    torch.manual_seed(0)
    m = _randomize(Tagger("LSTM", 1, False, True)).eval()
    w = m.rnn.weight_ih_l0.detach().clone()
    plan = plan_channels(m, torch.randn(2, 7, 5), ratio=0.5, ignore=["inp"])
    (g, chans), = [(g, c) for g, c in plan.choices if g.name == "rnn"]
    removed = plan.removed[("rnn", "weight_ih_l0")][0]
    want = torch.cat([k * 8 + chans for k in range(4)]).sort().values  # unit j: row j of each of the 4 gates
    assert torch.equal(removed, want)
    plan.apply(m)
    keep = torch.tensor([j for j in range(8) if j not in chans.tolist()])
    torch.testing.assert_close(m.rnn.weight_ih_l0.detach(), w[torch.cat([k * 8 + keep for k in range(4)])])


@pytest.mark.parametrize("bidir", [False, True])
def test_lstm_projections_prune_cells_and_projected_dims(bidir):
    torch.manual_seed(0)
    m = _randomize(Tagger("LSTM", 2, bidir, True, proj=6, hidden=8)).eval()
    x = torch.randn(2, 7, 5)
    names = {g.name for g in build_groups(m, x)}
    assert "rnn" in names  # the cells and the projections are separate groups
    assert sum(1 for g in build_groups(m, x) if g.name == "rnn") == 2
    _oracle(m, x, ratio=0.5)
    r = m.rnn
    assert (r.hidden_size, r.proj_size) == (4, 3) and r.weight_hr_l1.shape == (3, 4)
    assert r.weight_hh_l0.shape == (16, 3) and r.weight_ih_l1.shape == (16, 3 * (2 if bidir else 1))


def test_initial_state_from_the_model_joins_units_and_model_input_state_keeps_them():
    class WithState(nn.Module):
        def __init__(self, own):
            super().__init__()
            self.own = own
            self.enc, self.init = nn.Linear(5, 6), nn.Linear(5, 8)
            self.rnn, self.out = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x, h0=None):
            if self.own:
                h0 = self.init(x.mean(1)).unsqueeze(0)
            return self.out(self.rnn(self.enc(x), h0)[0])

    torch.manual_seed(0)
    x, h0 = torch.randn(2, 7, 5), torch.randn(1, 2, 8)
    m = _randomize(WithState(own=True)).eval()
    _oracle(m, x, ratio=0.5)
    assert m.rnn.hidden_size == 4 and m.init.out_features == 4
    m = _randomize(WithState(own=False)).eval()
    plan = plan_channels(m, (x, h0), ratio=0.5)
    assert not any(g.name == "rnn" for g, _ in plan.choices)
    assert any("initial state" in n for n in plan.notes)
    plan.apply(m)
    assert m.rnn.hidden_size == 8 and m(x, h0).shape == (2, 7, 2)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_in_a_loop(cell):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.cell, self.out = nn.Linear(5, 6), cell(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            state = None
            for t in range(x.size(1)):
                state = self.cell(self.enc(x[:, t]), state)
            h = state[0] if isinstance(state, tuple) else state
            return self.out(h)

    torch.manual_seed(0)
    m = _randomize(Loop()).eval()
    _oracle(m, torch.randn(2, 4, 5), ratio=0.5)
    assert m.cell.hidden_size == 4 and m.cell.input_size == 3 and m.out.in_features == 4


def test_prune_channels_result_trains_and_keeps_output_shape():
    torch.manual_seed(0)
    m = Tagger("LSTM", 2, True, True)
    x = torch.randn(4, 7, 5)
    res = prune_channels(m, x, ratio=0.5)
    assert res.params_after < res.params_before and m(x).shape == (4, 7, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    target = torch.randn(4, 7, 3)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_packed_sequences_classified_from_the_last_state():
    """pack_padded_sequence -> LSTM -> h_n. (pad_packed_sequence decomposes into a copy into a view of a fresh
    tensor, which the engine refuses with a PruningError naming aten::copy_.)"""
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.rnn, self.out = nn.Linear(5, 6), nn.LSTM(6, 8, batch_first=True, num_layers=2), \
                nn.Linear(8, 2)

        def forward(self, x):
            p = pack_padded_sequence(self.enc(x), torch.tensor([4, 2]), batch_first=True)
            return self.out(self.rnn(p)[1][0][-1])

    torch.manual_seed(0)
    m = _randomize(Packed()).eval()
    _oracle(m, torch.randn(2, 4, 5), ratio=0.5)
    assert m.rnn.hidden_size == 4 and m.rnn.input_size == 3


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_plan_macs_count_without_applying_is_exact_for_recurrent_layers(kind):
    from secateur.graph import build_graph
    from secateur.metrics import count_macs
    from secateur.structured.targets import _Counter
    torch.manual_seed(0)
    m, x = Tagger(kind, 2, True, True, proj=6 if kind == "LSTM" else 0), torch.randn(2, 7, 5)
    graph = build_graph(m, x)
    plan = plan_channels(m, x, ratio=0.5, graph=graph)
    counter = _Counter(m, x, graph.groups, "macs")
    estimate = counter.estimate(plan.choices)
    plan.apply(m)
    assert counter.fixed == 0 and estimate == count_macs(m, x)
    res = prune_channels(Tagger(kind, 2, True, True), x, target_macs=0.5)
    assert len(res.plans) == 1 and res.macs_after <= 0.5 * res.macs_before


def test_structure_round_trip_and_deepcopy_of_a_pruned_lstm():
    from secateur.structured import apply_structure
    torch.manual_seed(0)
    m, x = Tagger("LSTM", 2, True, False, proj=6), torch.randn(7, 2, 5)
    prune_channels(m, x, ratio=0.5)
    fresh = apply_structure(Tagger("LSTM", 2, True, False, proj=6), m._secateur_structure)
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m.eval()(x)) and torch.equal(copy.deepcopy(m)(x), m(x))
    assert (fresh.rnn.hidden_size, fresh.rnn.proj_size, fresh.rnn.input_size) == (4, 3, 3)


@pytest.mark.parametrize("layer", [lambda: nn.LSTM(5, 6, batch_first=True, bidirectional=True, num_layers=2),
                                   lambda: nn.GRU(5, 6, batch_first=True), lambda: nn.RNN(5, 6, batch_first=True),
                                   lambda: nn.LSTMCell(5, 6), lambda: nn.GRUCell(5, 6)],
                         ids=["lstm", "gru", "rnn", "lstm_cell", "gru_cell"])
def test_input_features_straight_from_the_models_input_stay(layer):
    """Features 0-3 from a Linear, 4 from the model's input: the input's column stays, the Linear's prune (an
    internal 'slot size mismatch' error before; found by tests/test_engine_fuzz.py)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.rnn, self.head = nn.Linear(2, 4), layer(), nn.Linear(12 if self.bidir else 6, 3)

        bidir = False

        def forward(self, x):
            y = torch.cat([self.lin(x[..., :2]), x[..., 2:]], -1)
            if isinstance(self.rnn, nn.RNNCellBase):
                out = self.rnn(y[:, 0])
                return self.head(out[0] if isinstance(out, tuple) else out)
            return self.head(self.rnn(y)[0][:, -1])

    M.bidir = isinstance(layer(), nn.LSTM)
    torch.manual_seed(0)
    model = M().eval()
    assert_oracle(model, torch.randn(2, 3, 3), ratio=0.5)
    assert model.lin.out_features == 2
    assert (model.rnn.weight_ih_l0 if hasattr(model.rnn, "weight_ih_l0") else model.rnn.weight_ih).shape[1] == 3


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("cls, kw", [
    (nn.LSTM, dict()), (nn.LSTM, dict(bidirectional=True)), (nn.LSTM, dict(num_layers=2)),
    (nn.LSTM, dict(batch_first=False)), (nn.LSTM, dict(proj_size=4, bidirectional=True)), (nn.LSTM, dict(packed=True)),
    (nn.GRU, dict(bidirectional=True, num_layers=2)), (nn.RNN, dict()),
], ids=["lstm", "bidir", "2_layers", "seq_first", "proj_bidir", "packed", "gru", "rnn"])
def test_recurrent_macs_are_counted_on_the_cpu_as_on_meta(cls, kw):
    """nn.LSTM runs one fused oneDNN kernel per layer and direction on the CPU (``mkldnn_rnn_layer``), which the
    flop counter did not know: an LSTM counted 0 MACs on the CPU and its matmuls on meta, so MACs targets on LSTM
    models were met against the wrong total. Both now count the formula: per step and sequence, gates x (input +
    hidden), plus the projection."""
    from secateur.graph.verify import skeleton, to_meta
    from secateur.metrics import count_macs
    packed, batch_first = kw.pop("packed", False), kw.pop("batch_first", True)
    torch.manual_seed(0)
    rnn = cls(11, 8, batch_first=batch_first, **kw)
    x = torch.randn(2, 5, 11) if batch_first else torch.randn(5, 2, 11)
    tokens = 10
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
        tokens = 8
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    dirs = 2 if kw.get("bidirectional") else 1
    hidden, proj = 8, kw.get("proj_size", 0)
    out = proj or hidden
    want = 0
    for layer in range(kw.get("num_layers", 1)):
        width = 11 if layer == 0 else out * dirs
        want += dirs * tokens * (gates * hidden * (width + out) + hidden * proj)
    assert count_macs(rnn, (x,)) == want  # (a PackedSequence is a tuple: one argument)
    if not packed:  # (meta cannot pack: the lengths are values)
        assert count_macs(skeleton(rnn), to_meta(x)) == want


@pytest.mark.parametrize("kw", [dict(), dict(bidirectional=True, num_layers=2), dict(proj_size=4), dict(bias=False)])
def test_fused_gpu_rnn_formula_counts_every_matrix(kw):
    """cuDNN runs the whole nn.LSTM in one ``_cudnn_rnn`` call (no GPU here: the formula, on the shapes the flop
    counter hands it): the same count as the CPU's per-layer kernels."""
    from secateur.metrics import _fused_rnn_flops, count_macs
    torch.manual_seed(0)
    lstm = nn.LSTM(11, 8, batch_first=True, **kw)
    x = torch.randn(2, 5, 11)
    shapes = [tuple(w.shape) for w in lstm._flat_weights]
    assert _fused_rnn_flops((2, 5, 11), shapes, 4, None) // 2 == count_macs(lstm, x)
