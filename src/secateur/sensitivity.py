"""How much each layer can lose: a one-layer-at-a-time sensitivity scan, and a budget allocation.

`sensitivity` prunes a single layer at several ratios with masks, evaluates the user's metric, and
puts the layer's mask back exactly as it was (masks never touch the stored weights, so restoring the
mask restores the model bit for bit). Structural mode masks whole output rows (filters / neurons),
which predicts what removing those channels physically costs without copying or resizing the model.

`allocate` is PaddleSlim's ``sensitive_prune``: for a loss threshold ``t`` each layer takes the largest
ratio whose (interpolated, monotone) loss stays below ``t``; a bisection on ``t`` finds the smallest
threshold whose ratios remove the requested fraction of MACs, parameters or measured latency, so no
other threshold meets the target with less predicted loss. ``align`` rounds each layer's kept rows to
a multiple (hardware-friendly channel counts), always towards more pruning so the target still holds.
The predicted saving counts each layer's own weights only; removing a layer's output channels also
shrinks its consumers' inputs, so a structural plan usually saves more than predicted (up to channel-count
rounding); check the result with `secateur.metrics.count_macs`."""
from __future__ import annotations

import io
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from secateur.errors import fail
from secateur.masks import get_mask, remove_mask, set_mask
from secateur.patterns import Slices
from secateur.prune import drop_tied, prune
from secateur.targets import select_targets

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TARGETS = ("macs", "params", "latency")


