"""Recognise a normalisation over the last dim written in plain tensor ops (Mistral's, Qwen's, Gemma's RMSNorm,
T5's LayerNorm) by what it computes, not by its class name.

Why: Hugging Face alone has well over a hundred RMSNorm classes, each its own copy of ``x * rsqrt(mean(x**2) + eps)
* weight``. Traced op by op, the mean over the channels makes them one unit, so a model's whole residual stream
became all-or-nothing (MistralForCausalLM kept its stream while LlamaForCausalLM, whose norm was registered by
name, lost half). A registry of names never catches up; a probe of the module's behaviour does.

How: a candidate is a module without children whose class name says it normalises (``norm``), that is not a
torch norm subclass (those reach ATen's own norm kernels, handled at op level), and whose only size-``C`` tensors
are 1-D ``weight`` / ``bias``. On a float32 CPU copy with random affine parameters (a meta model's norms are
probed the same way), it must behave like a normalisation of each row over its ``C`` channels:

- same shape out as in, and each row (all but the last dim) computed on its own;
- channel-equivariant: permuting the input's channels together with ``weight`` / ``bias`` permutes the output;
- mixing: one channel's output depends on the other channels (else it is elementwise and traced as such);
- scale-invariant: ``f(s * x) == f(x)`` for ``s > 0`` (what normalising means; a softmax or a gate is not);
- its copy sliced to half the channels (``reference._sliced``: the pruned model's module and the oracle's
  reference are that copy) runs on half the channels and gives them the same shape.

Such a module is then a leaf with the LayerNorm rule: its channels are pruned with its affine tensors and the
plan names it as a norm site, whose reference computes it over the kept channels (``Plan.kept_norms``)."""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

__all__ = ["is_candidate", "probe_channel_norm"]

_NAME = re.compile(r"norm", re.IGNORECASE)
_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
_ROWS, _TOL = (2, 3), 1e-4


def _sized(mod: nn.Module) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The channel count and the module's own tensors, when its affine tensors are 1-D ``weight`` / ``bias`` of
    one size and nothing else it holds has more than one element."""
    own = dict([*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)])
    weight = own.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() < 4:
        return None
    size = weight.numel()
    for name, t in own.items():
        if t is None or t.numel() <= 1:
            continue
        if name not in ("weight", "bias") or t.dim() != 1 or t.numel() != size:
            return None
    return size, own


def is_candidate(mod: nn.Module) -> bool:
    """Worth probing: a childless module named as a norm, not a torch norm (ATen handles those)."""
    return (not isinstance(mod, _TORCH_NORMS) and _NAME.search(type(mod).__name__) is not None
            and next(iter(mod.children()), None) is None and _sized(mod) is not None)


def _copy(mod: nn.Module, gen: torch.Generator) -> nn.Module:
    """A float32 CPU copy without hooks whose affine tensors are random (distinct per channel, away from zero)."""
    small = copy.deepcopy(mod)
    small._forward_hooks.clear()
    small._forward_pre_hooks.clear()
    if any(t.is_meta for t in [*small.parameters(), *small.buffers()]):
        small = small.to_empty(device="cpu")
    small = small.float().cpu()
    with torch.no_grad():
        for name, t in [*small.named_parameters(recurse=False), *small.named_buffers(recurse=False)]:
            if t is not None and t.dim() == 1 and t.numel() > 1:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return small


def _permuted(mod: nn.Module, perm: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(mod)
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(out, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == perm.numel():
                t.copy_(t[perm])
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=_TOL, atol=_TOL))


def probe_channel_norm(mod: nn.Module) -> bool:
    """True when ``mod`` behaves as a normalisation of each row over its last dim (see the module docstring)."""
    from secateur.graph.reference import _sliced
    sized = _sized(mod)
    if sized is None:
        return False
    size, _ = sized
    gen = torch.Generator().manual_seed(0)
    try:
        small = _copy(mod, gen)
        x = torch.randn(*_ROWS, size, generator=gen) * 3 + 1
        with torch.no_grad():
            y = small(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape or not torch.isfinite(y).all():
                return False
            other = x.clone()
            other[0] = torch.randn(_ROWS[1], size, generator=gen)  # rows on their own
            if not _close(small(other)[1:], y[1:]):
                return False
            perm = torch.randperm(size, generator=gen)  # channel-equivariant with its affine tensors
            if not _close(_permuted(small, perm)(x[..., perm]), y[..., perm]):
                return False
            bumped = x.clone()
            bumped[..., 1:] *= 2  # mixing: channel 0 sees the others
            if _close(small(bumped)[..., :1], y[..., :1]):
                return False
            if not _close(small(x * 7.5), y):  # scale-invariant: a normalisation
                return False
            keep = torch.arange(0, size, 2)
            half = _sliced(small, keep, size)(x[..., keep])
            return isinstance(half, torch.Tensor) and half.shape == (*_ROWS, keep.numel())
    except Exception:  # noqa: BLE001 - a module that does not run on a plain (rows, C) tensor is not one of these
        return False
