"""Training helpers: masks held through momentum SGD with weight decay, distillation loss against its
formula, the iterative loop stopping at the bound and returning the previous model, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import PruningError, get_mask, masks_of, prune
from secateur.data import load_digits
from secateur.masks import original
from secateur.schedules import GMP, PruningScheduler
from secateur.training import (checkpoint, distillation_loss, evaluate, fine_tune, iterative_prune,
                               load_checkpoint, plain_state, resume, save_checkpoint)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    ds = load_digits(seed=0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(ds.y_train), generator=g)
    train = [(ds.x_train[perm[i:i + 64]], ds.y_train[perm[i:i + 64]]) for i in range(0, len(perm), 64)]
    test = [(ds.x_test, ds.y_test)]
    return train, test


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_masks_held_through_momentum_sgd_with_weight_decay(digits):
    train, _ = digits
    model = _mlp()
    fine_tune(model, train[:5], torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)
    prune(model, amount=0.7)
    masks = {k: v.clone() for k, v in masks_of(model).items()}
    # the stored values under the masks are still non-zero here: only reapply zeroes them
    assert any(bool((original(m, "weight")[~get_mask(m, "weight")] != 0).any()) for m in (model[0], model[2]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    before = [p.clone() for p in model.parameters()]
    fine_tune(model, train, opt, epochs=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it did train
    for key, mask in masks_of(model).items():
        assert torch.equal(mask, masks[key])
    for m in (model[0], model[2]):
        keep = get_mask(m, "weight")
        assert bool((m.weight[~keep] == 0).all())                      # effective weights
        assert bool((original(m, "weight")[~keep] == 0).all())         # and the stored values
        assert bool((opt.state[original(m, "weight")]["momentum_buffer"][~keep] == 0).all())


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    T, a = 3.0, 0.3
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ref = (1 - a) * F.cross_entropy(s, y) + a * T * T * kl
    assert torch.allclose(distillation_loss(s, t, y, alpha=a, temperature=T), ref, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))


def test_fine_tune_with_teacher_leaves_teacher_unchanged(digits):
    train, test = digits
    teacher = _mlp(1)
    fine_tune(teacher, train, torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9), epochs=2)
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _mlp(2)
    prune(student, amount=0.5)
    fine_tune(student, train, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9), epochs=2,
              teacher=teacher, alpha=0.7)
    assert all(torch.equal(snap[k], v) for k, v in teacher.state_dict().items())
    assert evaluate(student, test) > 0.5
    with pytest.raises(PruningError, match="alpha"):
        fine_tune(student, train, torch.optim.SGD(student.parameters(), lr=0.1), teacher=teacher, alpha=2.0)


def test_fine_tune_drives_scheduler(digits):
    train, _ = digits
    model = _mlp()
    sched = PruningScheduler(model, GMP(final=0.8, start=0, end=20, frequency=5), scope="global")
    fine_tune(model, train, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=1, scheduler=sched)
    assert sched.step_count == len(train)
    m = masks_of(model)
    assert sum(int((~v).sum()) for v in m.values()) == round(0.8 * sum(v.numel() for v in m.values()))


def test_iterative_loop_stops_at_bound_and_returns_previous_model(digits):
    train, test = digits
    model = _mlp()
    fine_tune(model, train, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=3)
    model, hist = iterative_prune(model, train, test, make_optimizer=lambda m: torch.optim.SGD(
        m.parameters(), lr=0.01, momentum=0.9), rate=0.6, target=0.9999, max_drop=0.02, epochs=1,
        example_inputs=torch.zeros(1, 64), scope="global")
    assert hist[0]["round"] == 0 and hist[0]["accepted"]
    assert not hist[-1]["accepted"] and hist[-1]["drop"] > 0.02          # stopped at the bound
    assert all(h["accepted"] and h["drop"] <= 0.02 for h in hist[:-1])
    assert len(hist) >= 3                                                  # some rounds did pass
    last_ok = hist[-2]
    assert evaluate(model, test) == pytest.approx(last_ok["accuracy"])     # the previous model came back
    nz = sum(int(torch.count_nonzero(p)) for p in (model[0].weight, model[2].weight, model[0].bias, model[2].bias))
    assert nz == last_ok["nonzero"]
    assert last_ok["macs"] < hist[0]["macs"]
    # targets follow the geometric rate: keep (1 - 0.6)^r
    for h in hist[1:]:
        assert h["target"] == pytest.approx(1 - 0.4 ** h["round"])


def test_iterative_loop_reaches_target(digits):
    train, test = digits
    model = _mlp()
    fine_tune(model, train, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=2)
    model, hist = iterative_prune(model, train, test, make_optimizer=lambda m: torch.optim.SGD(
        m.parameters(), lr=0.01, momentum=0.9), rate=0.5, target=0.6, max_drop=0.5)
    assert [h["target"] for h in hist] == pytest.approx([0.0, 0.5, 0.6])
    assert hist[-1]["accepted"]
    with pytest.raises(PruningError, match="rate"):
        iterative_prune(model, train, test, make_optimizer=None, rate=1.5)


def test_checkpoint_roundtrip_and_refuses_other_model(tmp_path, digits):
    train, _ = digits
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = PruningScheduler(model, GMP(final=0.7, end=10, frequency=2))
    fine_tune(model, train[:7], opt, scheduler=sched)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, scheduler=sched, optimizer=opt, history=[{"round": 1, "accuracy": 0.5}])
    ck = load_checkpoint(path)  # weights_only=True: plain data
    fresh = _mlp(seed=5)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    sched2 = PruningScheduler(fresh, GMP(final=0.7, end=10, frequency=2))
    hist = resume(fresh, ck, scheduler=sched2, optimizer=opt2)
    assert hist == [{"round": 1, "accuracy": 0.5}]
    assert sched2.state_dict() == sched.state_dict()
    assert masks_of(fresh).keys() == masks_of(model).keys()
    assert all(torch.equal(masks_of(fresh)[k], v) for k, v in masks_of(model).items())
    assert all(torch.equal(plain_state(fresh)[k], v) for k, v in plain_state(model).items())
    # a different model: refused, untouched
    other = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PruningError, match="different model"):
        resume(other, ck)
    assert all(torch.equal(snap[k], v) for k, v in other.state_dict().items())
    # a different schedule: refused before the model changes
    m3 = _mlp(seed=9)
    other_sched = PruningScheduler(m3, GMP(final=0.9, end=10))
    snap3 = {k: v.clone() for k, v in m3.state_dict().items()}
    with pytest.raises(PruningError, match="different schedule"):
        resume(m3, ck, scheduler=other_sched)
    assert all(torch.equal(snap3[k], v) for k, v in m3.state_dict().items())
    with pytest.raises(PruningError, match="not a secateur checkpoint"):
        resume(m3, {"weights": {}})
    assert checkpoint(model)["format"] == ck["format"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], v) for k, v in snap.items())


def _pruned_checkpoint(**kw):
    model = _mlp()
    prune(model, 0.5)
    ck = checkpoint(model, **kw)
    return {**ck, "weights": {k: v.clone() for k, v in ck["weights"].items()}}


@pytest.mark.parametrize("spoil, match", [
    (lambda ck: ck["weights"].pop("2.bias"), "weights do not match its fingerprint"),
    (lambda ck: ck["weights"].__setitem__("2.bias", torch.zeros(3)), r"\[2.bias\] checkpoint tensor does not fit"),
    (lambda ck: ck.pop("fingerprint"), "has no 'fingerprint' dict"),
    (lambda ck: ck.__setitem__("masks", None), "has no 'masks' dict"),
    (lambda ck: ck["masks"].__setitem__("1.weight", torch.ones(3, dtype=torch.bool)), "mask does not fit"),
    (lambda ck: ck.__setitem__("history", 5), "history is not a list"),
])
def test_resume_refuses_a_broken_checkpoint_before_touching_the_model(spoil, match):
    ck = _pruned_checkpoint()
    spoil(ck)
    model = _mlp(seed=3)
    prune(model, 0.8)
    masks, snap = {k: v.clone() for k, v in masks_of(model).items()}, _state(model)
    with pytest.raises(PruningError, match=match):
        resume(model, ck)
    assert _same(model, snap)  # masks still attached (their buffers are in the state_dict), weights as before
    assert masks_of(model).keys() == masks.keys()


def test_resume_refuses_a_mismatched_optimizer_before_touching_anything():
    src = _mlp()
    prune(src, 0.5)
    ck = checkpoint(src, optimizer=torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9))
    model = _mlp(seed=3)
    prune(model, 0.8)
    snap = _state(model)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(PruningError, match="optimizer state does not fit this optimizer"):
        resume(model, ck, optimizer=opt)
    assert _same(model, snap)
    with pytest.raises(PruningError, match="no optimizer state"):
        resume(model, checkpoint(src), optimizer=opt)
    assert _same(model, snap)


def test_resume_refuses_foreign_parametrizations_unchanged():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    ck = _pruned_checkpoint()
    model = _mlp(seed=3)
    parametrize.register_parametrization(model[0], "weight", Double())
    snap = _state(model)
    with pytest.raises(PruningError, match=r"\[0.weight\] resume handles only secateur masks"):
        resume(model, ck)
    assert _same(model, snap)


def test_load_checkpoint_names_the_path_of_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(PruningError, match="no such checkpoint file.*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PruningError, match="cannot read the file as a checkpoint.*garbage.pt"):
        load_checkpoint(bad)


def test_fine_tune_refuses_empty_data():
    model = _mlp()
    snap = _state(model)
    with pytest.raises(PruningError, match="training data is empty"):
        fine_tune(model, [], torch.optim.SGD(model.parameters(), lr=0.1))
    assert _same(model, snap)


def test_fine_tune_refuses_a_one_shot_iterator_for_several_epochs(digits):
    train, _ = digits
    model = _mlp()
    with pytest.raises(PruningError, match="no batch in epoch 2.*re-iterable"):
        fine_tune(model, iter(train[:2]), torch.optim.SGD(model.parameters(), lr=0.1), epochs=2)
