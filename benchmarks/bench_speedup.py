"""Real speedup of structural pruning: secateur vs Torch-Pruning 1.6.1, side by side in the same run.

For each torchvision model (random weights) and each reduction target, every method prunes its own copy
of the same dense model; then the dense model and all pruned copies are timed *interleaved* (one call
each per round, order rotated) so that load from other processes hits all of them alike. Speedup is the
median of the per-round ratios dense / pruned (p10-p90 in brackets); efficiency = speedup / MACs
reduction (1.0 is the physical limit). "min sp." / "eff min" use the minimum latency of each model over the
rounds instead (another process only adds time, so on a shared machine the minima are the better estimate). MACs are counted the same way for every method
(torch's FlopCounterMode: convolutions, matmuls, attention).

Methods (``--methods``):
  tp                Torch-Pruning 1.6.1 BasePruner, L1 magnitude, round_to=8, classifier ignored,
                    uniform ratio raised in ``iterative_steps`` until the MACs target is met
  secateur          prune_channels(target_macs=1/target, round_to=8): one L1 ratio for every group, found by
                    bisection on the plan's exact MACs, applied once
  secateur-latency  prune_channels(target_macs=1/target, round_to=8, latency_table=table): a per-layer latency
                    table of this machine (secateur.latency_model; with the time outside the Conv/Linear layers,
                    secateur.latency_tail) rates the plans that meet the MACs target (exact count) and the fastest
                    is kept (secateur.fastest_plan): the uniform plan, the greedy allocator's (secateur.allocate:
                    multiples of 8, least L1 importance per second saved first), and a latency budget bisected
                    until the MACs target is met
  secateur-depth    (not run by default) drop_blocks then prune_channels, depth first: the lowest-scored
                    droppable residual blocks go whole (those that fit above the target, at most
                    ``--depth-fraction`` of them), then one uniform ratio meets the rest of the MACs target;
                    the accuracy cost of depth vs width on real data: bench_depth_mnist.py, bench_minilm.py --depth
  secateur-auto     (not run by default) prune_fastest(target_macs=1/target, depth=--auto-shares, round_to=8,
                    latency_table=table): one candidate per depth share (0: channels only; 1: depth first as
                    above; the channels of each the plan the table rates fastest, timed here), all timed against
                    the dense model at the table's batch, the fastest kept: depth or width chosen by measurement
  secateur-auto-compiled  (not run by default) secateur-auto with the candidates timed under torch.compile
                    (prune_fastest(compile=True)): the choice for a model that will run compiled; time it with
                    ``--compile`` (on the CPU: ``--compile --compile-batch 1 8``)
  secateur-latency-greedy  (not run by default) the greedy allocator's plan alone, the previous
                    secateur-latency (slower than uniform on ConvNeXt-T by its own table)
  secateur-latency-layers  (not run by default) the greedy with the Conv/Linear layers' latencies alone (the
                    table before the tail was measured), for comparison
  secateur-latency-target  (not run by default) the target is a *latency* reduction estimated by the
                    table ("2x faster"); MACs reduction is whatever that takes

Where (``--device``; by default cuda when a GPU is present, else cpu):
  cpu   the latency table is measured on the CPU (``--threads``, float32, at each ``--table-batch``, by
        default every ``--batch``: a plan per batch, since the staircase differs between batch 1 and 8)
        and the models are timed on the CPU at each ``--batch`` size.
  cuda  the latency table is measured on the GPU (bf16, channels-last, at ``--table-batch``, default the
        first ``--gpu-batch``) and the models are timed on the GPU at each ``--gpu-batch`` size, eager, and
        compiled with ``torch.compile`` at each ``--compile-batch`` size when ``--compile`` is given.
        CPU timing runs only for the ``--batch`` sizes given (none by default with cuda).
``--dtype`` and ``--channels-last`` override the device's defaults (on the CPU too, which is how the GPU
code path is tested on machines without one). Pruning itself always runs on the CPU in float32.

    .venv/bin/python benchmarks/bench_speedup.py --quiet-check --wait-quiet 300   # full CPU matrix, load reported
        (4 models x targets 2, 4 x batch 1, 8 x tp / secateur / secateur-latency; its 8 latency tables took
        12 min in all with the machine's 2 cores shared by other jobs, results/latency_table_build_times_loaded.json;
        timing ~3 min and pruning ~3 min on a quiet machine before secateur-latency rated three plans per target;
        it now takes ~3 min per target and table on ConvNeXt-T with the 2 cores shared by ~10 busy processes,
        less when quiet; each model prints its elapsed time)
    .venv/bin/python benchmarks/bench_speedup.py --models resnet50 --targets 2 --batch 1 --repeats 5
    python benchmarks/bench_speedup.py --device cuda --gpu-batch 64 256 --compile   # GPU, no CPU timing
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from secateur.errors import PruningError, fail

RESULTS = Path(__file__).parent / "results" / "speedup.json"
MODELS = ["resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16"]
ROUND_TO = 8


def say(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    """One counter for every method: secateur.metrics.count_macs (torch's FlopCounterMode, 2 FLOPs = 1 MAC,
    with CPU flash attention counted and the fused nn.MultiheadAttention fast path switched off, which
    FlopCounterMode cannot see: ViT-B/16's dense MACs read 11.3 G with it, 16.8 G without)."""
    from secateur.metrics import count_macs
    return count_macs(model, x)


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear (the 1000-way head of torchvision classifiers)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ----------------------------------------------------------------------------------------- methods
# Each method gets the dense model (which it must not change) and the ascending targets, and returns
# {target: pruned copy}. Targets it cannot reach are left out (and reported).
METHODS: dict[str, Callable[..., dict[float, nn.Module]]] = {}


def method(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


@method("tp")
def prune_tp(dense: nn.Module, x: torch.Tensor, targets: list[float], args) -> dict[float, nn.Module]:
    import torch_pruning as tp
    model = copy.deepcopy(dense)
    kw: dict[str, Any] = {}
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if mha:  # torchvision ViT: heads and the free class token / position embedding (Torch-Pruning's recipe)
        kw["num_heads"] = {m: m.num_heads for m in mha}
        kw["unwrapped_parameters"] = [(p, 2) for n, p in model.named_parameters()
                                      if n in ("class_token", "encoder.pos_embedding")]
    steps = args.tp_steps
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=args.tp_max_ratio, iterative_steps=steps, round_to=ROUND_TO,
                                  ignored_layers=[classifier(model)], **kw)
    base = macs_of(dense, x)
    out, todo = {}, list(targets)
    for _ in range(steps):
        pruner.step()
        macs = macs_of(model, x)
        while todo and base / macs >= todo[0]:
            out[todo.pop(0)] = copy.deepcopy(model)
        if not todo:
            break
    return out


def _scored_groups(dense: nn.Module, x: torch.Tensor):
    """The structural engine's groups of ``dense`` with their L1 channel scores (unscorable ones left out)."""
    from secateur.graph import build_graph
    from secateur.importance import group_scores
    graph = build_graph(dense, x)
    groups, scores = [], []
    for g in graph.groups:
        s = group_scores(g, dense, "l1")
        if s is not None and g.size > 1:
            groups.append(g)
            scores.append(s)
    return graph, groups, scores


def _apply_counts(dense, graph, groups, scores, counts) -> nn.Module:
    """A pruned copy of ``dense`` keeping, in each group, its ``counts[g]`` highest-scored channels."""
    from secateur.structured import Plan
    choices = [(g, torch.argsort(s, stable=True)[: g.size - k]) for g, s, k in zip(groups, scores, counts)
               if k < g.size]
    model = copy.deepcopy(dense)
    Plan(graph.groups, choices, list(graph.notes)).apply(model)
    return model


def _macs_budget(dense, x, table, groups, target):
    """(MACs cost of group counts, budget for ``target``): MACs outside the table's layers
    (attention matmuls) are not pruned and stay as a fixed part of the model's total."""
    sizes = [g.size for g in groups]
    macs = table.cost_fn(table.members_of(groups), "macs", sizes=sizes)
    base = macs_of(dense, x)
    fixed = base - macs(sizes)
    return macs, base / target - fixed


@method("secateur")
def prune_secateur(dense: nn.Module, x: torch.Tensor, targets: list[float], args) -> dict[float, nn.Module]:
    """What a user would call: ``prune_channels(target_macs=1/t, round_to=8)``, one uniform L1 ratio for every
    group found by bisection on the plan's exact MACs (one capture, one apply); classifier outputs kept."""
    from secateur.structured import prune_channels
    out = {}
    for t in targets:
        model = copy.deepcopy(dense)
        prune_channels(model, x, target_macs=1 / t, round_to=ROUND_TO)
        out[t] = model
    return out


@method("secateur-depth")
def prune_secateur_depth(dense: nn.Module, x: torch.Tensor, targets: list[float], args) -> dict[float, nn.Module]:
    """Depth, then width: ``drop_blocks(target_macs=1/t, stay_above=True)`` removes the lowest-scored droppable
    residual blocks (``--depth-criterion``) that fit above the target (at most ``--depth-fraction`` of them), then
    ``prune_channels(target_macs=..., round_to=8)`` takes the rest of the MACs target with one uniform ratio."""
    from secateur.structured import drop_blocks, droppable_blocks, prune_channels
    base, out = macs_of(dense, x), {}
    n = int(len(droppable_blocks(dense, x)) * args.depth_fraction)
    for t in targets:
        model = copy.deepcopy(dense)
        res = drop_blocks(copy.deepcopy(dense), x, target_macs=1 / t, stay_above=True,
                          criterion=args.depth_criterion)  # depth up to the target, never past it
        drop_blocks(model, x, blocks=res.dropped[:n])  # named: no scoring
        left = base / (t * macs_of(model, x))
        if left < 1:
            prune_channels(model, x, target_macs=left, round_to=ROUND_TO)
        out[t] = model
    return out


_TABLES: dict[tuple[int, int], Any] = {}  # (dense model, table batch) -> latency table, shared by the latency methods


@dataclass(frozen=True)
class Place:
    """Where a model runs: device, dtype and memory format (the latency table and the timings agree)."""

    device: str
    dtype: torch.dtype
    channels_last: bool

    def model(self, m: nn.Module) -> nn.Module:
        """``m`` moved in place (as ``nn.Module.to`` does) and returned."""
        m = m.to(self.device, self.dtype)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def input(self, batch: int, size: int) -> torch.Tensor:
        x = torch.randn(batch, 3, size, size, device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> dict:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "channels_last": self.channels_last}


CPU32 = Place("cpu", torch.float32, False)


def _latency_setup(dense: nn.Module, x: torch.Tensor, args, metric: str = "latency"):
    """Groups, scores and the latency table of ``dense``, measured where ``--device`` says (a copy of the
    model in the device's dtype and memory format, at ``--table-batch``)."""
    from secateur.latency_model import LatencyTable
    graph, groups, scores = _scored_groups(dense, x)
    key = (id(dense), args.table_batch)
    if key not in _TABLES:
        t0 = time.perf_counter()
        cache = {} if args.table_cache else {"cache": False}
        place = args.place
        on_device = place.model(copy.deepcopy(dense)).eval()
        xt = place.input(args.table_batch, args.size)
        _TABLES[key] = LatencyTable.build(
            on_device, xt, threads=args.threads if place.device == "cpu" else None, repeats=args.table_repeats,
            max_points=args.table_points, in_points=max(4, args.table_points // 2), progress=True,
            calibrate=args.calibrate, **cache)
        tail = _TABLES[key].tail
        say(f"  latency table on {_TABLES[key].device} ({place.describe()['dtype']}, batch "
            f"{args.table_batch}): {len(_TABLES[key].specs)} layers + {tail.ops if tail else 0} other ops"
            f"{', calibrated in place' if args.calibrate else ''} in {time.perf_counter() - t0:.0f} s")
        del on_device, xt
    table = _TABLES[key]
    latency = table.cost_fn(table.members_of(groups), metric, sizes=[g.size for g in groups])
    return graph, groups, scores, table, latency


def _measured_input(x: torch.Tensor, args) -> torch.Tensor:
    """The input a method that times its options here uses: on the CPU ``x`` at the table's batch, in the memory
    format the models will be timed in (the options ranked in another layout than the final timing could rank
    otherwise); on a GPU place ``x`` itself (the table's estimate decides, the models are timed on the GPU later)."""
    if args.place.device != "cpu":
        return x
    xm = x.expand(args.table_batch, *x.shape[1:])
    return xm.contiguous(memory_format=torch.channels_last if args.place.channels_last else torch.contiguous_format)


def _measured_copy(dense: nn.Module, args) -> nn.Module:
    """A copy of ``dense`` to prune, in the CPU place's memory format (see ``_measured_input``)."""
    model = copy.deepcopy(dense)
    return args.place.model(model) if args.place.device == "cpu" else model


@method("secateur-latency")
def prune_secateur_fastest(dense: nn.Module, x: torch.Tensor, targets: list[float], args) -> dict[float, nn.Module]:
    """What a user would call: ``prune_channels(target_macs=1/t, round_to=8, latency_table=table)``, the plan
    the table rates fastest among those meeting the MACs target (uniform, greedy, bisected latency budget:
    secateur.fastest_plan), counted by the engine's exact MACs."""
    from secateur.structured import prune_channels
    *_, table, _ = _latency_setup(dense, x, args)
    # verify="measure" times the options on the example input: at the table's batch, on the CPU (where the table
    # was measured too); on a GPU place the table's estimate decides (the models are timed on the GPU later)
    xm = _measured_input(x, args)
    out = {}
    for t in targets:
        model = _measured_copy(dense, args)
        try:
            res = prune_channels(model, xm, target_macs=1 / t, round_to=ROUND_TO, latency_table=table,
                                 verify="measure" if args.place.device == "cpu" else "estimate")
        except PruningError as e:  # reported, the other targets still run
            say(f"  secateur-latency {t}x: {e}")
            continue
        model.predicted_speedup = 1 / res.latency_estimate
        model.plan_options = [n for n in res.notes if n.startswith("latency table:")]
        say(f"  secateur-latency {t}x: {model.plan_options[0] if model.plan_options else ''}")
        out[t] = model
    return out


@method("secateur-auto")
def prune_secateur_auto(dense: nn.Module, x: torch.Tensor, targets: list[float], args, *,
                        compile: bool = False) -> dict[float, nn.Module]:
    """What a user would call to let the machine decide between depth and width: ``prune_fastest(target_macs=1/t,
    depth=--auto-shares, criterion=--depth-criterion, round_to=8, latency_table=table)``, planned and timed at the
    table's batch on the CPU (where the table was measured); ``compile``: the candidates timed under
    torch.compile."""
    from secateur.structured import prune_fastest
    *_, table, _ = _latency_setup(dense, x, args)
    cpu = args.place.device == "cpu"
    xm = _measured_input(x, args)
    name = "secateur-auto" + ("-compiled" if compile else "")
    out = {}
    for t in targets:
        model = _measured_copy(dense, args)
        try:
            res = prune_fastest(model, xm, target_macs=1 / t, depth=args.auto_shares, criterion=args.depth_criterion,
                                round_to=ROUND_TO, latency_table=table, repeats=args.repeats,
                                threads=args.threads if cpu else None, compile=compile)
        except PruningError as e:  # reported, the other targets still run
            say(f"  {name} {t}x: {e}")
            continue
        k = res.kept
        model.plan_options = [f"kept depth share {k.share:g}: {len(k.dropped)} blocks dropped, {k.channels}"] \
            + [f"share {o.share:g}: {len(o.dropped)} blocks, {o.channels}, measured {o.speedup:.2f}x, drift "
               f"{o.drift:.3f}" for o in res.options]
        say(f"  {name} {t}x: " + "; ".join(model.plan_options))
        out[t] = model
    return out


@method("secateur-auto-compiled")
def prune_secateur_auto_compiled(dense: nn.Module, x: torch.Tensor, targets: list[float], args
                                 ) -> dict[float, nn.Module]:
    """secateur-auto with the candidates timed under torch.compile (``prune_fastest(compile=True)``): the choice
    for a model that will run compiled."""
    return prune_secateur_auto(dense, x, targets, args, compile=True)


@method("secateur-latency-greedy")
def prune_secateur_latency(dense: nn.Module, x: torch.Tensor, targets: list[float], args, *,
                           metric: str = "latency") -> dict[float, nn.Module]:
    """The MACs target, met with the channels whose removal saves the most estimated time per importance
    (``metric``: the table's whole-model estimate, or ``"layers"``: its Conv/Linear layers alone); the
    default latency method before it kept the fastest of several plans (ConvNeXt-T: slower than uniform)."""
    from secateur.allocate import channel_counts, round_candidates
    from secateur.latency_model import LatencyTable
    graph, groups, scores, table, latency = _latency_setup(dense, x, args, metric)
    cands = [round_candidates(g.size, ROUND_TO) for g in groups]
    shapes = LatencyTable.shapes_only(dense, x)  # MACs at the benchmark's own input, whatever the table's batch
    out = {}
    dense_macs = macs_of(dense, x)
    for t in targets:
        macs, budget = _macs_budget(dense, x, shapes, groups, t)

        def allocate(b: float) -> nn.Module:
            counts = channel_counts(groups, scores, macs, budget=b, candidates=cands, min_keep=ROUND_TO,
                                    rank_fn=latency)
            model = _apply_counts(dense, graph, groups, scores, counts)
            model.predicted_speedup = latency([g.size for g in groups]) / latency(counts)
            model._macs_reduction = dense_macs / macs_of(model, x)
            return model
        try:
            model = _calibrated(allocate, budget, macs([g.size for g in groups]), t)
        except Exception as e:  # noqa: BLE001 - reported, the other targets still run
            say(f"  secateur-latency {t}x: {e}")
            continue
        out[t] = model
    return out


def _calibrated(allocate: Callable[[float], nn.Module], budget: float, full: float, target: float,
                tolerance: float = 0.02, steps: int = 10) -> nn.Module:
    """The allocation whose *measured* MACs reduction meets ``target`` (within ``tolerance``, never short of it).

    The table's MACs count only its Conv/Linear modules and treats the rest as fixed; where the rest shrinks too
    (nn.MultiheadAttention's bare ``in_proj_weight`` under a pruned hidden size) the first budget overshoots (ViT-B/16:
    3.99x for a 2x target), or comes out negative. Bisection on the budget over [0, full] against the pruned
    model's own count fixes that; models the table covers whole meet it on the first try."""
    lo, hi, best = 0.0, full, None
    b = budget if 0 < budget < full else full / target
    for _ in range(steps):
        try:
            model = allocate(b)
        except PruningError:  # below every group's floor: keep more
            lo = b
        else:
            if model._macs_reduction >= target:
                best = model
                if model._macs_reduction <= target * (1 + tolerance):
                    return model
                lo = b
            else:
                hi = b
        b = (lo + hi) / 2
    if best is None:
        raise fail("the MACs target cannot be reached within the per-group floors", value=target)
    return best


@method("secateur-latency-layers")
def prune_secateur_latency_layers(dense: nn.Module, x: torch.Tensor, targets: list[float], args
                                  ) -> dict[float, nn.Module]:
    """secateur-latency ranking steps by the Conv/Linear layers' time only (no norms, activations, adds)."""
    return prune_secateur_latency(dense, x, targets, args, metric="layers")


@method("secateur-latency-target")
def prune_secateur_latency_target(dense: nn.Module, x: torch.Tensor, targets: list[float], args
                                  ) -> dict[float, nn.Module]:
    """HALP's question, "make it t x faster": the target is the table's estimated latency (Conv/Linear
    time; the rest of the model is assumed to shrink in proportion), MACs are whatever that takes."""
    from secateur.allocate import channel_counts, round_candidates
    graph, groups, scores, table, latency = _latency_setup(dense, x, args)
    cands = [round_candidates(g.size, ROUND_TO) for g in groups]
    out = {}
    for t in targets:
        try:
            counts = channel_counts(groups, scores, latency, t, candidates=cands, min_keep=ROUND_TO)
        except Exception as e:  # noqa: BLE001 - reported, the other targets still run
            say(f"  secateur-latency-target {t}x: {e}")
            continue
        out[t] = _apply_counts(dense, graph, groups, scores, counts)
        out[t].predicted_speedup = latency([g.size for g in groups]) / latency(counts)
    return out


# ----------------------------------------------------------------------------------------- measuring
def measure(variants: dict[str, nn.Module], x: torch.Tensor, args, *, threads: int | None,
            compile: bool = False) -> dict[str, dict]:
    from secateur.latency import compare_latency, paired_speedup
    n = args.repeats
    res = compare_latency(variants, x, repeats=n, warmup=args.warmup, threads=threads, compile=compile)
    dense = res["dense"]
    out = {}
    for k, st in res.items():
        med, lo, hi = paired_speedup(dense, st)
        out[k] = {"latency_ms": st.median * 1e3, "latency_p10_ms": st.p10 * 1e3, "latency_p90_ms": st.p90 * 1e3,
                  "latency_min_ms": st.min * 1e3, "speedup": med, "speedup_p10": lo, "speedup_p90": hi,
                  "speedup_min": dense.min / st.min}  # minima: another process only adds time
    return out


def timings(args) -> list[tuple[Place, int, bool]]:
    """(place, batch, compiled) of every timing run, in order: CPU first (models start there)."""
    cpu = args.place if args.place.device == "cpu" else CPU32
    out = [(cpu, b, False) for b in args.batch]
    if args.place.device == "cpu":
        out += [(cpu, b, True) for b in args.compile_batch if args.compile]
    else:
        for b in args.gpu_batch:
            out.append((args.place, b, False))
            if args.compile and b in args.compile_batch:
                out.append((args.place, b, True))
    return out


def _fresh_dynamo() -> None:
    """Compiled entries of the previous batch or model are dropped; room for every variant's own entry is made by
    compare_latency itself (past dynamo's recompile limit the rest would run eagerly)."""
    import torch._dynamo
    torch._dynamo.reset()


def machine_load(seconds: float = 3.0) -> dict:
    """How busy the CPUs are with *other* processes: the busy share of all CPUs (from /proc/stat) while this
    process sleeps ``seconds``, and the load averages. Timings taken while this is high are noise."""
    def stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(n) for n in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]) - idle, sum(v[:8])
    out: dict[str, Any] = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        b0, t0 = stat()
        time.sleep(seconds)
        b1, t1 = stat()
        out["busy"] = (b1 - b0) / max(1, t1 - t0)
    except OSError:  # no /proc (not Linux): the load average only
        out["busy"] = None
    return out


