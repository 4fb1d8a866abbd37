"""Depth or width, chosen by measurement: meet a MACs target with the mix of dropped blocks and pruned channels that
runs fastest on this machine.

Why: at the same MACs, dropping whole blocks and narrowing every layer run at very different speeds, and which wins
depends on the model, the batch and the device. On this 2-core CPU (bench_speedup.py, ResNet-50 at 4x fewer MACs,
results/speedup_cpu_depth.json) depth first ran 3.22x faster at batch 1 against 2.67x for the best channel plan,
but at batch 8 it was the slowest (3.10x against 4.03x). No rule of thumb gets both right, so ``prune_fastest``
builds one candidate per *depth share* (the share of the MACs cut that dropping blocks may take: 0 is channels only,
1 is blocks up to the target, then channels for whatever is left; blocks never pass a share's part of the cut by
more than 5 %), times them all against the model here (interleaved rounds, `secateur.latency.compare_latency`) and
keeps the fastest.

Depth and width do not cost the same accuracy (bench_depth_mnist.py, bench_minilm.py --depth), so each candidate's
output drift (relative L2 change of the outputs on the example inputs) is reported, and ``accept`` can pass over
candidates on the user's own measure (a validation batch, say) before the fastest is picked."""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from secateur.errors import PruningError, check_model_inputs, fail
from secateur.graph.capture import _flat_tensors
from secateur.latency import pinned_threads
from secateur.metrics import count_macs, count_params, macs_by_layer
from secateur.modes import keeps_statistics
from secateur.report import call_model
from secateur.structured.depth import CRITERIA, _choose, _containers, _distance, _probe, _scores, drop_blocks

__all__ = ["MixOption", "FastestResult", "prune_fastest"]

OVERSHOOT = 0.05  # blocks may take the model this far below a share's depth goal (relative), never further: at
                  # share 1 the goal is the target, and a candidate faster only because it removes more than asked
                  # is not an answer to the target
CHANNEL_OPTIONS = ("importance", "scope", "ignore", "ignore_inputs", "round_to", "heads", "reduce", "normalize",
                   "grouped")


@dataclass(frozen=True)
class MixOption:
    """One candidate: the depth ``share`` asked for, the blocks it dropped, the channel plan that took the rest
    (``width``: "uniform", or the latency table's "greedy" / "latency"; "none" when the blocks met the target), its
    MACs and params as fractions of the model's, its measured ``speedup`` over the model (median of paired rounds,
    ``spread`` = p10, p90), its output ``drift`` and whether ``accept`` took it."""

    share: float
    dropped: tuple[str, ...]
    width: str
    macs: float
    params: float
    speedup: float
    spread: tuple[float, float]
    drift: float
    accepted: bool = True

    @property
    def channels(self) -> str:
        """What the channel plan was, in words ("uniform channels", "no channels")."""
        return "no channels" if self.width == "none" else f"{self.width} channels"

    def row(self) -> str:
        return (f"{self.share:5.2f}  {len(self.dropped):6d}  {self.width:8s}  {self.macs:6.3f}  {self.params:6.3f}  "
                f"{self.speedup:6.2f}x ({self.spread[0]:.2f}-{self.spread[1]:.2f})  {self.drift:7.4f}"
                f"{'' if self.accepted else '  not accepted'}")


