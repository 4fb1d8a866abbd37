"""``prune``: the one verb of the masking engine.

Everything is computed and validated first; masks are attached only when every tensor succeeded, so a
bad call leaves the model exactly as it was."""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from functools import partial
from typing import Callable, Iterable, Mapping, Union

import torch
from torch import nn

from secateur.criteria import CriterionSpec, Magnitude, get_criterion
from secateur.errors import fail
from secateur.masks import check_model, get_mask, set_mask
from secateur.patterns import NM, PatternSpec, get_pattern
from secateur.selection import Lazy, below, lowest
from secateur.targets import Target, TargetSpec, select_targets

Amount = Union[float, Mapping[str, float], Callable[[str, torch.Tensor], float]]

_NEG_INF = float("-inf")


def _is_real(x) -> bool:
    """Any real number (int, float, NumPy scalars...) but not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_ratio(r, where):
    if not _is_real(r) or not (0.0 <= float(r) <= 1.0):  # NaN fails the range test too
        raise fail("amount must be a ratio in [0, 1]", where=where, value=r)
    return float(r)


def _ratio_for(amount: Amount, t: Target, used: set) -> float | None:
    if isinstance(amount, Mapping):
        for pat, r in amount.items():
            if fnmatch.fnmatchcase(t.name, pat) or fnmatch.fnmatchcase(t.module_name, pat):
                used.add(pat)
                return _check_ratio(r, t.name)
        return None
    if callable(amount):
        return _check_ratio(amount(t.name, t.tensor), t.name)
    return amount  # a scalar, checked once by _check_options


def _validate_tensor(t: Target) -> torch.Tensor:
    w = t.tensor
    if w.is_meta:
        raise fail("masks need real weights: this tensor is on the meta device (it holds no values)",
                   where=t.name, shape=w.shape,
                   hint="materialize the model (model.to_empty(device=...), then load its weights) before pruning")
    if not torch.is_floating_point(w):
        raise fail("cannot prune a non-floating tensor", where=t.name, shape=w.shape, value=w.dtype)
    # a finite sum proves every entry finite with one reduction and no boolean copy; only a sum that is
    # not finite (a NaN/inf, or an overflow) pays for the exact element-wise check
    if w.numel() and not bool(torch.isfinite(w.detach().sum())):
        bad = ~torch.isfinite(w.detach())
        if bool(bad.any()):
            raise fail("tensor holds NaN or infinite values", where=t.name, shape=w.shape,
                       value=w.detach()[bad].flatten()[0].item())
    return w


def _group_keep_old(old: torch.Tensor | None, pattern, shape) -> torch.Tensor | None:
    """Which groups are already fully pruned by an existing mask (they count as pruned)."""
    if old is None:
        return None
    if pattern.is_elementwise:
        return ~old
    return pattern.reduce((~old).float(), 1.0) == math.prod(shape) / math.prod(pattern.group_shape(shape))


def prune(model: nn.Module, amount: Amount | None = None, *, threshold: float | None = None,
          count: int | None = None, criterion: CriterionSpec = "l1", pattern: PatternSpec = "element",
          scope: str = "local", targets: TargetSpec = None, include_bias: bool = False,
          exclude: Iterable[str] = (), min_sparsity: float = 0.0, max_sparsity: float = 1.0,
          ) -> dict[str, float]:
    """Mask the least important weights of ``model`` in place; returns each tensor's sparsity.

    Say how much with exactly one of: ``amount`` (target sparsity ratio of each tensor for
    ``scope="local"``, of all targets together for ``"global"``; a dict ``{name glob: ratio}`` or a
    function ``(name, tensor) -> ratio`` gives per-layer ratios), ``threshold`` (prune scores below it,
    PaddleSlim's threshold mode) or ``count`` (number of weights, or of groups for block/row patterns).
    N:M patterns need none of them. Ratios are targets: pruning again to a higher ratio prunes among
    the survivors and reaches exactly that ratio; masks never regrow.

    ``criterion``: ``"l1"``, ``"l2"``, ``"random"``, ``"taylor"``, a `Criterion` or a function
    ``(tensor, name) -> scores``. ``pattern``: ``"element"``, ``"2:4"``, ``"block4x4"``, ``"rows"``...
    ``targets``: None (Linear/Conv weights), a preset (``"conv1x1"``), a filter ``(name, module) -> bool``
    or module names. ``min_sparsity`` / ``max_sparsity`` bound each tensor in global scope (with
    ``amount`` or ``count``); bounds that make the global target unreachable are an error."""
    check_model(model, "prune")
    crit, pat = get_criterion(criterion), get_pattern(pattern)
    amount, count, lo, hi = _check_options(pat, amount, threshold, count, scope, min_sparsity, max_sparsity)
    chosen = select_targets(model, targets, include_bias=include_bias, exclude=exclude)
    chosen = drop_tied(model, chosen, explicit=targets is not None)
    work = _collect(chosen, crit, pat, amount)
    _check_count(work, amount if scope == "global" else None, count, scope, lo, hi)
    with torch.no_grad():
        pruned = _select(work, pat, amount, threshold, count, scope, lo, hi)
        new_masks = []
        for (t, _, _, _, tp), p in zip(work, pruned):
            keep = tp.expand(~p, tuple(t.tensor.shape))
            old = get_mask(t.module, t.param)
            if old is not None:
                keep = keep & old
            new_masks.append((t, keep))
    # every check has passed and every mask is computed: only now is the model changed
    result = {}
    for t, keep in new_masks:
        set_mask(t.module, t.param, keep.contiguous())
        result[t.name] = 1.0 - int(torch.count_nonzero(keep)) / max(keep.numel(), 1)
    return result


def _check_options(pat, amount, threshold, count, scope, min_sparsity, max_sparsity) -> tuple:
    """Validated ``(amount, count, min_sparsity, max_sparsity)``: a scalar amount as a float, a count as an int."""
    given = [x is not None for x in (amount, threshold, count)]
    if isinstance(pat, NM):
        if any(given):
            raise fail("N:M patterns fix the sparsity; do not pass amount, threshold or count", value=pat)
    elif sum(given) != 1:
        raise fail("give exactly one of amount, threshold or count", value=dict(amount=amount,
                   threshold=threshold, count=count))
    if scope not in ("local", "global"):
        raise fail("scope must be 'local' or 'global'", value=scope)
    lo = _check_ratio(min_sparsity, "min_sparsity")
    hi = _check_ratio(max_sparsity, "max_sparsity")
    if lo > hi:
        raise fail("min_sparsity exceeds max_sparsity", value=(lo, hi))
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise fail("count must be a non-negative integer", where="count", value=count)
        count = int(count)
    if threshold is not None and (not _is_real(threshold) or math.isnan(threshold)):
        raise fail("threshold must be a number", where="threshold", value=threshold)
    if scope == "global" and (isinstance(amount, Mapping) or callable(amount)):
        raise fail("per-layer amounts need scope='local'", value=amount)
    if amount is not None and not isinstance(amount, Mapping) and not callable(amount):
        amount = _check_ratio(amount, "amount")
    if (lo, hi) != (0.0, 1.0) and (scope != "global" or threshold is not None or isinstance(pat, NM)):
        raise fail("min_sparsity / max_sparsity bound the tensors of a global amount or count only",
                   value=dict(min_sparsity=lo, max_sparsity=hi), hint="pass scope='global' with amount or count, "
                   "or give per-layer amounts as a dict")
    if isinstance(amount, float) and not lo <= amount <= hi:
        raise fail("no tensor may be pruned past max_sparsity (or less than min_sparsity), so the global amount "
                   "cannot be met", where="amount", value=amount,
                   hint=f"ask for an amount within [{lo}, {hi}] or widen min_sparsity / max_sparsity")
    return amount, count, lo, hi


def _collect(chosen: list[Target], crit, pat, amount) -> list[tuple]:
    """Validate every target and prepare ``(target, lazy group scores, already-pruned groups, ratio,
    pattern resolved for the module)``; scores are computed once to validate, then dropped."""
    used: set = set()
    work = []
    for t in chosen:
        w = _validate_tensor(t)
        tp = pat.for_module(t.module)  # e.g. N:M along dim 0 of a ConvTranspose weight (its input dim)
        tp.check(tuple(w.shape), t.name)
        ratio = _ratio_for(amount, t, used) if amount is not None else None
        if amount is not None and ratio is None:
            continue
        with torch.no_grad():
            done = _group_keep_old(get_mask(t.module, t.param), tp, tuple(w.shape))
            # magnitudes of finite weights are finite: only other criteria need the check
            shape = _scores(crit, t, tp, done, check=not isinstance(crit, Magnitude)).shape
        nonneg = isinstance(crit, Magnitude) and done is None  # no -inf fill: every score >= 0
        work.append((t, Lazy(partial(_scores, crit, t, tp, done), shape, w.device, nonneg), done, ratio, tp))
    if isinstance(amount, Mapping):
        unused = set(amount) - used
        if unused:
            raise fail("amount keys matched no target tensor", value=sorted(unused),
                       hint=f"targets are {[t.name for t in chosen][:10]}")
    return work


def _check_count(work: list[tuple], amount: float | None, count: int | None, scope: str, lo: float,
                 hi: float) -> None:
    """A count must fit the targets; a global amount or count must be reachable within min / max_sparsity (the
    rounded amount too: 0.5 of two tensors of 3 entries is 3 entries, but a floor of 0.5 prunes at least 2 of each)."""
    sizes = {t.name: s.numel() for t, s, _, _, _ in work}
    if count is not None:
        too_small = {n: size for n, size in sizes.items() if size < count} if scope == "local" else (
            {"all targets": sum(sizes.values())} if sum(sizes.values()) < count else {})
        if too_small:
            name, size = next(iter(too_small.items()))
            raise fail(f"count exceeds the {size} prunable entries (or groups)", where=name, value=count,
                       hint="count is per tensor with scope='local', over all targets with scope='global'")
    if scope != "global" or (amount is None and count is None) or (lo, hi) == (0.0, 1.0):
        return
    for t, s, _, _, _ in work:
        if math.ceil(lo * s.numel()) > math.floor(hi * s.numel()):
            raise fail(f"min_sparsity / max_sparsity allow no count of this tensor's {s.numel()} entries (or groups)",
                       where=t.name, shape=t.tensor.shape, value=(lo, hi),
                       hint="widen the bounds, or exclude the tensor")
    most = sum(math.floor(hi * n) for n in sizes.values())
    least = sum(math.ceil(lo * n) for n in sizes.values())
    k = count if count is not None else round(amount * sum(sizes.values()))
    if not least <= k <= most:
        raise fail(f"min_sparsity / max_sparsity allow pruning only {least} to {most} entries (or groups)",
                   where="count" if count is not None else "amount", value=count if count is not None else amount,
                   hint=f"ask for {'a count' if count is not None else 'an amount'} in that range or widen the bounds")


def _select(work, pat, amount, threshold, count, scope, lo, hi) -> list[torch.Tensor]:
    """Prune-masks over each target's groups (True = pruned)."""
    if isinstance(pat, NM):
        return [~tp.keep(s()) for _, s, _, _, tp in work]
    if threshold is not None:
        return [below(s(), threshold) for _, s, _, _, _ in work]
    if scope == "global":
        return _global(work, amount, count, lo, hi)
    pruned = []
    for _, s, done, ratio, _ in work:
        k = count if count is not None else round(ratio * s.numel())
        k = max(k, int(torch.count_nonzero(done)) if done is not None else 0)
        pruned.append(lowest([s], min(k, s.numel()))[0])
    return pruned


def drop_tied(model: nn.Module, chosen: list[Target], explicit: bool) -> list[Target]:
    """A tensor shared by several modules (tied embeddings) cannot carry one module's mask: the other
    users would see the zeros only once `finalize` bakes them, so the masked and the finalized model
    would differ. One module registered under two names (``nn.Sequential(lin, act, lin)``) is not tied:
    its mask acts wherever it runs. The default targets skip such a tensor, like the embedding it is tied to (with a
    warning naming it); targets named by the user make it an error that names both places."""
    users: dict[int, dict[int, str]] = {}  # tensor -> {id of a module holding it: its first name}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = ("." + name).replace(".parametrizations.", ".").removesuffix(".original")[1:]
        owner = model.get_submodule(name.rpartition(".")[0])
        users.setdefault(id(p), {}).setdefault(id(owner), name)
    kept, skipped = [], []
    for t in chosen:
        names = list(users.get(id(t.tensor), {}).values())
        if len(names) <= 1:
            kept.append(t)
            continue
        if explicit:
            raise fail("this tensor is shared (tied) with " + ", ".join(n for n in names if n != t.name),
                       where=t.name, shape=t.tensor.shape, value=names,
                       hint=f"leave it out of targets, or exclude=[{t.module_name!r}]")
        skipped.append(f"{t.name} (tied to {', '.join(n for n in names if n != t.name)})")
    if skipped:
        warnings.warn("secateur.prune skips tensors shared with other modules: " + "; ".join(skipped),
                      stacklevel=3)
    if not kept:
        raise fail("every target tensor is shared (tied) with another module", value=skipped)
    return kept


def _scores(crit, t: Target, pat, done, check: bool = False) -> torch.Tensor:
    s = crit.group_scores(t.tensor, t.name, pat).float()
    if check and s.numel() and not bool(torch.isfinite(s).all()):
        raise fail("criterion produced NaN or infinite scores", where=t.name, shape=t.tensor.shape)
    return s.masked_fill(done, _NEG_INF) if done is not None else s


def _global(work, amount, count, lo, hi) -> list[torch.Tensor]:
    """Global selection with per-tensor floors and ceilings: each tensor first prunes its floor (its own lowest
    scores); the rest of the budget goes to the lowest remaining scores across tensors, each up to its ceiling.
    The ceilings are met by water-filling (fix the tensors past their ceiling, share the rest again): a tensor past
    its ceiling stays past it when the others get less, so fixing it is exact. Floors cannot join that loop: a tensor
    fixed at its ceiling may deserve less once others are lifted to their floors (the total then came out short)."""
    scores = [s for _, s, _, _, _ in work]
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    k = count if count is not None else round(amount * total)
    # what an earlier call pruned stays pruned (scored -inf, it comes first): it counts towards a tensor's floor and
    # ceiling and towards the total, rather than being added to them
    done = [int(torch.count_nonzero(d)) if d is not None else 0 for _, _, d, _, _ in work]
    floors = [max(math.ceil(lo * n), d) for n, d in zip(sizes, done)]
    room = [max(math.floor(hi * n), d) - f for n, d, f in zip(sizes, done, floors)]  # how many more each may prune
    k = min(max(k, sum(floors)), total)
    base = [lowest([s], f)[0] if f else None for s, f in zip(scores, floors)]  # None: no floor (no extra mask)
    rest = [_without(s, b) if f else s for s, b, f in zip(scores, base, floors)]
    fixed: dict[int, int] = {}
    out: dict[int, torch.Tensor] = {}
    while True:
        active = [i for i in range(len(scores)) if i not in fixed]
        if not active:
            break
        masks = lowest([rest[i] for i in active], max(k - sum(floors) - sum(fixed.values()), 0))
        over = {i: room[i] for i, m in zip(active, masks) if int(torch.count_nonzero(m)) > room[i]}
        if not over:
            out = dict(zip(active, masks))
            break
        fixed.update(over)
    for i, c in fixed.items():
        out[i] = lowest([rest[i]], c)[0]
    return [out[i] if base[i] is None else base[i] | out[i] for i in range(len(scores))]


def _without(s: Lazy, pruned: torch.Tensor) -> Lazy:
    """``s`` with the ``pruned`` entries scored +inf (out of the running, as long as others remain)."""
    return Lazy(lambda: s().masked_fill(pruned, math.inf), s.shape, s.device, s.nonneg)
