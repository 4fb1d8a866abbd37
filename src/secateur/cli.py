"""The ``secateur`` command line. Subcommands live in small functions registered in ``COMMANDS``.

Exit codes: 0 success, 1 a PruningError (bad input; message without traceback unless --debug),
2 usage error (argparse), 3 unexpected internal error.

A MODEL argument is one of: a torchvision or timm model name (built with random weights: nothing is
downloaded), ``package.module:factory`` (a function called without arguments), or a file written by
``secateur prune`` / `secateur.save` (rebuilt from the spec recorded in it, or from ``--arch``)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable

from secateur.errors import PruningError, fail

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as subcommand ``name``."""
    def deco(fn):
        COMMANDS[name] = (add_args, fn)
        return fn
    return deco


def say(*parts: Any) -> None:
    """Messages go to stderr so that stdout stays clean for tables and JSON."""
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- models


class Loaded:
    """A model from a MODEL argument: the module, the spec that builds its unpruned twin, its inputs."""

    def __init__(self, model, spec: str, inputs, saved: str | None = None):
        self.model, self.spec, self.inputs, self.saved = model, spec, inputs, saved

    def fresh(self):
        """A newly built unpruned instance (for before/after comparisons)."""
        return build_spec(self.spec)


def _is_saved_file(arg: str) -> bool:
    return os.path.isfile(arg)


def build_spec(spec: str):
    """Build an unpruned model from a torchvision / timm name or ``package.module:factory``."""
    import torch
    torch.manual_seed(0)
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise fail("cannot import the model factory", where=spec, value=str(e)) from None
        try:
            model = fn()
        except Exception as e:  # noqa: BLE001 - the user's code: name it and what it raised
            raise fail("the model factory raised (it is called with no arguments)", where=spec,
                       value=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if not isinstance(model, torch.nn.Module):
            raise fail("the factory did not return an nn.Module", where=spec, value=type(model).__name__)
        return model
    try:
        import torchvision
        if spec in torchvision.models.list_models():
            return torchvision.models.get_model(spec, weights=None)
    except ImportError:
        pass
    try:
        import timm
        if timm.is_model(spec):
            return timm.create_model(spec, pretrained=False)
    except ImportError:
        pass
    if spec.endswith((".safetensors", ".st")) or os.sep in spec:
        raise fail("no such file", where=spec, hint="give the path of a file written by secateur prune / save")
    raise fail("unknown model", value=spec, hint="give a torchvision or timm model name, package.module:factory "
               "or a file saved by secateur (install the zoo extra: pip install secateur[zoo])")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise fail("--input-shape must be integers such as 1,3,224,224", value=text) from None
    if not shape or any(v <= 0 for v in shape):
        raise fail("--input-shape must be positive integers", value=text)
    return shape


def guess_input_shape(model, spec: str) -> tuple[int, ...]:
    """timm's configured input size, else from the first layer: (1, in_features) or (1, C, 224, 224)."""
    from torch import nn
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (1, m.in_channels) + (224,) * (m.weight.dim() - 2)
    raise fail("cannot guess the model's input shape", where=spec, hint="pass --input-shape")


def load_model(arg: str, *, arch: str | None = None, input_shape: str | None = None) -> Loaded:
    """Resolve a MODEL argument (see the module notes) and make example inputs for it."""
    import torch

    from secateur import io as sio
    saved = None
    if _is_saved_file(arg):
        desc = sio.describe(arg)
        spec = arch or desc.get("source")
        if not spec:
            raise fail("the file does not record how to build its architecture", where=arg,
                       hint="pass --arch MODEL (the unpruned model's spec)")
        model = sio.load(build_spec(spec), arg)
        saved = arg
    else:
        spec = arch or arg
        model = build_spec(spec)
    model.eval()
    shape = _parse_shape(input_shape) if input_shape else guess_input_shape(model, spec)
    g = torch.Generator().manual_seed(0)
    try:
        x = torch.randn(shape, generator=g)
    except RuntimeError as e:  # too large to allocate
        raise fail("cannot make example inputs of this shape", value=shape,
                   hint=f"give a smaller --input-shape ({str(e).splitlines()[0][:120]})") from None
    return Loaded(model, spec, x, saved)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="torchvision/timm model name, package.module:factory, or a saved secateur file")
    p.add_argument("--arch", help="spec of the unpruned architecture, for saved files that do not record it")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: guessed)")


