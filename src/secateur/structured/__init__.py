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
(``plan.kept_norms``). GroupNorm loses whole groups, which is exact; one with a single group is a LayerNorm over
channels and positions and is treated as one (pruned, noted, kept-channel reference). A grouped convolution loses the same
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

import functools
import gc
from typing import Any, Callable, Iterable

from torch import nn

from secateur.errors import check_model_inputs, fail
from secateur.graph.capture import capture
from secateur.graph.groups import Graph, build_graph, groups_from
from secateur.metrics import count_macs, count_params
from secateur.modes import keeps_statistics
from secateur.structured.apply import _apply, apply_structure
from secateur.structured.depth import DepthResult, Skipped, drop_blocks, droppable_blocks, score_blocks
from secateur.structured.mix import FastestResult, MixOption, prune_fastest
from secateur.structured.choose import (_candidates, _choose, _new_plan, _ratio_for, _ratio_keys_prune,
                                        _refuse_masked, _refuse_rope, _validate, align_notes, resolve_ratio,
                                        toward_original, widths)
from secateur.structured.plan import STRUCTURE_ATTR, Plan, StructuredResult
from secateur.structured.proof import _verified
from secateur.structured.targets import _latency_target, _target_plan, _validate_latency

__all__ = ["STRUCTURE_ATTR", "DepthResult", "FastestResult", "MixOption", "Plan", "Skipped", "StructuredResult",
           "apply_structure", "drop_blocks", "droppable_blocks", "plan_channels", "prune_channels", "prune_fastest",
           "score_blocks"]


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


@_old_objects_spared
@keeps_statistics
def plan_channels(model: nn.Module, example_inputs: Any, *, ratio: float | dict = 0.5,
                  importance: str | Callable = "l1", threshold: float | None = None, scope: str = "local",
                  ignore: Iterable = (), round_to: int | None = None, heads: str = "heads",
                  reduce: str = "mean", normalize: str | None = None, ignore_inputs: Iterable = (),
                  graph: Graph | None = None, verify: bool = True, grouped: str = "channels") -> Plan:
    """Choose the channels ``prune_channels`` would remove; nothing is changed (``plan.apply(model)`` does it).
    ``verify`` dry-runs the plan on a copy (sharing the weights on the CPU, or on meta: no weight memory) and leaves
    out groups whose removal would break the model's own forward (noted in ``plan.notes``)."""
    check_model_inputs(model, example_inputs, "plan_channels")
    _validate(ratio, threshold, scope, round_to, 1, None, None, heads, grouped)
    if graph is not None and not isinstance(graph, Graph):
        raise fail("graph is a secateur.graph.Graph from build_graph(model, example_inputs)", where="plan_channels",
                   value=type(graph).__name__)
    ratio = resolve_ratio(model, ratio)
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
    plan.notes.extend(align_notes(cands, plan.choices, threshold, scope, round_to))
    return plan


def _step_ratio(model, graph, ratio, i: int, steps: int, first: dict, scope, ignore, ignore_inputs):
    """Round ``i`` of ``steps``: after it each group has lost ``1 - (1 - r) ** ((i + 1) / steps)`` of its width at
    the first round (exactly ``r`` after the last), counted from those widths, so the rounds end where one-shot
    pruning would (the survivors' share rounded down each round removed nothing from a narrow layer)."""
    if i == 0:
        if isinstance(ratio, dict):
            _ratio_keys_prune(graph, ratio)
        first.update(widths(graph))
    frac = (i + 1) / steps

    def share(g):
        r = _ratio_for(g, ratio)
        return r if i == steps - 1 else 1 - (1 - r) ** frac

    return toward_original(model, graph, first, share, lambda g: 1 - (1 - _ratio_for(g, ratio)) ** (1 / steps),
                           scope, ignore, ignore_inputs)


