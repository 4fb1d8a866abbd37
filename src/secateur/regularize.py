"""Sparsity regularisation: L1 on BatchNorm scales (network slimming) and group lasso over channels.

Each regulariser works two ways: ``penalty(model)`` is a loss term to add before ``backward()``, and
``proximal_(model, lr)`` is the cheaper, exact-zero-producing proximal step to call right after
``optimizer.step()`` (soft-thresholding for L1, block soft-thresholding for group lasso). Lambda is a
number or a function ``step -> lambda`` (any secateur schedule works), so it can be warmed up or decayed.

After sparse training, `prune_bn_channels` removes channels by BN scale with an absolute threshold
(the seed's ``sparsity_threshold``) or a ratio."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import fail
from secateur.masks import Mask, get_mask, original, set_mask
from secateur.selection import below, lowest

LambdaSpec = Union[float, Callable[[int], float]]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _lam(lam: LambdaSpec, step: int, where: str) -> float:
    value = lam(step) if callable(lam) else lam
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail("lambda must be a finite number >= 0", where=where, value=value)
    return float(value)


def _check_lr(lr: float, where: str) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise fail("the proximal step size (learning rate) must be a finite number >= 0", where=where, value=lr)
    return float(lr)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The affine BatchNorm layers whose scales the slimming penalty acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.affine]


@dataclass(frozen=True)
class BNScaleL1:
    """L1 on BatchNorm scales (Liu et al. 2017, network slimming); typical lambda 1e-5 .. 1e-4."""

    lam: LambdaSpec = 1e-4

    def __post_init__(self):
        if not callable(self.lam):
            _lam(self.lam, 0, "BNScaleL1")

    def check(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The BN layers to regularise; a model without one is an error (it would get no regularisation at all).
        ``fine_tune`` calls this before the first step."""
        layers = bn_layers(model)
        if not layers:
            raise fail("the model has no affine BatchNorm layer to regularise", where=type(model).__name__)
        return layers

    def penalty(self, model: nn.Module, step: int = 0) -> torch.Tensor:
        lam = _lam(self.lam, step, "BNScaleL1")
        return lam * torch.stack([m.weight.abs().sum() for _, m in self.check(model)]).sum()

    @torch.no_grad()
    def proximal_(self, model: nn.Module, lr: float, step: int = 0) -> None:
        """Soft-threshold every BN scale by ``lr * lambda`` (the proximal map of the L1 term)."""
        tau = _check_lr(lr, "BNScaleL1.proximal_") * _lam(self.lam, step, "BNScaleL1")
        for _, m in self.check(model):
            g = original(m, "weight")
            g.copy_(g.sign() * (g.abs() - tau).clamp_min(0))


@dataclass(frozen=True)
class LassoGroup:
    """``size`` coupled channels. Each member ``(module_name, param, dim, index, channel)`` owns the
    positions ``index`` along ``dim`` of one tensor, position ``index[i]`` belonging to channel
    ``channel[i]`` (one channel may own several positions, e.g. after a flatten). ``index=None`` means
    every position, ``channel=None`` means position ``i`` is channel ``i``. The structural engine's
    groups convert with `LassoGroup.from_engine`; `channel_groups` builds a simple conv/linear + BN one."""

    members: tuple[tuple, ...]
    size: int

    @classmethod
    def from_engine(cls, group, model: nn.Module) -> "LassoGroup":
        """Convert a `secateur.graph` Group: every trainable member (weights, biases, norm affine and
        consumers' input columns), buffers such as running statistics left out."""
        members = []
        for m in group.members:
            t = original(model.get_submodule(m.module), m.name)
            if t is None or not isinstance(t, nn.Parameter) or not t.is_floating_point():
                continue
            members.append((m.module, m.name, m.dim, tuple(int(i) for i in m.index),
                            tuple(int(c) for c in m.channel)))
        return cls(tuple(members), int(group.size))


def _member(m: tuple) -> tuple:
    return tuple(m) + (None,) * (5 - len(m))


