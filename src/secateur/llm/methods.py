"""The one-shot methods as a registry: name -> how to gather input statistics and how to prune.

Each method declares the statistics it needs from a Linear layer's inputs; the layer-wise driver
gathers them with forward hooks while it runs a block, then calls ``prune`` per layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from secateur.llm.sparsegpt import sparsegpt_prune
from secateur.llm.wanda import magnitude_mask, wanda_mask


class InputNorms:
    """Per-input-feature sum of squares over all calibration tokens (Wanda)."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += x.pow(2).sum(0)
        self.tokens += x.shape[0]


class Hessian:
    """``H = 2/N * sum_t x_t x_t^T`` over the N calibration tokens (SparseGPT)."""

    def __init__(self, in_features: int, device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


# prune(weight, stats, pattern, sparsity, where) -> (prune_mask, new_weight or None, loss or None)
PruneFn = Callable[..., tuple]


@dataclass(frozen=True)
class Method:
    name: str
    stats: Optional[type]  # None: no calibration forward needed
    prune: PruneFn
    updates_weights: bool = False


def _magnitude(weight, stats, pattern, sparsity, where):
    return magnitude_mask(weight, pattern, sparsity), None, None


def _wanda(weight, stats, pattern, sparsity, where):
    return wanda_mask(weight, stats.sq, pattern, sparsity), None, None


def _sparsegpt(weight, stats, pattern, sparsity, where):
    new, pruned, loss = sparsegpt_prune(weight, stats.hessian, pattern, sparsity, where=where)
    return pruned, new, loss


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude),
    "wanda": Method("wanda", InputNorms, _wanda),
    "sparsegpt": Method("sparsegpt", Hessian, _sparsegpt, updates_weights=True),
}


def register_method(method: Method) -> None:
    """Add a one-shot method (e.g. a variant of Wanda) under ``method.name``."""
    METHODS[method.name] = method
