"""Group importance: one score per channel of a group, from the slices the channel owns in every member.

Scores are computed per member (the tensor slice along the member's dim, gathered to channels), reduced across
members (``reduce``: mean, sum, max) and optionally normalised within the group (``normalize``: None, "sum",
"max", "mean", "standardize"). A callable ``importance(group, model) -> tensor[group.size]`` is also accepted."""
from __future__ import annotations

import contextlib
import zlib

from typing import Callable, NamedTuple

import torch
from torch import nn

from secateur.errors import fail
from secateur.graph.groups import Group, Member

IMPORTANCES: dict[str, Callable] = {}
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def importance(name: str):
    def deco(fn):
        IMPORTANCES[name] = fn
        return fn
    return deco


def _values(model: nn.Module, m: Member, grad: bool) -> torch.Tensor:
    """The member's tensor, or its gradient for Taylor importance (detached)."""
    t = m.tensor(model)
    if grad:
        if t.grad is None:
            raise fail("Taylor importance needs gradients: run a backward pass first", where=m.qualname,
                       shape=t.shape, hint="call loss.backward() on a batch before pruning")
        t = t.grad
    return t.detach()


def _rows(model: nn.Module, m: Member, grad: bool = False) -> torch.Tensor:
    """The member's slices as rows [len(index), -1] (float32, on the tensor's device)."""
    t = _values(model, m, grad)
    if not _whole(m, t):
        t = t.index_select(m.dim, m.index.to(t.device))  # whole-dim members (the common case) need no copy
    return t.movedim(m.dim, 0).reshape(m.index.numel(), -1).float()


def _per_channel(m: Member, row_scores: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.float32, device=row_scores.device)
    return out.index_add_(0, m.channel.to(row_scores.device), row_scores)


def _weighted(group: Group) -> list[Member]:
    return [m for m in group.members if m.kind in ("out", "in")]


_SHARED: dict | None = None  # see shared_norms


@contextlib.contextmanager
def shared_norms():
    """Score many groups reading each weight once: a Conv / Linear weight is a member of two groups (its outputs'
    and its inputs'), and each read is a pass over the whole weight; inside this context one pass gives both dims'
    norms (regnet_y_128gf: 2.6 GB of weights, read twice). Entries are keyed by memory, shape and version, and
    dropped when the outermost context ends."""
    global _SHARED
    outer = _SHARED
    if outer is None:
        _SHARED = {}
    try:
        yield
    finally:
        _SHARED = outer