def channel_groups(model: nn.Module, *, exclude: Iterable[str] | None = None, example_inputs=None
                   ) -> list[LassoGroup]:
    """Channel groups for group lasso. With ``example_inputs`` and the structural engine available:
    the engine's dependency groups (producer rows, norm parameters, consumers' input columns, residual
    partners); otherwise one group per Linear/Conv layer: each output channel's weight row, bias entry
    and the scale and shift of the BatchNorm that reads its output, and nothing else, in the forward
    (`_producers_of`; no BN where that cannot be told). The last producer (the classifier) is excluded by
    default in the simple grouping; the engine never offers the model's outputs. ``exclude``: module
    names; one that matches no grouped layer is an error (a typo would leave a layer unprotected)."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    elif exclude is not None:
        if not isinstance(exclude, Iterable):
            raise fail("exclude must be an iterable of module names", where="channel_groups", value=exclude)
        exclude = tuple(exclude)
        if not all(isinstance(e, str) for e in exclude):
            raise fail("exclude must be an iterable of module names", where="channel_groups", value=exclude)
    if example_inputs is not None:
        try:
            from secateur.graph.groups import build_groups
        except ImportError:
            build_groups = None
        if build_groups is not None:
            skip = set(exclude or ())
            engine_groups = build_groups(model, example_inputs)
            _check_exclude(model, skip, set().union(*(g.modules() for g in engine_groups)))
            return [LassoGroup.from_engine(g, model) for g in engine_groups if not (g.modules() & skip)]
    producers = [n for n, m in model.named_modules() if isinstance(m, _PRODUCERS)]
    skip = set(producers[-1:]) if exclude is None else set(exclude)
    _check_exclude(model, skip, set(producers))
    bn_of = {id(p): bn for bn, p in _producers_of(model, [n for n, _ in bn_layers(model)], strict=False).items()
             if p is not None}
    groups = []
    for name, m in model.named_modules():
        if not isinstance(m, _PRODUCERS) or name in skip:
            continue
        width = original(m, "weight").shape[0]
        members = [(name, "weight", 0)] + ([(name, "bias", 0)] if m.bias is not None else [])
        if id(m) in bn_of:
            members += [(bn_of[id(m)], "weight", 0), (bn_of[id(m)], "bias", 0)]
        groups.append(LassoGroup(tuple(members), width))
    return groups


def _check_exclude(model: nn.Module, exclude: set[str], candidates: set[str]) -> None:
    """An exclude entry that matches no candidate layer is a typo that would leave a layer unprotected."""
    unused = sorted(exclude - candidates)
    if unused:
        raise fail("exclude entries matched no layer of a channel group", where=type(model).__name__,
                   value=unused, hint=f"layer names look like {sorted(candidates)[:5]}")


def _resolve(model: nn.Module, groups: Sequence[LassoGroup]):
    """Check every member exists and fits before anything is touched; return lists of
    ``(tensor, dim, index or None, channel or None, module_name, param)``."""
    modules = dict(model.named_modules())
    resolved = []
    for g in groups:
        parts = []
        for mod_name, param, dim, index, channel in map(_member, g.members):
            where = f"{mod_name}.{param}"
            t = original(modules[mod_name], param) if mod_name in modules else None
            if t is None:
                raise fail("group member not found in the model", where=where)
            if not -t.dim() <= dim < t.dim():
                raise fail("group dim out of range", where=where, shape=t.shape, value=dim)
            dim = dim % t.dim()
            idx = None if index is None else torch.as_tensor(index, dtype=torch.long, device=t.device)
            ch = None if channel is None else torch.as_tensor(channel, dtype=torch.long, device=t.device)
            n = t.shape[dim] if idx is None else len(idx)
            if idx is not None and len(idx) and (int(idx.max()) >= t.shape[dim] or int(idx.min()) < 0):
                raise fail(f"group index out of range along dim {dim}", where=where, shape=t.shape, value=index)
            if ch is None and n != g.size:
                raise fail(f"group member does not hold {g.size} channels along dim {dim}", where=where,
                           shape=t.shape, value=index)
            if ch is not None and (len(ch) != n or (n and (int(ch.max()) >= g.size or int(ch.min()) < 0))):
                raise fail("group channel map does not fit", where=where, shape=t.shape, value=channel)
            parts.append((t, dim, idx, ch, mod_name, param))
        resolved.append(parts)
    return resolved


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _sq_per_channel(t: torch.Tensor, dim: int, idx, ch, size: int) -> torch.Tensor:
    v = t if idx is None else t.index_select(dim, idx)
    # at least float32 (half tensors), and float64 stays float64: the norms and thresholds are the model's precision
    sq = v.movedim(dim, 0).reshape(v.shape[dim], -1).to(_acc(v)).pow(2).sum(1)
    if ch is None:
        return sq
    return torch.zeros(size, dtype=sq.dtype, device=sq.device).index_add_(0, ch, sq)


@dataclass(frozen=True)
class GroupLasso:
    """Group lasso ``lambda * sum_g sqrt(sum of squares of group g)``: whole channels shrink to zero
    together (weights, bias, BN and any coupled slices), which is what channel pruning can remove."""

    groups: tuple[LassoGroup, ...]
    lam: LambdaSpec = 1e-4
    size_weighted: bool = False  # weight each group by sqrt(entries per channel), Yuan & Lin's group lasso

    def __post_init__(self):
        if not callable(self.lam):
            _lam(self.lam, 0, "GroupLasso")
        object.__setattr__(self, "groups", tuple(self.groups))

    def check(self, model: nn.Module) -> None:
        """Every group's members exist in ``model`` and fit (``fine_tune`` calls this before the first step)."""
        if not self.groups:
            raise fail("group lasso has no groups", where=type(model).__name__)
        _resolve(model, self.groups)

    def _weights(self, resolved) -> list[torch.Tensor | float]:
        """Per-channel penalty weights: 1, or sqrt(number of entries of the channel) when size-weighted
        (a channel's norm grows like sqrt of its size, so unweighted lasso spares wide channels)."""
        if not self.size_weighted:
            return [1.0] * len(resolved)
        out = []
        for parts, g in zip(resolved, self.groups):
            count = 0
            for t, dim, idx, ch, _, _ in parts:
                per_pos = t.numel() // t.shape[dim]
                n = t.shape[dim] if idx is None else len(idx)
                ones = torch.full((n,), float(per_pos), device=t.device, dtype=_acc(t))
                count = count + (ones if ch is None else
                                 torch.zeros(g.size, device=t.device, dtype=_acc(t)).index_add_(0, ch, ones))
            out.append(torch.sqrt(count))
        return out

    @classmethod
    def for_model(cls, model: nn.Module, lam: LambdaSpec = 1e-4, **kw) -> "GroupLasso":
        """Groups from `channel_groups` (pass ``example_inputs=`` to use the structural engine's)."""
        return cls(tuple(channel_groups(model, **kw)), lam)

    def norms(self, model: nn.Module, *, effective: bool = False) -> list[torch.Tensor]:
        """Per-channel L2 norm of each group: of the stored values (no autograd), or of the masked,
        effective tensors with autograd when ``effective`` (what `penalty` differentiates)."""
        out, modules = [], dict(model.named_modules())
        with torch.set_grad_enabled(effective and torch.is_grad_enabled()):
            for parts, g in zip(_resolve(model, self.groups), self.groups):
                sq = 0
                for t, dim, idx, ch, mod_name, param in parts:
                    if effective:
                        t = getattr(modules[mod_name], param)
                    sq = sq + _sq_per_channel(t, dim, idx, ch, g.size)
                out.append(torch.sqrt(sq))
        return out

    def penalty(self, model: nn.Module, step: int = 0) -> torch.Tensor:
        lam = _lam(self.lam, step, "GroupLasso")
        norms = self.norms(model, effective=True)
        if not norms:
            raise fail("group lasso has no groups", where=type(model).__name__)
        weights = self._weights(_resolve(model, self.groups))
        # eps keeps the gradient finite at an exactly-zero group
        return lam * torch.stack([(w * torch.sqrt(n.pow(2) + 1e-12)).sum() for n, w in zip(norms, weights)]).sum()

    @torch.no_grad()
    def proximal_(self, model: nn.Module, lr: float, step: int = 0) -> None:
        """Block soft-thresholding: scale channel k of a group by ``max(0, 1 - lr*lambda/||w_k||)``. Every group's
        norms are taken before any is scaled, so groups that share entries (a layer's rows in one group, its input
        columns in the next) give the same step in any order; a shared entry gets the product of its groups'
        scales."""
        tau = _check_lr(lr, "GroupLasso.proximal_") * _lam(self.lam, step, "GroupLasso")
        resolved = _resolve(model, self.groups)
        scales = []
        for parts, g, w in zip(resolved, self.groups, self._weights(resolved)):
            norm = torch.sqrt(sum(_sq_per_channel(t, d, i, c, g.size) for t, d, i, c, _, _ in parts))
            scales.append((1 - tau * w / norm.clamp_min(1e-30)).clamp_min(0))
        for parts, scale in zip(resolved, scales):
            for t, dim, idx, ch, _, _ in parts:
                n = t.shape[dim] if idx is None else len(idx)
                per_pos = scale if ch is None else scale[ch]
                shape = [1] * t.dim()
                shape[dim] = n
                s_ = per_pos[:n].to(t.dtype).reshape(shape)
                if idx is None:
                    t.mul_(s_)
                else:
                    t.index_copy_(dim, idx, t.index_select(dim, idx) * s_)


