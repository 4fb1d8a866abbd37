"""Exact, deterministic selection of the k lowest scores, within one tensor or across many.

Global selection never concatenates or sorts the model's scores: it runs a two-pass radix select
(16-bit histograms of the order-preserving integer image of float32 scores, ``torch.bincount`` on the
scores' own device, in chunks), so memory stays at one chunk of int32 keys whatever the model's size.
Ties at the threshold go to the earliest tensor, then the lowest flat index: deterministic everywhere."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

CHUNK = 1 << 24  # elements converted to int32 keys at a time (64 MiB)


class Lazy:
    """Scores computed on demand, so that global selection over a large model never holds every
    tensor's scores at once (each pass recomputes one tensor's scores, then drops them)."""

    def __init__(self, fn: Callable[[], torch.Tensor], shape: torch.Size, device: torch.device,
                 nonneg: bool = False):
        # nonneg: the scores are known to be >= 0 (magnitudes), so their IEEE bits are already ordered
        self.fn, self.shape, self.device, self.nonneg = fn, torch.Size(shape), device, nonneg

    def numel(self) -> int:
        return self.shape.numel()

    def __call__(self) -> torch.Tensor:
        return self.fn()


Scores = Union[torch.Tensor, Lazy]


def _get(s: Scores) -> torch.Tensor:
    return s() if isinstance(s, Lazy) else s


def _keys(s: torch.Tensor, nonneg: bool = False) -> torch.Tensor:
    """Monotone map float32 -> int32 (a < b  <=>  key(a) < key(b), a == b  <=>  key(a) == key(b); no NaNs): the
    IEEE bits, with the order of negative numbers flipped and shifted up by one so that -0.0 and +0.0 share key 0
    (they are equal scores: ties between them go by index, as everywhere else). Non-negative scores (magnitudes)
    keep their bits unchanged."""
    b = s.contiguous().float().view(torch.int32)
    return b if nonneg else torch.where(b < 0, (b ^ 0x7FFFFFFF) + 1, b)


def _high(key: torch.Tensor) -> torch.Tensor:
    """Top 16 bits as a bin index in [0, 65536) (arithmetic shift, then offset)."""
    return (key >> 16) + 32768


def _chunks(s: Scores):
    flat = _get(s).reshape(-1)
    nonneg = isinstance(s, Lazy) and s.nonneg
    for i in range(0, flat.numel(), CHUNK):
        yield _keys(flat[i:i + CHUNK], nonneg)


def _histogram_high(s: Scores, hist: torch.Tensor) -> None:
    """Add the counts of the top 16 key bits of ``s`` into ``hist`` (65536 bins, key offset by 2**15)."""
    nonneg = isinstance(s, Lazy) and s.nonneg
    for key in _chunks(s):
        if nonneg:  # keys in [0, 2**31): their top bits need no offset, only the histogram does
            hist[1 << 15:] += torch.bincount(key >> 16, minlength=1 << 15).cpu()
        else:
            hist += torch.bincount(_high(key), minlength=1 << 16).cpu()


def kth_key(scores: Sequence[Scores], k: int) -> tuple[int, int]:
    """Return ``(t, less)``: the int32 key t of the k-th smallest score overall (1-based) and the number
    of scores strictly below it. Two histogram passes, no sort, memory of one chunk."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores:
        _histogram_high(s, hist)
    cum = torch.cumsum(hist, 0)
    hi = int(torch.searchsorted(cum, torch.tensor(k), right=False))
    below = int(cum[hi - 1]) if hi > 0 else 0
    hist.zero_()
    for s in scores:
        for key in _chunks(s):
            sel = key[(key >> 16) == hi - 32768]
            if sel.numel():
                hist += torch.bincount(sel & 0xFFFF, minlength=1 << 16).cpu()
    cum = torch.cumsum(hist, 0)
    lo = int(torch.searchsorted(cum, torch.tensor(k - below), right=False))
    less = below + (int(cum[lo - 1]) if lo > 0 else 0)
    return ((hi - 32768) << 16) | lo, less


def _prune_at(s: Scores, t: int, ties: int) -> tuple[torch.Tensor, int]:
    """Boolean prune-mask of entries with key < t plus the first ``ties`` entries equal to t."""
    flat = _get(s).reshape(-1)
    nonneg = isinstance(s, Lazy) and s.nonneg
    out = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    used = 0
    for i in range(0, flat.numel(), CHUNK):
        key = _keys(flat[i:i + CHUNK], nonneg)
        less = key < t
        if ties - used > 0:  # the first ties, in index order, among the entries equal to t
            take = (key == t).nonzero().squeeze(1)[: ties - used]
            less[take] = True
            used += take.numel()
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
    need = k - int(torch.count_nonzero(less))
    less[(flat == t).nonzero().squeeze(1)[:need]] = True
    return less.reshape(s.shape)




def below(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``scores < threshold`` decided as on the exact numbers. ``scores < 1e-40`` would cast the Python float to
    the scores' dtype first, rounding it to nearest, possibly *down* (to 0 in float32), so that a score equal to
    the rounded value counted as at or above a threshold it is below. The threshold is rounded *up* instead (the
    smallest value of the dtype at or above it): no value of the dtype lies between the two, so the comparison
    is exact."""
    if not scores.is_floating_point():
        return scores < threshold
    exact = torch.tensor(threshold, dtype=torch.float64)
    t = exact.to(scores.dtype)
    if t.double() < exact:
        t = torch.nextafter(t, torch.tensor(float("inf"), dtype=scores.dtype))
    return scores < t.to(scores.device)