# ------------------------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=1, help="training epochs (and fine-tuning epochs)")
    p.add_argument("--ratio", type=float, default=0.6, help="per-layer magnitude pruning ratio")
    p.add_argument("--global-ratio", type=float, default=0.9, help="global pruning ratio of the last step")
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--out", default="secateur-out", help="output folder (table JSON, histograms)")
    p.add_argument("--seed", type=int, default=0)


@command("demo", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Train, prune and fine-tune the seed MLP on MNIST; print the table."""
    from secateur.demo import run_demo
    run_demo(epochs=args.epochs, ratio=args.ratio, global_ratio=args.global_ratio, data=args.data,
             out_dir=args.out, seed=args.seed)
    return 0


# ------------------------------------------------------------------------------------------ prune


def _prune_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ratio", "--amount", dest="ratio", type=float,
                     help="fraction of the weights to prune (default 0.5; prune()'s amount)")
    how.add_argument("--threshold", type=float, metavar="T",
                     help="prune every weight whose score (|w| for l1) is below T (PaddleSlim's threshold mode)")
    how.add_argument("--target-macs", type=float, metavar="F",
                     help="prune until the non-zero (with --structural: dense) MACs are at most F "
                          "times the original's, e.g. 0.5")
    p.add_argument("--criterion", "--method", dest="method", default="l1", metavar="NAME",
                   help="importance: l1, l2, random (default l1); with --structural also fpgm, lamp, bn_scale")
    p.add_argument("--pattern", default="element", help="element, 2:4, 4:8, block4x4, rows ... (default element)")
    p.add_argument("--scope", choices=["local", "global"],
                   help="compare scores per tensor (local) or across the model (global); default global for "
                        "masks (one threshold for the whole model), the structural engine's local with --structural")
    p.add_argument("--exclude", action="append", default=[], metavar="NAMES",
                   help="comma-separated module names or globs to leave unpruned, e.g. conv1,fc (repeatable)")
    p.add_argument("--structural", action="store_true",
                   help="remove channels physically with the structural engine instead of masking")
    p.add_argument("--round-to", type=int, metavar="N",
                   help="with --structural: keep channel counts multiples of N (e.g. 8, for fast kernels)")
    p.add_argument("--heads", choices=["heads", "head_dim"],
                   help="with --structural: remove whole attention heads (default) or the same dims of every head")
    p.add_argument("--grouped", choices=["channels", "groups"],
                   help="with --structural: grouped convs lose the same channels from every group (default) "
                        "or whole groups")
    p.add_argument("--drop-blocks", type=int, metavar="N",
                   help="with --structural: first drop the N residual blocks whose removal changes the outputs "
                        "least (whole ResNet / MobileNet blocks, transformer layers); channels are then pruned "
                        "only if --ratio or --target-macs is given (the MACs target counts the whole model)")
    p.add_argument("--fastest", action="store_true", default=None,
                   help="with --structural --target-macs: try channels only and mixes with dropped blocks "
                        "(--depth-shares), time each against the model on this machine, keep the fastest")
    p.add_argument("--depth-shares", type=float, nargs="+", metavar="S",
                   help="with --fastest: the shares of the MACs cut that dropped blocks may take (default 0 0.5 1; "
                        "0: channels only, 1: blocks up to the target, then channels for what is left)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="with --fastest: time the candidates under torch.compile (for a model you will run "
                        "compiled); the saved model is the same plain module either way")
    p.add_argument("--block-criterion", choices=["output", "cosine"],
                   help="with --drop-blocks or --fastest: score blocks by the change of the outputs (default) or "
                        "by block influence, 1 - cos(input, output)")
    p.add_argument("--finalize", action="store_true", help="bake the masks in before saving")
    p.add_argument("-o", "--output", required=True, help="output file (.safetensors)")


_STRUCTURAL_ONLY = {"round_to": "--round-to", "heads": "--heads", "grouped": "--grouped",
                    "drop_blocks": "--drop-blocks", "block_criterion": "--block-criterion", "fastest": "--fastest",
                    "depth_shares": "--depth-shares", "compile": "--compile"}
_CHANNEL_OPTIONS = ("round_to", "heads", "grouped")


def _prune_masks_to_macs(model, inputs, fraction: float, criterion: str, exclude=()) -> float:
    """Global magnitude threshold whose pruned weights leave at most ``fraction`` of the dense MACs.

    Bisection on the score threshold over the per-layer counts, without touching the model, then
    one `prune(threshold=...)`."""
    import torch

    from secateur.criteria import get_criterion
    from secateur.patterns import Element
    from secateur.prune import prune
    from secateur.report import weight_uses
    from secateur.targets import select_targets

    if not 0 < fraction < 1:
        raise fail("--target-macs must lie in (0, 1)", value=fraction)
    uses = weight_uses(model, inputs)
    crit = get_criterion(criterion)
    scored = [(crit.group_scores(t.tensor, t.name, Element()).flatten(), uses.get(t.module_name, 0))
              for t in select_targets(model, exclude=exclude) if uses.get(t.module_name)]
    dense = sum(s.numel() * u for s, u in scored)
    if dense == 0:
        raise fail("no Linear/conv layer of the model runs on these inputs", value=fraction)

    def kept(th: float) -> float:
        return sum(int((s >= th).sum()) * u for s, u in scored) / dense
    lo, hi = 0.0, max(float(s.max()) for s, _ in scored) * 1.0001
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept(mid) <= fraction:
            hi = mid
        else:
            lo = mid
    with torch.no_grad():
        prune(model, threshold=hi, criterion=criterion, exclude=exclude)
    return kept(hi)


def _structural(model, inputs, ratio, target_macs=None, **options):
    try:
        from secateur.structured import prune_channels
    except ImportError:
        raise fail("structural pruning needs secateur.structured, which this install lacks") from None
    kw = {"target_macs": target_macs} if target_macs is not None else {"ratio": ratio}
    kw.update(options)
    result = prune_channels(model, inputs, **kw)  # in place
    say(str(result))
    if not result.channels_pruned:  # saved anyway (a valid model), but never silently unchanged
        why = "; ".join(result.notes[:3]) or ("no channel group whose removal keeps the model's inputs and outputs "
                                              "(they always stay), or a ratio too small to remove one channel")
        say(f"warning: no channel was removed: {why}")
    return model


def _drop(model, inputs, count: int, criterion: str, target_macs: float | None):
    """Drop ``count`` blocks; returns the model and what is left of a whole-model MACs target for the channels
    (None where the blocks alone meet it)."""
    from secateur.structured import drop_blocks
    result = drop_blocks(model, inputs, count=count, criterion=criterion)
    say(f"dropped {len(result.dropped)} blocks ({', '.join(result.dropped) or 'none'}): MACs "
        f"{result.macs_before:,} -> {result.macs_after:,}")
    if target_macs is None:
        return model, None
    left = target_macs / result.macs_ratio
    if left >= 1:
        say(f"the dropped blocks alone meet --target-macs {target_macs}: no channel pruned")
        return model, None
    return model, left


@command("prune", _prune_args)
def _prune(args: argparse.Namespace) -> int:
    """Prune a model and save it (weights + what changed) as one safetensors file."""
    from secateur import io as sio
    from secateur.masks import finalize, is_pruned
    from secateur.patterns import NM, get_pattern
    from secateur.prune import prune
    from secateur.report import report

    if os.path.isdir(args.output):
        raise fail("the output path is a folder; give a file name", where=args.output)
    exclude = [n.strip() for text in args.exclude for n in text.split(",") if n.strip()]
    pattern = get_pattern(args.pattern)
    if args.structural and args.pattern != "element":
        raise fail("--structural removes whole channels; --pattern applies to masks only", value=args.pattern,
                   hint="drop --pattern, or drop --structural to mask with that pattern")
    if isinstance(pattern, NM) and (args.ratio is not None or args.target_macs is not None
                                    or args.threshold is not None):
        raise fail("an N:M pattern fixes the sparsity itself; do not pass --ratio/--threshold/--target-macs",
                   value=args.pattern)
    given = [flag for key, flag in _STRUCTURAL_ONLY.items() if getattr(args, key) is not None]
    if given and not args.structural:
        raise fail(f"{', '.join(given)} shape(s) the structural engine's plan; add --structural", value=given)
    if args.structural and args.threshold is not None:
        raise fail("--threshold applies to masks; with --structural use --ratio or --target-macs",
                   value=args.threshold)
    loaded = load_model(args.model, arch=args.arch, input_shape=args.input_shape)
    model, x = loaded.model, loaded.inputs
    before = report(model, x)
    if args.structural:
        if args.target_macs is not None and not 0 < args.target_macs < 1:
            raise fail("--target-macs must lie in (0, 1)", value=args.target_macs)
        if args.drop_blocks is not None and args.drop_blocks < 0:
            raise fail("--drop-blocks is a number of blocks >= 0", value=args.drop_blocks)
        if args.block_criterion is not None and args.drop_blocks is None and not args.fastest:
            raise fail("--block-criterion scores the blocks --drop-blocks drops; add --drop-blocks N")
        if args.depth_shares is not None and not args.fastest:
            raise fail("--depth-shares are the mixes --fastest tries; add --fastest", value=args.depth_shares)
        if args.compile and not args.fastest:
            raise fail("--compile times the candidates --fastest tries; add --fastest")
        if args.fastest and (args.target_macs is None or args.drop_blocks is not None):
            raise fail("--fastest meets a MACs target with the blocks and channels it chooses: give --target-macs "
                       "F and no --drop-blocks", value={"target_macs": args.target_macs,
                                                         "drop_blocks": args.drop_blocks})
        options = {"importance": args.method, "ignore": exclude}
        if args.scope is not None:
            options["scope"] = args.scope
        options.update({key: getattr(args, key) for key in _CHANNEL_OPTIONS if getattr(args, key) is not None})
        ratio = None if args.target_macs is not None else args.ratio if args.ratio is not None else 0.5
        if is_pruned(model):  # the structural engine works on plain weights; baking keeps the zeros
            say("finalizing the masks (zeros baked in) before removing channels")
            finalize(model)
        target_macs = args.target_macs
        if args.fastest:
            from secateur.structured import prune_fastest
            result = prune_fastest(model, x, target_macs=target_macs, depth=args.depth_shares or (0.0, 0.5, 1.0),
                                   criterion=args.block_criterion or "output", compile=bool(args.compile),
                                   progress=True, **options)
            say(str(result))
            ratio = target_macs = None
        if args.drop_blocks is not None:
            model, target_macs = _drop(model, x, args.drop_blocks, args.block_criterion or "output", target_macs)
            if args.ratio is None and args.target_macs is None:
                ratio = None
        if ratio is not None or target_macs is not None:
            model = _structural(model, x, ratio, target_macs=target_macs, **options)
    elif args.target_macs is not None:
        if args.pattern != "element":
            raise fail("--target-macs works with --pattern element", value=args.pattern)
        _prune_masks_to_macs(model, x, args.target_macs, args.method, exclude)
    elif isinstance(pattern, NM):  # N:M fixes the sparsity itself
        prune(model, pattern=pattern, criterion=args.method, exclude=exclude)
    elif args.threshold is not None:
        prune(model, threshold=args.threshold, criterion=args.method, pattern=pattern, exclude=exclude)
    else:
        prune(model, args.ratio if args.ratio is not None else 0.5, criterion=args.method, pattern=pattern,
              scope=args.scope or "global", exclude=exclude)
    if args.finalize:
        finalize(model)
    after = report(model, x)
    print(after.table())
    say(f"parameters non-zero: {before.nonzero_params:,} -> {after.nonzero_params:,}; MACs non-zero: "
        f"{before.macs_nonzero or 0:,} -> {after.macs_nonzero or 0:,}")
    sio.save(model, args.output, source=loaded.spec)
    say(f"saved {args.output}")
    return 0


# ----------------------------------------------------------------------------------------- report


def _report_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--html", help="write a self-contained HTML page here")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--histograms", help="write weight histograms (PNG) here")
    p.add_argument("--sensitivity", help="a sensitivity JSON (from `secateur sensitivity --json`) for the page")


@command("report", _report_args)
def _report(args: argparse.Namespace) -> int:
    """Print a per-layer table of a model; optionally write JSON, histograms and an HTML page."""
    from secateur.report import report
    loaded = load_model(args.model, arch=args.arch, input_shape=args.input_shape)
    rep = report(loaded.model, loaded.inputs)
    before = report(loaded.fresh(), loaded.inputs) if loaded.saved else None
    print(rep.table())
    if args.json:
        rep.to_json(args.json)
    if args.histograms:
        rep.histograms(args.histograms, before=before)
    if args.html:
        sens = None
        if args.sensitivity:
            try:
                with open(args.sensitivity) as f:
                    sens = json.load(f)
            except (OSError, ValueError) as e:
                raise fail("cannot read the sensitivity JSON", where=args.sensitivity, value=str(e)) from None
        rep.to_html(args.html, sensitivity=sens, before=before)
        say(f"wrote {args.html}")
    return 0


# ------------------------------------------------------------------------------------ sensitivity


def _sensitivity_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated ratios (default 0.1,...,0.9)")
    p.add_argument("--eval", dest="evaluate", metavar="package.module:function",
                   help="metric function model -> float, higher is better (default: output fidelity, "
                        "-relative L2 error of the outputs against the unpruned model on random inputs)")
    p.add_argument("--structural", action="store_true", help="prune whole output channels")
    p.add_argument("--pattern", default="element",
                   help="what each scan step masks: element, 2:4 (fixed sparsity), block4x4, rows ... "
                        "(default element)")
    p.add_argument("--criterion", "--method", dest="method", default="l1", metavar="NAME",
                   help="importance used to prune each layer: l1, l2, random (default l1)")
    p.add_argument("--layers", help="comma-separated module names (default: every Linear/conv)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write the curves as PNG here")
    p.add_argument("--target", choices=["macs", "params", "latency"], default="macs")
    p.add_argument("--fraction", type=float, help="allocate ratios removing this fraction of --target")
    p.add_argument("--align", type=int, help="round kept rows/channels to a multiple of this")
    p.add_argument("-o", "--output", help="apply the allocation and save the pruned model here")


def _fidelity(model, x):
    import torch

    from secateur.report import call_model
    ref = call_model(model, x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    norm = float(ref.float().norm()) or 1.0

    def metric(m):
        out = call_model(m, x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        return 0.0 - float((out.float() - ref.float()).norm()) / norm  # 0.0 - 0.0 is 0.0, not -0.0
    return metric


def _named_metric(fn, spec: str):
    """The user's metric, whose failures are bad input (exit 1) named by its spec, not internal errors."""
    def evaluate(model):
        try:
            return fn(model)
        except PruningError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code
            raise fail("the metric function raised (it is called as function(model) -> float)", where=spec,
                       value=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    return evaluate


@command("sensitivity", _sensitivity_args)
def _sensitivity(args: argparse.Namespace) -> int:
    """Scan each layer's sensitivity to pruning; optionally allocate ratios to a target and apply them."""
    from secateur import io as sio
    from secateur.sensitivity import allocate, sensitivity
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise fail("--ratios must be numbers", value=args.ratios) from None
    # options of the allocation step are checked before the (long) scan, not after it
    if args.fraction is not None and not 0 < args.fraction < 1:
        raise fail("--fraction (of --target to remove) must lie in (0, 1)", value=args.fraction)
    if args.align is not None and args.align < 1:
        raise fail("--align must be a positive integer", value=args.align)
    if args.output and args.fraction is None:
        raise fail("-o needs --fraction (what to allocate)", value=args.output)
    loaded = load_model(args.model, arch=args.arch, input_shape=args.input_shape)
    if args.evaluate:
        mod, _, fn = args.evaluate.partition(":")
        try:
            evaluate = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, ValueError) as e:
            raise fail("cannot import the metric function", where=args.evaluate, value=str(e)) from None
        evaluate = _named_metric(evaluate, args.evaluate)
    else:
        evaluate = _fidelity(loaded.model, loaded.inputs)
    layers = [s.strip() for s in args.layers.split(",")] if args.layers else None
    res = sensitivity(loaded.model, evaluate, ratios, pattern=args.pattern, structural=args.structural,
                      layers=layers, example_inputs=loaded.inputs, criterion=args.method)
    print(res.table())
    if args.json:
        from secateur.report import _atomic_write
        _atomic_write(args.json, json.dumps(res.to_dict(), indent=1).encode())
    if args.plot:
        res.plot(args.plot)
    if args.fraction is not None:
        alloc = allocate(res, args.target, args.fraction, align=args.align)
        print(f"\nallocation removing {alloc.predicted_saving:.1%} of {alloc.target} "
              f"(predicted metric loss {alloc.predicted_loss:.4g}):")
        for name, r in alloc.ratios.items():
            print(f"  {name}: {r:.3f}")
        if args.output:
            model = alloc.apply(loaded.model, loaded.inputs, pattern=args.pattern, criterion=args.method)
            sio.save(model, args.output, source=loaded.spec)
            say(f"saved {args.output}")
    return 0


# ----------------------------------------------------------------------------------------- export


def _export_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, help="ONNX opset version")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


