"""Exact, deterministic selection of the k lowest scores, within one tensor or across many.

Global selection never concatenates or sorts the model's scores: it runs a two-pass radix select
(16-bit histograms of the order-preserving integer image of float32 scores, ``torch.bincount`` on the
scores' own device, in chunks), so memory stays at one chunk of int64 keys whatever the model's size.
Ties at the threshold go to the earliest tensor, then the lowest flat index: deterministic everywhere."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

CHUNK = 1 << 24  # elements converted to int64 keys at a time (128 MiB)


class Lazy:
    """Scores computed on demand, so that global selection over a large model never holds every
    tensor's scores at once (each pass recomputes one tensor's scores, then drops them)."""

    def __init__(self, fn: Callable[[], torch.Tensor], shape: torch.Size, device: torch.device):
        self.fn, self.shape, self.device = fn, torch.Size(shape), device

    def numel(self) -> int:
        return self.shape.numel()

    def __call__(self) -> torch.Tensor:
        return self.fn()


Scores = Union[torch.Tensor, Lazy]


def _get(s: Scores) -> torch.Tensor:
    return s() if isinstance(s, Lazy) else s


def _keys(s: torch.Tensor) -> torch.Tensor:
    """Monotone map float32 -> int32 (a < b  <=>  key(a) < key(b); no NaNs): the IEEE bits, with the
    order of negative numbers flipped. Non-negative scores (magnitudes) keep their bits unchanged."""
    b = s.contiguous().float().view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def _high(key: torch.Tensor) -> torch.Tensor:
    """Top 16 bits as a bin index in [0, 65536) (arithmetic shift, then offset)."""
    return (key >> 16) + 32768


def _chunks(s: Scores):
    flat = _get(s).reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        yield _keys(flat[i:i + CHUNK])


def kth_key(scores: Sequence[Scores], k: int) -> tuple[int, int]:
    """Return ``(t, less)``: the int32 key t of the k-th smallest score overall (1-based) and the number
    of scores strictly below it. Two histogram passes, no sort, memory of one chunk."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores:
        for key in _chunks(s):
            hist += torch.bincount(_high(key), minlength=1 << 16).cpu()
    cum = torch.cumsum(hist, 0)
    hi = int(torch.searchsorted(cum, torch.tensor(k), right=False))
    below = int(cum[hi - 1]) if hi > 0 else 0
    hist.zero_()
    for s in scores:
        for key in _chunks(s):
            sel = key[_high(key) == hi]
            if sel.numel():
                hist += torch.bincount(sel & 0xFFFF, minlength=1 << 16).cpu()
    cum = torch.cumsum(hist, 0)
    lo = int(torch.searchsorted(cum, torch.tensor(k - below), right=False))
    less = below + (int(cum[lo - 1]) if lo > 0 else 0)
    return ((hi - 32768) << 16) | lo, less


def _prune_at(s: Scores, t: int, ties: int) -> tuple[torch.Tensor, int]:
    """Boolean prune-mask of entries with key < t plus the first ``ties`` entries equal to t."""
    flat = _get(s).reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    used = 0
    for i in range(0, flat.numel(), CHUNK):
        key = _keys(flat[i:i + CHUNK])
        less = key < t
        if ties - used > 0:
            eq = key == t
            if bool(eq.any()):
                take = eq & (torch.cumsum(eq, 0) <= ties - used)
                used += int(take.sum())
                less |= take
        out[i:i + CHUNK] = less
    return out.reshape(s.shape), used


def lowest(scores: Sequence[Scores], k: int) -> list[torch.Tensor]:
    """Prune-masks (True = pruned) marking exactly the k lowest scores across all tensors."""
    total = sum(s.numel() for s in scores)
    if k <= 0:
        return [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if k >= total:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if len(scores) == 1 and scores[0].numel() <= CHUNK:
        return [_lowest_small(_get(scores[0]), k)]
    t, less = kth_key(scores, k)
    ties = k - less
    out = []
    for s in scores:
        m, used = _prune_at(s, t, ties)
        ties -= used
        out.append(m)
    return out


def _lowest_small(s: torch.Tensor, k: int) -> torch.Tensor:
    flat = s.reshape(-1).float()
    t = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, k).values.to(flat.device)
    less = flat < t
    eq = flat == t
    need = k - int(less.sum())
    less |= eq & (torch.cumsum(eq, 0) <= need)
    return less.reshape(s.shape)


