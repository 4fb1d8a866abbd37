"""What pruning did to a model: per-layer table, totals, MACs, weight histograms, an HTML page.

A `Report` holds numbers only (no tensors, no model references): it is cheap to keep one from before
pruning and pass it as ``before=``, and it round-trips through JSON. Zeros count the *effective*
weights, so a masked tensor reports its mask's zeros without finalizing anything.

MACs are counted per module with forward hooks on the example inputs: a weight of a Linear or
convolution is used once per output position (``output.numel() / out_features``), so dense MACs are
``uses * weight.numel()`` and effective MACs are ``uses * nonzero(weight)``. New layer types plug into
`register_macs`."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import PruningError, fail, inputs_rejected
from secateur.targets import is_hf_conv1d

HIST_BINS = 60
MAX_HIST_LAYERS = 16
PLOT_HINT = "install the plot extra: pip install secateur[plot]"

# --------------------------------------------------------------------------------------------- inputs


def eval_mode(model: nn.Module):
    """Eval mode for the duration, every module's own training flag restored after (so measuring a
    model never updates a BatchNorm's running statistics): `secateur.modes.statistics_kept`."""
    from secateur.modes import statistics_kept
    return statistics_kept(model, eval=True)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple/list of positional args or a dict of
    keyword args, in eval mode and without gradients (see `eval_mode`). A model that rejects the inputs
    (wrong shape or dtype) gives a PruningError naming the model and the input shapes."""
    with eval_mode(model), torch.no_grad(), inputs_rejected(model, inputs):
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


# ----------------------------------------------------------------------------------------------- MACs

#: ``type -> fn(module, inputs, output) -> how many times each weight entry is used``.
WEIGHT_USES: dict[type, Callable[[nn.Module, tuple, torch.Tensor], int]] = {}


def register_macs(module_type: type, uses: Callable[[nn.Module, tuple, torch.Tensor], int]) -> None:
    """Teach the MAC counter a layer type: ``uses(module, inputs, output)`` is the number of
    multiply-accumulates each weight entry takes part in for this call."""
    WEIGHT_USES[module_type] = uses


register_macs(nn.Linear, lambda m, i, o: o.numel() // max(m.out_features, 1))
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_macs(_t, lambda m, i, o: o.numel() // max(m.out_channels, 1))
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_macs(_t, lambda m, i, o: i[0].numel() // max(m.in_channels, 1))


def _uses_fn(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in WEIGHT_USES:
            return WEIGHT_USES[cls]
    if is_hf_conv1d(module):  # transformers' GPT-2 style Conv1D (weight (in, out)), masked or not
        return lambda m, i, o: o.numel() // max(m.nf, 1)
    return None


def weight_uses(model: nn.Module, inputs: Any) -> dict[str, int]:
    """``{module_name: uses per weight entry}`` for every MAC-counted module run by ``inputs``."""
    uses: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        fn = _uses_fn(module)
        if fn is None:
            continue

        def hook(m, i, o, name=name, fn=fn):
            out = o[0] if isinstance(o, (tuple, list)) else o
            uses[name] = uses.get(name, 0) + int(fn(m, i, out))
        handles.append(module.register_forward_hook(hook))
    try:
        call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return uses


# ---------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class LayerRow:
    """One module that owns parameters. ``shape`` is its weight's (or first parameter's) shape;
    ``params``/``zeros``/``nonfinite`` (NaN or inf entries) count all its own parameters, effective
    (masked) values."""

    name: str
    type: str
    shape: tuple
    params: int
    zeros: int
    masked: bool = False
    macs: int | None = None
    macs_nonzero: int | None = None
    nonfinite: int = 0

    @property
    def nonzero(self) -> int:
        return self.params - self.zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool, int]]:
    """``(param name, effective tensor, masked?, id of the stored tensor)`` of the parameters a module
    owns directly; the id lets a tensor shared by several modules (tied weights) be counted once."""
    out = []
    for pname, p in module.named_parameters(recurse=False):
        out.append((pname, p, False, id(p)))
    if parametrize.is_parametrized(module):
        from secateur.masks import get_mask, original
        for pname in module.parametrizations.keys():
            out.append((pname, getattr(module, pname), get_mask(module, pname) is not None,
                        id(original(module, pname))))
    order = {"weight": 0, "bias": 1}
    return sorted(out, key=lambda x: order.get(x[0], 2))


def _type_name(module: nn.Module) -> str:
    """The user's class name (parametrize swaps in a ``Parametrized<Class>`` subclass)."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__