@command("export", _export_args)
def _export(args: argparse.Namespace) -> int:
    """Export a (pruned) model to ONNX and check it against PyTorch with onnxruntime."""
    from secateur.io import export_onnx
    from secateur.report import call_model
    loaded = load_model(args.model, arch=args.arch, input_shape=args.input_shape)
    export_onnx(loaded.model, loaded.inputs, args.output, opset=args.opset)
    say(f"wrote {args.output}")
    if args.no_check:
        return 0
    try:
        import onnxruntime as ort
    except ImportError:
        say("onnxruntime not installed: output not checked (pip install secateur[onnx])")
        return 0
    sess = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: loaded.inputs.numpy()})[0]
    ref = call_model(loaded.model, loaded.inputs)
    ref = (ref if hasattr(ref, "numpy") else ref[0]).numpy()
    err = float(abs(got - ref).max())
    peak = float(abs(ref).max())
    scale = peak or 1.0
    print(f"onnxruntime vs PyTorch: max abs difference {err:.3g} (outputs up to {peak:.3g})")
    if ref.size > 1 and float(ref.max() - ref.min()) == 0.0:
        # e.g. torchvision's ViT heads start at zero: equal outputs would hide a wrong graph
        say(f"note: PyTorch's outputs are all {float(ref.flat[0]):.3g} for this input, so the check proves little "
            "(a zero-initialised or untrained head?)")
    if err > 1e-3 * scale + 1e-5:
        raise fail("the ONNX model's outputs differ from PyTorch's", where=args.output, value=err)
    return 0


