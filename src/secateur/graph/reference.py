"""The pruning reference where removal is not zeroing: normalisations over pruned channels.

Zeroing a channel at its consumers leaves it in a LayerNorm's mean and variance; removing it does not. So the
reference runs the *original* model (consumers zeroed, ``Plan.zero_consumers``) with every such normalisation
computing its statistics over the kept channels only: a module site runs a sliced copy of the module on the kept
channels, an ATen site (``native_layer_norm`` reached at op level, e.g. ConvNeXt's LayerNorm2d) runs the same op
on them; a statistic over the channel dim ("reduce": a mean or variance inside RmsNorm2d, GlobalResponseNorm, a
hand-written LayerNorm2d) is recomputed over the kept channels. The pruned channels' outputs keep their old values
(their consumers are zeroed). Sites are matched to
calls by the order the model runs them, which a zeroed copy of the same model repeats exactly."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from secateur.errors import fail


def _sliced(mod: nn.Module, keep: torch.Tensor, size: int) -> nn.Module:
    """A copy of a norm module over the kept channels only (no hooks)."""
    small = copy.deepcopy(mod)
    small._forward_hooks.clear()
    small._forward_pre_hooks.clear()
    with torch.no_grad():
        for name, t in [*small.named_parameters(recurse=False), *small.named_buffers(recurse=False)]:
            if t is not None and t.dim() == 1 and t.numel() == size:
                new = t.detach().index_select(0, keep.to(t.device))
                if isinstance(t, nn.Parameter):
                    t.data = new
                else:
                    small._buffers[name] = new
    if isinstance(getattr(small, "normalized_shape", None), tuple):
        small.normalized_shape = (int(keep.numel()),)
    return small


class _OpSites(TorchDispatchMode):
    """ATen sites: ``sites`` (LayerNorm ops: the kept channels normalised on their own, the rest keep their old
    values) and ``reduce`` (statistics, rules/reductions.py _statistic_site: the op rerun on the kept positions
    along its dim;
    its result has no channel position, so it replaces the whole output)."""

    def __init__(self, sites: dict[tuple[Any, int], torch.Tensor],
                 reduce: dict[tuple[Any, int], tuple[torch.Tensor, int]] | None = None) -> None:
        super().__init__()
        self.sites, self.reduce, self.calls, self.paused = sites, reduce or {}, {}, False
        self.packets = {k for k, _ in sites} | {k for k, _ in self.reduce}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if self.paused or packet not in self.packets:
            return func(*args, **kwargs)
        n = self.calls.get(packet, 0)
        self.calls[packet] = n + 1
        if (packet, n) in self.reduce:
            keep, dim = self.reduce[(packet, n)]
            x = args[0]
            return func(x.index_select(dim, keep.to(x.device)), *args[1:], **kwargs)
        keep = self.sites.get((packet, n))
        out = func(*args, **kwargs)
        if keep is None:
            return out
        x, shape, w, b, *rest = args
        keep = keep.to(x.device)
        small = func(x.index_select(-1, keep), [int(keep.numel())], None if w is None else w.index_select(0, keep),
                     None if b is None else b.index_select(0, keep), *rest, **kwargs)
        y = out[0].clone()
        y.index_copy_(-1, keep, small[0])
        return (y, *out[1:])


def _wstd_hook(model: nn.Module, name: str, call: int, keep: torch.Tensor, mode: _OpSites) -> Any:
    """A weight-standardised conv (graph/std_conv.py) run on its kept inputs only, at call ``call``."""
    from secateur.graph.std_conv import sliced_inputs
    mod = model.get_submodule(name)
    small = sliced_inputs(mod, keep)
    width = mod.in_channels // mod.groups
    idx = (torch.arange(mod.groups)[:, None] * width + keep[None, :]).flatten()
    count = [0]

    def hook(m, args, out):
        n = count[0]
        count[0] += 1
        if n != call:
            return None
        mode.paused = True  # the copy's ops are not the model's calls (ATen sites count those)
        try:
            return small(args[0].index_select(1, idx.to(args[0].device)))
        finally:
            mode.paused = False

    return mod.register_forward_hook(hook)


@contextlib.contextmanager
def kept_norms(model: nn.Module, sites: list[tuple[Any, torch.Tensor]]) -> Iterator[None]:
    """Inside, ``model`` computes each site's normalisation over its kept positions (``sites``: (NormSite, kept
    positions along the normalised dim))."""
    ops = {(s.key, s.call): keep for s, keep in sites if s.kind == "op"}
    reduce = {(s.key, s.call): (keep, s.dim) for s, keep in sites if s.kind == "reduce"}
    by_module: dict[str, dict[int, torch.Tensor]] = {}
    for s, keep in sites:
        if s.kind == "module":
            by_module.setdefault(s.key, {})[s.call] = keep
    mode = _OpSites(ops, reduce)
    handles = [_wstd_hook(model, s.key, s.call, keep, mode) for s, keep in sites if s.kind == "wstd"]
    for name, calls in by_module.items():
        mod = model.get_submodule(name)
        size, dim = next((s.size, s.dim) for s, _ in sites if s.kind == "module" and s.key == name)
        small = {c: _sliced(mod, keep, size) for c, keep in calls.items()}
        count = [0]

        def hook(m, args, out, calls=calls, small=small, count=count, name=name, dim=dim):
            n = count[0]
            count[0] += 1
            if n not in calls:
                return None
            x = args[0]
            if x.size(dim) != out.size(dim):
                raise fail("reference: norm input and output differ in size", where=name, shape=x.shape)
            keep = calls[n].to(x.device)
            mode.paused = True
            try:
                y = small[n](x.index_select(dim, keep))
            finally:
                mode.paused = False
            res = out.clone()
            res.index_copy_(dim, keep, y.to(res.dtype))
            return res

        handles.append(mod.register_forward_hook(hook))
    try:
        with mode:
            yield
    finally:
        for h in handles:
            h.remove()
