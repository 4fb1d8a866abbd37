"""Shapes of what is removed: single elements, N:M groups, r x c blocks, whole slices along a dim.

A pattern maps element scores to group scores (``reduce``) and a keep-decision per group back to an
element mask (``expand``). N:M is special: it keeps the N best of every M, whatever the amount."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from secateur.errors import fail


def _norm_reduce(s: torch.Tensor, dims: tuple[int, ...], p: float) -> torch.Tensor:
    if math.isinf(p):
        return s.abs().amax(dim=dims)
    if p == 1:
        return s.abs().sum(dim=dims)
    a = s.abs()
    if p == 2:  # as torch.nn.utils.prune's ln_structured computes it (exact agreement with its masks)
        return a.pow(2).sum(dim=dims).pow(0.5)
    # any other p: scaled by each group's largest entry, so that |w|**p neither underflows (p = 50 on weights of
    # 1e-2 is 1e-100: every group would score 0 and tie) nor overflows
    top = a.amax(dim=dims, keepdim=True)
    scaled = (a / top.clamp_min(torch.finfo(a.dtype).tiny)).pow(p).sum(dim=dims).pow(1.0 / p)
    return top.squeeze(dims) * scaled


def _check_int(value, what: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(f"{what} must be an integer", where=where, value=value)


class _PerElement:
    """Patterns whose groups are single elements: scores and keep-masks pass through unchanged."""

    is_elementwise = True

    def for_module(self, module):
        return self

    def check(self, shape, where):
        pass

    def group_shape(self, shape):
        return tuple(shape)

    def reduce(self, s, p):
        return s

    def expand(self, keep, shape):
        return keep


@dataclass(frozen=True)
class Element(_PerElement):
    """Unstructured: every weight on its own. Keeps the most accuracy for a given sparsity, but dense
    kernels run no faster: use it for size (with compressed storage) or to study sparsity."""


@dataclass(frozen=True)
class Block:
    """``rows x cols`` blocks over the 2-D view ``(shape[0], prod(shape[1:]))`` of the tensor.

    Use it for block-sparse kernels and formats (e.g. BSR, CPU inference engines), which skip whole
    blocks of zeros where scattered zeros gain nothing."""

    rows: int = 1
    cols: int = 4
    is_elementwise = False

    def __post_init__(self):
        _check_int(self.rows, "block rows", "Block")
        _check_int(self.cols, "block cols", "Block")
        if self.rows < 1 or self.cols < 1:
            raise fail("block size must be positive", value=(self.rows, self.cols))

    def _2d(self, shape):
        r = shape[0] if len(shape) else 1
        c = math.prod(shape[1:]) if len(shape) > 1 else 1
        return r, c

    def for_module(self, module):
        return self

    def check(self, shape, where):
        r, c = self._2d(shape)
        if r % self.rows or c % self.cols:
            raise fail(f"tensor (as {r}x{c}) does not divide into {self.rows}x{self.cols} blocks", where=where,
                       shape=shape, value=(self.rows, self.cols))

    def group_shape(self, shape):
        r, c = self._2d(shape)
        return (r // self.rows, c // self.cols)

    def reduce(self, s, p):
        r, c = self._2d(s.shape)
        return _norm_reduce(s.reshape(r // self.rows, self.rows, c // self.cols, self.cols), (1, 3), p)

    def expand(self, keep, shape):
        full = keep.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)
        return full.reshape(shape)


@dataclass(frozen=True)
class Slices:
    """Whole slices along ``dim`` (dim=0: output rows / conv filters), like ``ln_structured``.

    Masks only: use it to try channel pruning (accuracy, fine-tuning) before removing channels for real
    with the structural engine (`secateur.structured.prune_channels`), which makes the model smaller."""

    dim: int = 0
    is_elementwise = False

    def __post_init__(self):
        _check_int(self.dim, "the sliced dim", "Slices")

    def for_module(self, module):
        return self

    def check(self, shape, where):
        if not -len(shape) <= self.dim < len(shape):
            raise fail(f"dim {self.dim} out of range", where=where, shape=shape)

    def group_shape(self, shape):
        return (shape[self.dim],)

    def reduce(self, s, p):
        dims = tuple(d for d in range(s.dim()) if d != self.dim % s.dim())
        return _norm_reduce(s, dims, p) if dims else s.abs()

    def expand(self, keep, shape):
        d = self.dim % len(shape)
        view = [1] * len(shape)
        view[d] = shape[d]
        return keep.reshape(view).expand(shape)


@dataclass(frozen=True)
class NM(_PerElement):
    """Keep the ``n`` highest-scoring of every ``m`` consecutive weights along ``dim``; ``None`` means the
    input dimension (1 for Linear ``(out, in)`` and Conv ``(out, in, *k)``, 0 for ConvTranspose
    ``(in, out, *k)`` and transformers' GPT-2 ``Conv1D`` ``(in, out)``). 2:4 is the GPU sparse format:
    Ampere and newer GPUs run 2:4 weights on sparse tensor cores (see `secateur.semi_structured`), so
    this is the pattern to choose for GPU speed."""

    n: int = 2
    m: int = 4
    dim: int | None = None

    def __post_init__(self):
        _check_int(self.n, "N", "NM")
        _check_int(self.m, "M", "NM")
        if self.dim is not None:
            _check_int(self.dim, "the N:M dim", "NM")
        if not (0 < self.n < self.m):
            raise fail("N:M needs 0 < N < M", value=f"{self.n}:{self.m}")

    def for_module(self, module):
        """Resolve ``dim=None`` to the module's input dimension (0 for ConvTranspose weights)."""
        if self.dim is not None:
            return self
        from secateur.targets import is_hf_conv1d
        transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        return NM(self.n, self.m, 0 if transposed or is_hf_conv1d(module) else 1)

    def check(self, shape, where):
        if len(shape) < 2:
            raise fail("N:M needs a tensor with an input dimension", where=where, shape=shape)
        dim = 1 if self.dim is None else self.dim
        if not -len(shape) <= dim < len(shape):
            raise fail(f"N:M dim {dim} out of range", where=where, shape=shape, value=f"{self.n}:{self.m}")
        size = shape[dim]
        if size % self.m:
            raise fail(f"input dimension {size} is not divisible by M={self.m}", where=where, shape=shape,
                       value=f"{self.n}:{self.m}")

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask with exactly n per group; ties go to the lower index (stable sort)."""
        dim = 1 if self.dim is None else self.dim
        moved = scores.movedim(dim, -1)
        g = moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.m, self.m)
        order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., : self.n]
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
        return keep.reshape(moved.shape).movedim(-1, dim)


PatternSpec = Union[str, Element, Block, Slices, NM]


def get_pattern(spec: PatternSpec):
    """``"element"``, ``"2:4"`` / ``"4:8"`` (N:M), ``"block4x4"``, ``"rows"`` / ``"filters"`` / ``"channels"``
    (slices along dim 0), ``"columns"`` (dim 1), or a pattern object."""
    if isinstance(spec, (Element, Block, Slices, NM)):
        return spec
    if not isinstance(spec, str):
        raise fail("pattern must be a string or a pattern object", value=spec)
    s = spec.strip().lower()
    if s in ("element", "unstructured"):
        return Element()
    if s in ("rows", "filters", "channels", "neurons"):
        return Slices(0)
    if s in ("columns", "inputs"):
        return Slices(1)
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        return NM(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"block(\d+)x(\d+)", s)
    if m:
        return Block(int(m.group(1)), int(m.group(2)))
    raise fail("unknown pattern", value=spec, hint="use 'element', '2:4', 'block4x4', 'rows' or 'columns'")