# ------------------------------------------------------------------------------------------ bench


def _bench_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="pin torch threads during timing")
    p.add_argument("--device", default="cpu", help="where to time: cpu (default) or cuda[:N]")
    p.add_argument("--compile", action="store_true", help="time the torch.compile'd models (compiled in warm-up)")
    p.add_argument("--json", help="write the numbers as JSON here")


def _bench_device(spec: str):
    """The torch.device ``secateur bench`` times on, refused up front where it cannot run."""
    import torch
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise fail("unknown device", where="secateur bench", value=spec, hint="use cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("CUDA is not available on this machine", where="secateur bench", value=spec)
    return device


@command("bench", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    """Latency, MACs and parameters of a model (before and after, for a saved pruned file)."""
    import torch

    from secateur.latency import compare_latency
    from secateur.masks import finalize
    from secateur.report import report
    loaded = load_model(args.model, arch=args.arch, input_shape=args.input_shape)
    models = {"model": loaded.model}
    if loaded.saved:
        # a masked model is timed as deployed: finalized (dense kernels, zeros baked in)
        models = {"before": loaded.fresh().eval(), "after": finalize(loaded.model)}
    reports = {name: report(m, loaded.inputs) for name, m in models.items()}  # counted on the CPU
    device = _bench_device(args.device)
    models = {name: m.to(device) for name, m in models.items()}
    inputs = loaded.inputs.to(device) if isinstance(loaded.inputs, torch.Tensor) else loaded.inputs
    bar = _bar(args.repeats, "timing")
    try:
        stats = compare_latency(models, (inputs,), repeats=args.repeats, warmup=args.warmup,
                                threads=args.threads, compile=args.compile, progress=lambda i, n: bar.update(1))
    finally:
        bar.close()
    rows = {}
    for name, m in models.items():
        rep = reports[name]
        rows[name] = {"params": rep.total_params, "nonzero_params": rep.nonzero_params, "macs": rep.macs,
                      "macs_nonzero": rep.macs_nonzero, "latency_ms_median": stats[name].median * 1e3,
                      "latency_ms_p10": stats[name].p10 * 1e3, "latency_ms_p90": stats[name].p90 * 1e3}
    _print_bench(rows)
    if args.json:
        from secateur.report import _atomic_write
        _atomic_write(args.json, json.dumps(rows, indent=1).encode())
    return 0


def _print_bench(rows: dict[str, dict]) -> None:
    """Print the bench table with columns sized to their widest cell, then the ratios a user looks for."""
    cells = {name: [f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{r['macs'] or 0:,}", f"{r['macs_nonzero'] or 0:,}",
                    f"{r['latency_ms_median']:.3f} ({r['latency_ms_p10']:.3f}-{r['latency_ms_p90']:.3f})"]
             for name, r in rows.items()}
    head = ["params", "non-zero", "MACs", "MACs non-zero", "latency ms (p10-p90)"]
    widths = [max(len(h), *(len(c[i]) for c in cells.values())) for i, h in enumerate(head)]
    print(" " * 8 + "".join(f"  {h:>{w}}" for h, w in zip(head, widths)))
    for name, row in cells.items():
        print(f"{name:8}" + "".join(f"  {c:>{w}}" for c, w in zip(row, widths)))
    if "before" in rows and "after" in rows:
        b, a = rows["before"], rows["after"]
        macs = (b["macs_nonzero"] or 0) / a["macs_nonzero"] if a["macs_nonzero"] else float("nan")
        print(f"speedup {b['latency_ms_median'] / a['latency_ms_median']:.2f}x (median latency), "
              f"MACs {macs:.2f}x fewer, params {b['nonzero_params'] / max(a['nonzero_params'], 1):.2f}x fewer")


def _bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        from secateur.sensitivity import _progress
        return _progress(total, desc)


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateur", description="Prune PyTorch models.",
                                     epilog="Exit codes: 0 ok, 1 bad input (PruningError), 2 usage, 3 internal.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, fn) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        add_args(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PruningError as e:
        if args.debug:
            raise
        say(f"secateur: error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a file that cannot be read or written: the user's to fix, no traceback
        if args.debug:
            raise
        say(f"secateur: error: {e.strerror or e}: {e.filename or ''}")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - last-resort message for scripts
        if args.debug:
            raise
        say(f"secateur: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