def quiet_check(args, when: str, *, wait: bool = True) -> dict | None:
    """With ``--quiet-check``: report (and with ``--wait-quiet``, unless ``wait`` is False, wait up to that
    long for) a quiet machine."""
    if not args.quiet_check:
        return None
    deadline = time.monotonic() + (args.wait_quiet if wait else 0.0)
    while True:
        load = machine_load()
        quiet = load["busy"] is not None and load["busy"] <= args.max_busy
        if quiet or time.monotonic() >= deadline:
            break
        say(f"  waiting for a quiet machine ({when}): {load['busy']:.0%} of the CPUs busy with other processes")
        time.sleep(10)
    busy = "unknown" if load["busy"] is None else f"{load['busy']:.0%}"
    say(f"  machine load {when}: {busy} of {load['cpus']} CPUs busy with other processes, load average "
        f"{', '.join(f'{v:.2f}' for v in load['load_average'])}" + ("" if quiet else "  ** NOT QUIET: timings are noise **"))
    load["quiet"] = quiet
    return load


def run_model(name: str, args) -> list[dict]:
    import torchvision
    torch.manual_seed(0)
    _TABLES.clear()
    dense = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    before_tables = quiet_check(args, f"{name}, before pruning and latency tables")
    base_macs, base_params = macs_of(dense, x), params_of(dense)
    variants: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict] = {"dense": {"method": "dense", "target": 1.0, "macs": base_macs, "params": base_params,
                                       "prune_s": 0.0}}
    for meth, tb in [(m, tb) for m in args.methods for tb in (args.table_batch if "latency" in m or m.startswith("secateur-auto") else [None])]:
        t0 = time.perf_counter()
        say(f"{name}: pruning with {meth} to {args.targets}x" + (f" (latency table at batch {tb})" if tb else ""))
        margs = copy.copy(args)
        margs.table_batch = tb
        try:
            pruned = METHODS[meth](dense, x, sorted(args.targets), margs)
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            say(f"  {meth} failed on {name}: {type(e).__name__}: {e}")
            pruned = {}
        secs = time.perf_counter() - t0
        table = _TABLES.get((id(dense), tb))
        for t in sorted(args.targets):
            if t not in pruned:
                say(f"  {meth} did not reach {t}x on {name}")
                continue
            m = pruned[t].eval()
            with torch.no_grad():
                assert m(x).shape == dense(x).shape
            key = f"{meth}@{t:g}x" + (f"/t{tb}" if tb and len(args.table_batch) > 1 else "")
            variants[key] = m
            info[key] = {"method": meth, "target": t, "macs": macs_of(m, x), "params": params_of(m), "prune_s": secs,
                         "predicted_speedup": getattr(m, "predicted_speedup", None),
                         "plan_options": getattr(m, "plan_options", None),
                         "table_device": table.device if table else None, "table_batch": tb}
    rows = []
    for place, b, comp in timings(args):
        threads = args.threads if place.device == "cpu" else None
        load = quiet_check(args, f"{name}, before timing batch {b}")
        say(f"{name}: timing {len(variants)} variants on {place.device} ({place.describe()['dtype']}"
            f"{', channels-last' if place.channels_last else ''}) batch {b}{' compiled' if comp else ''}, "
            f"{args.repeats} rounds")
        for m in variants.values():
            place.model(m)
        if comp:
            _fresh_dynamo()
        lat = measure(variants, place.input(b, args.size), args, threads=threads, compile=comp)
        after = quiet_check(args, f"{name}, after timing batch {b}", wait=False)
        rows += _rows(name, info, lat, base_macs, base_params, **place.describe(), batch=b, compiled=comp,
                      threads=threads, load_before_tables=before_tables, load_before=load, load_after=after)
    for m in variants.values():  # back where pruning left them, so nothing of this model stays on the GPU
        CPU32.model(m)
    return rows