@_old_objects_spared
@keeps_statistics
def prune_channels(model: nn.Module, example_inputs: Any, *, ratio: float | dict = 0.5,
                   importance: str | Callable = "l1", threshold: float | None = None, scope: str = "local",
                   ignore: Iterable = (), round_to: int | None = None, heads: str = "heads",
                   target_macs: float | None = None, target_params: float | None = None, steps: int = 1,
                   reduce: str = "mean", normalize: str | None = None,
                   ignore_inputs: Iterable = (), target_latency: float | None = None,
                   latency_table: Any = None, verify: Any = None, grouped: str = "channels") -> StructuredResult:
    """Physically remove channels from ``model`` in place (see module docstring). ``target_macs`` /
    ``target_params`` (fractions of the current model): one uniform ratio (or global budget with
    ``scope="global"``) found by bisection on the plan's exact count, applied once (so a target refuses
    ``steps`` > 1 and a ratio dict); ``steps`` splits ``ratio`` into that many capture-score-prune rounds
    (geometric shares counted from the widths at the first round: the last round leaves one-shot's widths).
    ``ignore``: modules (or names / globs) whose output channels are kept; ``ignore_inputs``: modules whose
    input channels are kept. The model's outputs are always kept, whatever layer produces them. ``heads``:
    "heads" removes whole attention heads (whole key/value groups under GQA); "head_dim" removes the same number
    of dims from every head (q/k dims together, v dims with the output projection's columns), keeping each
    module's original softmax scale; RoPE models are refused, and
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
    check_model_inputs(model, example_inputs, "prune_channels")
    _validate(ratio, threshold, scope, round_to, steps, target_macs, target_params, heads, grouped)
    ratio = resolve_ratio(model, ratio)
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
    unapplied: list[str] = []  # notes of a target's plan that removes nothing ("not reachable" among them)
    if target_latency is not None:
        plan, latency = _latency_target(model, example_inputs, target_latency, latency_table, opts, check)
        if plan.choices:
            plan.apply(model)
            plans.append(plan)
        else:
            unapplied.extend(plan.notes)  # (why nothing was removed: the groups the dry run kept)
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
        else:
            unapplied.extend(plan.notes)
        if latency:
            latency["latency_estimate"] = latency.pop("estimate")(model)
    else:
        first: dict[str, int] = {}
        for i in range(steps):
            # one capture per step (counting the dense MACs on the first); the dry run's slices and MAC count
            # are reused: the plan is sliced once and the pruned model not run again to count it
            graph = groups_from(capture(model, example_inputs, heads, grouped, macs=i == 0))
            if i == 0:
                macs0 = graph.tracer.macs if graph.tracer.macs is not None else count_macs(model, example_inputs)
            r = ratio if steps == 1 or threshold is not None else _step_ratio(model, graph, ratio, i, steps, first,
                                                                             scope, ignore, ignore_inputs)
            done = {}
            plan = _plan(model, example_inputs, graph, r, importance, threshold, scope, ignore, round_to, heads,
                         reduce, normalize, ignore_inputs, True, done)
            if not plan.choices:
                if threshold is not None:
                    break  # (nothing left below it)
                continue  # (a narrow layer's next channel may be due only in a later round)
            _apply(model, plan, reuse=done.get("slices"))
            plans.append(plan)
            macs1 = done.get("macs")
    if macs1 is None:
        macs1 = macs0 if not plans else count_macs(model, example_inputs)
    params1 = count_params(model)
    groups = sum(len(p.choices) for p in plans)
    chans = sum(p.channels for p in plans)
    notes = sorted({n for p in plans for n in p.notes} | set(unapplied))
    desc = (f"pruned {chans} channels in {groups} groups: params {params0:,} -> {params1:,} "
            f"({params1 / max(params0, 1):.1%}), MACs {macs0:,} -> {macs1:,} ({macs1 / max(macs0, 1):.1%})")
    if latency:
        desc += f", latency {latency['latency_estimate']:.1%} of dense (estimated)"
        if latency.get("latency_measured") is not None:
            desc += f", {latency['latency_measured']:.1%} (measured)"
    return StructuredResult(desc, macs0, macs1, params0, params1, groups, chans, plans, notes, **latency)
