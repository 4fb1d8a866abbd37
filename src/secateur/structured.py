"""Structural pruning: physically remove channels, filters, neurons and attention heads.

``prune_channels(model, example_inputs, ratio=0.5)`` captures the model's dependency groups (secateur.graph),
scores every group's channels (secateur.importance), chooses what to remove, then slices parameters, buffers and
size attributes in place. The result is an ordinary, smaller ``nn.Module``: no masks, no hooks. Everything is
computed and checked first (including a dry run on a copy: see graph/verify.py); a PruningError leaves the model
untouched.

Where removing a channel is not the same as zeroing it at its consumers, the engine either keeps those channels
and says so in ``plan.notes`` (a softmax or a fused norm over the channel dim, a constant that cannot be sliced,
a slice at fixed positions, the model's outputs), or prunes them and says so: a LayerNorm / RMSNorm over the
channel dim, or a statistic over it reached op by op (a mean, variance, L2 norm or max: RmsNorm2d, GRN, CBAM),
then computes its statistics over the kept channels, and the oracle's reference does the same
(``plan.kept_norms``). GroupNorm loses whole groups only, which is exact. A grouped convolution loses the same
local channels in every conv group (or whole groups, ``grouped="groups"``; depthwise ones always whole groups), so
it keeps one width per group. Heads are pruned whole, so the
attention scale (from the head size) never changes, or, with ``heads="head_dim"``, every head loses the same
number of dims and the modules keep the scale of the original head size (their ``scaling`` attribute; a call
that derives the scale from q's size keeps its q/k dims). Hence every plan satisfies the oracle: the original
model with the chosen channels zeroed where they enter their consumers (``plan.zero_consumers``), inside
``plan.kept_norms``, computes what the pruned model computes.

Attention that reads its inner width from its input's shape (timm's ``reshape(B, N, C)``) needs its heads to keep
as many channels as the residual stream, not the same ones: the dry run finds such modules and ties the groups'
counts (graph/ties.py, ``graph.ties``); every way of choosing (ratio, global ranking, ``round_to``, MACs / params
targets) then meets the ties in ``_tied``."""
from __future__ import annotations

import copy
import fnmatch
import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from secateur.errors import fail
from secateur.graph.capture import capture
from secateur.graph.groups import Graph, Group, NormSite, build_graph, groups_from
from secateur.graph.modules import snapshot, structure_class, update_attrs
from secateur.importance import group_scores
from secateur.metrics import count_macs, count_params

STRUCTURE_ATTR = "_secateur_structure"