@dataclass
class SensitivityResult:
    """``curves[layer][ratio] = metric`` with ``layer`` a module name; ``baseline`` is the metric of
    the untouched model. ``costs[target][layer]`` holds each layer's params / MACs / seconds when known;
    ``rows[layer]`` its number of output rows (for ``align``)."""

    curves: dict[str, dict[float, float]]
    baseline: float | None = None
    higher_is_better: bool = True
    structural: bool = False
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return sorted({r for c in self.curves.values() for r in c})

    def loss(self, layer: str, ratio: float) -> float:
        """Metric drop (>= 0 is worse) of pruning ``layer`` at ``ratio`` alone."""
        m = self.curves[layer][ratio]
        base = self.baseline if self.baseline is not None else 0.0
        return (base - m) if self.higher_is_better else (m - base)

    def table(self) -> str:
        ratios = self.ratios
        name_w = max([5] + [len(n) for n in self.curves])
        head = "layer".ljust(name_w) + "".join(f"{r:>11.0%}" for r in ratios)
        lines = [head, "-" * len(head)]
        for layer, c in self.curves.items():
            lines.append(layer.ljust(name_w) + "".join(f"{c[r] + 0.0:>11.4g}" if r in c else f"{'-':>11}" for r in ratios))
        if self.baseline is not None:
            lines.append(f"baseline metric: {self.baseline:.4g}")
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "higher_is_better": self.higher_is_better,
                "structural": self.structural,
                "curves": {k: {str(r): v for r, v in c.items()} for k, c in self.curves.items()},
                "costs": self.costs, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SensitivityResult":
        try:
            curves = {k: {float(r): float(v) for r, v in c.items()} for k, c in d["curves"].items()}
            return cls(curves, d.get("baseline"), bool(d.get("higher_is_better", True)),
                       bool(d.get("structural", False)), dict(d.get("costs", {})), dict(d.get("rows", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise fail("not a sensitivity result", value=repr(e)[:80]) from None

    def plot_png(self) -> bytes:
        from secateur.report import _pyplot
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for layer, c in self.curves.items():
            rs = sorted(c)
            ax.plot([0.0] + rs, [self.baseline if self.baseline is not None else c[rs[0]]] + [c[r] for r in rs],
                    marker=".", label=layer)
        ax.set_xlabel("ratio pruned (this layer only)")
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        if len(self.curves) <= 16:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    def plot(self, path) -> None:
        """Write the sensitivity curves as a PNG (needs matplotlib: ``pip install secateur[plot]``)."""
        from secateur.report import _atomic_write
        _atomic_write(path, self.plot_png())


def as_sensitivity(x: Any) -> SensitivityResult:
    """Accept a `SensitivityResult`, its dict, or a plain ``{layer: {ratio: metric}}`` mapping."""
    if isinstance(x, SensitivityResult):
        return x
    if isinstance(x, Mapping) and "curves" in x:
        return SensitivityResult.from_dict(x)
    if isinstance(x, Mapping):
        return SensitivityResult.from_dict({"curves": x})
    raise fail("expected a sensitivity result", value=type(x).__name__)


def _check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise fail(f"sensitivity ratios must be a list of numbers in (0, 1), not {type(ratios).__name__}",
                   where="sensitivity", value=ratios, hint="e.g. ratios=[0.3, 0.5, 0.7]")
    ratios = list(ratios)
    bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, numbers.Real)]
    if bad:
        raise fail("sensitivity ratios must be numbers in (0, 1)", where="sensitivity", value=bad[0],
                   hint="e.g. ratios=[0.3, 0.5, 0.7]")
    out = tuple(sorted({float(r) for r in ratios}))
    if not out or any(not (0.0 < r < 1.0) or math.isnan(r) for r in out):
        raise fail("sensitivity ratios must lie in (0, 1)", where="sensitivity", value=ratios)
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        class _Counter:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", flush=True)

            def close(self):
                print()
        return _Counter()


def _layer_latency(model: nn.Module, names: Sequence[str], inputs: Any, repeats: int = 3) -> dict[str, float]:
    """Seconds spent in each named module's forward (best of ``repeats`` runs on this machine)."""
    from secateur.report import call_model
    mods = dict(model.named_modules())
    best = {n: math.inf for n in names}
    start: dict[str, float] = {}
    handles = []
    for n in names:
        m = mods[n]
        handles.append(m.register_forward_pre_hook(lambda m, i, n=n: start.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda m, i, o, n=n: best.__setitem__(n, min(best[n], time.perf_counter() - start[n]))))
    try:
        for _ in range(repeats):
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: (0.0 if math.isinf(t) else t) for n, t in best.items()}


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float], ratios: Sequence[float] = DEFAULT_RATIOS,
                *, pattern="element", structural: bool = False, layers: Iterable[str] | None = None,
                criterion="l1", higher_is_better: bool = True, example_inputs: Any = None,
                progress: bool = True) -> SensitivityResult:
    """Prune each layer alone at each ratio, call ``evaluate(model) -> float`` and restore the layer.

    ``layers``: module names (default: every Linear / conv). ``structural=True`` removes whole output
    rows (filters, neurons) by magnitude instead of ``pattern``. With ``example_inputs`` the result
    also records each layer's MACs and measured forward time, which `allocate` needs for those
    targets (parameters are always recorded).

    Use it before choosing per-layer ratios: it shows which layers tolerate pruning and which break
    the metric, and its result feeds `allocate`."""
    ratios = _check_ratios(ratios)
    if not callable(evaluate):
        raise fail("evaluate must be a function model -> float", value=type(evaluate).__name__)
    targets = select_targets(model, list(layers) if layers is not None else None)
    targets = drop_tied(model, targets, explicit=layers is not None)  # as prune() does
    names = [t.module_name for t in targets]
    if layers is not None:
        missing = sorted(set(layers) - set(names))
        if missing:
            raise fail("no prunable weight in these modules", value=missing)
    pat = Slices(0) if structural else pattern

    costs: dict[str, dict[str, float]] = {"params": {t.module_name: float(t.tensor.numel()) for t in targets}}
    if example_inputs is not None:
        from secateur.report import weight_uses
        uses = weight_uses(model, example_inputs)
        costs["macs"] = {t.module_name: float(uses.get(t.module_name, 0) * t.tensor.numel()) for t in targets}
        costs["latency"] = _layer_latency(model, names, example_inputs)
    rows = {t.module_name: int(t.tensor.shape[0]) for t in targets}

    baseline = _metric(evaluate, model, "the unpruned model")
    curves: dict[str, dict[float, float]] = {}
    bar = _progress(len(targets) * len(ratios), "sensitivity") if progress else None
    try:
        for t in targets:
            saved = get_mask(t.module, t.param)
            saved = None if saved is None else saved.clone()
            curve = {}
            try:
                for r in ratios:
                    prune(model, r, pattern=pat, criterion=criterion, targets=[t.module_name])
                    curve[r] = _metric(evaluate, model, f"{t.module_name} at {r}")
                    if bar is not None:
                        bar.update(1)
            finally:
                if saved is None:
                    remove_mask(t.module, t.param, bake=False)
                else:
                    set_mask(t.module, t.param, saved)
            curves[t.module_name] = curve
    finally:
        if bar is not None:
            bar.close()
    return SensitivityResult(curves, baseline, higher_is_better, structural, costs, rows)


def _metric(evaluate: Callable[[nn.Module], float], model: nn.Module, where: str) -> float:
    """``evaluate(model)`` as a float; anything else (a string, None, NaN) is the caller's bug, named."""
    value = evaluate(model)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise fail("evaluate(model) must return a number", where=where, value=value) from None
    if math.isnan(out):
        raise fail("evaluate(model) returned NaN", where=where, value=value)
    return out


# -------------------------------------------------------------------------------------------- allocate


