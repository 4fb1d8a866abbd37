"""Schedules: formula values from the papers' formulas (computed independently here), validation,
the scheduler driving prune, and state_dict round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import PruningError, masks_of
from secateur.schedules import GMP, Iterative, Linear, OneShot, PruningScheduler, schedule_from_dict


def zhu_gupta(t, s_i, s_f, t0, dt, n):
    """Zhu & Gupta 2017 eq. 1, written directly from the paper for t in {t0, t0+dt, ..., t0+n dt}."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("s_i,s_f,t0,dt,n", [(0.0, 0.9, 100, 10, 20), (0.1, 0.75, 0, 1, 7), (0.3, 0.3, 5, 3, 4)])
def test_gmp_matches_paper_at_update_steps(s_i, s_f, t0, dt, n):
    sched = GMP(final=s_f, initial=s_i, start=t0, end=t0 + n * dt, frequency=dt)
    for k in range(n + 1):
        t = t0 + k * dt
        assert sched.changes_at(t)
        assert sched.sparsity_at(t) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, dt, n), abs=1e-12)
        # held constant between updates
        if k < n:
            for u in range(t + 1, t + dt):
                assert not sched.changes_at(u)
                assert sched.sparsity_at(u) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, dt, n), abs=1e-12)
    assert sched.sparsity_at(t0 - 1) == 0.0
    assert sched.sparsity_at(t0 + n * dt + 1000) == pytest.approx(s_f)


def test_gmp_known_values():
    # hand-evaluated: s_f=0.8, s_i=0, halfway -> 0.8 * (1 - 0.5**3) = 0.7
    g = GMP(final=0.8, start=0, end=10, frequency=1)
    assert g.sparsity_at(5) == pytest.approx(0.7)
    assert g.sparsity_at(0) == 0.0 and g.sparsity_at(10) == pytest.approx(0.8)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(0, 50), st.integers(0, 80), st.integers(1, 9))
def test_ramps_monotone_and_bounded(a, b, start, length, freq):
    s_i, s_f = min(a, b), max(a, b)
    for cls in (GMP, Linear):
        sched = cls(final=s_f, initial=s_i, start=start, end=start + length, frequency=freq)
        vals = [sched.sparsity_at(t) for t in range(start, start + length + 2)]
        assert all(x <= y + 1e-12 for x, y in zip(vals, vals[1:]))
        # a zero-length ramp (end == start) is a one-shot jump to the final sparsity
        assert vals[0] == pytest.approx(s_i if length else s_f) and vals[-1] == pytest.approx(s_f)
        assert all(s_i - 1e-12 <= v <= s_f + 1e-12 for v in vals)


def test_linear_values():
    lin = Linear(final=0.6, initial=0.2, start=10, end=30, frequency=5)
    assert lin.sparsity_at(10) == pytest.approx(0.2)
    assert lin.sparsity_at(24) == pytest.approx(0.2 + 0.4 * 10 / 20)
    assert lin.sparsity_at(30) == pytest.approx(0.6)