def _histogram(w: torch.Tensor) -> dict:
    """Histogram of the finite non-zero entries (the zero spike of a pruned tensor is reported apart,
    and so are NaN and inf entries, counted under ``nan`` / ``inf`` when there are any)."""
    flat = w.detach().float().flatten()
    finite = torch.isfinite(flat)
    extra = {}
    if not bool(finite.all()):
        extra = {"nan": int(torch.isnan(flat).sum()), "inf": int(torch.isinf(flat).sum())}
    nz = flat[finite & (flat != 0)]
    if nz.numel() == 0:
        return {"lo": 0.0, "hi": 0.0, "counts": [0] * HIST_BINS, **extra}
    lo, hi = float(nz.min()), float(nz.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(nz, bins=HIST_BINS, min=lo, max=hi)
    return {"lo": lo, "hi": hi, "counts": [int(c) for c in counts.tolist()], **extra}


# -------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Per-layer rows and model totals; build one with `report(model, example_inputs)`. It is plain data
    (``to_dict`` / ``from_dict``), so reports of different runs can be stored and compared later."""

    model: str
    rows: list[LayerRow]
    total_params: int
    total_zeros: int
    hists: dict[str, dict] = field(default_factory=dict)
    model_macs: int | None = None

    # totals ----------------------------------------------------------------------------------------
    @property
    def nonzero_params(self) -> int:
        return self.total_params - self.total_zeros

    @property
    def sparsity(self) -> float:
        return self.total_zeros / self.total_params if self.total_params else 0.0

    @property
    def macs(self) -> int | None:
        vals = [r.macs for r in self.rows if r.macs is not None]
        return sum(vals) if vals else None

    @property
    def macs_nonzero(self) -> int | None:
        vals = [r.macs_nonzero for r in self.rows if r.macs_nonzero is not None]
        return sum(vals) if vals else None

    def totals(self) -> dict:
        return {"params": self.total_params, "zeros": self.total_zeros, "nonzero": self.nonzero_params,
                "sparsity": self.sparsity, "macs": self.macs, "macs_nonzero": self.macs_nonzero,
                "model_macs": self.model_macs}

    # text -------------------------------------------------------------------------------------------
    def table(self) -> str:
        """An aligned plain-text table, one row per layer, then the totals."""
        with_macs = self.macs is not None
        head = ["layer", "type", "shape", "params", "zeros", "sparsity"]
        if with_macs:
            head += ["MACs", "MACs (nonzero)"]
        body = []
        for r in self.rows:
            line = [r.name or "(model)", r.type, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.zeros:,}",
                    f"{r.sparsity:.1%}"]
            if with_macs:
                line += [_fmt_int(r.macs), _fmt_int(r.macs_nonzero)]
            body.append(line)
        total = ["total", "", "", f"{self.total_params:,}", f"{self.total_zeros:,}", f"{self.sparsity:.1%}"]
        if with_macs:
            total += [_fmt_int(self.macs), _fmt_int(self.macs_nonzero)]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, total)]
        right = {3, 4, 5, 6, 7}

        def fmt(cells):
            return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        rule = "-" * len(fmt(head))
        lines = [fmt(head), rule, *map(fmt, body), rule, fmt(total),
                 f"non-zero parameters: {self.nonzero_params:,} of {self.total_params:,}"]
        if self.model_macs is not None:
            lines.append(f"model MACs (every op, torch flop counter): {self.model_macs:,}")
        note = self.nonfinite_note()
        if note:
            lines.append(note)
        return "\n".join(lines)

    def nonfinite_note(self) -> str | None:
        """A line naming the layers whose parameters hold NaN or inf (None when every value is finite)."""
        bad = [r for r in self.rows if r.nonfinite]
        if not bad:
            return None
        names = ", ".join(f"{r.name or '(model)'} ({r.nonfinite:,})" for r in bad[:5])
        more = f" and {len(bad) - 5} more layers" if len(bad) > 5 else ""
        return (f"warning: {sum(r.nonfinite for r in bad):,} parameters are NaN or inf, in {names}{more}; "
                "histograms show the finite values")

    def __str__(self) -> str:
        return self.table()

    # JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["shape"] = list(r.shape)
            d["sparsity"] = r.sparsity
            d["nonzero"] = r.nonzero
            rows.append(d)
        return {"model": self.model, "totals": self.totals(), "layers": rows, "histograms": self.hists}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        try:
            fields = {"name", "type", "shape", "params", "zeros", "masked", "macs", "macs_nonzero", "nonfinite"}
            rows = [LayerRow(**{k: (tuple(v) if k == "shape" else v) for k, v in r.items() if k in fields})
                    for r in d["layers"]]
            t = d["totals"]
            return cls(d["model"], rows, int(t["params"]), int(t["zeros"]), dict(d.get("histograms", {})),
                       t.get("model_macs"))
        except (KeyError, TypeError) as e:
            raise fail("not a secateur report", value=repr(e)[:80]) from None

    def to_json(self, path: str | os.PathLike) -> None:
        _atomic_write(path, json.dumps(self.to_dict(), indent=1).encode())

    # pictures ---------------------------------------------------------------------------------------
    def histograms_png(self, before: "Report | nn.Module | None" = None) -> bytes:
        """PNG bytes of the weight histograms (after, and before when given)."""
        plt = _pyplot()
        before = _as_report(before)
        names = self._hist_layers()
        if not names:
            raise fail("the model has no weight histograms to draw", where=self.model)
        cols = min(4, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        rows = {r.name: r for r in self.rows}
        for ax, name in zip(axes.flat, names):
            if before is not None and name in before.hists:
                _draw_hist(ax, before.hists[name], "before", "#9aa5b1")
            _draw_hist(ax, self.hists[name], "after", "#d9480f")
            r = rows.get(name)
            title = name if len(name) <= 28 else "…" + name[-27:]
            if r is not None:
                title += f"\nsparsity {r.sparsity:.0%}"
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=6)
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("non-zero weight values" + ("" if len(names) == len(self.hists) else
                                                  f" ({len(names)} largest of {len(self.hists)} layers)"),
                     fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    def histograms(self, path: str | os.PathLike, before: "Report | nn.Module | None" = None) -> None:
        """Write the weight histograms (after, and before when given) as a PNG file."""
        _atomic_write(path, self.histograms_png(before))

    def _hist_layers(self) -> list[str]:
        size = {r.name: r.params for r in self.rows}
        names = sorted(self.hists, key=lambda n: -size.get(n, 0))[:MAX_HIST_LAYERS]
        order = {r.name: i for i, r in enumerate(self.rows)}
        return sorted(names, key=lambda n: order.get(n, 0))

    def to_html(self, path: str | os.PathLike, history: Sequence[Mapping] | None = None,
                sensitivity: Any = None, before: "Report | nn.Module | None" = None) -> None:
        """Write a single self-contained HTML page (inline CSS, PNG images inlined as base64). ``history``:
        a list of dicts (one row each, e.g. `iterative_prune`'s)."""
        if history is not None:
            if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Iterable):
                raise fail("history must be a list of dicts (one row each)", where="Report.to_html",
                           value=history if isinstance(history, (int, float)) else type(history).__name__)
            history = list(history)
            bad = [h for h in history if not isinstance(h, Mapping)]
            if bad:
                raise fail("history must be a list of dicts (one row each)", where="Report.to_html", value=bad[0])
        page = _render_html(self, history=history, sensitivity=sensitivity, before=_as_report(before))
        _atomic_write(path, page.encode())


def _fmt_int(x) -> str:
    return "-" if x is None else f"{x:,}"


def _draw_hist(ax, h: Mapping, label: str, color: str) -> None:
    counts = h["counts"]
    if not any(counts):
        return
    n = len(counts)
    edges = [h["lo"] + (h["hi"] - h["lo"]) * i / n for i in range(n + 1)]
    ax.stairs(counts, edges, fill=True, alpha=0.55, color=color, label=label)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise fail("drawing needs matplotlib", hint=PLOT_HINT) from None
    return plt


def _as_report(x) -> "Report | None":
    if x is None or isinstance(x, Report):
        return x
    if isinstance(x, nn.Module):
        return report(x)
    if isinstance(x, Mapping):
        return Report.from_dict(x)
    raise fail("before= must be a Report, a model or a report dict", value=type(x).__name__)


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Crash-safe write (see `secateur.io.atomic_write`, the one implementation)."""
    from secateur.io import atomic_write
    atomic_write(path, data)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ------------------------------------------------------------------------------------------ the verb


def report(model: nn.Module, example_inputs: Any = None) -> Report:
    """Measure ``model`` as it is now: per-layer params, effective zeros and sparsity, and (when
    ``example_inputs`` are given) dense and non-zero MACs of Linear/conv layers for those inputs.

    Use it to check that pruning did what was asked (per-layer sparsity), and to compare models
    before/after: print it, or write JSON, histograms or an HTML page from the `Report`."""
    if not isinstance(model, nn.Module):
        raise fail("report() needs an nn.Module", value=type(model).__name__)
    skip = {id(m) for m in model.modules() if isinstance(m, parametrize.ParametrizationList)}
    uses = weight_uses(model, example_inputs) if example_inputs is not None else {}
    rows: list[LayerRow] = []
    hists: dict[str, dict] = {}
    total = zeros = 0
    seen: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if id(module) in skip:
                continue
            tensors = _own_tensors(module)
            if not tensors:
                continue
            fresh = [t for _, t, _, key in tensors if key not in seen]  # a tied tensor counts in its first row
            seen.update(key for _, _, _, key in tensors)
            params = sum(t.numel() for t in fresh)
            z = sum(t.numel() - int(torch.count_nonzero(t)) for t in fresh)
            nonfinite = sum(t.numel() - int(torch.isfinite(t).sum()) for t in fresh
                            if t.is_floating_point() or t.is_complex())
            first = tensors[0][1]
            w = {p: t for p, t, _, _ in tensors}.get("weight")
            macs = macs_nz = None
            if name in uses and w is not None:
                macs = uses[name] * w.numel()
                macs_nz = uses[name] * int(torch.count_nonzero(w))
            rows.append(LayerRow(name, _type_name(module), tuple(first.shape), params, z,
                                 any(m for _, _, m, _ in tensors), macs, macs_nz, nonfinite))
            if w is not None and w.dim() >= 2 and torch.is_floating_point(w) and name not in hists:
                hists[name] = _histogram(w)
            total += params
            zeros += z
    model_macs = None
    if example_inputs is not None:
        try:
            from secateur.metrics import count_macs
        except ImportError:
            count_macs = None
        if count_macs is not None:
            try:
                with eval_mode(model):
                    model_macs = int(count_macs(model, example_inputs))
            except Exception:  # noqa: BLE001 - the whole-model count is extra information only
                model_macs = None
    return Report(type(model).__name__, rows, total, zeros, hists, model_macs)


# ------------------------------------------------------------------------------------------ HTML page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#656d76;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{color:#656d76;font-size:12px}.card .v{font-size:20px;font-weight:600}.card .d{font-size:12px;color:#656d76}
table{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eaeef2;text-align:right;white-space:nowrap}
th{background:#f0f3f6;position:sticky;top:0}
td.l,th.l{text-align:left}tr:hover td{background:#f6f8fa}
.bar{display:inline-block;vertical-align:middle;width:90px;height:9px;background:#eaeef2;border-radius:4px;margin-right:6px;overflow:hidden}
.bar i{display:block;height:100%;background:#d9480f}
img{max-width:100%;background:#fff;border:1px solid #d0d7de;border-radius:6px}
.note{color:#656d76;font-style:italic}
.scroll{max-height:640px;overflow:auto;border-radius:6px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _card(label: str, after: str, before: str | None = None) -> str:
    d = f'<div class="d">before: {_e(before)}</div>' if before is not None else ""
    return f'<div class="card"><div class="k">{_e(label)}</div><div class="v">{_e(after)}</div>{d}</div>'


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">{_e(alt)}: not drawn ({_e(PLOT_HINT)}).</p>'
    return f'<img alt="{_e(alt)}" src="{png_data_uri(png)}">'


def _try_png(fn) -> bytes | None:
    try:
        return fn()
    except PruningError:
        return None


def _history_png(history: Sequence[Mapping]) -> bytes:
    plt = _pyplot()
    keys = [k for k in history[0] if all(isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool)
                                         for h in history)]
    label_key = next((k for k in history[0] if k not in keys), None)
    fig, ax = plt.subplots(figsize=(7, 3))
    xs = list(range(len(history)))
    for k in keys:
        ax.plot(xs, [float(h[k]) for h in history], marker="o", label=k)
    if label_key is not None:
        ax.set_xticks(xs, [str(h.get(label_key, "")) for h in history], fontsize=7, rotation=20)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _history_html(history: Sequence[Mapping]) -> str:
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    head = "".join(f'<th class="l">{_e(k)}</th>' if i == 0 else f"<th>{_e(k)}</th>" for i, k in enumerate(keys))
    body = []
    for h in history:
        cells = []
        for i, k in enumerate(keys):
            v = h.get(k, "")
            v = f"{v:.4g}" if isinstance(v, float) else v
            cells.append(f'<td class="l">{_e(v)}</td>' if i == 0 else f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    png = _try_png(lambda: _history_png(history)) if len(history) > 1 else None
    chart = _img(png, "pruning history") if len(history) > 1 else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table><p></p>{chart}"


def _sensitivity_html(sensitivity: Any) -> str:
    from secateur.sensitivity import as_sensitivity
    sens = as_sensitivity(sensitivity)
    ratios = sens.ratios
    head = '<th class="l">layer</th>' + "".join(f"<th>{r:.0%}</th>" for r in ratios)
    body = []
    for layer, curve in sens.curves.items():
        cells = "".join(f"<td>{curve[r] + 0.0:.4g}</td>" if r in curve else "<td>-</td>" for r in ratios)
        body.append(f'<tr><td class="l">{_e(layer)}</td>{cells}</tr>')
    png = _try_png(sens.plot_png)
    base = f"<p>baseline metric: <b>{sens.baseline + 0.0:.4g}</b></p>" if sens.baseline is not None else ""
    return (f"{base}{_img(png, 'sensitivity curves')}<p></p>"
            f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>")


def _shape_change(before: LayerRow | None, after: LayerRow) -> str:
    now = "x".join(map(str, after.shape))
    if before is None or tuple(before.shape) == tuple(after.shape):
        return now
    return "x".join(map(str, before.shape)) + " → " + now


def _layers_html(rep: Report, before: Report | None) -> str:
    prev = {r.name: r for r in before.rows} if before is not None else {}
    with_macs = rep.macs is not None
    head = ['<th class="l">layer</th>', '<th class="l">type</th>', '<th class="l">shape</th>']
    if before is not None:
        head += ["<th>params before</th>"]
    head += ["<th>params</th>", "<th>zeros</th>", '<th class="l">sparsity</th>']
    if with_macs:
        if before is not None and before.macs is not None:
            head += ["<th>MACs before</th>"]
        head += ["<th>MACs</th>", "<th>MACs non-zero</th>"]
    body = []
    for r in rep.rows:
        b = prev.get(r.name)
        cells = [f'<td class="l">{_e(r.name or "(model)")}</td>', f'<td class="l">{_e(r.type)}</td>',
                 f'<td class="l">{_e(_shape_change(b, r))}</td>']
        if before is not None:
            cells.append(f"<td>{_fmt_int(b.params if b else None)}</td>")
        cells += [f"<td>{r.params:,}</td>", f"<td>{r.zeros:,}</td>",
                  f'<td class="l"><span class="bar"><i style="width:{100 * r.sparsity:.1f}%"></i></span>'
                  f"{r.sparsity:.1%}</td>"]
        if with_macs:
            if before is not None and before.macs is not None:
                cells.append(f"<td>{_fmt_int(b.macs if b else None)}</td>")
            cells += [f"<td>{_fmt_int(r.macs)}</td>", f"<td>{_fmt_int(r.macs_nonzero)}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='scroll'><table><tr>{''.join(head)}</tr>{''.join(body)}</table></div>"


def _render_html(rep: Report, history=None, sensitivity=None, before: Report | None = None) -> str:
    def pair(a, b, fmt):
        return fmt(a), (fmt(b) if before is not None else None)
    big = lambda x: "-" if x is None else (f"{x / 1e6:,.2f} M" if x >= 1e6 else f"{x:,}")  # noqa: E731
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    cards = [
        _card("parameters", *pair(rep.total_params, before and before.total_params, big)),
        _card("non-zero parameters", *pair(rep.nonzero_params, before and before.nonzero_params, big)),
        _card("sparsity", *pair(rep.sparsity, before.sparsity if before else 0, pct)),
    ]
    if rep.macs is not None:
        cards += [_card("MACs (dense)", *pair(rep.macs, before and before.macs, big)),
                  _card("MACs (non-zero)", *pair(rep.macs_nonzero, before and before.macs_nonzero, big))]
    hist = _try_png(lambda: rep.histograms_png(before)) if rep.hists else None
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>secateur report: {_e(rep.model)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>secateur report: {_e(rep.model)}</h1>",
        f"<p class='sub'>{len(rep.rows)} layers with parameters"
        + (" · compared with the model before pruning" if before is not None else "") + "</p>",
        f"<div class='cards'>{''.join(cards)}</div>",
        f"<p class='note'>{_e(rep.nonfinite_note())}</p>" if rep.nonfinite_note() else "",
        "<h2>Layers</h2>", _layers_html(rep, before),
        "<h2>Weight histograms</h2>",
        _img(hist, "weight histograms") if rep.hists else "<p class='note'>no weight matrices</p>",
    ]
    if sensitivity is not None:
        parts += ["<h2>Sensitivity</h2>", _sensitivity_html(sensitivity)]
    if history:
        parts += ["<h2>Pruning history</h2>", _history_html(list(history))]
    parts.append("</main></body></html>")
    return "\n".join(parts)