def _slice_norms(model: nn.Module, m: Member, p: float) -> torch.Tensor:
    """Per slice of the member, sum |w|^p (p = 1 or 2) in float32, reduced in chunks of the weight's first dim. The
    rows of ``_rows`` made a moved copy of a weight read along its inputs, then an ``abs`` copy of that: fresh
    buffers of a whole weight each, every page of which faults in (regnet_y_128gf, 2.6 GB of weights: 3.2 s of
    importance, 1.9 s in ``abs``); chunks of ~4 MB reuse the allocator's memory (a 7392x7392 weight read along
    its inputs: 0.23 s -> 0.025 s)."""
    t = m.tensor(model).detach()
    if _SHARED is not None and t.dim() >= 2 and m.dim in (0, 1) and t.numel() > (1 << 20):  # (small: one read)
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version, t.dtype, p)
        both = _SHARED.get(key)
        if both is None:
            both = _SHARED[key] = _norms_both(t, p)
        return both[m.dim].index_select(0, m.index.to(t.device))
    if not _whole(m, t):
        t = t.index_select(m.dim, m.index.to(t.device))
    if t.dim() == 0:
        t = t.reshape(1)
    dims = [d for d in range(t.dim()) if d != m.dim]
    step = max(1, (1 << 20) // max(1, t.numel() // max(1, t.size(0))))

    def part(c: torch.Tensor) -> torch.Tensor:
        c = c.float()
        c = c.abs() if p == 1 else c.square()
        return c.sum(dims) if dims else c

    if t.size(0) <= step:  # one chunk (every weight of a small model): the same sums, without the cat / stack copy
        return part(t)
    chunks = [part(t[i:i + step]) for i in range(0, t.size(0), step)]
    return torch.cat(chunks) if m.dim == 0 else torch.stack(chunks).sum(0)


def _norms_both(t: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``_slice_norms`` of every position along dims 0 and 1 of ``t``, from one chunked pass. Each chunk's |w|^p
    goes into one reused buffer, and trailing size-1 dims (1x1 convs) are viewed away, not summed over (that sum
    is a copy): a (7392, 7392, 1, 1) conv 118 -> 42 ms (1 thread), the same sums in the same order."""
    step = max(1, (1 << 20) // max(1, t[0].numel()))
    rest = list(range(2, t.dim()))
    ones = all(t.size(d) == 1 for d in rest)
    rows, cols, buf = [], [], None
    for i in range(0, t.size(0), step):
        c = t[i:i + step]
        if c.dtype != torch.float32:  # the float copy is a fresh buffer already
            c = c.float()
            c = c.abs_() if p == 1 else c.square_()
        else:
            if buf is None or buf.shape != c.shape:
                buf = torch.empty_like(c)  # the chunk's layout, as ``abs`` would make it
            c = torch.abs(c, out=buf) if p == 1 else torch.square(c, out=buf)
        if rest:
            # (chunk rows, dim 1); a strided view would be summed in another order
            c = c.view(c.shape[:2]) if ones and c.is_contiguous() else c.sum(rest)
        rows.append(c.sum(1))
        cols.append(c.sum(0))
    return torch.cat(rows), torch.stack(cols).sum(0)


def _whole(m: Member, t: torch.Tensor) -> bool:
    """Does the member own every position of ``t`` along its dim? ``Member.index`` holds distinct positions of that
    dim (groups.py builds it sorted and unique), so as many of them as the dim has are all of them, in order: no op,
    where comparing with an ``arange`` cost three per member."""
    return m.index.numel() == t.size(m.dim)


def _magnitude(p: float):
    def score(group: Group, model: nn.Module) -> list[torch.Tensor]:
        return [_per_channel(m, _slice_norms(model, m, p), group.size) for m in _weighted(group)]
    return score


importance("l1")(_magnitude(1.0))
importance("l2")(_magnitude(2.0))


@importance("taylor")
def taylor(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """First-order Taylor: |sum w * dL/dw| over each channel's slices (gradients provided by the caller)."""
    return [_per_channel(m, (_rows(model, m) * _rows(model, m, grad=True)).sum(1), group.size).abs()
            for m in _weighted(group)]


@importance("bn_scale")
def bn_scale(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """Network slimming: |gamma| of the group's BatchNorm/GroupNorm weights (no norm layer: nothing to say)."""
    out = []
    for m in group.members:
        mod = model.get_submodule(m.module)
        if m.kind == "param" and m.name == "weight" and isinstance(mod, _NORM_LAYERS):
            out.append(_per_channel(m, _rows(model, m).abs().sum(1), group.size))
    return out


def _generator(group: Group) -> torch.Generator:
    """A generator for the group's random scores: the same in every process for the same ``torch.manual_seed``
    (``hash(name)`` was salted per process, so plans could not be reproduced), other groups getting other draws, and
    the caller's global random stream left where it was."""
    return torch.Generator().manual_seed((zlib.crc32(group.name.encode()) + torch.initial_seed()) % (2 ** 63))


@importance("random")
def random(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """Uniform scores, reproducible: seeded by ``torch.manual_seed`` and the group's name."""
    return [torch.rand(group.size, generator=_generator(group))]


@importance("fpgm")
def fpgm(group: Group, model: nn.Module) -> list[torch.Tensor]:
    """Filter pruning via geometric median: a filter close to all others is redundant (low score)."""
    out = []
    for m in group.members:
        if m.kind != "out" or m.dim != 0 or m.name != "weight":
            continue
        rows = _rows(model, m)
        counts = torch.bincount(m.channel, minlength=group.size)
        if bool((counts == counts[0]).all()):  # a channel of several filters (channel j of every conv group, a
            order = torch.argsort(m.channel, stable=True)  # head): all of them, side by side, not their sum
            per = rows[order.to(rows.device)].reshape(group.size, -1)
        else:
            per = torch.zeros(group.size, rows.size(1), device=rows.device).index_add_(
                0, m.channel.to(rows.device), rows)
        out.append(torch.cdist(per, per).sum(1))
    return out or _magnitude(2.0)(group, model)


def _lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP: s^2 / sum of s^2 over channels at least as important (scale-free across layers)."""
    sq = scores.pow(2)
    order = torch.argsort(sq)
    suffix = torch.flip(torch.cumsum(torch.flip(sq[order], [0]), 0), [0])
    out = torch.empty_like(sq)
    out[order] = sq[order] / suffix.clamp_min(1e-30)
    return out


@importance("lamp")
def lamp(group: Group, model: nn.Module) -> list[torch.Tensor]:
    return [_lamp(s) for s in _magnitude(2.0)(group, model)]


_REDUCE = {"mean": lambda s: s.mean(0), "sum": lambda s: s.sum(0), "max": lambda s: s.max(0).values,
           "prod": lambda s: s.prod(0), "first": lambda s: s[0]}
_NORMALIZE = {None: lambda s: s, "sum": lambda s: s / s.sum().clamp_min(1e-30),
              "max": lambda s: s / s.max().clamp_min(1e-30), "mean": lambda s: s / s.mean().clamp_min(1e-30),
              "standardize": lambda s: (s - s.min()) / (s.max() - s.min()).clamp_min(1e-30)}


def group_scores(group: Group, model: nn.Module, how="l1", *, reduce: str = "mean",
                 normalize: str | None = None) -> torch.Tensor | None:
    """One float score per channel of ``group`` (None when the criterion has nothing to say, e.g. bn_scale on a
    group without a norm layer: such groups are left alone)."""
    if reduce not in _REDUCE:
        raise fail("unknown reduce", where="importance", value=reduce, hint=f"use one of {sorted(_REDUCE)}")
    if normalize not in _NORMALIZE:
        raise fail("unknown normalize", where="importance", value=normalize,
                   hint=f"use one of {list(_NORMALIZE)}")
    if callable(how):
        s = torch.as_tensor(how(group, model) if _takes_two(how) else how(group)).float().flatten()
        if s.numel() != group.size:
            raise fail("importance callable returned the wrong number of scores", where=group.name,
                       shape=s.shape, value=group.size)
        return _NORMALIZE[normalize](_finite(s.cpu(), group, "the importance callable"))
    if how not in IMPORTANCES:
        raise fail("unknown importance", where="importance", value=how, hint=f"use one of {sorted(IMPORTANCES)}")
    parts = IMPORTANCES[how](group, model)
    if not parts:
        return None
    s = _REDUCE[reduce](torch.stack([_real(p, group, how).cpu() for p in parts]))
    return _NORMALIZE[normalize](_finite(s, group, f"importance {how!r}"))


def _real(t: torch.Tensor, group: Group, how: str) -> torch.Tensor:
    if t.is_meta:
        raise fail(f"importance {how!r} reads the weights, and a model on the meta device has none",
                   where=group.name, shape=tuple(t.shape), value=how,
                   hint="plan on meta with importance='random' or a callable (scores from a real copy, say)")
    return t


def _finite(s: torch.Tensor, group: Group, what: str) -> torch.Tensor:
    """Scores with a NaN would rank that channel anywhere (NaN compares false): refuse them, naming the group
    (NaN or inf weights, or a callable that returned them)."""
    bad = ~torch.isfinite(s)
    if bad.any():
        raise fail(f"{what} gave NaN or infinite scores (NaN / inf weights?)", where=group.name,
                   shape=tuple(s.shape), value=f"{int(bad.sum())} of {s.numel()} channels",
                   hint="check the model's weights with torch.isfinite before pruning")
    return s


def _takes_two(fn) -> bool:
    import inspect
    try:
        return len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- per-expert scores (fused mixture-of-experts)
class ExpertScores(NamedTuple):
    """Scores of a fused-experts group (``expert_scores``): ``own [experts, size]``, ``ranked [size]``."""
    own: torch.Tensor
    ranked: torch.Tensor


def _expert_rows(model: nn.Module, m: Member, experts: int, grad: bool = False) -> torch.Tensor:
    """The member's slices per expert: [experts, len(index), -1] (float32); the expert dim is the tensor's dim 0."""
    t = _values(model, m, grad)
    if t.dim() < 2 or t.size(0) != experts or m.dim == 0:
        raise fail("internal: an experts member is not batched over the experts along dim 0", where=m.qualname,
                   shape=t.shape, value=experts)
    if not _whole(m, t):
        t = t.index_select(m.dim, m.index.to(t.device))
    return t.movedim(m.dim, 1).reshape(experts, m.index.numel(), -1).float()


def _expert_channels(m: Member, rows: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(rows.size(0), size, dtype=torch.float32, device=rows.device)
    return out.index_add_(1, m.channel.to(rows.device), rows)


def _expert_parts(group: Group, model: nn.Module, how: str) -> list[torch.Tensor] | None:
    """Per member, [experts, size] scores: each expert's own slices scored as the shared criterion scores the
    whole group (LAMP ranks like L2 within an expert: ``expert_scores`` applies it to the group's ranking)."""
    e = group.experts
    members = _weighted(group)
    if how in ("l1", "l2", "lamp"):
        p = 1 if how == "l1" else 2
        return [_expert_channels(m, _expert_rows(model, m, e).abs().pow(p).sum(2), group.size) for m in members]
    if how == "taylor":
        return [_expert_channels(m, (_expert_rows(model, m, e) * _expert_rows(model, m, e, grad=True)).sum(2),
                                 group.size).abs() for m in members]
    if how == "random":
        return [torch.rand(e, group.size, generator=_generator(group))]
    if how == "fpgm":
        out = []
        for m in members:
            if m.kind != "out":
                continue
            rows = _expert_rows(model, m, e)
            per = torch.zeros(e, group.size, rows.size(2), device=rows.device).index_add_(
                1, m.channel.to(rows.device), rows)
            out.append(torch.cdist(per, per).sum(2))
        return out or _expert_parts(group, model, "l2")
    return None  # bn_scale (no norm in an expert) and criteria registered by users: the group's shared scores


def expert_scores(group: Group, model: nn.Module, how="l1", *, reduce: str = "mean",
                  normalize: str | None = None) -> ExpertScores | None:
    """For a fused-experts group (``group.experts`` > 0): ``(own, ranked)``. ``own[e]`` ranks expert ``e``'s
    channels (each expert keeps its own top channels); ``ranked[r]`` is what the group loses with its ``r``-th
    lowest channel slot (one channel from every expert), the score it enters a global ranking or a threshold with.

    Why that ranking: removing ``n`` channels from the group removes each expert's ``n`` lowest. Slot ``r`` is
    then scored as the shared criterion would score a channel if every expert's channels were first reordered by
    that expert's own scores: the sum over experts of each one's ``r``-th lowest score (a shared channel's L1 / L2 /
    Taylor score is that same sum over the experts' slices), with LAMP and ``normalize`` applied to those sums as
    to a shared group's scores. So the group competes with other groups on the scale it had with one shared set,
    and its slot scores never decrease: a global budget takes a prefix of them, which is what ``own`` removes.
    None: the criterion has nothing to say (as ``group_scores``). A callable may return ``[experts, size]`` scores;
    one score per channel (``[size]``) is then the same for every expert (one shared set)."""
    e = group.experts
    if callable(how):
        s = torch.as_tensor(how(group, model) if _takes_two(how) else how(group)).float().cpu()
        if s.numel() == e * group.size:
            own = _finite(s.reshape(e, group.size), group, "the importance callable")
            return ExpertScores(own, _NORMALIZE[normalize](own.sort(1).values.sum(0)))
        if s.numel() != group.size:
            raise fail(f"importance callable returned the wrong number of scores (experts group: {group.size} or "
                       f"{e} x {group.size})", where=group.name, shape=s.shape, value=group.size)
        shared = _NORMALIZE[normalize](_finite(s.flatten(), group, "the importance callable"))
        return ExpertScores(shared.expand(e, group.size), shared)
    if how not in ("l1", "l2", "lamp", "taylor", "random", "fpgm"):
        shared = group_scores(group, model, how, reduce=reduce, normalize=normalize)
        return None if shared is None else ExpertScores(shared.expand(e, group.size), shared)
    if reduce not in _REDUCE:
        raise fail("unknown reduce", where="importance", value=reduce, hint=f"use one of {sorted(_REDUCE)}")
    if normalize not in _NORMALIZE:
        raise fail("unknown normalize", where="importance", value=normalize, hint=f"use one of {list(_NORMALIZE)}")
    parts = _expert_parts(group, model, how)
    if not parts:
        return None
    own = _finite(_REDUCE[reduce](torch.stack([_real(p, group, how).cpu() for p in parts])), group,
                  f"importance {how!r}")
    ranked = own.sort(1).values.sum(0)
    if how == "lamp":
        ranked = _lamp(ranked)
    return ExpertScores(own, _NORMALIZE[normalize](ranked))