@dataclass(frozen=True)
class Allocation:
    """Per-layer ratios chosen by `allocate`, with what they are predicted to cost and save."""

    ratios: dict[str, float]
    target: str
    fraction: float
    predicted_saving: float
    predicted_loss: float
    threshold: float
    structural: bool

    def apply(self, model: nn.Module, example_inputs: Any = None, *, pattern="element", criterion="l1"):
        """Prune ``model`` to these ratios: masks (``pattern``) for unstructured scans, physical channel
        removal with `secateur.structured.prune_channels` for structural ones."""
        ratios = {k: v for k, v in self.ratios.items() if v > 0}
        if not ratios:
            return model
        if self.structural:
            try:
                from secateur.structured import prune_channels
            except ImportError:
                raise fail("structural allocation needs secateur.structured, which this install lacks") from None
            if example_inputs is None:
                raise fail("structural pruning needs example_inputs to trace the model")
            prune_channels(model, example_inputs, ratio=ratios)  # in place; returns a summary
            return model
        prune(model, {f"{k}.weight": v for k, v in ratios.items()}, pattern=pattern, criterion=criterion,
              targets=list(ratios))
        return model


def _ratio_at(sens: SensitivityResult, layer: str, threshold: float) -> float:
    """Largest ratio whose loss (made non-decreasing in the ratio) stays <= threshold, linearly
    interpolated between measured ratios; 0 is free."""
    pts = [(0.0, 0.0)]
    run = 0.0
    for r in sorted(sens.curves[layer]):
        run = max(run, sens.loss(layer, r))
        pts.append((r, run))
    best = 0.0
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if l1 <= threshold:
            best = r1
        elif l0 <= threshold:
            best = r0 + (r1 - r0) * (threshold - l0) / (l1 - l0) if l1 > l0 else r0
            break
        else:
            break
    return best


def _predicted_loss(sens: SensitivityResult, layer: str, ratio: float) -> float:
    pts = [(0.0, 0.0)] + [(r, sens.loss(layer, r)) for r in sorted(sens.curves[layer])]
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if r0 <= ratio <= r1:
            return l0 + (l1 - l0) * (ratio - r0) / (r1 - r0) if r1 > r0 else l1
    return pts[-1][1]


def _align(ratio: float, rows: int, align: int | None) -> float:
    if not align or ratio <= 0:
        return ratio
    keep = max(align, (math.floor((1 - ratio) * rows) // align) * align) if rows > align else rows
    return 1 - keep / rows


def allocate(sens: SensitivityResult, target: str = "macs", fraction: float = 0.5, *, align: int | None = None,
             max_ratio: float | None = None) -> Allocation:
    """Per-layer ratios that remove at least ``fraction`` of the scanned layers' ``target``
    (``"macs"``, ``"params"`` or ``"latency"``) with the least predicted loss; see the module notes.

    Use it instead of one uniform ratio: layers that `sensitivity` found robust are pruned harder,
    fragile ones less, for the same saving."""
    sens = as_sensitivity(sens)
    if target not in TARGETS:
        raise fail("unknown allocation target", value=target, hint=f"choose one of {TARGETS}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0 < fraction < 1):
        raise fail("fraction (of the target to remove) must lie in (0, 1)", value=fraction)
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise fail("align must be a positive integer", value=align)
    if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real)
                                  or not 0 < max_ratio <= 1):
        raise fail("max_ratio (the largest ratio any layer gets) must lie in (0, 1]", where="allocate",
                   value=max_ratio)
    costs = sens.costs.get(target)
    if not costs:
        raise fail(f"the sensitivity scan holds no {target} costs", value=target,
                   hint="run sensitivity(..., example_inputs=...) to record MACs and latency")
    layers = [n for n in sens.curves if n in costs]
    total = sum(costs[n] for n in layers)
    if total <= 0:
        raise fail(f"the scanned layers have no {target} to remove", value=total)
    top = max(sens.ratios)
    if max_ratio is not None:
        top = min(top, float(max_ratio))

    def ratios_for(th: float) -> dict[str, float]:
        out = {}
        for n in layers:
            r = min(_ratio_at(sens, n, th), top)
            out[n] = _align(r, sens.rows.get(n, 0), align) if sens.rows.get(n) else r
        return out

    def saving(rs: Mapping[str, float]) -> float:
        return sum(rs[n] * costs[n] for n in layers) / total

    losses = [sens.loss(n, r) for n in layers for r in sens.curves[n]]
    lo, hi = min(0.0, min(losses)), max(losses)
    if saving(ratios_for(hi)) < fraction:
        raise fail(f"even the largest scanned ratios remove only {saving(ratios_for(hi)):.1%} of {target}",
                   value=fraction, hint="scan larger ratios or ask for a smaller fraction")
    for _ in range(60):
        mid = (lo + hi) / 2
        if saving(ratios_for(mid)) >= fraction:
            hi = mid
        else:
            lo = mid
    rs = ratios_for(hi)
    pred = sum(_predicted_loss(sens, n, rs[n]) for n in layers)
    return Allocation(rs, target, float(fraction), saving(rs), pred, hi, sens.structural)