def _structured():
    try:
        from secateur import structured  # noqa: F401
        return structured
    except ImportError:
        return None


def prune_bn_channels(model: nn.Module, *, threshold: float | None = None, ratio: float | None = None,
                      example_inputs=None, min_channels: int = 1) -> dict[str, int]:
    """Network slimming's pruning step: remove channels whose |BN scale| is below ``threshold`` or the
    ``ratio`` smallest scales across all BN layers (global, as in the paper). Returns the channels kept
    per BN layer.

    With ``example_inputs`` and the structural engine available the channels are physically removed via
    ``secateur.structured.prune_channels(importance="bn_scale")``. Otherwise the channels are masked: the
    BN scale and shift and the producing layer's output rows, which zeroes the channel exactly. The
    producer is found from the forward's data flow (a ``torch.fx`` trace); a model that does not trace
    needs ``example_inputs`` unless its BNs follow their producers inside an ``nn.Sequential``.
    ``ratio`` prunes exactly ``round(ratio * channels)`` channels (ties: earlier layer, lower index),
    ``min_channels`` (>= 1) per layer allowing."""
    if (threshold is None) == (ratio is None):
        raise fail("give exactly one of threshold or ratio", where="prune_bn_channels",
                   value={"threshold": threshold, "ratio": ratio})
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise fail("ratio must be in [0, 1)", where="prune_bn_channels", value=ratio)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or math.isnan(threshold)):
        raise fail("threshold must be a number", where="prune_bn_channels", value=threshold)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise fail("min_channels must be an integer >= 1 (a BN layer is never emptied)", where="prune_bn_channels",
                   value=min_channels)
    eng = _structured()
    if example_inputs is not None and eng is not None:
        kw = {"ratio": ratio} if ratio is not None else {"threshold": threshold}
        eng.prune_channels(model, example_inputs, importance="bn_scale", **kw)
        return {n: m.num_features for n, m in bn_layers(model)}
    layers = bn_layers(model)
    if not layers:
        raise fail("the model has no affine BatchNorm layer", where=type(model).__name__)
    scales = [original(m, "weight").detach().abs() for _, m in layers]
    for (name, _), sc in zip(layers, scales):
        if not bool(torch.isfinite(sc).all()):
            raise fail("BatchNorm scales are not all finite", where=f"{name}.weight", shape=sc.shape,
                       value=sc[~torch.isfinite(sc)].flatten()[0].item())
    producers = _producers_of(model, [n for n, _ in layers], strict=True)  # may refuse: before any change
    # never empty a layer: its min_channels largest scales are kept (ties: lower index)
    protected = []
    for sc in scales:
        keep = torch.zeros_like(sc, dtype=torch.bool)
        keep[torch.sort(sc, descending=True, stable=True).indices[:min_channels]] = True
        protected.append(keep)
    if ratio is not None:
        # exactly the k smallest unprotected scales; ties go to the earlier layer, then the lower index
        # (secateur.selection, as everywhere in secateur)
        total = sum(sc.numel() for sc in scales)
        k = min(int(round(ratio * total)), total - sum(int(p.sum()) for p in protected))
        ranked = [sc.float().masked_fill(p, math.inf) for sc, p in zip(scales, protected)]
        keeps = [~pruned for pruned in lowest(ranked, k)]
    else:
        keeps = [~below(sc, threshold) | p for sc, p in zip(scales, protected)]
    plan = []
    for (name, bn), keep in zip(layers, keeps):
        plan += [(bn, "weight", keep), (bn, "bias", keep)]
        prod = producers.get(name)
        if prod is not None:
            w = original(prod, "weight")
            plan.append((prod, "weight", keep.reshape(-1, *[1] * (w.dim() - 1)).expand_as(w)))
            if prod.bias is not None:
                plan.append((prod, "bias", keep))
    for module, param, _ in plan:  # set_mask would refuse these halfway through the plan
        if parametrize.is_parametrized(module, param) and \
                any(not isinstance(p, Mask) for p in module.parametrizations[param]):
            raise fail("cannot mask a tensor under a parametrization secateur did not add",
                       where=f"{type(module).__name__}.{param}")
    for module, param, keep in plan:
        old = get_mask(module, param)
        set_mask(module, param, keep if old is None else keep & old)
    return {name: int(k.sum()) for (name, _), k in zip(layers, keeps)}


