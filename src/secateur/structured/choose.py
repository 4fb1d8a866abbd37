"""Which channels go: arguments validated up front, groups scored (secateur.importance) and chosen by ratio, threshold,
global ranking or ``round_to``, with count ties and linked groups honoured."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Iterable

import torch
from torch import nn

from secateur.errors import fail
from secateur.graph.groups import Graph, Group
from secateur.importance import ExpertScores, expert_scores, group_scores, shared_norms
from secateur.structured.plan import Plan
from secateur.selection import below


def _number(v: Any) -> bool:
    """A real number (a Python or NumPy float / int, a 0-d tensor), not a bool, not NaN."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dim()):
        return False
    try:
        return not math.isnan(float(v)) and not isinstance(v, str)
    except (TypeError, ValueError):
        return False


def _validate(ratio, threshold, scope, round_to, steps, target_macs, target_params, heads, grouped="channels"):
    if isinstance(ratio, dict):
        if not ratio:
            raise fail("a ratio dict names the modules to prune and their ratios; it is empty",
                       where="prune_channels", value=ratio)
        for k, v in ratio.items():
            if not _number(v) or not 0.0 <= float(v) < 1.0:
                raise fail("ratio must be a number in [0, 1)", where=f"prune_channels ratio[{k!r}]", value=v)
    elif threshold is None and (not _number(ratio) or not 0.0 <= float(ratio) < 1.0):
        raise fail("ratio must be a number in [0, 1), or a dict of module names / globs to such numbers",
                   where="prune_channels", value=ratio)
    if threshold is not None and not _number(threshold):
        raise fail("threshold is a number (channels scoring below it go)", where="prune_channels", value=threshold)
    if scope not in ("local", "global"):
        raise fail("scope must be 'local' or 'global'", where="prune_channels", value=scope)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise fail("round_to must be a positive int", where="prune_channels", value=round_to)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise fail("steps must be a positive int", where="prune_channels", value=steps)
    for name, t in (("target_macs", target_macs), ("target_params", target_params)):
        if t is not None and (not _number(t) or not 0.0 < float(t) <= 1.0):
            raise fail(f"{name} is a fraction of the current model in (0, 1]", where="prune_channels", value=t)
    if target_macs is not None and target_params is not None:
        raise fail("give one target: target_macs or target_params", where="prune_channels",
                   value={"target_macs": target_macs, "target_params": target_params})
    if isinstance(ratio, dict) and (target_macs is not None or target_params is not None):  # (ignored, as steps)
        raise fail("a MACs / params target chooses one ratio for every group itself; it cannot take a ratio dict",
                   where="prune_channels", value={"ratio": ratio, "target_macs": target_macs,
                                                  "target_params": target_params},
                   hint="prune only some modules with a target by ignoring the others (ignore=...)")
    if steps != 1 and (target_macs is not None or target_params is not None):  # (it was ignored without a word)
        raise fail("steps splits ratio into rounds; a MACs / params target is met by one plan, applied once",
                   where="prune_channels", value={"steps": steps, "target_macs": target_macs,
                                                  "target_params": target_params}, hint="give steps=1")
    if threshold is not None and (target_macs is not None or target_params is not None):
        raise fail("threshold chooses the channels itself; it cannot meet a MACs / params target too",
                   where="prune_channels", value={"threshold": threshold, "target_macs": target_macs,
                                                  "target_params": target_params})
    if heads not in ("heads", "head_dim"):
        raise fail("heads must be 'heads' (whole heads) or 'head_dim' (the same number of dims in every head)",
                   where="prune_channels", value=heads)
    if grouped not in ("channels", "groups"):
        raise fail("grouped must be 'channels' (the same channels from every conv group) or 'groups' (whole conv "
                   "groups)", where="prune_channels", value=grouped)