def _old_objects_spared(fn: Callable) -> Callable:
    """Run ``fn`` with the objects that exist at the call frozen out of the cyclic garbage collector
    (``gc.freeze``), and put them back after (``gc.unfreeze``). A plan allocates tens of thousands of objects that
    live a while (labels, the dry runs' copies of every module), which sets off full collections, and each one walks
    every object the process holds (timm and torch imported: about 400,000): efficientformerv2_l spent 0.59 s of
    its 4.3 s plan in two of them, 0.2 s with this. Garbage the plan makes is still collected as usual. Left alone
    where the collector is off, or where someone froze objects already (an outer call, or the caller's own)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not gc.isenabled() or gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()
    return wrapper


@dataclass
class Plan:
    """What will be removed: ``removed[(module, tensor)][dim] = positions``; ``choices`` pairs each group with the
    channels (0..size-1) chosen in it. ``notes`` say where removal is not the same as zeroing (kept channels)."""
    groups: list[Group]
    choices: list[tuple[Group, torch.Tensor]]
    notes: list[str] = field(default_factory=list)
    heads: str = "heads"  # "head_dim": attention units are per-head dims (size attributes follow that)
    norms: list[NormSite] = field(default_factory=list)
    # sizes the model keeps in its own attributes, set after slicing: {module: {attr: value}}; only values the
    # dry run proved (graph/size_attrs.py), each one written in ``notes``
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def removed(self) -> dict[tuple[str, str], dict[int, torch.Tensor]]:
        out: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {}
        for g, chans in self.choices:
            pick = torch.zeros(g.size, dtype=torch.bool)
            pick[chans] = True
            for m in g.members:
                pos = m.index[pick[m.channel]]
                if pos.numel():
                    out.setdefault((m.module, m.name), {}).setdefault(m.dim, []).append(pos)
        # one piece (the common case: one group per tensor dim) is sorted and unique already (Member.index is)
        return {k: {d: v[0] if len(v) == 1 else torch.unique(torch.cat(v)) for d, v in dims.items()}
                for k, dims in out.items()}

    @property
    def channels(self) -> int:
        return sum(int(c.numel()) for _, c in self.choices)

    def zero_consumers(self, model: nn.Module) -> None:
        """The pruning oracle's reference: zero the chosen channels where they enter their consumers. A grouped
        conv's input (a, j) is read only by group a's rows of weight[:, j]; a unit holds (a, j) for every group a,
        so zeroing weight[:, j] (the member's dim-1 slice) zeroes exactly those inputs."""
        with torch.no_grad():
            for g, chans in self.choices:
                pick = torch.zeros(g.size, dtype=torch.bool)
                pick[chans] = True
                for m in g.members:
                    if m.consumer:
                        t = m.tensor(model)
                        t.index_fill_(m.dim, m.index[pick[m.channel]].to(t.device), 0)

    def apply(self, model: nn.Module) -> dict[str, Any]:
        return _apply(model, self)

    def _norm_keeps(self) -> list[tuple[NormSite, torch.Tensor]]:
        """(site, kept positions) for every normalisation that loses channels under this plan."""
        picks = {id(g): chans for g, chans in self.choices}
        out = []
        for site in self.norms:
            drop = torch.zeros(site.size, dtype=torch.bool)
            for g, idx, chan in site.parts:
                if id(g) in picks:
                    pick = torch.zeros(g.size, dtype=torch.bool)
                    pick[picks[id(g)]] = True
                    drop[idx[pick[chan]]] = True
            if drop.any():
                out.append((site, (~drop).nonzero().flatten()))
        return out

    def norm_notes(self) -> list[str]:
        """One note per normalisation whose statistics change (removal is not zeroing there)."""
        seen = dict.fromkeys(f"{s.where}: {s.op} normalises over pruned channels; its statistics now cover the "
                             f"kept channels only (removal is not zeroing there; reference: Plan.kept_norms)"
                             for s, _ in self._norm_keeps())
        return list(seen)

    def kept_norms(self, model: nn.Module):
        """Context manager for the oracle where removal is not zeroing: inside it, ``model`` (an unpruned copy,
        usually after ``zero_consumers``) computes every normalisation this plan shrinks over the kept channels
        only. ``with plan.kept_norms(ref): want = ref(x)`` then equals the pruned model's output."""
        from secateur.graph.reference import kept_norms
        return kept_norms(model, self._norm_keeps())


@dataclass
class StructuredResult:
    description: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups_pruned: int
    channels_pruned: int
    plans: list[Plan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # target_latency only, as fractions of the dense model: the table's estimate of the applied plan, its
    # measured latency (None unless verify measured it), and every allocation round (secateur.latency_target)
    latency_estimate: float | None = None
    latency_measured: float | None = None
    latency_rounds: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        return self.description


# ---------------------------------------------------------------- choosing
def _validate(ratio, threshold, scope, round_to, steps, target_macs, target_params, heads, grouped="channels"):
    if threshold is None and not isinstance(ratio, dict) and not (0.0 <= float(ratio) < 1.0):
        raise fail("ratio must be in [0, 1)", where="prune_channels", value=ratio)
    if isinstance(ratio, dict):
        for k, v in ratio.items():
            if not 0.0 <= float(v) < 1.0:
                raise fail("ratio must be in [0, 1)", where=f"prune_channels ratio[{k!r}]", value=v)
    if scope not in ("local", "global"):
        raise fail("scope must be 'local' or 'global'", where="prune_channels", value=scope)
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise fail("round_to must be a positive int", where="prune_channels", value=round_to)
    if not isinstance(steps, int) or steps < 1:
        raise fail("steps must be a positive int", where="prune_channels", value=steps)
    for name, t in (("target_macs", target_macs), ("target_params", target_params)):
        if t is not None and not 0.0 < float(t) <= 1.0:
            raise fail(f"{name} is a fraction of the current model in (0, 1]", where="prune_channels", value=t)
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


def _ignored(model: nn.Module, ignore: Iterable) -> set[str]:
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for x in ignore:
        if isinstance(x, nn.Module):
            if x not in names:
                raise fail("ignored module is not part of the model", where="prune_channels", value=type(x))
            out.add(names[x])
        else:
            out.add(str(x))
    return out


def _matches(name: str, pats: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatch(name, p) for p in pats)


def _is_ignored(group: Group, outputs: set[str], inputs: set[str]) -> bool:
    """``ignore``: the module's output channels stay; ``ignore_inputs``: its input channels stay."""
    return any((m.kind in ("out", "param") and _matches(m.module, outputs)) or
               (m.consumer and _matches(m.module, inputs)) for m in group.members)


def _ratio_for(group: Group, ratio) -> float:
    if not isinstance(ratio, dict):
        return float(ratio)
    for pat, r in ratio.items():
        if any(fnmatch.fnmatch(m.module, pat) for m in group.members if m.kind == "out"):
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


def _count(group: Group, n: int, round_to: int | None) -> int:
    """How many channels to remove: a head-dim group removes the same count from every head (at least one dim
    stays in each), so ``n`` is split evenly and rounded per head."""
    if group.block is None:
        return _round(group.size, n, round_to, group.unit)
    heads = int(group.block.max()) + 1
    return _round(group.size // heads, n // heads, round_to) * heads


def _pick(group: Group, scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` lowest-scoring channels (per head for a head-dim group: n / heads in each)."""
    if group.block is None:
        return torch.argsort(scores, stable=True)[:n]
    heads = int(group.block.max()) + 1
    out = []
    for b in range(heads):
        idx = (group.block == b).nonzero().flatten()
        out.append(idx[torch.argsort(scores[idx], stable=True)[:n // heads]])
    return torch.cat(out)


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


@_old_objects_spared
def plan_channels(model: nn.Module, example_inputs: Any, *, ratio: float | dict = 0.5,
                  importance: str | Callable = "l1", threshold: float | None = None, scope: str = "local",
                  ignore: Iterable = (), round_to: int | None = None, heads: str = "heads",
                  reduce: str = "mean", normalize: str | None = None, ignore_inputs: Iterable = (),
                  graph: Graph | None = None, verify: bool = True, grouped: str = "channels") -> Plan:
    """Choose the channels ``prune_channels`` would remove; nothing is changed (``plan.apply(model)`` does it).
    ``verify`` dry-runs the plan on a copy (sharing the weights on the CPU, or on meta: no weight memory) and leaves
    out groups whose removal would break the model's own forward (noted in ``plan.notes``)."""
    _validate(ratio, threshold, scope, round_to, 1, None, None, heads, grouped)
    _refuse_masked(model)
    if heads == "head_dim":
        _refuse_rope(model)
    if graph is not None and getattr(graph.tracer, "head_dim", heads == "head_dim") != (heads == "head_dim"):
        raise fail("the graph was built for another heads= mode", where="plan_channels", value=heads,
                   hint="build it with build_graph(model, example_inputs, heads=...) using the same mode")
    if graph is not None and getattr(graph.tracer, "grouped", grouped) != grouped:
        raise fail("the graph was built for another grouped= mode", where="plan_channels", value=grouped,
                   hint="build it with build_graph(model, example_inputs, grouped=...) using the same mode")
    graph = graph or build_graph(model, example_inputs, heads, grouped)
    return _plan(model, example_inputs, graph, ratio, importance, threshold, scope, ignore, round_to, heads, reduce,
                 normalize, ignore_inputs, verify)


def _plan(model: nn.Module, example_inputs: Any, graph: Graph, ratio, importance, threshold, scope, ignore, round_to,
          heads, reduce, normalize, ignore_inputs, verify, done: dict | None = None) -> Plan:
    """``plan_channels`` on a graph; ``done``: see ``_verified``."""
    cands = _candidates(model, graph, ratio, threshold is not None, importance, ignore, ignore_inputs, reduce,
                        normalize)
    def choose(ties=None, fixed=frozenset()):
        return _choose(cands, threshold, scope, round_to, graph.links, ties, fixed)

    plan = _new_plan(graph, choose(graph.ties), list(graph.notes), heads)
    plan = _verified(model, example_inputs, plan, graph, done, choose) if verify and plan.choices else plan
    plan.notes.extend(plan.norm_notes())
    return plan


def _new_plan(graph: Graph, choices: list, notes: list[str], heads: str) -> Plan:
    plan = Plan(graph.groups, choices, notes, heads=heads, norms=graph.norms)
    note = "heads='head_dim': attention scales stay 1/sqrt(original head size) (module `scaling`)"
    if any(g.block is not None for g, _ in choices) and note not in plan.notes:
        plan.notes.append(note)
    return plan


def _candidates(model: nn.Module, graph: Graph, ratio, every: bool, importance, ignore, ignore_inputs, reduce,
                normalize) -> list[tuple[Group, torch.Tensor, float]]:
    """(group, channel scores, ratio) for every group that may lose channels (``every``: ratio 0 too)."""
    ignored, ignored_in = _ignored(model, ignore), _ignored(model, ignore_inputs)
    cands: list[tuple[Group, torch.Tensor, float]] = []
    for g in graph.groups:
        if _is_ignored(g, ignored, ignored_in):
            continue
        r = _ratio_for(g, ratio)
        if r <= 0 and not every:
            continue
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
            n = _count(g, int((s < threshold).sum()), round_to)
            if n:
                choices.append((g, _pick(g, s, n)))
    elif scope == "local":
        for g, s, r in cands:
            n = _count(g, int(g.size * r), round_to)
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


def _reachable(g: Group, round_to: int | None) -> set[int]:
    """Kept channel counts ``_count`` can leave in ``g`` (all of them included)."""
    return {g.size - n for n in range(g.size) if _count(g, n, round_to) == n}


def _tied(choices, cands, ties, round_to, fixed=frozenset()) -> list[tuple[Group, torch.Tensor]]:
    """Meet the count ties: every tied class keeps one width (channels x positions per channel), the reachable
    one nearest the mean of the widths the choice wanted (the larger on a draw: prune less), each group ranking its
    own channels. A group that is not a candidate, or is ``fixed``, keeps all its channels, so its class does."""
    scores = {id(g): s for g, s, _ in cands}
    removed = {id(g): int(c.numel()) for g, c in choices}
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


def _verified(model: nn.Module, example_inputs: Any, plan: Plan, graph: Graph | None = None,
              done: dict | None = None, rechoose: Callable | None = None) -> Plan:
    """Dry-run the plan on a copy (graph/verify.py); drop the groups whose removal breaks the model's own forward (its
    code keeps a size the engine cannot update), or makes an op output a shape other than the plan predicts (the same
    code, where a ``-1`` hides the stale size: a silently wrong model), and try again. Never returns such a plan.

    ``done`` (for a caller that applies the returned plan to ``model`` right after, nothing changing in between):
    filled with what the successful dry run computed, so that it is not computed again: ``"slices"`` (``_Slices``,
    where the dry run ran on the model's own device) and ``"macs"`` (the pruned model's ``count_macs``, or None).

    ``rechoose(ties, fixed)`` (the plan's own choice with count ties and left-out groups): before dropping groups
    at a failing module, try tying the counts of the groups inside it to the stream that enters it (graph/ties.py);
    the ties stay (on ``graph.ties``) when the dry run then passes that module's class."""
    memo: dict = {}  # one plan's dry runs by what they run (``_DryRuns``): the loops below repeat some
    if graph is not None and graph.cuts:
        # cuts at attribute positions (graph/splits.py) need their sizes updated wherever channels leave a section:
        # the search first, taken straight away where it keeps every group and computes the reference; otherwise the
        # plan without it is found below as before (that first, then the search, took dpn68 7.1 s, this 4.9 s)
        d1, ties = ({} if done is not None else None), graph.ties
        first = _verify_loop(model, example_inputs, _copy(plan), graph, search=True, done=d1, rechoose=rechoose,
                             memo=memo)
        if len(first.choices) == len(plan.choices) and _exact(model, example_inputs, first, memo):
            if done is not None:
                done.update(d1)
            return first
        graph.ties = ties
    d0 = {} if done is not None else None
    base = _verify_loop(model, example_inputs, _copy(plan), graph, search=False, done=d0, rechoose=rechoose,
                        memo=memo)
    if graph is not None and graph.ties and _exact(model, example_inputs, base, memo) is False:
        graph.ties = None  # count ties proven by shapes, refuted by values: the plan without them
        d0 = {} if done is not None else None
        base = _verify_loop(model, example_inputs, _copy(plan), graph, search=False, done=d0, memo=memo)
        base.notes.append("count ties gave a pruned model that differs from the reference; not used")
    picked, d = base, d0
    if len(base.choices) != len(plan.choices) and graph is not None:
        # groups were dropped: would updating sizes the model keeps (graph/size_attrs.py) keep more of them? The
        # search is greedy (an update that gets the dry run further may still lead to a refusal later), so its plan
        # is taken only where it removes more channels than the plan without it, and only where it computes the
        # reference: shapes prove a stored size is the pruned dim's, not that it is not also used as a number
        # (a 1-head attention's ``head_dim`` sized its reshape *and* its softmax scale)
        # (with the count ties found above, and without them: a tie can hold a stream whole where an updated size
        # would have let it shrink, efficientvim's HSMSSD)
        ties, kept_ties = graph.ties, graph.ties
        for tied in ([True, False] if ties else [True]):
            graph.ties = ties if tied else None
            d1 = {} if done is not None else None
            found = _verify_loop(model, example_inputs, _copy(plan), graph, search=True, done=d1,
                                 rechoose=rechoose if tied else None, memo=memo)
            if found.attrs and found.channels > picked.channels and _exact(model, example_inputs, found, memo):
                picked, d, kept_ties = found, d1, graph.ties
        graph.ties = kept_ties
    if done is not None:
        done.update(d)
    return picked


def _exact(model: nn.Module, example_inputs: Any, plan: Plan, memo: dict | None = None) -> bool | None:
    """Does ``plan`` applied to a copy compute the oracle's reference (the original with the chosen channels zeroed
    at their consumers, norms over the kept ones) on the example inputs? None where it cannot be run here (not a
    CPU model within ``verify.HERE_BYTES``): a numeric proof costs two forwards of copies, or one where ``memo``
    (``_DryRuns``') holds the outputs of this plan's dry run on a CPU twin: the same copy (the model's weights,
    the plan's slices and sizes) run on the same inputs with the same seed, so its outputs are the ones a fresh
    pruned copy gives (tnt_b_patch16_224's proof: 1.25 s, 0.92 s this way)."""
    from secateur.graph import verify
    from secateur.graph.capture import _flat_tensors, call
    if not plan.choices or not _runs_here(model, example_inputs, False, memo):
        return None
    got = memo.get(("outputs", *_DryRuns.plan_key(plan))) if memo is not None and _MEMO else None
    ref = _writable_twin(model, plan)
    plan.zero_consumers(ref)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(0)
        with plan.kept_norms(ref):
            want = _flat_tensors(call(ref, example_inputs))
        if got is None:
            pruned = verify.twin(model)
            plan.apply(pruned)
            torch.manual_seed(0)
            got = _flat_tensors(call(pruned, example_inputs))
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return False
    for a, b in zip(want, got):
        if a.is_floating_point() and a.numel():
            scale = float(a.abs().max())
            if float((a - b).abs().max()) > 1e-4 * max(scale, 1e-3):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _writable_twin(model: nn.Module, plan: Plan) -> nn.Module:
    """A ``verify.twin`` of ``model`` whose tensors ``plan.zero_consumers`` writes into are its own copies (the
    others still share the model's memory): the oracle's reference without a deep copy of every weight. A
    consumer tensor that is neither a parameter nor a buffer: a plain deep copy."""
    from secateur.graph import verify
    ref = verify.twin(model)
    for g, _ in plan.choices:
        for m in g.members:
            if not m.consumer:
                continue
            mod = ref.get_submodule(m.module)
            if m.name in mod._parameters and mod._parameters[m.name] is not None:
                p = mod._parameters[m.name]
                if p.data_ptr() == getattr(model.get_submodule(m.module), m.name).data_ptr():
                    p.data = p.data.clone()  # once per tensor (a tied weight is one Parameter in the twin too)
            elif m.name not in mod._buffers:  # buffers: the twin's are copies already
                return copy.deepcopy(model)
    return ref


def _copy(plan: Plan) -> Plan:
    return Plan(plan.groups, list(plan.choices), list(plan.notes), heads=plan.heads, norms=plan.norms,
                attrs={k: dict(v) for k, v in plan.attrs.items()})


def _verify_loop(model: nn.Module, example_inputs: Any, plan: Plan, graph: Graph | None, search: bool,
                 done: dict | None = None, rechoose: Callable | None = None, memo: dict | None = None) -> Plan:
    from secateur.graph import verify
    out = getattr(getattr(graph, "tracer", None), "output", None)
    want = verify._shapes(out) if out is not None else None  # the capture saw the unpruned output shapes
    dry = _DryRuns(model, example_inputs, graph, want, memo)
    here = done is not None and dry.cpu[True]
    spent = [0]  # dry runs spent on attribute searches (size_attrs.MAX_TRIALS)
    fixed: set[int] = set()
    tried: dict[type, bool] = {}  # module class -> its broad tie was tried
    pending = None  # (class tried, plan and ties before its ties, the failure they answer)
    if rechoose is not None and graph is not None and graph.ties:  # ties found by an earlier loop hold here too
        plan = Plan(plan.groups, rechoose(graph.ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                    attrs=plan.attrs)
    prev = plan.choices
    for _ in range(32):
        if plan.choices is not prev and plan.attrs:  # choices changed: sizes taken from cuts follow them
            plan.attrs = _recut(model, graph, plan.attrs, prev, plan.choices)
        prev = plan.choices
        ok, where, err, bad, expected, slices, macs = dry.check(plan, here)
        if pending is not None:
            cls, plan0, ties0, failure = pending
            if not ok and where and type(model.get_submodule(where)) is cls:  # not enough: broader, or undo
                ties = None if tried[cls] else _tie_class(model, graph, cls, True)
                if ties is not None:
                    tried[cls] = True
                    graph.ties = ties
                    plan = Plan(plan.groups, rechoose(ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                                attrs=plan.attrs)
                    continue
                graph.ties, plan = ties0, plan0
                ok, where, err, bad = failure
            else:
                plan.notes.append(_tie_note(cls))
            pending = None
        if not ok and search and expected is not None:  # a size the model keeps itself? (graph/size_attrs.py)
            attrs = _attr_search(model, plan, expected, where or "", spent, dry)
            if attrs != plan.attrs:
                plan = Plan(plan.groups, plan.choices, plan.notes, heads=plan.heads, norms=plan.norms, attrs=attrs)
                continue
        if err and ok:
            plan.notes.append(err)
        if ok:
            if here:
                done.update(slices=slices if slices.removed else None, macs=macs)
            return _noted(model, plan)
        cls = type(model.get_submodule(where)) if rechoose is not None and where and graph is not None else None
        if cls is not None and cls not in tried:
            ties, tried[cls] = _tie_class(model, graph, cls, False), False
            if ties is None:
                ties, tried[cls] = _tie_class(model, graph, cls, True), True
            if ties is not None:
                pending = (cls, plan, graph.ties, (ok, where, err, bad))
                graph.ties = ties
                plan = Plan(plan.groups, rechoose(ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                            attrs=plan.attrs)
                continue
        if bad:  # a shape mismatch names the groups removed there: those, and the same role in its class
            keep = _without_role(model, plan, {id(graph.groups[i]) for i in bad}, where or "")
        else:
            keep = _without_module(model, plan, where or "", dry)
        fixed |= {id(g) for g, _ in plan.choices} - {id(g) for g, _ in keep}
        dropped = len(plan.choices) - len(keep)
        what = "pruned forward failed" if bad is None else "pruned shapes differ from the plan's"
        plan.notes.append(f"{where or '<model>'}: {what} ({err}); kept {dropped} group(s) there")
        if graph is not None and graph.ties and rechoose is not None:  # tied groups follow the ones left out
            keep = rechoose(graph.ties, fixed)
        plan = Plan(plan.groups, keep, plan.notes, heads=plan.heads, norms=plan.norms,
                    attrs=plan.attrs if keep else {})  # attrs found for other choices are revised on failure
        if not keep:
            return _noted(model, plan)
    raise fail("could not find a plan whose pruned forward runs", where="prune_channels", value=plan.notes[-1])


def _recut(model: nn.Module, graph: Graph | None, attrs: dict, old: list, new: list) -> dict:
    """``attrs`` where the values that came from cut sizes under choices ``old`` (graph/splits.py ``proposals``)
    are recomputed for ``new`` (dropped where ``new`` no longer moves them): a size found for other choices is
    stale, and would fail the dry run of a plan that drops groups or adds count ties."""
    if graph is None or not graph.cuts:
        return attrs
    from secateur.graph.splits import proposals
    before, after = proposals(model, graph.cuts, old), proposals(model, graph.cuts, new)
    out: dict[str, dict[str, Any]] = {}
    for n, kv in attrs.items():
        for k, v in kv.items():
            if k not in before.get(n, {}) or before[n][k] != v:
                out.setdefault(n, {})[k] = v
            elif k in after.get(n, {}):
                out.setdefault(n, {})[k] = after[n][k]
    return out


def _tie_class(model: nn.Module, graph: Graph, cls: type, broad: bool):
    """``graph.ties`` plus the count ties of every module of class ``cls`` (graph/ties.py ``candidates``: the
    same code sizes them all), or None where that adds none."""
    from secateur.graph.ties import Ties, candidates
    ties = graph.ties.copy() if graph.ties else Ties()
    new = False
    for name, mod in model.named_modules():
        if type(mod) is cls and name:
            for a, b in candidates(graph.groups, name, broad):
                new = ties.tie(a, b, name) or new
    return ties if new else None


def _tie_note(cls: type) -> str:
    return (f"{cls.__name__}: reads its inner width from its input's shape; its groups keep as many channels as "
            f"the stream that enters it (count ties, graph/ties.py)")


def _attr_search(model: nn.Module, plan: Plan, expected, where: str, spent: list[int], dry_runs: "_DryRuns"
                 ) -> dict[str, dict[str, Any]]:
    """``plan.attrs`` plus the attribute updates that get the failed dry run further (graph/size_attrs.py)."""
    from secateur.graph import size_attrs, verify
    if spent[0] >= size_attrs.MAX_TRIALS:
        return plan.attrs
    pairs = size_attrs.size_pairs(expected)
    if not pairs:
        return plan.attrs

    def dry(attrs):  # a trial still counts against MAX_TRIALS when its dry run is a repeat (memo): same search
        trial = Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms, attrs=attrs)
        ok, w, _, _, exp, _, _ = dry_runs.check(trial)
        return ok, w or "", exp.step_no

    done: set[tuple[str, str]] = set()  # attributes the updaters already set (Linear.out_features): not tried
    try:
        sk = verify.skeleton(model)
        _apply(sk, Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms))
        mods = dict(model.named_modules())
        done = {(n, k) for n, m in sk.named_modules() if n in mods for k, v in vars(m).items()
                if not k.startswith("_") and k in vars(mods[n]) and _differs(v, vars(mods[n])[k])}
    except Exception:  # noqa: BLE001 - only a shortcut: without it every candidate is tried
        pass
    from secateur.graph.splits import proposals
    graph = dry_runs.graph
    moves = proposals(model, graph.cuts, plan.choices) if graph is not None and graph.cuts else None
    return size_attrs.Search(model, pairs, dry, spent, done, moves).run(plan.attrs, where, expected.step_no)


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - tensors and other values without a plain comparison
        return False


def _noted(model: nn.Module, plan: Plan) -> Plan:
    """The plan, its attribute updates written in its notes (a kept size is never changed silently)."""
    if plan.attrs:
        from secateur.graph.size_attrs import notes
        plan.notes.extend(n for n in notes(model, plan.attrs) if n not in plan.notes)
    return plan


def _without_module(model: nn.Module, plan: Plan, scope: str, dry: "_DryRuns") -> list:
    """The plan's choices without the groups inside the failing module and every module of its class (same code,
    same problem); where that is the model's own forward, without the first group that breaks it."""
    while True:
        cls = type(model.get_submodule(scope)) if scope else None
        scopes = {n for n, mod in model.named_modules() if type(mod) is cls} | {scope} if scope else set()
        keep = [(g, c) for g, c in plan.choices if not any(
            _matches(m.module, scopes) for m in g.members)] if scope else []
        if len(keep) < len(plan.choices) or not scope:
            break
        scope = scope.rpartition(".")[0]
    if not scope and len(plan.choices) > 1:  # the model's own forward: find the culprit, keep the rest
        bad = _culprit(plan, dry)
        keep = [c for i, c in enumerate(plan.choices) if i != bad]
    return keep


def _without_role(model: nn.Module, plan: Plan, bad: set[int], where: str) -> list:
    """The plan's choices without the groups ``bad`` (ids) and, in every module of the class of ``where``, the
    groups produced at the same place (same relative module path, tensor and dim) as a bad group's producers there:
    the other layers run the same code. Groups elsewhere keep their channels pruned."""
    def rel(name: str, base: str) -> str | None:
        if not base:
            return name
        return name[len(base):] if name == base or name.startswith(base + ".") else None

    cls = type(model.get_submodule(where))
    peers = [n for n, mod in model.named_modules() if type(mod) is cls] if where else [""]
    roles = {(rel(m.module, where), m.name, m.dim) for g, _ in plan.choices if id(g) in bad for m in g.members
             if m.kind == "out" and rel(m.module, where) is not None}

    def same_role(g: Group) -> bool:
        return any(m.kind == "out" and (rel(m.module, p), m.name, m.dim) in roles for m in g.members for p in peers)

    return [(g, c) for g, c in plan.choices if id(g) not in bad and not same_role(g)]


def _culprit(plan: Plan, dry: "_DryRuns") -> int:
    """Index of the first choice whose addition breaks the forward (bisection on prefixes: log2(n) dry runs)."""
    lo, hi = 0, len(plan.choices)  # prefix lo runs, prefix hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = dry.check(Plan(plan.groups, plan.choices[:mid]))[0]
        lo, hi = (mid, hi) if ok else (lo, mid)
    return hi - 1


class _DryRuns:
    """``verify.check`` of plans on one model, graph and input, remembered by what the dry run runs: the choices
    (group and channels, in order), the size attributes and the device it runs on. A dry run's outcome depends on
    nothing else, and one plan's verification repeats some (the search loop starts where the first loop ended; a
    size-attribute trial whose value is the model's own is the plan without it): efficientformerv2_l ran 18 dry
    runs, 9 of them repeats. Where ``here`` (the caller applies the slices), the twin's slices and MAC count are
    kept too. ``memo``: shared by the loops of one ``_verified``."""

    def __init__(self, model: nn.Module, example_inputs: Any, graph: Graph | None, want, memo: dict | None) -> None:
        self.model, self.inputs, self.graph, self.want = model, example_inputs, graph, want
        self.memo = memo if memo is not None else {}
        self.cpu = {a: _runs_here(model, example_inputs, a, self.memo) for a in (False, True)}  # see _key

    @staticmethod
    def plan_key(plan: Plan) -> tuple:
        """What a dry run of ``plan`` runs, but the device: the choices, the size attributes, the heads mode."""
        return (plan.heads, repr(plan.attrs), tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))

    def _key(self, plan: Plan, here: bool) -> tuple:
        return ("applied" if here else self.cpu[False], *self.plan_key(plan))

    def _expected(self, plan: Plan):
        """``verify.expected`` for the plan's choices: one per choices, reset for each dry run (its set-up walks
        every atom of the capture: 65 ms a trial on efficientformerv2_l)."""
        from secateur.graph import verify
        if self.graph is None:
            return None
        if not _MEMO:
            return verify.expected(self.graph, plan.choices)
        key = ("expected", tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))
        exp = self.memo.get(key)
        if exp is None or getattr(exp.tracer, "meta_trace", ()) is None:  # (no meta trace: verify.expected's None)
            exp = self.memo[key] = verify.expected(self.graph, plan.choices)
            return exp
        exp.reset()
        return exp

    def _apply(self, plan: Plan, here: bool, record: "_Slices | None") -> Callable[[nn.Module], Any]:
        """The plan's apply for the dry run's copy. The slices depend on the choices only (the size attributes are
        set after them), so the trials of one search, which differ in attributes, slice once: the later ones
        take the first one's tensors (``_apply``'s ``reuse``: new tensors, never written in place)."""
        if not _MEMO:
            return plan.apply if record is None else (lambda base: _apply(base, plan, record=record))
        device = "cpu" if self.cpu[here] else "meta"
        key = ("slices", device, tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))
        reuse = self.memo.get(key)
        if reuse is not None:
            return lambda base: _apply(base, plan, reuse=reuse, record=record)

        def first(base: nn.Module) -> Any:
            made = record if record is not None else _Slices()
            out = _apply(base, plan, record=made)
            self.memo[key] = made  # only complete slices: an apply that raised leaves none
            return out
        return first

    def check(self, plan: Plan, here: bool = False) -> tuple:
        """(ok, failing module, error, groups of a shape mismatch, ``verify.Expected`` or None, slices, MACs):
        ``verify.check``'s answer, then what ``_verify_loop`` and the size-attribute search read from its run
        (the slices and MACs only where ``here``)."""
        from secateur.graph import verify
        from secateur.metrics import MacTally
        expected = self._expected(plan)
        key = self._key(plan, here) if _MEMO else None
        hit = self.memo.get(key) if key is not None else None
        if hit is not None:
            (ok, where, err, bad), step_no, trace, slices, macs = hit
            if expected is not None:  # as the run left it: how far it got, on which trace
                expected.step_no, expected.trace = step_no, trace
            return ok, where, err, bad, expected, slices, macs
        tally, slices = (MacTally(), _Slices()) if here else (None, None)
        apply = self._apply(plan, here, slices)
        outputs: list = []
        res = verify.check(self.model, self.inputs, apply, self.want, expected, tally, applied=here,
                           here=self.cpu[here], outputs=outputs)
        macs = tally.total if here else None
        if key is not None:
            self.memo[key] = (res, getattr(expected, "step_no", None), getattr(expected, "trace", None), slices, macs)
            if res[0] and res[2] is None and outputs:  # ran here to the end: for _exact
                self.memo[("outputs", *self.plan_key(plan))] = outputs
        return (*res, expected, slices, macs)


_MEMO = True  # tests turn it off to compare with the plain path (tests/test_engine_fast_paths.py)


def _runs_here(model: nn.Module, example_inputs: Any, applied: bool, memo: dict | None) -> bool:
    """``verify.runs_here``, once per plan (``memo``: ``_DryRuns``'): it walks every tensor of the model, and one
    plan asked it four times (mobilenet_v3_small: 2 ms each)."""
    from secateur.graph import verify
    if memo is None:
        return verify.runs_here(model, example_inputs, applied)
    key = ("runs_here", applied)
    if key not in memo:
        memo[key] = verify.runs_here(model, example_inputs, applied)
    return memo[key]


def _global(cands, round_to) -> list[tuple[Group, torch.Tensor]]:
    """One ranking across groups; each group keeps at least one channel (or a round_to multiple)."""
    if not cands:
        return []
    total = sum(g.size for g, _, _ in cands)
    k = int(sum(g.size * r for g, _, r in cands))
    scores, owner, rank = [], [], []
    for i, (g, s, _) in enumerate(cands):
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


def _validate_latency(ratio, threshold, steps, target_macs, target_params, heads="heads") -> None:
    """A latency target chooses every group's count itself: other ways to say how much to prune conflict."""
    clash = {k: v for k, v in (("threshold", threshold), ("target_macs", target_macs),
                               ("target_params", target_params)) if v is not None}
    if isinstance(ratio, dict):
        clash["ratio"] = ratio
    if steps != 1:
        clash["steps"] = steps
    if heads != "heads":
        clash["heads"] = heads
    if clash:
        raise fail("target_latency chooses the channel counts itself; it cannot be combined with these",
                   where="prune_channels", value=clash, hint="give only target_latency (ratio is ignored)")


def _latency_plan(model: nn.Module, example_inputs: Any, target_latency: float, table: Any,
                  opts: dict) -> Plan:
    """One plan whose per-group counts meet the latency target (see `secateur.allocate.latency_choices`),
    verified like every other plan."""
    from secateur.allocate import latency_choices
    graph = build_graph(model, example_inputs, grouped=opts["grouped"])
    ignored, ignored_in = _ignored(model, opts["ignore"]), _ignored(model, opts["ignore_inputs"])
    choices = latency_choices(model, example_inputs, target_latency, table=table, importance=opts["importance"],
                              round_to=opts["round_to"], graph=graph,
                              skip=lambda g: _is_ignored(g, ignored, ignored_in),
                              score_options=dict(reduce=opts["reduce"], normalize=opts["normalize"]))
    plan = Plan(graph.groups, choices, list(graph.notes), norms=graph.norms)
    plan = _verified(model, example_inputs, plan, graph) if plan.choices else plan
    plan.notes.extend(plan.norm_notes())
    return plan


class _Counter:
    """MACs or params of a plan *without applying it*, from the shapes the plan leaves.

    Params: exact (every parameter's kept shape). MACs: every MAC of a leaf module with weight matrices (Conv,
    Linear, ConvTranspose, recurrent layers) is (output positions) x (weight elements), so it scales with the
    kept weight elements exactly; MACs elsewhere (attention matmuls, custom ops) are counted as if they stayed,
    which can only over-estimate. When such MACs exist, ``exact`` counts a plan on a meta skeleton."""

    def __init__(self, model: nn.Module, example_inputs: Any, groups: list[Group], what: str) -> None:
        from secateur.metrics import macs_by_layer
        self.model, self.inputs, self.groups, self.what = model, example_inputs, groups, what
        self.shapes = {}
        for name, mod in model.named_modules():
            for pn, p in mod.named_parameters(recurse=False):
                self.shapes[(name, pn)] = tuple(p.shape)
        if what == "params":
            self.total = count_params(model)
            self.leaves: dict[str, tuple[int, int]] = {}
            self.fixed = 0
            return
        by_layer = macs_by_layer(model, example_inputs)
        self.total = by_layer.get("", 0)
        self.leaves = {}
        for name, mod in model.named_modules():
            mats = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= 2)
            if mats and not any(True for _ in mod.children()) and by_layer.get(name, 0):
                self.leaves[name] = (by_layer[name], mats)
        self.fixed = self.total - sum(m for m, _ in self.leaves.values())

    def estimate(self, choices) -> int:
        """Exact for params, and for MACs when ``fixed`` is 0; an upper bound otherwise."""
        removed = Plan(self.groups, choices).removed
        lost: dict[str, int] = {}
        for (mname, tname), dims in removed.items():
            shape = self.shapes.get((mname, tname))
            if shape is None or (self.what == "macs" and (mname not in self.leaves or len(shape) < 2)):
                continue
            new = math.prod(s - int(dims[d].numel()) if d in dims else s for d, s in enumerate(shape))
            lost[mname] = lost.get(mname, 0) + math.prod(shape) - new
        if self.what == "params":
            return self.total - sum(lost.values())
        return self.total - sum(self.leaves[n][0] * k // self.leaves[n][1] for n, k in lost.items())

    def exact(self, choices, attrs=None) -> int:
        if self.what == "params" or not self.fixed:
            return self.estimate(choices)
        from secateur.graph.verify import skeleton, to_meta
        sk = skeleton(self.model)
        if choices:
            _apply(sk, Plan(self.groups, choices, attrs=attrs or {}))
        try:
            return count_macs(sk, to_meta(self.inputs))
        except Exception:  # noqa: BLE001 - a plan the model cannot run (count ties not found yet): the dry run
            return self.estimate(choices)  # will change it; its upper bound guides the search meanwhile


def _target_plan(model: nn.Module, example_inputs: Any, fraction: float, what: str, opts: dict) -> Plan:
    """One plan meeting a MACs / params target from one capture: the uniform ratio (or the global budget) is
    found by bisection on the plan's count without applying it (`_Counter`), refined on exact counts where the
    cheap count is only an upper bound, then verified. Groups the verification leaves out are excluded and the
    search runs again, so the verified plan still meets the target (when any ratio < 1 can)."""
    if opts["heads"] == "head_dim":
        _refuse_rope(model)
    graph = build_graph(model, example_inputs, opts["heads"], opts["grouped"])
    counter = _Counter(model, example_inputs, graph.groups, what)
    goal = fraction * counter.total
    cands = _candidates(model, graph, 1.0, False, opts["importance"], opts["ignore"], opts["ignore_inputs"],
                        opts["reduce"], opts["normalize"])
    notes = list(graph.notes)

    def search(choose, count, lo: float, hi: float, steps: int) -> float:
        for _ in range(steps):
            if hi - lo <= 1e-3:
                break
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if count(choose(mid)) <= goal else (mid, hi)
        return hi

    for _ in range(4):
        def choose(r: float, cands=cands, fixed=frozenset()):
            return _choose([(g, s, r) for g, s, _ in cands], None, opts["scope"], opts["round_to"], graph.links,
                           graph.ties, fixed)

        hi = 0.99
        if counter.exact(choose(hi)) > goal:
            notes.append(f"target_{what}={fraction} is not reachable with a ratio below 1; pruned at {hi}")
        else:
            hi = search(choose, counter.estimate, 0.0, hi, 20)  # upper bound: hi meets the goal for sure
            if counter.fixed and what == "macs":
                hi = search(choose, counter.exact, 0.0, hi, 6)  # a lower ratio may meet it too
        plan = _new_plan(graph, choose(hi), list(notes), opts["heads"])
        if not plan.choices:
            return plan
        ties = graph.ties
        plan = _verified(model, example_inputs, plan, graph,
                         rechoose=lambda t, fixed, hi=hi: choose(hi, fixed=fixed))  # choose reads graph.ties
        dropped = {id(g) for g, _ in choose(hi)} - {id(g) for g, _ in plan.choices}
        if (not dropped and graph.ties is ties) or counter.exact(plan.choices, plan.attrs) <= goal:
            break
        cands = [c for c in cands if id(c[0]) not in dropped]
        notes = plan.notes
    plan.notes.extend(plan.norm_notes())
    return plan


def _latency_target(model: nn.Module, example_inputs: Any, target: float, table: Any, opts: dict,
                    check: Any) -> tuple[Plan, dict]:
    """The plan for ``target_latency`` (checked by measurement when ``check`` is given) and the result's
    latency fields; ``"estimate"`` is a function of the pruned model, read once the plan is applied."""
    from secateur.latency_model import LatencyTable
    from secateur.latency_target import plan_for_latency
    if table is not None and not isinstance(table, LatencyTable):
        raise fail("latency_table must be a secateur.latency_model.LatencyTable", where="latency_table",
                   value=type(table).__name__, hint="build one with LatencyTable.build(model, example_inputs)")
    table = table if table is not None else LatencyTable.build(model, example_inputs)
    dense = table.total()
    table.estimate(model)  # every table layer is found in this model, before anything changes

    def estimate(m: nn.Module) -> float:
        return table.estimate(m) / dense

    plan, rounds, measured = plan_for_latency(
        model, example_inputs, target, lambda goal: _latency_plan(model, example_inputs, goal, table, opts),
        check, estimate)
    return plan, {"estimate": estimate, "latency_rounds": rounds, "latency_measured": measured}


# ---------------------------------------------------------------- applying
def _tensor(mod: nn.Module, name: str) -> torch.Tensor:
    t = getattr(mod, name)
    if not isinstance(t, torch.Tensor):
        raise fail("not a tensor", where=name, value=type(t))
    return t


@dataclass
class _Slices:
    """What applying a plan to the dry run's twin computed (``prune_channels`` applies the same plan to the model
    right after, nothing changing in between): ``removed`` (``Plan.removed``) and the new tensors by (module,
    tensor). The twin's parameters share the model's storage, so its sliced parameters are the model's; its
    buffers were copies (as the model's were then), kept here as copies again, since the twin's forward may update
    them (BatchNorm in training mode)."""
    removed: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


def _apply(model: nn.Module, plan: Plan, reuse: _Slices | None = None, record: _Slices | None = None
           ) -> dict[str, Any]:
    """Slice, then set sizes. ``reuse``: slices computed already (the dry run's, see ``_Slices``) for this plan on
    this model; ``record``: fill with the slices made here."""
    removed = reuse.removed if reuse is not None else plan.removed
    if record is not None:
        record.removed = removed
    mods = dict(model.named_modules())  # one walk; get_submodule per tensor was a tenth of a small model's apply

    def module(name: str) -> nn.Module:
        mod = mods.get(name)
        return model.get_submodule(name) if mod is None else mod

    # compute everything first: a PruningError must leave the model as it was
    new_tensors = []
    for (mname, tname), dims in removed.items():
        mod = module(mname)
        t = _tensor(mod, tname)
        new = reuse.tensors.get((mname, tname)) if reuse is not None else None
        if new is not None and not isinstance(t, nn.Parameter):
            new = new.clone()  # a buffer: the model's forward may update it in place (BatchNorm in training mode)
        if new is None or new.device != t.device or new.dtype != t.dtype:
            keep = []
            for d, pos in dims.items():  # pos: sorted, unique (Plan.removed)
                if pos.numel() >= t.size(d):
                    raise fail("pruning would remove every channel", where=f"{mname}.{tname}", shape=t.shape,
                               value=d)
                mask = torch.ones(t.size(d), dtype=torch.bool)
                mask[pos] = False
                keep.append((d, mask.nonzero().flatten()))
            new = t.detach()
            for d, idx in keep:
                new = new.index_select(d, idx.to(new.device))
            new = new.contiguous()
        if record is not None:
            record.tensors[(mname, tname)] = new if isinstance(t, nn.Parameter) else new.clone()
        new_tensors.append((mod, mname, tname, t, new))
    sliced = {id(t) for *_, t, _ in new_tensors}
    touched = {m for m, *_ in new_tensors}
    for mod in model.modules():  # tied weights: every owner's size attributes change
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None and id(t) in sliced:
                touched.add(mod)
    names = {m: n for n, m in mods.items()}
    parents = {}
    for mod in list(touched):
        n = names[mod]
        while n:
            n = n.rpartition(".")[0]
            if n in parents:  # so are its ancestors
                break
            parents[n] = module(n)
    # head-dim units sliced in a module or its children: its head sizes shrink; elsewhere head counts do (a
    # head_dim plan can still hold whole heads where dims could not be split, e.g. eager q @ k^T)
    dims_in = {m.module for g, _ in plan.choices if g.block is not None for m in g.members}
    mode = {mod: "head_dim" if any(d == names[mod] or d.rpartition(".")[0] == names[mod] for d in dims_in)
            else "heads" for mod in [*touched, *parents.values()]}
    # grouped convs: the mode their capture used (whole groups or the same channels from every group)
    grouped = {n: g_mode for g, _ in plan.choices for n, g_mode in g.grouped.items()}
    snaps = {m: {**snapshot(m), "_heads": mode[m], "_grouped": grouped.get(names[m])}
             for m in [*touched, *parents.values()]}
    done = set()
    with torch.no_grad():
        for mod, mname, tname, t, new in new_tensors:
            if id(t) in done:
                continue
            done.add(id(t))
            if isinstance(t, nn.Parameter):
                t.data = new
                t.grad = None
            else:
                mod._buffers[tname] = new
    structure = getattr(model, STRUCTURE_ATTR, None) or {}
    for mod, snap in snaps.items():
        attrs = update_attrs(mod, snap)
        name = names[mod]
        entry = structure.setdefault(name, {"params": {}, "buffers": {}, "attrs": {}})
        entry["attrs"].update({k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()})
        for pn, p in mod.named_parameters(recurse=False):
            entry["params"][pn] = list(p.shape)
        for bn, b in mod.named_buffers(recurse=False):  # a non-persistent buffer left whole is not recorded:
            if b is not None and (bn not in mod._non_persistent_buffers_set or (name, bn) in removed):
                entry["buffers"][bn] = list(b.shape)  # it is not in the state_dict a reload checks against
            if b is not None and bn in mod._non_persistent_buffers_set and (name, bn) in removed:
                _record_unsaved(entry, bn, removed[(name, bn)], b)
        if not attrs and not entry["params"] and not entry["buffers"]:
            structure.pop(name)
    from secateur.graph.size_attrs import clear_caches
    clear_caches(model)  # cached tensors of the unpruned sizes (timm's attention_bias_cache) are recomputed
    if plan.attrs:  # proven by the dry run (graph/size_attrs.py); recorded so that a reload sets them too
        from secateur.graph.size_attrs import set_attrs
        set_attrs(model, plan.attrs)
        for name, kv in plan.attrs.items():
            entry = structure.setdefault(name, {"params": {}, "buffers": {}, "attrs": {}})
            entry["attrs"].update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kv.items()})
    _update_hf_config(model, structure, "head_dim" if any(g.block is not None for g, _ in plan.choices) else "heads")
    setattr(model, STRUCTURE_ATTR, structure)
    return structure


_HF_SIZES = {  # config field -> (module attribute, module-name suffixes): set when every layer agrees
    "intermediate_size": ("out_features", ("mlp.up_proj", "mlp.gate_proj", "intermediate.dense", "mlp.fc1")),
    "n_inner": ("nf", ("mlp.c_fc",)),
    "encoder_ffn_dim": ("out_features", ("encoder.layers.*.fc1",)),
    "decoder_ffn_dim": ("out_features", ("decoder.layers.*.fc1",)),
    "d_ff": ("out_features", ("DenseReluDense.wi",)),
}
_HF_HEADS = {"num_attention_heads": ("q_proj", "attention.self.query", "attention.attention.query", "attn.c_attn"),
             "num_key_value_heads": ("k_proj",), "n_head": ("attn.c_attn",), "num_heads": ("SelfAttention.q",)}


def _update_hf_config(model: nn.Module, structure: dict, heads: str = "heads") -> None:
    """Hugging Face: keep ``config`` in step where every layer has the same new size; where layers differ the
    config cannot say it and the structure record is what reloads the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    changed = {}

    def sizes(attr, suffixes, dim=0):
        vals = set()
        for n, mod in model.named_modules():
            if any(fnmatch.fnmatch(n, "*" + s) for s in suffixes):
                w = getattr(mod, "weight", None)
                if w is not None:
                    vals.add(int(getattr(mod, attr, w.shape[dim])))
        return vals

    for key, (attr, suffixes) in _HF_SIZES.items():
        vals = sizes(attr, suffixes)
        if hasattr(config, key) and len(vals) == 1:
            changed[key] = vals.pop()
    # head counts only where the config states the head size; where it derives it (hidden // heads: BERT, GPT-2,
    # ViT, BART) a new head count would build a different model, so the structure record carries it instead
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
    if head_dim:  # the hidden size (residual stream, pruned through its RMSNorms) is then free to change too
        vals = sizes("embedding_dim", ("embed_tokens",), dim=1)
        if hasattr(config, "hidden_size") and len(vals) == 1:
            changed["hidden_size"] = vals.pop()
    if head_dim and heads == "head_dim":  # head counts stay; the stated head size follows the q projections
        key = "head_dim" if getattr(config, "head_dim", None) else "d_kv"
        n = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
        vals = {v for s in _HF_HEADS["num_attention_heads"] + _HF_HEADS["num_heads"] for v in
                sizes("out_features", (s,))}
        if n and len(vals) == 1:
            changed[key] = vals.pop() // n
    elif head_dim:
        for key, suffixes in _HF_HEADS.items():
            vals = {v for s in suffixes for v in sizes("out_features", (s,))}
            if hasattr(config, key) and len(vals) == 1 and getattr(config, key) is not None:
                changed[key] = vals.pop() // head_dim
    from secateur.graph.moe import config_sizes
    changed.update(config_sizes(model, changed))  # experts' widths, each proven by a rebuild on meta
    changed = {k: v for k, v in changed.items() if getattr(config, k) != v}
    for k, v in changed.items():
        setattr(config, k, v)
    if changed:
        structure.setdefault("", {"params": {}, "buffers": {}, "attrs": {}}).setdefault("config", {}).update(changed)


def _record_unsaved(entry: dict, name: str, removed: dict, new: torch.Tensor) -> None:
    """A non-persistent buffer (not in the state_dict: a sinusoidal position table the model rebuilds from its
    config, CTRL's ``pos_encoding``, XGLM's ``weights``) sliced along channels: record which positions of the fresh
    one are kept (composed with an earlier pruning's) and a checksum of the result, so that ``load`` takes the
    same positions from a fresh model and can prove it got the same values (``apply_structure``)."""
    kept = entry.setdefault("kept", {}).setdefault(name, {})
    for d, pos in removed.items():  # positions in the buffer as it was before this slicing
        mask = torch.ones(new.size(d) + int(pos.numel()), dtype=torch.bool)
        mask[pos] = False
        idx = mask.nonzero().flatten().tolist()
        kept[str(d)] = [kept[str(d)][i] for i in idx] if str(d) in kept else idx
    entry.setdefault("checks", {})[name] = _checksum(new)


def _checksum(t: torch.Tensor) -> list[float]:
    t = t.detach().double().cpu()
    return [float(t.sum()), float(t.abs().sum()), float((t * torch.arange(1, t.numel() + 1, dtype=torch.float64
                                                                          ).reshape(t.shape)).sum())]


def _rebuild_unsaved(mod: nn.Module, where: str, name: str, kept: dict, check: list | None) -> None:
    b = mod._buffers.get(name)
    if b is None:
        raise fail("a pruned non-persistent buffer is missing from the fresh model", where=f"{where}.{name}")
    for d, idx in kept.items():
        d = int(d)
        if d >= b.dim() or (idx and max(idx) >= b.size(d)):
            raise fail("the structure's kept positions do not fit this buffer", where=f"{where}.{name}",
                       shape=tuple(b.shape), value=d)
        b = b.index_select(d, torch.tensor(idx, dtype=torch.long, device=b.device))
    if check is not None and not all(math.isclose(a, c, rel_tol=1e-6, abs_tol=1e-6) for a, c in
                                     zip(_checksum(b), check)):
        raise fail("a pruned non-persistent buffer rebuilt by this model differs from the saved one (its values are "
                   "not in the file: the model must build it as it did when saved)", where=f"{where}.{name}",
                   shape=tuple(b.shape))
    mod._buffers[name] = b.contiguous()


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built, unpruned ``model`` to a recorded structure (values are truncated: load the pruned
    state_dict afterwards). Returns the model."""
    with torch.no_grad():
        for name, entry in structure.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError as e:
                raise fail("module of the structure not found in the model", where=name) from e
            for pn, shape in entry.get("params", {}).items():
                p = getattr(mod, pn)
                p.data = p.data[tuple(slice(0, s) for s in shape)].contiguous()
            kept = entry.get("kept", {})
            for bn, shape in entry.get("buffers", {}).items():
                if bn in kept:
                    _rebuild_unsaved(mod, name, bn, kept[bn], entry.get("checks", {}).get(bn))
                    continue
                b = mod._buffers[bn]
                mod._buffers[bn] = b[tuple(slice(0, s) for s in shape)].contiguous()
            for k, v in entry.get("attrs", {}).items():
                if k == "__class__":  # a module that became a pruned variant (nn.MultiheadAttention)
                    cls = structure_class(v)
                    if cls is None:
                        raise fail("unknown module class in the structure", where=name, value=v)
                    if not isinstance(mod, cls.__mro__[1]):  # a pruned variant only replaces its own base
                        raise fail(f"the structure's {v} does not fit this module", where=name,
                                   value=type(mod).__name__, hint="load into the architecture that was saved")
                    mod.__class__ = cls
                    continue
                old = getattr(mod, k, None)
                setattr(mod, k, tuple(v) if isinstance(old, tuple) else v)
            for k, v in entry.get("config", {}).items():
                setattr(model.config, k, v)
    setattr(model, STRUCTURE_ATTR, {k: v for k, v in structure.items()})
    return model


# ---------------------------------------------------------------- the verb
@_old_objects_spared
def prune_channels(model: nn.Module, example_inputs: Any, *, ratio: float | dict = 0.5,
                   importance: str | Callable = "l1", threshold: float | None = None, scope: str = "local",
                   ignore: Iterable = (), round_to: int | None = None, heads: str = "heads",
                   target_macs: float | None = None, target_params: float | None = None, steps: int = 1,
                   reduce: str = "mean", normalize: str | None = None,
                   ignore_inputs: Iterable = (), target_latency: float | None = None,
                   latency_table: Any = None, verify: Any = None, grouped: str = "channels") -> StructuredResult:
    """Physically remove channels from ``model`` in place (see module docstring). ``target_macs`` /
    ``target_params`` (fractions of the current model): one uniform ratio (or global budget with
    ``scope="global"``) found by bisection on the plan's exact count, applied once; ``steps`` splits
    ``ratio`` into that many capture-score-prune rounds. ``ignore``: modules (or names / globs) whose output
    channels are kept; ``ignore_inputs``: modules whose input channels are kept. The model's outputs are always
    kept, whatever layer produces them. ``heads``: "heads" removes whole attention heads (whole key/value groups
    under GQA); "head_dim" removes the same number of dims from every head (q/k dims together, v dims with the
    output projection's columns), keeping each module's original softmax scale; RoPE models are refused, and
    attention whose scale cannot be kept falls back to whole heads or keeps its dims (noted).
    ``grouped``: how a grouped convolution loses channels. "channels" (default): the same local channels leave
    every conv group, its inputs and outputs separately, so ``groups`` stays and each group gets narrower;
    "groups": whole conv groups (a group's inputs and outputs together), so the group width stays. Depthwise
    convolutions (one input channel per group) lose whole groups either way. ``round_to`` counts a layer's
    channels (a grouped conv's total, not its per-group width).

    ``target_latency`` (a fraction of today's estimated latency in (0, 1): 0.5 = twice as fast) lets the
    allocator (`secateur.allocate.latency_choices`) pick every group's channel count from ``latency_table``
    (measured here with `LatencyTable.build` when None) and removes them in one plan; a float ``ratio`` and
    ``scope`` are ignored, and it cannot be combined with ``threshold``, a ratio dict, ``steps`` > 1,
    ``target_macs`` or ``target_params``. Groups the dry run drops (``plan.notes``) keep their channels.
    ``verify`` says how the latency target is checked: ``"measure"`` times the dense model against each
    candidate here (interleaved) and re-allocates with a tighter estimated target while the measured ratio
    misses (`secateur.latency_target`; a `LatencyCheck` sets tolerance, rounds, repeats, or a timer);
    ``"estimate"`` trusts the table. Default: measure when the table is built here, estimate when one is
    given (it may describe another device). The result reports ``latency_estimate``, ``latency_measured``
    and ``latency_rounds``.

    ``target_macs`` / ``target_params`` with a ``latency_table``: among plans that meet the target (the uniform
    one above, the allocator's greedy ranked by importance lost per second saved, and a latency budget bisected
    until the target is met) the one the table estimates fastest is applied, never one it rates slower than the
    uniform plan (`secateur.fastest_plan`; ``heads="heads"`` only); counts are the plan's exact MACs / params.
    ``plan.notes`` name every option with its count and estimate; ``latency_estimate`` is the kept one's.
    ``verify="measure"`` there times the options that meet the target against the dense model here (copies,
    interleaved) and keeps the fastest measured: a table can rank plans wrongly (ConvNeXt-T at 2x on this CPU:
    it rated a latency-budget plan 1.68-1.78x and uniform 1.49-1.56x; measured 1.53-1.63x vs 1.83-1.92x)."""
    _validate(ratio, threshold, scope, round_to, steps, target_macs, target_params, heads, grouped)
    check = None
    if target_latency is not None:
        _validate_latency(ratio, threshold, steps, target_macs, target_params, heads)
        from secateur.latency_target import resolve_verify
        check = resolve_verify(verify, latency_table is not None)
    elif verify is not None and (latency_table is None or verify not in ("measure", "estimate")):
        raise fail("verify checks a target_latency, or picks among the plans meeting a MACs / params target "
                   "with a latency_table ('measure' or 'estimate')", where="prune_channels", value=verify)
    elif latency_table is not None and target_macs is None and target_params is None:
        raise fail("latency_table is used by target_latency, target_macs or target_params: give one of them",
                   where="prune_channels", value=type(latency_table).__name__)
    _refuse_masked(model)
    if heads == "head_dim":
        _refuse_rope(model)  # before any forward, as plan_channels does
    # the ratio path counts the dense MACs during its first capture (one forward fewer); the others count here
    by_ratio = target_latency is None and target_macs is None and target_params is None
    macs0 = None if by_ratio else count_macs(model, example_inputs)
    params0 = count_params(model)
    opts = dict(importance=importance, scope=scope, ignore=ignore, round_to=round_to, heads=heads,
                reduce=reduce, normalize=normalize, ignore_inputs=ignore_inputs, grouped=grouped)
    plans, latency, macs1 = [], {}, None
    if target_latency is not None:
        plan, latency = _latency_target(model, example_inputs, target_latency, latency_table, opts, check)
        if plan.choices:
            plan.apply(model)
            plans.append(plan)
        latency["latency_estimate"] = latency.pop("estimate")(model)
    elif target_macs is not None or target_params is not None:
        what = "macs" if target_macs is not None else "params"
        fraction = target_macs if what == "macs" else target_params
        if latency_table is None:
            plan = _target_plan(model, example_inputs, fraction, what, opts)
        else:  # the fastest plan by the table that meets the target (secateur.fastest_plan)
            from secateur.fastest_plan import fastest_plan
            plan, _ = fastest_plan(model, example_inputs, fraction, what, latency_table, opts,
                                   measure=verify == "measure")
            dense = latency_table.estimate(model)
            latency["estimate"] = lambda m: latency_table.estimate(m) / dense
        if plan.choices:
            plan.apply(model)
            plans.append(plan)
        if latency:
            latency["latency_estimate"] = latency.pop("estimate")(model)
    else:
        for i in range(steps):
            if isinstance(ratio, dict):
                r = {k: 1 - (1 - v) ** (1 / steps) for k, v in ratio.items()}
            else:
                r = 1 - (1 - float(ratio)) ** (1 / steps)
            # one capture per step (counting the dense MACs on the first); the dry run's slices and MAC count
            # are reused: the plan is sliced once and the pruned model not run again to count it
            graph = groups_from(capture(model, example_inputs, heads, grouped, macs=i == 0))
            if i == 0:
                macs0 = graph.tracer.macs if graph.tracer.macs is not None else count_macs(model, example_inputs)
            done = {}
            plan = _plan(model, example_inputs, graph, r, importance, threshold, scope, ignore, round_to, heads,
                         reduce, normalize, ignore_inputs, True, done)
            if not plan.choices:
                break
            _apply(model, plan, reuse=done.get("slices"))
            plans.append(plan)
            macs1 = done.get("macs")
    if macs1 is None:
        macs1 = macs0 if not plans else count_macs(model, example_inputs)
    params1 = count_params(model)
    groups = sum(len(p.choices) for p in plans)
    chans = sum(p.channels for p in plans)
    notes = sorted({n for p in plans for n in p.notes})
    desc = (f"pruned {chans} channels in {groups} groups: params {params0:,} -> {params1:,} "
            f"({params1 / max(params0, 1):.1%}), MACs {macs0:,} -> {macs1:,} ({macs1 / max(macs0, 1):.1%})")
    if latency:
        desc += f", latency {latency['latency_estimate']:.1%} of dense (estimated)"
        if latency.get("latency_measured") is not None:
            desc += f", {latency['latency_measured']:.1%} (measured)"
    return StructuredResult(desc, macs0, macs1, params0, params1, groups, chans, plans, notes, **latency)