def _rows(name, info, lat, base_macs, base_params, **where) -> list[dict]:
    rows = []
    for k, i in info.items():
        if k == "dense":
            continue
        mr = base_macs / i["macs"]
        r = {"model": name, "variant": k, **i, "macs_reduction": mr, "params_reduction": base_params / i["params"],
             **where, **lat[k], "dense_latency_ms": lat["dense"]["latency_ms"]}
        r["efficiency"] = r["speedup"] / mr
        r["efficiency_min"] = r["speedup_min"] / mr
        rows.append(r)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<14}{'device':<9}{'bs':>4} {'method (/t table batch)':<21}{'target':>7}{'MACs red':>9}{'speedup':>9}"
            f"{'[p10-p90]':>14}{'effic.':>8}{'min sp.':>8}{'eff min':>8}{'predicted':>10}{'dense ms':>10}{'ms':>9}")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["model"], r["device"], r["batch"], r["compiled"], r["target"],
                                         r["method"])):
        dev = r["device"] + ("+c" if r["compiled"] else "")
        pred = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else "-"
        meth = r["method"] + (f"/t{r['table_batch']}" if r.get("table_batch") is not None else "")
        print(f"{r['model']:<14}{dev:<9}{r['batch']:>4} {meth:<21}{r['target']:>6g}x{r['macs_reduction']:>8.2f}x"
              f"{r['speedup']:>8.2f}x  [{r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}]{r['efficiency']:>8.2f}"
              f"{r['speedup_min']:>7.2f}x{r['efficiency_min']:>8.2f}"
              f"{pred:>10}{r['dense_latency_ms']:>10.2f}{r['latency_ms']:>9.2f}")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torchvision
    d = {"cpu": cpu, "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "python": platform.python_version(),
         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
         "load_average_at_end": __import__("os").getloadavg()}  # > cores: other processes shared the CPU
    try:
        import importlib.metadata as md
        d["torch_pruning"] = md.version("torch-pruning")
    except Exception:  # noqa: BLE001
        d["torch_pruning"] = None
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments, with the device-dependent defaults resolved (and refused when they cannot work)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS, help="torchvision model names")
    ap.add_argument("--methods", nargs="+", default=["tp", "secateur", "secateur-latency"], choices=list(METHODS))
    ap.add_argument("--depth-fraction", type=float, default=1.0,
                    help="secateur-depth: the largest share of the droppable residual blocks it drops (lowest score "
                         "first; 1.0: depth first, as many as the target needs, then width)")
    ap.add_argument("--depth-criterion", default="cosine", choices=["cosine", "output"],
                    help="secateur-depth and secateur-auto: how blocks are scored (output: needs a model whose outputs "
                         "are not all zero, which torchvision's zero-initialised ViT head is)")
    ap.add_argument("--auto-shares", nargs="+", type=float, default=[0.0, 0.5, 1.0],
                    help="secateur-auto: the depth shares tried (share of the MACs cut that dropped blocks may take)")
    ap.add_argument("--targets", nargs="+", type=float, default=[2.0, 4.0], help="MACs (or latency) reductions")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the latency table is measured and the --gpu-batch timings run (cuda); "
                         "auto: cuda when available")
    ap.add_argument("--batch", nargs="*", type=int, default=None,
                    help="CPU batch sizes (default 1 8 with --device cpu, none with cuda; empty: no CPU timing)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for timing (pinned)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per batch (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--gpu-batch", nargs="*", type=int, default=[64, 256], help="GPU batch sizes (--device cuda)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--compile-batch", nargs="*", type=int, default=None,
                    help="batch sizes timed compiled (default: the largest GPU batch, or CPU batch on cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype on --device (default float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels-last on --device (default: on for cuda, off for cpu)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--tp-steps", type=int, default=30, help="Torch-Pruning iterative_steps")
    ap.add_argument("--tp-max-ratio", type=float, default=0.9, help="Torch-Pruning final pruning_ratio")
    ap.add_argument("--table-batch", nargs="+", type=int, default=None,
                    help="batch(es) the latency table is measured at; the latency methods run once per table "
                         "(default: every --batch on cpu, so each batch has a plan from its own table; the first "
                         "--gpu-batch on cuda)")
    ap.add_argument("--table-points", type=int, default=12, help="output-channel grid points per layer")
    ap.add_argument("--table-repeats", type=int, default=3)
    ap.add_argument("--calibrate", action="store_true",
                    help="calibrate the latency table against the model timed in place (LatencyTable.calibrate)")
    ap.add_argument("--table-cache", action="store_true",
                    help="reuse latency tables cached by earlier runs (default: measure afresh, on this run's load)")
    ap.add_argument("--quiet-check", action="store_true",
                    help="measure how busy the CPUs are with other processes (3 s each) before the tables and "
                         "before/after each timing, print it and store it in every row")
    ap.add_argument("--max-busy", type=float, default=0.10,
                    help="busy share of the CPUs above which --quiet-check calls the machine not quiet")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="with --quiet-check: wait up to this many seconds for a quiet machine each time")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False on this machine")
    if args.batch is None:
        args.batch = [] if cuda else [1, 8]
    if cuda and not args.gpu_batch:
        ap.error("--device cuda needs at least one --gpu-batch size")
    if not cuda and not args.batch:
        ap.error("--device cpu with no --batch size would time nothing")
    if args.table_batch is None:
        args.table_batch = [args.gpu_batch[0]] if cuda else list(args.batch)
    if args.compile_batch is None:
        args.compile_batch = [max(args.gpu_batch if cuda else args.batch)]
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    cl = cuda if args.channels_last is None else args.channels_last
    args.place = Place(args.device, dtype, cl)
    for flag in ("batch", "gpu_batch", "compile_batch"):
        if any(b < 1 for b in getattr(args, flag)):
            ap.error(f"--{flag.replace('_', '-')} sizes must be positive: {getattr(args, flag)}")
    if any(b < 1 for b in args.table_batch) or args.size < 32:
        ap.error(f"--table-batch must be positive and --size at least 32: {args.table_batch}, {args.size}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    if args.batch:  # CPU timing: pin the threads for everything, as the CPU results always were
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        t1 = time.perf_counter()
        rows += run_model(name, args)
        for r in rows:
            r.setdefault("model_s", time.perf_counter() - t1)
        print_table([r for r in rows if r["model"] == name])
        say(f"{name}: {time.perf_counter() - t1:.0f} s (run so far {time.perf_counter() - t0:.0f} s)")
        print(flush=True)
    print_table(rows)
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "place"}
    plain["place"] = args.place.describe()
    result = {"benchmark": "speedup", "command": " ".join(["benchmarks/bench_speedup.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "args": plain, "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    say(f"wrote {args.out} in {result['seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