def test_iterative_geometric_keeps_same_fraction_each_round():
    it = Iterative(final=0.9, steps=4, start=2, every=3)
    levels = [it.sparsity_at(2 + 3 * k) for k in range(4)]
    keep = [1 - s for s in levels]
    ratios = [keep[0]] + [keep[i + 1] / keep[i] for i in range(3)]
    assert all(r == pytest.approx(0.1 ** 0.25) for r in ratios)
    assert levels[-1] == pytest.approx(0.9)
    assert [t for t in range(30) if it.changes_at(t)] == [2, 5, 8, 11]
    lin = Iterative(final=0.8, steps=4, mode="linear")
    assert [lin.sparsity_at(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_paddleslim_phases():
    g = GMP.phases(final=0.75, stable=100, pruning=300, tuning=200, updates=30)
    assert (g.start, g.end, g.frequency) == (100, 400, 10)
    assert g.sparsity_at(99) == 0 and g.sparsity_at(400) == pytest.approx(0.75)
    assert g.sparsity_at(599) == pytest.approx(0.75)
    assert sum(g.changes_at(t) for t in range(600)) == 31


@pytest.mark.parametrize("make,match", [
    (lambda: GMP(final=0.9, start=10, end=5), "end step precedes"),
    (lambda: Linear(final=0.9, start=10, end=5), "end step precedes"),
    (lambda: GMP(final=0.3, initial=0.5, start=0, end=5), "below initial"),
    (lambda: Linear(final=0.3, initial=0.5, end=5), "below initial"),
    (lambda: GMP(final=1.5, end=5), "sparsity in"),
    (lambda: GMP(final=0.5, end=5, frequency=0), "frequency"),
    (lambda: Iterative(final=0.5, steps=0), "steps"),
    (lambda: Iterative(final=0.5, steps=2, mode="cubic"), "mode"),
    (lambda: OneShot(sparsity=-0.1), "sparsity"),
    (lambda: GMP.phases(final=0.5, stable=-1, pruning=3), "stable"),
])
def test_schedule_validation(make, match):
    with pytest.raises(PruningError, match=match):
        make()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


def _sparsity(model):
    m = masks_of(model)
    if not m:
        return 0.0
    return sum(int((~v).sum()) for v in m.values()) / sum(v.numel() for v in m.values())


@pytest.mark.parametrize("d, match", [
    (None, "a schedule dict is needed"),
    ({"kind": "gmp", "final": 0.5, "end": 5, "bogus": 1}, "unknown field 'bogus' for schedule 'gmp'"),
    ({"kind": "gmp"}, "missing field 'final' for schedule 'gmp'"),
    ({"kind": "iterative", "final": 0.5}, "missing field 'steps'"),
    ({"kind": "zz"}, "unknown schedule kind"),
])
def test_schedule_from_dict_refuses_bad_dicts(d, match):
    with pytest.raises(PruningError, match=match):
        schedule_from_dict(d)


def test_scheduler_load_state_dict_refuses_bad_applied_unchanged():
    ps = PruningScheduler(_net(), Linear(final=0.5, end=10))
    before = ps.state_dict()
    state = {**before, "step": 3, "applied": [["x", 0.1]]}
    with pytest.raises(PruningError, match="not a PruningScheduler state"):
        ps.load_state_dict(state)
    assert ps.state_dict() == before


def test_scheduler_drives_prune_to_schedule():
    model = _net()
    sched = GMP(final=0.8, start=2, end=12, frequency=2)
    ps = PruningScheduler(model, sched, scope="global")
    for t in range(20):
        ps.step()
        if t >= 2:
            assert _sparsity(model) == pytest.approx(sched.sparsity_at(t), abs=1 / 900)
    assert [a[0] for a in ps.applied] == [4, 6, 8, 10, 12]  # step 2 has s=initial=0: nothing to prune


def test_scheduler_state_roundtrip_and_mismatch():
    model = _net()
    ps = PruningScheduler(model, Linear(final=0.5, end=10))
    for _ in range(4):
        ps.step()
    state = ps.state_dict()
    torch.save(state, "/dev/null")  # plain data
    assert schedule_from_dict(state["schedule"]) == Linear(final=0.5, end=10)
    other = PruningScheduler(_net(), Linear(final=0.5, end=10))
    other.load_state_dict(state)
    assert other.state_dict() == state
    wrong = PruningScheduler(_net(), GMP(final=0.5, end=10))
    before = wrong.state_dict()
    with pytest.raises(PruningError, match="different schedule"):
        wrong.load_state_dict(state)
    assert wrong.state_dict() == before
    with pytest.raises(PruningError, match="not a PruningScheduler state"):
        wrong.load_state_dict({"step": 1})


def test_scheduler_with_custom_prune_fn():
    calls = []
    ps = PruningScheduler(_net(), OneShot(0.5, at=3), prune_fn=lambda m, s: calls.append(s))
    for _ in range(6):
        ps.step()
    assert calls == [0.5]
    with pytest.raises(PruningError, match="not both"):
        PruningScheduler(_net(), OneShot(0.5), prune_fn=lambda m, s: None, scope="global")


def test_scheduler_channel_pruning_through_the_structural_engine():
    pytest.importorskip("secateur.structured")
    from secateur.schedules import channel_pruning
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    ps = PruningScheduler(model, Iterative(final=0.75, steps=2, mode="linear"), prune_fn=channel_pruning(x))
    ps.step()   # 37.5 % of the original channels gone
    widths = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    assert widths == [10, 10]
    ps.step()   # 75 % of the original channels gone, not 75 % of the survivors
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [4, 4]
    assert model(x).shape == (2, 5)


def test_scheduler_refuses_unknown_prune_options_up_front():
    model = _net()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="prune\\(\\) takes no option 'foo'"):
        PruningScheduler(model, GMP(final=0.5, end=10), foo=1)
    with pytest.raises(PruningError, match="takes no option 'amount' \\(the schedule sets it\\)"):
        PruningScheduler(model, GMP(final=0.5, end=10), amount=0.3)
    assert not masks_of(model) and all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_channel_pruning_refuses_unknown_options_when_built():
    from secateur.schedules import channel_pruning
    with pytest.raises(PruningError, match="prune_channels\\(\\) takes no option 'bogus'"):
        channel_pruning(torch.randn(1, 3, 8, 8), bogus=1)
