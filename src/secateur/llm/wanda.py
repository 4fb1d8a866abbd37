"""Magnitude and Wanda masks for one Linear weight ``(out, in)``.

Wanda (Sun et al. 2023) scores ``|W_ij| * ||X_j||_2`` where ``||X_j||`` is the L2 norm of input feature
``j`` over all calibration tokens, and compares scores *within each output row*: every row loses the same
share, which the paper found matters for LLMs. The magnitude baseline compares within the whole layer,
as in the paper's baseline. N:M patterns keep the N best of each M consecutive inputs for both."""
from __future__ import annotations

import torch

from secateur.patterns import NM
from secateur.selection import lowest


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * in)`` lowest scores of every row (ties: lower index pruned first)."""
    k = round(sparsity * scores.shape[1])
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        pruned.scatter_(1, idx, True)
    return pruned


def layer_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * numel)`` lowest scores of the whole tensor."""
    return lowest([scores], round(sparsity * scores.numel()))[0]


def select(scores: torch.Tensor, pattern, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Boolean PRUNE mask from scores under an element or N:M pattern."""
    if isinstance(pattern, NM):
        return ~pattern.keep(scores)
    return row_prune_mask(scores, sparsity) if per_row else layer_prune_mask(scores, sparsity)


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sum_t x_tj^2)`` broadcast over rows; ``sq_norms`` is the per-input sum of squares."""
    return weight.float().abs() * sq_norms.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, pattern, sparsity: float) -> torch.Tensor:
    return select(wanda_scores(weight, sq_norms), pattern, sparsity, per_row=True)


def magnitude_mask(weight: torch.Tensor, pattern, sparsity: float) -> torch.Tensor:
    return select(weight.float().abs(), pattern, sparsity, per_row=False)