def _refuse_rope(model: nn.Module) -> None:
    """RoPE rotates q/k dims i and i + head_dim/2 together with frequencies computed from the head size:
    removing dims would change the rotation of the dims that stay (and a rebuilt model recomputes them)."""
    config = getattr(model, "config", None)
    for name, mod in model.named_modules():
        if "inv_freq" in mod._buffers or "rotary" in type(mod).__name__.lower():
            raise fail("heads='head_dim' is not supported with rotary position embeddings (RoPE)",
                       where=name or type(mod).__name__, value=type(mod).__name__,
                       hint="use heads='heads' to remove whole heads")
    rope = [k for k in ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim") if getattr(config, k, None)]
    if rope:
        raise fail("heads='head_dim' is not supported with rotary position embeddings (RoPE)",
                   where=type(model).__name__, value=rope[0], hint="use heads='heads' to remove whole heads")


def _module_name(model: nn.Module, x: Any, where: str, names: dict | None = None) -> str:
    """A module's qualified name, or a name / glob that matches at least one module (a typo would otherwise
    prune or keep nothing without a word)."""
    names = names if names is not None else {m: n for n, m in model.named_modules()}
    if isinstance(x, nn.Module):
        if x not in names:
            raise fail("module is not part of the model", where=where, value=type(x).__name__)
        return names[x]
    pat = str(x)
    all_names = list(names.values())  # (the caller's one walk, not one per key)
    if not any(_matches(n, {pat}) for n in all_names):
        close = [n for n in all_names if n and pat.split("*")[0].split(".")[0] in n][:5] or all_names[1:6]
        raise fail("name or pattern matches no module of the model", where=where, value=pat,
                   hint=f"module names look like {close}")
    return pat


def _ignored(model: nn.Module, ignore: Iterable) -> set[str]:
    if isinstance(ignore, (str, nn.Module)):
        ignore = [ignore]
    try:
        ignore = list(ignore)
    except TypeError:
        raise fail("ignore / ignore_inputs take modules, names or globs (one, or an iterable of them)",
                   where="prune_channels", value=ignore) from None
    if not ignore:  # (the usual case: no walk over the modules)
        return set()
    names = {m: n for n, m in model.named_modules()}
    return {_module_name(model, x, "prune_channels ignore", names) for x in ignore}


class GroupRatios(dict):
    """Ratios for single groups of one graph, keyed by ``id(group)`` (internal: rounds of pruning give each group
    the share of its own original width still to go, see `toward_original`). Groups it does not name keep their
    channels."""


def group_keys(groups: Iterable[Group]) -> list[str]:
    """A name for each group that survives pruning: its first member's module, numbered among the groups that
    share it (a fused q/k/v projection leads several)."""
    seen: dict[str, int] = {}
    out = []
    for g in groups:
        i = seen.get(g.name, 0)
        seen[g.name] = i + 1
        out.append(f"{g.name}#{i}")
    return out


def widths(graph: Graph) -> dict[str, int]:
    """Each group's width by `group_keys`: what later rounds' shares are of."""
    return {k: g.size for k, g in zip(group_keys(graph.groups), graph.groups)}


def toward_original(model: nn.Module, graph: Graph, first: dict[str, int], share, fallback, scope: str,
                    ignore: Iterable = (), ignore_inputs: Iterable = ()) -> GroupRatios:
    """This round's ratio of each group's *current* width such that the group keeps what one-shot pruning of its
    width in ``first`` by ``share(group)`` would keep (``scope="global"``: the groups' total does). Rounds of
    pruning that each take a share of the survivors, counts rounded down, remove nothing from a narrow layer when
    the shares are small (5 channels, ten rounds towards 0.5); counting from the first widths, the rounds add up
    to the one-shot count. ``fallback(group)``: the ratio for a group ``first`` does not know."""
    out = GroupRatios()
    ignored = _ignored(model, ignore), _ignored(model, ignore_inputs)
    live = [(k, g, float(share(g))) for k, g in zip(group_keys(graph.groups), graph.groups)
            if not _is_ignored(g, *ignored)]
    live = [(k, g, s) for k, g, s in live if s > 0]
    if scope == "global" and all(k in first for k, _, _ in live):
        now = sum(g.size for _, g, _ in live)
        gone = sum(first[k] for k, _, _ in live) - now
        need = _floor(sum(first[k] * s for k, _, s in live)) - gone
        if now and need > 0:
            out.update((id(g), need / now) for _, g, _ in live)
        return out
    for k, g, s in live:
        f = first.get(k)
        r = float(fallback(g)) if f is None or scope == "global" else (g.size - (f - _floor(f * s))) / g.size
        if r > 0:
            out[id(g)] = r
    return out


def resolve_ratio(model: nn.Module, ratio: float | dict) -> float | dict:
    """A ratio dict keyed by names / globs (a name covers its submodules) or modules, as names; every key must
    match a module."""
    if not isinstance(ratio, dict) or isinstance(ratio, GroupRatios):
        return ratio
    names = {m: n for n, m in model.named_modules()}
    return {_module_name(model, k, "prune_channels ratio", names): v for k, v in ratio.items()}


def _matches(name: str, pats: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatch(name, p) for p in pats)


def _is_ignored(group: Group, outputs: set[str], inputs: set[str]) -> bool:
    """``ignore``: the module's output channels stay; ``ignore_inputs``: its input channels stay. A grouped conv
    that loses whole conv groups (a depthwise conv) loses the inputs of the outputs it drops: its "out" member is
    an input too."""
    return any((m.kind in ("out", "param") and _matches(m.module, outputs)) or
               ((m.consumer or group.grouped.get(m.module) == "groups") and _matches(m.module, inputs))
               for m in group.members)


def _ratio_for(group: Group, ratio) -> float:
    if not isinstance(ratio, dict):
        return float(ratio)
    if isinstance(ratio, GroupRatios):
        return float(ratio.get(id(group), 0.0))
    for pat, r in ratio.items():
        if any(_matches(m.module, {pat}) for m in group.members if m.kind == "out"):
            return float(r)
    return 0.0


def _round(size: int, n: int, round_to: int | None, unit: int = 1) -> int:
    """Never prune a group to zero; keep a multiple of round_to channels. ``round_to`` counts the layers'
    channels: where one group channel is ``unit`` of them (channel j of each of ``unit`` conv groups), a kept
    count k only needs k * unit to be a multiple, so a grouped conv is not held to round_to channels *per
    group* (a group width of 4 or 8 would then never be pruned at round_to=8)."""
    n = max(0, min(n, size - 1))
    if round_to:
        step = round_to // math.gcd(round_to, unit)
        keep = min(size, math.ceil((size - n) / step) * step)
        n = size - keep
    return n


def _floor(x: float) -> int:
    """``int(x)`` for a channel count, where a ratio that went through float arithmetic (``1 - (1 - 1/3)``,
    a sum over groups) lands a hair below the integer it means: 6 * 0.33333333333333326 is 2 channels, not 1."""
    return int(math.floor(x + 1e-9))


def _count(group: Group, n: int, round_to: int | None) -> int:
    """How many channels to remove: a head-dim group removes the same count from every head (at least one dim
    stays in each), so ``n`` is split evenly and rounded per head. A group's ``align`` (a kernel's need) joins
    ``round_to``."""
    if group.align > 1:
        round_to = math.lcm(round_to or 1, group.align)
    if group.block is None:
        return _round(group.size, n, round_to, group.unit)
    heads = int(group.block.max()) + 1
    return _round(group.size // heads, n // heads, round_to) * heads


def _pick(group: Group, scores: torch.Tensor | ExpertScores, n: int) -> torch.Tensor:
    """The ``n`` lowest-scoring channels (per head for a head-dim group: n / heads in each; per expert for a
    fused-experts group: each expert's own ``n`` lowest, ``[experts, n]``, sorted)."""
    if isinstance(scores, ExpertScores):
        return torch.argsort(scores.own, dim=1, stable=True)[:, :n].sort(1).values
    if group.block is None:
        return torch.argsort(scores, stable=True)[:n]
    heads = int(group.block.max()) + 1
    out = []
    for b in range(heads):
        idx = (group.block == b).nonzero().flatten()
        out.append(idx[torch.argsort(scores[idx], stable=True)[:n // heads]])
    return torch.cat(out)


def _ranked(scores: torch.Tensor | ExpertScores) -> torch.Tensor:
    """One score per channel slot, for thresholds and global ranking (``importance.expert_scores``)."""
    return scores.ranked if isinstance(scores, ExpertScores) else scores


def _removed_count(chans: torch.Tensor) -> int:
    """Channels a choice removes from its group (per expert for a fused-experts choice ``[experts, n]``)."""
    return int(chans.shape[-1]) if chans.dim() == 2 else int(chans.numel())


def _linked(choices, links, scores) -> list[tuple[Group, torch.Tensor]]:
    """q/k units and v units of one attention read by one head size (HF ``view(..., head_dim)``): both lose the
    same count per head, the smaller of the two (zero where one of them is not pruned)."""
    per = {id(g): c.numel() // (int(g.block.max()) + 1) for g, c in choices if g.block is not None}
    changed = True
    while changed:
        changed = False
        for a, b in links:
            m = min(per.get(id(a), 0), per.get(id(b), 0))
            for g in (a, b):
                if per.get(id(g), 0) != m:
                    per[id(g)], changed = m, True
    out = []
    for g, c in choices:
        if g.block is None:
            out.append((g, c))
        elif per[id(g)]:
            heads = int(g.block.max()) + 1
            out.append((g, c if per[id(g)] * heads == c.numel() else _pick(g, scores[id(g)], per[id(g)] * heads)))
    return out


def _refuse_masked(model: nn.Module) -> None:
    """Channel removal slices the stored tensors; a mask on top would be sliced out of step with them."""
    from secateur.masks import iter_masks
    for name, module, param, mask in iter_masks(model):
        raise fail("structural pruning needs a model without masks", where=f"{name}.{param}", shape=mask.shape,
                   hint="call secateur.finalize(model) first to bake the masks in")



def _new_plan(graph: Graph, choices: list, notes: list[str], heads: str) -> Plan:
    plan = Plan(graph.groups, choices, notes, heads=heads, norms=graph.norms)
    note = ("heads='head_dim': attention scales stay 1/sqrt(original head size) (a scale the call reads from the module, "
            "such as `scaling`, is left as it is; one derived from the head size is folded into q's rows, noted per "
            "call)")
    if any(g.block is not None for g, _ in choices) and note not in plan.notes:
        plan.notes.append(note)
    return plan


def _ratio_keys_prune(graph: Graph, ratio: dict) -> None:
    """Every key of a ratio dict must name a module whose output channels can go: a key naming only an activation,
    or the layer that makes the model's outputs (always kept), would prune nothing without a word."""
    outs = {m.module for g in graph.groups for m in g.members if m.kind == "out"}
    for pat in ratio:
        if not any(_matches(n, {pat}) for n in outs):
            raise fail("ratio key names no module with output channels that can be removed (an activation or "
                       "container without channels of its own, or the layer making the model's outputs, which "
                       "are always kept)", where="prune_channels ratio", value=pat,
                       hint=f"modules whose outputs can go look like {sorted(outs)[:5]}")


def _candidates(model: nn.Module, graph: Graph, ratio, every: bool, importance, ignore, ignore_inputs, reduce,
                normalize) -> list[tuple[Group, torch.Tensor, float]]:
    """(group, channel scores, ratio) for every group that may lose channels (``every``: ratio 0 too)."""
    ignored, ignored_in = _ignored(model, ignore), _ignored(model, ignore_inputs)
    if isinstance(ratio, dict) and not isinstance(ratio, GroupRatios):
        _ratio_keys_prune(graph, ratio)
    cands: list[tuple[Group, torch.Tensor, float]] = []
    with shared_norms():  # each weight read once for the groups of both its dims
        for g in graph.groups:
            if _is_ignored(g, ignored, ignored_in):
                continue
            r = _ratio_for(g, ratio)
            if r <= 0 and not every:
                continue
            if g.experts:  # each expert ranks its own channels
                s = expert_scores(g, model, importance, reduce=reduce, normalize=normalize)
            else:
                s = group_scores(g, model, importance, reduce=reduce, normalize=normalize)
            if s is not None:
                cands.append((g, s, r))
    return cands


def _choose(cands, threshold, scope, round_to, links=(), ties=None, fixed=frozenset()
            ) -> list[tuple[Group, torch.Tensor]]:
    """The channels to remove in each candidate group; ``fixed``: ids of groups that keep every channel (the dry
    run left them out); ``ties``: groups whose kept counts must agree (graph/ties.py)."""
    choices = []
    if threshold is not None:
        for g, s, _ in cands:
            n = _count(g, int(below(_ranked(s), threshold).sum()), round_to)
            if n:
                choices.append((g, _pick(g, s, n)))
    elif scope == "local":
        for g, s, r in cands:
            n = _count(g, _floor(g.size * r), round_to)
            if n:
                choices.append((g, _pick(g, s, n)))
    else:
        choices = _global(cands, round_to)
    if links:
        choices = _linked(choices, links, {id(g): s for g, s, _ in cands})
    choices = [(g, c) for g, c in choices if id(g) not in fixed]
    if ties:
        choices = _tied(choices, cands, ties, round_to, fixed)
    return choices


def align_notes(cands, choices, threshold, scope, round_to) -> list[str]:
    """A group a kernel's alignment (``Group.align``) left whole although the ratio asked for channels: said, so that a
    small model that prunes nothing (tiny MoE experts at widths below a multiple of 8) is not a mystery."""
    if scope != "local" and threshold is None:
        return []  # global: the budget went elsewhere, not to this group
    chosen = {id(g) for g, _ in choices}
    out = []
    for g, s, r in cands:
        if g.align <= 1 or id(g) in chosen:
            continue
        n = int(below(_ranked(s), threshold).sum()) if threshold is not None else _floor(g.size * r)
        if _count(dataclasses.replace(g, align=1), n, round_to):
            out.append(f"{g.name}: keeps all {g.size} channels: its kept width must stay a multiple of {g.align} "
                       f"(fused experts run by grouped_mm), so the {n} channels asked for cannot go")
    return out


def _reachable(g: Group, round_to: int | None) -> set[int]:
    """Kept channel counts ``_count`` can leave in ``g`` (all of them included)."""
    return {g.size - n for n in range(g.size) if _count(g, n, round_to) == n}


def _tied(choices, cands, ties, round_to, fixed=frozenset()) -> list[tuple[Group, torch.Tensor]]:
    """Meet the count ties: every tied class keeps one width (channels x positions per channel), the reachable
    one nearest the mean of the widths the choice wanted (the larger on a draw: prune less), each group ranking its
    own channels. A group that is not a candidate, or is ``fixed``, keeps all its channels, so its class does."""
    scores = {id(g): s for g, s, _ in cands}
    removed = {id(g): _removed_count(c) for g, c in choices}
    new = {id(g): c for g, c in choices}
    for cls in ties.classes():
        widths = [ties.widths.get(id(g)) for g in cls]
        common = None
        for g, w in zip(cls, widths):
            if w is None:
                common = set()
                break
            ok = {g.size * w} if id(g) in fixed or id(g) not in scores else {k * w for k in _reachable(g, round_to)}
            common = ok if common is None else common & ok
        want = sum((g.size - removed.get(id(g), 0)) * (w or 1) for g, w in zip(cls, widths)) / len(cls)
        keep = min(common, key=lambda k: (abs(k - want), -k)) if common else None
        for g, w in zip(cls, widths):
            n = 0 if keep is None else g.size - keep // w
            if n == 0:
                new.pop(id(g), None)
            elif removed.get(id(g)) != n:
                new[id(g)] = _pick(g, scores[id(g)], n)
    order = {id(g): i for i, (g, _, _) in enumerate(cands)}
    groups = {id(g): g for g, _, _ in cands}
    return [(groups[i], new[i]) for i in sorted(new, key=lambda i: order.get(i, len(order)))]



def _global(cands, round_to) -> list[tuple[Group, torch.Tensor]]:
    """One ranking across groups; each group keeps at least one channel (or a round_to multiple)."""
    if not cands:
        return []
    total = sum(g.size for g, _, _ in cands)
    k = _floor(sum(g.size * r for g, _, r in cands))
    scores, owner, rank = [], [], []
    for i, (g, s, _) in enumerate(cands):
        s = _ranked(s)
        order = torch.argsort(s, stable=True)
        rk = torch.empty_like(order)
        rk[order] = torch.arange(g.size)
        scores.append(s)
        owner.append(torch.full((g.size,), i))
        rank.append(rk)
    scores, owner, rank = torch.cat(scores), torch.cat(owner), torch.cat(rank)
    caps = torch.tensor([g.size - 1 for g, _, _ in cands])
    eligible = rank < caps[owner]
    k = min(k, int(eligible.sum()))
    del total
    sel = torch.argsort(torch.where(eligible, scores, torch.inf), stable=True)[:k]
    counts = torch.bincount(owner[sel], minlength=len(cands))
    out = []
    for i, (g, s, _) in enumerate(cands):
        n = _count(g, int(counts[i]), round_to)
        if n:
            out.append((g, _pick(g, s, n)))
    return out