@dataclass(frozen=True)
class FastestResult:
    """What ``prune_fastest`` did: the option kept, every option measured (by depth share), the model's MACs and
    params before and after, and notes (shares that gave the same blocks, candidates that could not be built)."""

    kept: MixOption
    options: tuple[MixOption, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    notes: tuple[str, ...] = ()

    @property
    def dropped(self) -> tuple[str, ...]:
        return self.kept.dropped

    def table(self) -> str:
        head = "share  blocks  width     MACs    params  speedup (p10-p90)     drift"
        lines = [head] + [("* " if o is self.kept else "  ") + o.row() for o in self.options]
        return "\n".join(lines)

    def __str__(self) -> str:
        k = self.kept
        return (f"kept depth share {k.share:g} ({len(k.dropped)} blocks dropped, {k.channels}): MACs "
                f"{self.macs_before:,} -> {self.macs_after:,}, params {self.params_before:,} -> {self.params_after:,},"
                f" measured {k.speedup:.2f}x faster here\n{self.table()}"
                + "".join(f"\nnote: {n}" for n in self.notes))


def _validate(model, example_inputs, target_macs, depth, criterion, latency_table, repeats, threads, accept, compile,
              progress, channel_options) -> list[float]:
    check_model_inputs(model, example_inputs, "prune_fastest")
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0 < target_macs < 1:
        raise fail("target_macs is the fraction of the model's MACs to keep, in (0, 1)", where="prune_fastest",
                   value=target_macs)
    if isinstance(depth, (int, float)):
        depth = [depth]
    try:
        shares = [float(s) for s in depth]
    except (TypeError, ValueError):
        raise fail("depth is a sequence of shares in [0, 1]", where="prune_fastest", value=depth) from None
    if not shares or any(not 0 <= s <= 1 or math.isnan(s) for s in shares):
        raise fail("depth is a non-empty sequence of shares in [0, 1] (0: channels only, 1: blocks up to the target)",
                   where="prune_fastest", value=depth)
    if criterion not in CRITERIA:
        raise fail("unknown block criterion", where="prune_fastest", value=criterion, hint=f"one of {CRITERIA}")
    if latency_table is not None:
        from secateur.latency_model import LatencyTable
        if not isinstance(latency_table, LatencyTable):
            raise fail("latency_table must be a secateur.latency_model.LatencyTable", where="prune_fastest",
                       value=type(latency_table).__name__)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 3:
        raise fail("repeats is an int >= 3 (rounds of interleaved timing)", where="prune_fastest", value=repeats)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise fail("threads is a positive int or None", where="prune_fastest", value=threads)
    if not isinstance(progress, bool):
        raise fail("progress is True (print each step to stderr) or False", where="prune_fastest", value=progress)
    if not isinstance(compile, bool):
        raise fail("compile is True (time the candidates under torch.compile) or False (eager)", where="prune_fastest",
                   value=compile)
    if accept is not None and not callable(accept):
        raise fail("accept is a callable taking a pruned model and returning True to keep it as a candidate",
                   where="prune_fastest", value=type(accept).__name__)
    unknown = sorted(set(channel_options) - set(CHANNEL_OPTIONS))
    if unknown:
        raise fail("unknown channel option", where="prune_fastest", value=unknown,
                   hint=f"prune_fastest passes {', '.join(CHANNEL_OPTIONS)} on to prune_channels")
    from secateur.structured.choose import _validate as channels_ok
    o = channel_options
    channels_ok(0.5, None, o.get("scope", "local"), o.get("round_to"), 1, None, None, o.get("heads", "heads"),
                o.get("grouped", "channels"))
    if latency_table is not None and o.get("heads", "heads") != "heads":
        raise fail("a latency table picks whole-head counts only; give heads='heads'", where="prune_fastest",
                   value=o["heads"])
    return sorted(set(shares))


def _width_name(notes: Sequence[str]) -> str:
    """The channel plan fastest_plan kept, from its note ("latency table: kept the NAME (...")."""
    for n in notes:
        if n.startswith("latency table: kept the "):
            return n.removeprefix("latency table: kept the ").split(" ", 1)[0]
    return "uniform"


@keeps_statistics
def prune_fastest(model: nn.Module, example_inputs: Any, *, target_macs: float,
                  depth: Sequence[float] = (0.0, 0.5, 1.0), criterion: str = "output",
                  latency_table: Any = None, repeats: int = 10, threads: int | None = None,
                  accept: Callable[[nn.Module], bool] | None = None, compile: bool = False,
                  progress: bool = False, **channel_options: Any) -> FastestResult:
    """Keep at most ``target_macs`` of the model's MACs with the mix of dropped blocks and pruned channels that runs
    fastest here, in place (see the module docstring).

    For each share ``s`` in ``depth``, a copy drops the lowest-scored residual blocks (``criterion``, as
    `drop_blocks`) until the model has at most ``g = 1 - s * (1 - target_macs)`` of its MACs, passing over any block
    that would take it more than `OVERSHOOT` (5 %) below ``g``; then `prune_channels` takes the rest of the target
    exactly, if any is left (``channel_options``: importance, round_to, ignore, ...; with a
    ``latency_table``, the plan that table rates fastest, timed here: ``verify="measure"``; under ``compile`` the
    uniform plan is a candidate of its own as well, since that timing is eager). Shares that drop the same blocks are
    built once, and a candidate more than 5 % past the target is not timed when another is closer (channel counts
    move in steps, and removing more is not an answer to the target). The copies and the model are timed
    interleaved on ``example_inputs`` (``repeats`` rounds, ``threads``; with ``compile=True`` each under
    ``torch.compile``, for a model you will deploy compiled: fusion removes per-op overhead, which favours narrow
    layers more than missing blocks), the model takes the fastest one that ``accept`` (if given) takes, and the
    result lists them all. The model stays an ``nn.Module`` either way. Time and memory: one copy of the model per
    distinct candidate, all held while they are timed. Everything is checked first; a PruningError leaves the model
    as it was."""
    shares = _validate(model, example_inputs, target_macs, depth, criterion, latency_table, repeats, threads, accept,
                       compile, progress, channel_options)
    say = (lambda msg: print(f"prune_fastest: {msg}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    ref = _flat_tensors(call_model(model, example_inputs))  # first: inputs the model rejects get a PruningError
    macs0, params0 = count_macs(model, example_inputs), count_params(model)
    goal = target_macs * macs0
    notes: list[str] = []
    # one probe and one scoring for every share
    found: dict = {}
    if any(s > 0 for s in shares):
        found, _ = _probe(model, example_inputs, _containers(model))
        if not found:
            notes.append("no droppable residual block: channels only")
    scores = _scores(model, example_inputs, found, list(found), criterion) if found else {}
    sets: dict[tuple[str, ...], float] = {}
    per = macs_by_layer(model, example_inputs) if scores and any(s > 0 for s in shares) else None
    for s in shares:
        part = 1 - s * (1 - target_macs)  # the MACs left once the blocks have taken their share of the cut
        blocks = () if s == 0 or not scores else tuple(_choose(
            model, example_inputs, scores, None, part, macs0, True, part / (1 + OVERSHOOT), per))
        if blocks in sets:
            notes.append(f"depth share {s:g} drops the same blocks as {sets[blocks]:g}")
        else:
            sets[blocks] = s
    with pinned_threads(threads):  # a latency table's options are timed with the threads the candidates will be
        built = _build(model, example_inputs, sets, macs0, goal, latency_table, channel_options, notes, say, t0,
                       compile)
    if not built:
        raise fail("no candidate could be built", where="prune_fastest", value=target_macs, hint="; ".join(notes))
    built = _near_target(built, goal, macs0, notes, say)
    say(f"timing {len(built)} candidates against the model{' (compiling each first)' if compile else ''}")
    options = _measure(model, example_inputs, built, ref, macs0, params0, repeats, threads, accept, compile)
    say(f"timed {len(built)} candidates against the model ({time.perf_counter() - t0:.0f} s)")
    taken = [i for i, o in enumerate(options) if o.accepted]
    if not taken:
        raise fail("accept took none of the candidates", where="prune_fastest",
                   value=[f"share {o.share:g}: drift {o.drift:.4f}" for o in options])
    best = max(taken, key=lambda i: (options[i].speedup, -options[i].share))
    model.__dict__.update(built[best][4].__dict__)  # the timed copy becomes the model (same object for the caller)
    return FastestResult(options[best], tuple(options), macs0, built[best][3], params0, count_params(model),
                         tuple(notes))


def _build(model: nn.Module, example_inputs: Any, sets: dict, macs0: int, goal: float, latency_table: Any,
           channel_options: dict, notes: list[str], say: Callable[[str], None], t0: float,
           compile: bool = False) -> list:
    """Pruned copies per block set: (share, blocks, width plan's name, its MACs, copy); failures go to ``notes``.
    The MACs are the counts drop_blocks and prune_channels make anyway (no extra forward).

    With a latency table, each set's width plan is the one the table's options time fastest here, eagerly
    (``verify="measure"``). Under ``compile`` the uniform plan is kept as a candidate of its own as well, when the
    eager timings picked another: fusion changes which plan wins (ResNet-50 at 4.66x fewer MACs, batch 1 on this
    CPU: a latency-table plan 3.6x eager ran 2.6x compiled, uniform channel counts 3.5x compiled), so the compiled
    timings of every candidate decide."""
    from secateur.structured import prune_channels
    built: list[tuple[float, tuple[str, ...], str, int, nn.Module]] = []
    for blocks, s in sets.items():
        widths = ["table" if latency_table is not None else "uniform"]
        while widths:
            how = widths.pop(0)
            m = copy.deepcopy(model)
            try:
                macs = drop_blocks(m, example_inputs, blocks=list(blocks)).macs_after if blocks else macs0
                left = goal / max(macs, 1)
                width = "none"
                if left < 1:
                    kw = dict(channel_options, target_macs=left)
                    if how == "table":
                        kw.update(latency_table=latency_table.for_model(m), verify="measure")
                    res = prune_channels(m, example_inputs, **kw)
                    width = _width_name(res.notes) if how == "table" else "uniform"
                    macs = res.macs_after
                    if compile and width not in ("uniform", "none") and how == "table":
                        widths.append("uniform")
            except PruningError as e:
                notes.append(f"depth share {s:g} ({len(blocks)} blocks, {how} channels) could not be built: {e}")
                say(notes[-1])
                continue
            built.append((s, blocks, width, macs, m))
            say(f"depth share {s:g}: {len(blocks)} blocks dropped, {'no' if width == 'none' else width} channels "
                f"({time.perf_counter() - t0:.0f} s)")
    return built


def _near_target(built: list, goal: float, macs0: int, notes: list[str], say: Callable[[str], None]) -> list:
    """The candidates that keep at least ``goal / (1 + OVERSHOOT)`` MACs, when any does (all of them otherwise).

    Why: a candidate faster only because it removes more than asked is not an answer to the target, and a channel
    plan can overshoot where channel counts move in steps: one ratio over counts rounded to 8 jumps past the target
    when several small groups step together (MobileNetV2 with 8 blocks dropped, asked for 1/4 of the MACs, kept
    1/5.41 and was the fastest compiled candidate at batch 1 for that reason). Passed-over candidates are noted."""
    near = [b for b in built if b[3] * (1 + OVERSHOOT) >= goal]
    if not near:
        return built
    for s, blocks, width, macs, _ in built:
        if macs * (1 + OVERSHOOT) < goal:
            notes.append(f"depth share {s:g} ({len(blocks)} blocks, {width} channels) keeps {macs / macs0:.3f} of "
                         f"the MACs for a target of {goal / macs0:.3f}, more than {OVERSHOOT:.0%} below it: not timed")
            say(notes[-1])
    return near


def _measure(model: nn.Module, example_inputs: Any, built: list, ref: list, macs0: int, params0: int, repeats: int,
             threads: int | None, accept: Callable[[nn.Module], bool] | None, compile: bool) -> list[MixOption]:
    from secateur.latency import compare_latency, paired_speedup
    variants: dict[str, nn.Module] = {"model": model}
    for i, (*_, m) in enumerate(built):
        variants[f"option{i}"] = m.eval()  # for accept; compare_latency times every model in eval mode itself
    timed = compare_latency(variants, example_inputs, repeats=repeats, warmup=3, threads=threads, compile=compile)
    options = []
    for i, (s, blocks, width, macs, m) in enumerate(built):
        med, p10, p90 = paired_speedup(timed["model"], timed[f"option{i}"])
        ok = True if accept is None else bool(accept(m))  # in eval mode, as it was timed (prune_fastest's
        # keeps_statistics gives the kept copy the model's modes back, by module name)
        options.append(MixOption(s, blocks, width, macs / max(macs0, 1), count_params(m) / max(params0, 1), med,
                                 (p10, p90), _distance(ref, _flat_tensors(call_model(m, example_inputs))), ok))
    return options