def _producers_of(model: nn.Module, bn_names: list[str], *, strict: bool) -> dict[str, nn.Module | None]:
    """For each BN, the Linear/Conv layer whose output is its input and goes nowhere else, or None where the
    BN reads something else (a sum, a concat, a layer shared or also read elsewhere): then only the BN is
    masked, which still zeroes the channel exactly.

    Found by data flow, never by definition order: from a ``torch.fx`` trace of the forward (no inputs
    needed). Where the model does not trace, only a producer and a BN that are consecutive children of a
    plain ``nn.Sequential`` count; ``strict``: any other BN is then an error (its channels could belong to
    any layer), else it gets None."""
    modules = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1

    def fits(p, bn) -> bool:
        return isinstance(p, _PRODUCERS) and counts[id(p)] == 1 and original(p, "weight").shape[0] == bn.num_features

    try:
        import torch.fx
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # data-dependent control flow, non-tensor arguments...: no trace
        graph, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    out: dict[str, nn.Module | None] = {}
    if graph is not None:
        calls: dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        for bn_name in bn_names:
            nodes, prod = calls.get(bn_name, []), None
            if len(nodes) == 1 and nodes[0].args and isinstance(nodes[0].args[0], torch.fx.Node):
                src = nodes[0].args[0]
                if src.op == "call_module" and len(calls.get(src.target, [])) == 1 and len(src.users) == 1 \
                        and fits(modules.get(src.target), modules[bn_name]):
                    prod = modules[src.target]
            out[bn_name] = prod
        return out
    for seq_name, seq in model.named_modules():
        if type(seq).forward is not nn.Sequential.forward:
            continue
        kids = list(seq.named_children())
        for (_, p), (bn_short, bn) in zip(kids, kids[1:]):
            bn_name = f"{seq_name}.{bn_short}" if seq_name else bn_short
            if bn_name in bn_names and fits(p, bn):
                out[bn_name] = p
    unknown = [n for n in bn_names if n not in out]
    if unknown and strict:
        raise fail("cannot tell which layer produces this BatchNorm's channels without running the model "
                   f"(torch.fx could not trace it: {why})", where=unknown[0], value=unknown,
                   hint="pass example_inputs= (the channels are then removed following the real forward)")
    return {n: out.get(n) for n in bn_names}
