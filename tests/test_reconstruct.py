"""Feature-map reconstruction: the closed form against torch.linalg.lstsq, lower output error than plain
removal (measured by running the layer, not by trusting the returned numbers), the channel-error Gram
against brute force, and underdetermined calibration handling."""

import pytest
import torch
from torch import nn

from secateur import PruningError, finalize, get_mask
from secateur.reconstruct import capture_inputs, channel_errors, choose_channels, fit_weights, reconstruct_


def test_fit_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64)
    y = torch.randn(200, 3, generator=g, dtype=torch.float64)
    w, b = fit_weights(x, y, ridge=0.0, fit_bias=True)
    aug = torch.cat([x, torch.ones(200, 1, dtype=x.dtype)], 1)
    ref = torch.linalg.lstsq(aug, y).solution
    assert torch.allclose(w, ref[:7].T, atol=1e-8) and torch.allclose(b, ref[7], atol=1e-8)
    w0, b0 = fit_weights(x, y, ridge=0.0, fit_bias=False)
    assert b0 is None and torch.allclose(w0, torch.linalg.lstsq(x, y).solution.T, atol=1e-8)
    # ridge: matches the regularised normal equations
    lam = 0.1 * float((x.T @ x).diagonal().mean())
    wr, _ = fit_weights(x, y, ridge=0.1, fit_bias=False)
    assert torch.allclose(wr, torch.linalg.solve(x.T @ x + lam * torch.eye(7, dtype=x.dtype), x.T @ y).T, atol=1e-8)


def _correlated(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c // 2, generator=g)
    mix = torch.randn(c // 2, c, generator=g)
    return torch.relu(base @ mix + 0.3 * torch.randn(n, c, generator=g))


def _out_err(layer, x, y):
    with torch.no_grad():
        return float((layer(x) - y).pow(2).sum() / y.pow(2).sum())


def test_linear_reconstruction_beats_plain_removal():
    torch.manual_seed(0)
    layer = nn.Linear(16, 5)
    x = _correlated(400, 16)
    with torch.no_grad():
        y = layer(x)
    keep = torch.ones(16, dtype=torch.bool)
    keep[::2] = False
    plain = nn.Linear(16, 5)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        plain.weight[:, ~keep] = 0
    errs = reconstruct_(layer, x, keep, ridge=0.0)
    assert errs["plain"] == pytest.approx(_out_err(plain, x, y), rel=1e-4)
    assert errs["reconstructed"] == pytest.approx(_out_err(layer, x, y), rel=1e-4, abs=1e-7)
    assert _out_err(layer, x, y) < 0.5 * _out_err(plain, x, y)
    assert bool((layer.weight[:, ~keep] == 0).all())
    assert torch.equal(get_mask(layer, "weight")[0], keep)
    finalize(layer)
    assert bool((layer.weight[:, ~keep] == 0).all())


def test_conv_reconstruction_matches_forward_and_beats_plain():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1, stride=2)
    x = torch.relu(torch.randn(20, 3, 9, 9)).repeat(1, 2, 1, 1) + 0.1 * torch.randn(20, 6, 9, 9)
    with torch.no_grad():
        y = conv(x)
    keep = torch.tensor([True, True, True, False, False, True])
    plain = nn.Conv2d(6, 4, 3, padding=1, stride=2)
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        plain.weight[:, ~keep] = 0
    errs = reconstruct_(conv, x, keep)
    assert errs["reconstructed"] == pytest.approx(_out_err(conv, x, y), rel=1e-3, abs=1e-6)
    assert errs["plain"] == pytest.approx(_out_err(plain, x, y), rel=1e-4)
    assert _out_err(conv, x, y) < 0.5 * _out_err(plain, x, y)
    assert bool((conv.weight[:, ~keep] == 0).all())


def test_channel_error_gram_is_exact():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 3, 3)
    x = torch.randn(4, 5, 7, 7)
    g = channel_errors(conv, x)
    for removed in ([1], [0, 3], [1, 2, 4]):
        ref = nn.Conv2d(5, 3, 3, bias=False)
        with torch.no_grad():
            ref.weight.copy_(conv.weight)
            full = ref(x)
            ref.weight[:, removed] = 0
            diff = float((full - ref(x)).double().pow(2).sum())
        assert float(g[removed][:, removed].sum()) == pytest.approx(diff, rel=1e-4)


def test_greedy_choice_not_worse_than_l1_and_validated():
    torch.manual_seed(3)
    lin = nn.Linear(12, 4)
    x = _correlated(300, 12, seed=3)
    g = channel_errors(lin, x)
    kg = choose_channels(lin, x, 6, method="greedy")
    kl = choose_channels(lin, x, 6, method="l1")
    assert int(kg.sum()) == 6 and int(kl.sum()) == 6
    cost = lambda keep: float(g[~keep][:, ~keep].sum())  # noqa: E731
    assert cost(kg) <= cost(kl) + 1e-9
    with pytest.raises(PruningError, match="n_keep"):
        choose_channels(lin, x, 0)
    with pytest.raises(PruningError, match="unknown channel choice"):
        choose_channels(lin, x, 3, method="magic")


def test_underdetermined_warns_and_regularises_or_refuses():
    torch.manual_seed(4)
    lin = nn.Linear(30, 3)
    x = torch.randn(10, 30)  # 10 rows, 20+1 unknowns after keeping 20 channels
    keep = torch.arange(30) < 20
    snap = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(PruningError, match="underdetermined"):
        reconstruct_(lin, x, keep, underdetermined="error")
    assert all(torch.equal(snap[k], v) for k, v in lin.state_dict().items())
    with pytest.warns(UserWarning, match="underdetermined"):
        errs = reconstruct_(lin, x, keep, ridge=0.0)
    assert torch.isfinite(lin.weight).all() and errs["reconstructed"] <= errs["plain"]


def test_bad_inputs_leave_layer_unchanged():
    lin = nn.Linear(4, 2)
    snap = lin.weight.detach().clone()
    with pytest.raises(PruningError, match="boolean vector"):
        reconstruct_(lin, torch.randn(8, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(PruningError, match="every input channel"):
        reconstruct_(lin, torch.randn(8, 4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(PruningError, match="in_features"):
        reconstruct_(lin, torch.randn(8, 5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(PruningError, match="groups=1"):
        reconstruct_(nn.Conv2d(4, 4, 3, groups=2), torch.randn(2, 4, 5, 5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(PruningError, match="ridge"):
        reconstruct_(lin, torch.randn(8, 4), torch.ones(4, dtype=torch.bool), ridge=-1)
    assert torch.equal(lin.weight, snap)


def test_capture_inputs():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    batches = [(torch.randn(4, 3), torch.zeros(4)) for _ in range(3)]
    got = capture_inputs(model, model[2], batches)
    with torch.no_grad():
        ref = torch.cat([model[1](model[0](b[0])) for b in batches])
    assert torch.equal(got, ref)
