"""Least-squares feature-map reconstruction (ThiNet, Luo et al. 2017; He et al. 2017).

When input channels of a layer are removed, the remaining weights were trained to work *with* the
removed ones. Re-fitting them in closed form so that the layer's output on calibration data matches the
original output recovers much of the lost accuracy without any training. Everything is a few matrix
products and one ridge solve on the tensor's own device.

The layer's input is unfolded into rows ``X`` (``[N, C]`` for Linear, ``[N*L, C*kh*kw]`` patches for
Conv2d); the target is the original output ``Y = X W^T``; the fit is
``min ||X_keep W'^T + b - Y||^2 + ridge * ||W'||^2``."""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import fail
from secateur.masks import get_mask, original, set_mask


def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise fail("reconstruction supports only groups=1 convolutions", where=type(layer).__name__,
                       value=layer.groups)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise fail("reconstruction needs numeric zero padding", where=type(layer).__name__,
                       value=(layer.padding_mode, layer.padding))
        return
    raise fail("reconstruction supports Linear and Conv2d layers", where=type(layer).__name__)


def _rows(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Inputs as regression rows; columns are ordered channel-major (``c * K + k``)."""
    _finite_rows(inputs, type(layer).__name__, "inputs")
    if isinstance(layer, nn.Linear):
        if inputs.dim() < 2 or inputs.shape[-1] != layer.in_features:
            raise fail("inputs do not match the layer's in_features", where="Linear", shape=inputs.shape,
                       value=layer.in_features)
        return inputs.reshape(-1, layer.in_features)
    if inputs.dim() != 4 or inputs.shape[1] != layer.in_channels:
        raise fail("inputs must be [N, in_channels, H, W]", where="Conv2d", shape=inputs.shape,
                   value=layer.in_channels)
    cols = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # [N, C*K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _finite_rows(t: torch.Tensor, where: str, what: str) -> None:
    """Calibration data must be a non-empty tensor of finite values: a NaN would become the fitted weights."""
    if not isinstance(t, torch.Tensor):
        raise fail(f"{what} must be a tensor", where=where, value=type(t).__name__)
    if t.numel() == 0:
        raise fail(f"{what} are empty: the fit needs calibration rows", where=where, shape=t.shape)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise fail(f"{what} hold NaN or inf", where=where, shape=t.shape,
                   hint="check the calibration data with torch.isfinite")


def _weight2d(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()  # effective (masked) weight: the layer's current function
    return w.reshape(w.shape[0], -1)


def _kernel(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else math.prod(layer.kernel_size)


def _check_keep(layer: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    c = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or tuple(keep.shape) != (c,):
        raise fail("keep must be a boolean vector over the layer's input channels", where=type(layer).__name__,
                   shape=keep.shape, value=keep.dtype)
    if not bool(keep.any()):
        raise fail("keep removes every input channel", where=type(layer).__name__, shape=keep.shape)
    return keep


def capture_inputs(model: nn.Module, layer: nn.Module, batches: Iterable, *, max_batches: int | None = None
                   ) -> torch.Tensor:
    """Run ``model`` on calibration batches (tensors, or ``(x, y)`` pairs) and return what ``layer``
    received, concatenated along the batch dimension."""
    if not isinstance(model, nn.Module) or not isinstance(layer, nn.Module):
        raise fail("model and layer must be nn.Modules", where="capture_inputs",
                   value=(type(model).__name__, type(layer).__name__))
    if not any(m is layer for m in model.modules()):
        raise fail("layer is not part of the model", where="capture_inputs", value=type(layer).__name__)
    if batches is None or isinstance(batches, (str, bytes)):
        raise fail("batches is an iterable of tensors or (x, y) pairs", where="capture_inputs",
                   value=type(batches).__name__)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                model(b[0] if isinstance(b, (tuple, list)) else b)
    finally:
        handle.remove()
    if not seen:
        raise fail("no calibration batch reached the layer", where=type(layer).__name__)
    return torch.cat(seen)


def channel_errors(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``G[i, j] = <contribution of input channel i, contribution of channel j>`` summed over all rows
    and outputs, so removing the set T (no refit) costs exactly ``G[T][:, T].sum()`` squared error.
    Built from the input Gram matrix and ``W^T W``: no per-channel forward passes."""
    _check_layer(layer)
    x = _rows(layer, inputs).to(torch.float64)
    w = _weight2d(layer).to(torch.float64)
    k = _kernel(layer)
    h = (x.T @ x) * (w.T @ w)
    c = h.shape[0] // k
    return h.reshape(c, k, c, k).sum(dim=(1, 3))


def choose_channels(layer: nn.Module, inputs: torch.Tensor, n_keep: int, *, method: str = "greedy"
                    ) -> torch.Tensor:
    """Which input channels to keep: ``"greedy"`` (ThiNet: repeatedly remove the channel that adds the
    least output error given those already removed) or ``"l1"`` (largest L1 norm of the weight columns)."""
    _check_layer(layer)
    c = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= c:
        raise fail(f"n_keep must be an integer in [1, {c}]", where=type(layer).__name__, value=n_keep)
    if method not in _CHOOSERS:
        raise fail("unknown channel choice method", where=type(layer).__name__, value=method,
                   hint=f"known: {sorted(_CHOOSERS)}")
    return _CHOOSERS[method](layer, inputs, n_keep)


def _greedy(layer: nn.Module, inputs: torch.Tensor, n_keep: int) -> torch.Tensor:
    g = channel_errors(layer, inputs)
    c = g.shape[0]
    removed = torch.zeros(c, dtype=torch.bool, device=g.device)
    cross = torch.zeros(c, dtype=g.dtype, device=g.device)  # sum over removed t of G[t, c]
    diag = g.diagonal()
    for _ in range(c - n_keep):
        cost = (2 * cross + diag).masked_fill(removed, math.inf)
        j = int(torch.argmin(cost))
        removed[j] = True
        cross += g[j]
    return ~removed


def _l1(layer: nn.Module, inputs: torch.Tensor, n_keep: int) -> torch.Tensor:
    w = _weight2d(layer).abs()
    score = w.reshape(w.shape[0], -1, _kernel(layer)).sum(dim=(0, 2))
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[torch.topk(score, n_keep).indices] = True
    return keep


_CHOOSERS = {"greedy": _greedy, "l1": _l1}


def _check_ridge(ridge, where: str) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise fail("ridge must be a finite number >= 0", where=where, value=ridge)


def fit_weights(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-6, fit_bias: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form ridge regression ``y ~ x @ W^T + b``; ``ridge`` is relative to the mean diagonal of
    ``x^T x`` so it means the same at any input scale. Returns ``(W [out, in], b [out] or None)``."""
    _check_ridge(ridge, "fit_weights")
    _finite_rows(x, "fit_weights", "x")
    _finite_rows(y, "fit_weights", "y")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise fail("x [rows, in] and y [rows, out] need the same number of rows", where="fit_weights",
                   shape=tuple(x.shape), value=tuple(y.shape))
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    if fit_bias:
        x64 = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=x64.dtype, device=x64.device)], dim=1)
    a = x64.T @ x64
    n_w = x.shape[1]
    scale = float(a.diagonal()[:n_w].mean()) if n_w else 0.0
    reg = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    reg[:n_w] = ridge * (scale if scale > 0 else 1.0)
    a = a + torch.diag(reg)
    sol = torch.linalg.lstsq(a, x64.T @ y64).solution if ridge == 0 else torch.linalg.solve(a, x64.T @ y64)
    w = sol[:n_w].T.to(x.dtype)
    b = sol[n_w].to(x.dtype) if fit_bias else None
    return w, b


def reconstruct_(layer: nn.Module, inputs: torch.Tensor, keep: torch.Tensor, *, ridge: float = 1e-6,
                 fit_bias: bool = True, underdetermined: str = "warn") -> dict[str, float]:
    """Remove the input channels of ``layer`` where ``keep`` is False and re-fit the rest in place so
    the output on ``inputs`` (the layer's original inputs) matches the original output.

    The removed columns are masked (a `secateur` mask on ``weight``), so ``finalize`` or the structural
    engine can drop them. With fewer rows than unknowns ``underdetermined="warn"`` warns and makes sure
    the fit is regularised; ``"error"`` refuses. Returns relative output errors ``plain`` (removal
    without re-fit) and ``reconstructed``."""
    _check_layer(layer)
    keep = _check_keep(layer, keep)
    if underdetermined not in ("warn", "error"):
        raise fail("underdetermined must be 'warn' or 'error'", where=type(layer).__name__, value=underdetermined)
    _check_ridge(ridge, type(layer).__name__)
    fit_bias = fit_bias and layer.bias is not None
    w_param = original(layer, "weight")
    keep = keep.to(w_param.device)
    with torch.no_grad():
        x = _rows(layer, inputs.to(w_param.device, w_param.dtype))
        w = _weight2d(layer)
        k = _kernel(layer)
        cols = keep.repeat_interleave(k)
        bias = layer.bias.detach() if layer.bias is not None else None
        y = x @ w.T + (bias if bias is not None else 0)
        # an earlier mask on ``weight`` stays (masks never regrow): each output row is fitted on its own unmasked
        # kept columns, else the mask would zero part of the fit afterwards (rows alike share one solve)
        old = get_mask(layer, "weight")
        row_cols = cols.expand(w.shape[0], -1) if old is None else old.reshape(w.shape[0], -1) & cols
        patterns, which = torch.unique(row_cols, dim=0, return_inverse=True)
        unknowns = int(patterns.sum(1).max()) + int(fit_bias)
        if x.shape[0] < unknowns:
            msg = (f"{x.shape[0]} calibration rows for {unknowns} unknowns per output: the least-squares "
                   f"fit is underdetermined")
            if underdetermined == "error":
                raise fail(msg, where=type(layer).__name__, shape=inputs.shape, value=x.shape[0],
                           hint="pass more calibration samples or underdetermined='warn'")
            warnings.warn(msg + "; regularising (ridge >= 1e-3)", stacklevel=2)
            ridge = max(ridge, 1e-3)
        # without a fitted bias the existing bias stays, so fit the rest of the output
        target = y - bias if (bias is not None and not fit_bias) else y
        full = torch.zeros_like(w)
        b_new = torch.zeros_like(target[0]) if fit_bias else None
        for i, pattern in enumerate(patterns):
            rows = torch.nonzero(which == i).flatten()
            if not bool(pattern.any()):  # nothing left to fit but the bias: the mean
                if fit_bias:
                    b_new[rows] = target[:, rows].mean(0)
                continue
            w_r, b_r = fit_weights(x[:, pattern], target[:, rows], ridge=ridge, fit_bias=fit_bias)
            full[rows.unsqueeze(1), torch.nonzero(pattern).flatten().unsqueeze(0)] = w_r
            if fit_bias:
                b_new[rows] = b_r
        plain = x[:, cols] @ w[:, cols].T + (bias if bias is not None else 0)
        recon = x @ full.T + (b_new if b_new is not None else (bias if bias is not None else 0))
        denom = float(y.pow(2).sum()) or 1.0
        errors = {"plain": float((plain - y).pow(2).sum()) / denom,
                  "reconstructed": float((recon - y).pow(2).sum()) / denom}
        # compute first, then apply
        w_param.copy_(full.reshape(w_param.shape))
        if b_new is not None:
            original(layer, "bias").copy_(b_new)
        shape = [1, -1] + [1] * (w_param.dim() - 2)
        channel_keep = keep.reshape(shape).expand_as(w_param)
        set_mask(layer, "weight", channel_keep if old is None else channel_keep & old)
    return errors
