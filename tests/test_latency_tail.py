"""The non-GEMM part of the latency model (secateur.latency_tail): ops outside the Conv/Linear layers,
charged to the layer whose channels they carry.

The exact checks use a fake timer whose cost of an op is known by construction (a fixed call cost plus a
cost per output element), so the oracle is independent: the tail *measured on a pruned model* must equal
the tail the dense model's table *predicts* for it. One check times for real (elementwise-only work must
cost more with more channels)."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateur.latency_model as lm
import secateur.latency_tail as lt
from secateur.errors import PruningError
from secateur.latency_model import LatencyTable, LayerSpec, layer_specs
from secateur.latency_tail import Tail, TailOp, measure_tail, narrow_count, record_tail

CALL, PER_ELEMENT = 3e-6, 1e-9


class FakeTimer:
    """Seconds of one call of an op: ``CALL`` plus ``PER_ELEMENT`` per element of its tensor output."""

    def __call__(self, call, number):
        out = call()
        outs = out if isinstance(out, (tuple, list)) else [out]
        return CALL + PER_ELEMENT * sum(t.numel() for t in outs if isinstance(t, torch.Tensor))


class Block(nn.Module):
    """conv -> BN -> ReLU (in place) -> + skip, scaled in place -> pool -> flatten -> fc: the tail ops of a
    CNN block."""

    def __init__(self, c=32, cin=8):
        super().__init__()
        self.conv0 = nn.Conv2d(3, cin, 1)
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        y = self.bn(self.conv(self.conv0(x))).relu_()
        y = (y + self.conv2(y)).mul_(0.5)   # in place and not idempotent: timing must not repeat it on y
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _layers(model, x):
    return {n: s.out_channels for n, s in layer_specs(model, x).items()}


def _tail(model, x):
    layers = _layers(model, x)
    ops = record_tail(model, x, layers)
    secs, narrow, overhead = measure_tail(model, x, layers, ops, device=torch.device("cpu"), repeats=1, warmup=0,
                                          timer=FakeTimer())
    return ops, Tail.from_times(ops, secs, overhead, narrow)


def _pruned(model, keep):
    """``model`` with conv/bn/conv2 outputs and fc inputs cut to ``keep`` channels (the skip group)."""
    p = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("conv", "conv2"):
            old = getattr(p, name)
            new = nn.Conv2d(old.in_channels if name == "conv" else keep, keep, old.kernel_size,
                            padding=old.padding)
            setattr(p, name, new)
        p.bn = nn.BatchNorm2d(keep).eval()
        p.fc = nn.Linear(keep, 10)
    return p.eval()


def test_owners_follow_the_channels_and_table_layers_are_not_tail():
    m, x = Block().eval(), torch.randn(1, 3, 8, 8)
    ops = record_tail(m, x, _layers(m, x))
    names = [o.op for o in ops]
    assert not any("convolution" in n or "addmm" in n or "linear" in n for n in names)  # the table's own ops
    owned = {o.op: o.owner for o in ops}
    assert owned["aten.batch_norm.default"] == "conv" and owned["aten.relu_.default"] == "conv"
    assert owned["aten.add.Tensor"] == "conv"                      # its first input carries conv's channels
    assert owned["aten.adaptive_avg_pool2d.default"] == "conv"     # keeps the 32 channels
    flat = [o for o in ops if o.op == "aten.flatten.using_ints"]
    assert flat and flat[0].owner == "conv"                        # [1, 32] still has the channels
    assert all(o.channels == (32 if o.owner else 0) for o in ops)


def test_reshape_to_another_width_is_unowned():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 12)

        def forward(self, x):
            return self.fc(x).view(2, 3, 4).softmax(-1)
    m, x = Heads().eval(), torch.randn(2, 4)
    ops = record_tail(m, x, _layers(m, x))
    assert [o.owner for o in ops] == [None, None]   # [2, 3, 4] carries no 12: a fixed cost


@pytest.mark.parametrize("keep", [8, 16, 24])
def test_predicted_tail_of_a_pruned_model_equals_its_measured_tail(keep):
    """Under a timer that is linear in the elements, the two-point line per op is exact: the dense
    model's tail, scaled to ``keep`` channels, is what timing the pruned model's own ops gives."""
    m, x = Block().eval(), torch.randn(2, 3, 8, 8)
    _, dense = _tail(m, x)
    _, pruned = _tail(_pruned(m, keep), x)
    predicted = dense.other + sum(dense.of(n, keep if n in ("conv", "conv2") else c, c)
                                  for n, c in _layers(m, x).items())
    assert predicted == pytest.approx(pruned.total(), rel=1e-9)
    assert dense.of("conv", keep, 32) < dense.of("conv", 32, 32)
    assert dense.fixed["conv"] == pytest.approx(CALL * sum(1 for o in record_tail(m, x, _layers(m, x))
                                                           if o.owner == "conv"))


def test_timing_passes_leave_the_model_outputs_unchanged():
    """In-place ops are timed on copies: a timed pass computes what an untimed forward does."""
    m, x = Block().eval(), torch.randn(1, 3, 8, 8)
    layers = _layers(m, x)
    expect = m(x)
    mode = lt._TailMode(FakeTimer(), {})
    got = lt._run(m, x, layers, mode)
    torch.testing.assert_close(got, expect)
    assert len(mode.seconds) == len(mode.ops) > 0


@given(st.integers(2, 4096))
def test_narrow_count_is_a_smaller_positive_count(c):
    n = narrow_count(c)
    assert 1 <= n < c
    assert n % 8 == 0 or c < 32


@given(st.lists(st.tuples(st.floats(1e-7, 1e-2), st.floats(0, 1)), min_size=1, max_size=20),
       st.integers(2, 512))
@settings(max_examples=100, deadline=None)
def test_tail_reproduces_both_measured_points_and_is_monotone(points, channels):
    """Each op's line goes through its full-width and narrowed measurements (narrowed between proportional
    and as slow as full width: a non-negative fixed part) and never decreases with more channels."""
    ops = [TailOp("aten.relu.default", ((1, channels),), "a", channels) for _ in points]
    c = narrow_count(channels)
    full = [s for s, _ in points]
    narrow = {i: s * (c / channels + f * (1 - c / channels)) for i, (s, f) in enumerate(points)}
    tail = Tail.from_times(ops, full, 1e-6, narrow)
    assert tail.of("a", channels, channels) == pytest.approx(sum(full))
    assert tail.of("a", c, channels) == pytest.approx(sum(narrow.values()))
    faster = Tail.from_times(ops, full, 1e-6, {i: 0.0 for i in narrow})  # super-linear: no negative fixed part
    assert faster.fixed["a"] == 0.0 and faster.of("a", c, channels) == pytest.approx(sum(full) * c / channels)
    values = [tail.of("a", k, channels) for k in range(1, channels + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert tail.of("unknown", 3, channels) == 0.0


def test_table_adds_the_tail_to_totals_and_costs():
    """`total`, `estimate` and the latency cost include the tail; without a tail they are the layers alone."""
    a = LayerSpec("linear", 4, 8, (1, 4), (1, 8), (True,))
    store = {a.key(): {"out": {str(k): 1e-3 * k for k in range(1, 9)}, "in": {str(k): 1.0 for k in range(1, 5)}}}
    t = LatencyTable.from_measurements({"a": a}, store)
    bare = t.total()
    t.tail = Tail({"a": 2e-3}, {"a": 8e-3}, other=5e-3)
    assert t.total() == pytest.approx(bare + 5e-3 + 2e-3 + 8e-3)
    assert t.total(tail=False) == pytest.approx(bare)
    assert t.tail_latency("a", 4) == pytest.approx(2e-3 + 4e-3)
    cost = t.cost_fn([[("a", "out")]], "latency")
    assert cost([4]) == pytest.approx(t.latency("a", 4) + 5e-3 + 2e-3 + 4e-3)
    assert cost([8]) == pytest.approx(t.total())
    assert t.cost_fn([[("a", "out")]], "macs")([4]) == a.macs(4, 4)   # MACs know nothing of the tail
    assert t.cost_fn([[("a", "out")]], "layers")([4]) == pytest.approx(t.latency("a", 4))  # the layers alone
    with pytest.raises(PruningError, match="out of range"):
        t.tail_latency("a", 9)


def test_tail_is_cached_by_its_op_sequence(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    m, x = Block().eval(), torch.randn(1, 3, 8, 8)
    opts = dict(threads=1, repeats=1, warmup=0, max_points=4, min_sample_s=2e-4, progress=False)
    t1 = LatencyTable.build(m, x, **opts)
    assert t1.tail is not None and t1.tail.ops > 0 and t1.total() > t1.total(tail=False)

    def no_measuring(*a, **k):
        raise AssertionError("tail measured again despite the cache")
    monkeypatch.setattr(lm, "measure_tail", no_measuring)
    t2 = LatencyTable.build(m, x, **opts)
    assert t2.tail == t1.tail
    m.bn = nn.Identity()  # the same Conv/Linear layers, another tail: another key
    with pytest.raises(AssertionError, match="measured again"):
        LatencyTable.build(m, x, **opts)
    assert LatencyTable.build(m, x, tail=False, **opts).tail is None


def test_elementwise_only_cost_grows_with_the_channels():
    """Real timing: a model whose work is almost all elementwise (a 1x1 conv from 3 channels, then norm,
    activation and adds over a large map) has a tail that costs clearly more at full width than at a quarter."""
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 64, 1)
            self.bn = nn.BatchNorm2d(64)

        def forward(self, x):
            y = self.conv(x)
            for _ in range(4):
                y = self.bn(y).relu() + y
            return y
    m, x = Wide().eval(), torch.randn(1, 3, 96, 96)
    layers = _layers(m, x)
    ops = record_tail(m, x, layers)
    secs, narrow, overhead = measure_tail(m, x, layers, ops, device=torch.device("cpu"), threads=1, repeats=3)
    tail = Tail.from_times(ops, secs, overhead, narrow)
    assert set(tail.fixed) == {"conv"} and tail.other == 0.0
    assert tail.of("conv", 64, 64) > 1.5 * tail.of("conv", 16, 64)


def test_an_op_that_cannot_be_timed_counts_zero_with_a_warning():
    m, x = Block().eval(), torch.randn(1, 3, 8, 8)
    layers = _layers(m, x)
    ops = record_tail(m, x, layers)

    class Refuses(FakeTimer):
        def __call__(self, call, number):
            out = call()
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 32:  # the flatten
                raise RuntimeError("cannot run twice")
            return super().__call__(lambda: out, number)
    with pytest.warns(UserWarning, match="flatten"):
        secs, _, _ = measure_tail(m, x, layers, ops, device=torch.device("cpu"), repeats=1, warmup=0,
                                  timer=Refuses())
    assert [s for o, s in zip(ops, secs) if o.op == "aten.flatten.using_ints"] == [0.0]
    assert all(s > 0 for o, s in zip(ops, secs) if o.op != "aten.flatten.using_ints")


@given(st.lists(st.floats(1e-6, 1e-3), min_size=8, max_size=8), st.floats(0, 1e-3), st.floats(0, 1e-3))
@settings(max_examples=50, deadline=None)
def test_whole_model_estimate_is_monotone_where_the_measurements_are(steps, fixed, scaled):
    """Layer curves that never decrease with more channels plus a tail: the group cost never decreases either."""
    a = LayerSpec("linear", 4, 8, (1, 4), (1, 8), (True,))
    b = LayerSpec("linear", 8, 4, (1, 8), (1, 4), (True,))
    rising = [sum(steps[:k]) for k in range(1, 9)]
    store = {a.key(): {"out": {str(k): rising[k - 1] for k in range(1, 9)}, "in": {str(k): 1.0 for k in range(1, 5)}},
             b.key(): {"out": {str(k): 1.0 for k in range(1, 5)}, "in": {str(k): rising[k - 1] for k in range(1, 9)}}}
    t = LatencyTable.from_measurements({"a": a, "b": b}, store)
    t.tail = Tail({"a": fixed}, {"a": scaled}, other=1e-4)
    cost = t.cost_fn([[("a", "out"), ("b", "in")]], "latency")
    values = [cost([k]) for k in range(1, 9)]
    assert all(y >= x for x, y in zip(values, values[1:]))
    assert values[-1] == pytest.approx(t.total())
