"""SparseGPT (Frantar & Alistarh 2023): prune one Linear weight and update the survivors so that the
layer's output on the calibration inputs changes as little as possible.

The layer-wise objective ``||WX - W'X||^2`` has Hessian ``H = 2 X X^T`` (per input feature pair). The
optimal-brain-surgeon update for removing weight ``w_q`` is ``-w_q / [H^-1]_qq * H^-1_{:,q}``; SparseGPT
makes it cheap by sweeping columns left to right with the upper Cholesky factor of ``H^-1`` (each row of
which is the inverse Hessian of the columns not yet processed), in blocks of 128 columns with lazy batched
updates to the columns to the right. Masks are chosen adaptively per block (unstructured: lowest
``w^2 / [chol(H^-1)]_qq^2`` inside the block; N:M: the same score inside each group of M, chosen when the
sweep reaches the group)."""
from __future__ import annotations

import torch

from secateur.errors import fail
from secateur.patterns import NM


def hessian_inverse_factor(hessian: torch.Tensor, damp: float, *, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and the mask of dead inputs.

    Dead inputs (``H_jj == 0``: the feature was zero on every calibration token) get ``H_jj = 1`` so the
    factorisation exists; the caller prunes their weights first (they cost nothing on the calibration
    data), as the paper's code does by zeroing them."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(5):
        factor = damp * (10 ** attempt) * mean_diag
        l, info = torch.linalg.cholesky_ex(h + torch.diag_embed(factor.expand(h.shape[0])))
        if int(info) == 0:
            inv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u, dead
    raise fail("the calibration Hessian is not positive definite even with 10000x dampening", where=where,
               shape=h.shape, value=float(mean_diag), hint="Use more (or more varied) calibration tokens")


def _block_budget(rows: int, cols: int, sparsity: float, i1: int, i2: int) -> int:
    """Weights to prune in columns [i1, i2): cumulative rounding, so the layer total is exactly
    ``round(sparsity * rows * cols)``."""
    return round(sparsity * rows * i2) - round(sparsity * rows * i1)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern, sparsity: float, *,
                    block_size: int = 128, damp: float = 0.01, where: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return ``(new_weight, prune_mask, loss)`` for ``weight (out, in)`` and ``hessian (in, in)``.

    ``loss`` is the OBS estimate of the added error ``sum_q w_q^2 / (2 [H^-1]_qq)``; with ``H = 2 X X^T / N``
    and no dampening it equals ``||(W - W')X||^2 / N`` exactly."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    u, dead = hessian_inverse_factor(hessian.float(), damp, where=where)
    # dead inputs score 0 (pruned first) and move nothing, but keep their values unless pruned: the paper's
    # code zeroes them outright, which changed weights outside the mask (even at sparsity 0)
    live = ~dead.reshape(-1, 1)
    nm = pattern if isinstance(pattern, NM) else None
    if nm is not None:
        n_prune = nm.m - nm.n
    pruned = torch.zeros_like(w, dtype=torch.bool)
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].T.contiguous()  # (columns, rows): each column is one contiguous row here
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diag(u1).reshape(-1, 1)
        live1 = live[i1:i2]
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        err1 = torch.zeros_like(w1)
        if nm is None:
            k = _block_budget(rows, cols, sparsity, i1, i2)
            if k:
                m1.view(-1)[torch.topk(((w1 / d1) * live1).pow(2).flatten(), k, largest=False).indices] = True
            scale = (m1 & live1) / d1  # e = w * [pruned] / d, precomputed for the whole block
        else:
            scale = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                g = slice(i, i + nm.m)
                idx = torch.topk(((w1[g] / d1[g]) * live1[g]).pow(2), n_prune, dim=0, largest=False).indices
                m1[g].scatter_(0, idx, True)
                scale[g] = (m1[g] & live1[g]) / d1[g]
            torch.mul(w1[i], scale[i], out=err1[i])  # error of zeroing this column's pruned entries
            w1[i:].addr_(u1[i, i:], err1[i], alpha=-1.0)  # OBS update of this and the later columns
        w1.masked_fill_(m1, 0.0)
        loss += err1.pow(2).sum() / 2
        w[:, i1:i2] = w1.T
        pruned[:, i1:i2] = m1.T
        w[:, i2:] -= err1.T @ u[i1:i2, i2:]
    return w, pruned, float(loss)
