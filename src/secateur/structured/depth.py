"""Depth pruning: drop whole residual blocks (a ResNet bottleneck, an inverted residual, a transformer layer).

Why: removing channels shrinks every kernel, but at small batch a CPU or GPU spends a fixed share of each block's
time whatever its width (launches, norms, activations, memory passes), so a 2x-MACs channel plan runs well under 2x
faster (MobileNetV2 at batch 1: 0.64 of the MACs reduction). A dropped block takes its whole time with it. Layer
removal is also the usual first cut for LLMs (ShortGPT's "block influence").

A block is droppable when it is an element of an ``nn.Sequential`` / ``nn.ModuleList`` (the repeated units), returns
a tensor shaped like its input (or a tuple of that tensor and ``None``s), and adds its own input to something while
it runs (the skip connection, seen by identity during one forward). Dropping it replaces it with ``Skipped``, which
returns the block's input: exactly what the network computes when the residual branch is removed, the definition
ShortGPT uses. How much that changes the model is what the block's score measures:

- ``"output"``: the relative L2 change of the model's outputs on the example inputs with that block alone skipped
  (one forward per candidate; what "least importance lost" means for the user);
- ``"cosine"``: block influence, ``1 - cos(input, output)`` of the block per sample (one forward for all).

Names stay stable (a ``Skipped`` takes the block's place), so channel plans made before or after still apply and
``secateur.save`` / ``load`` replay the drop (``{"skipped": ...}`` in the structure record)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur.errors import check_model_inputs, fail
from secateur.graph.capture import _flat_tensors
from secateur.metrics import count_macs, count_params, macs_by_layer
from secateur.modes import keeps_statistics
from secateur.report import call_model
from secateur.structured.plan import STRUCTURE_ATTR

__all__ = ["DepthResult", "Skipped", "drop_blocks", "droppable_blocks", "score_blocks"]

CRITERIA = ("output", "cosine")
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
         torch.Tensor.__radd__}


class Skipped(nn.Module):
    """Stands where a dropped block was and returns the block's input, in the form the block returned it (a tensor,
    or a tuple of it and ``None``s). ``arg``: the input's position (int) or keyword (str). ``attrs``: the block's
    plain attributes (str / int / float / bool / None), kept because the model may read them off its layers
    (ModernBERT's ``layer.attention_type`` picks each layer's mask)."""

    def __init__(self, was: str, arg: int | str = 0, tuple_len: int | None = None,
                 attrs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.was, self.arg, self.tuple_len = was, arg, tuple_len
        self.attrs = dict(attrs or {})
        for k, v in self.attrs.items():
            setattr(self, k, v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs[self.arg] if isinstance(self.arg, str) else args[self.arg]
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and type(self.attrs.get("layer_idx")) is int and isinstance(x, torch.Tensor):
            _hold_cache_slot(cache, self.attrs["layer_idx"], x)
        return x if self.tuple_len is None else (x,) + (None,) * (self.tuple_len - 1)

    def extra_repr(self) -> str:
        return f"was={self.was}"

    def spec(self) -> dict:
        out = {"was": self.was, "arg": self.arg, "tuple_len": self.tuple_len}
        return dict(out, attrs=self.attrs) if self.attrs else out


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache": transformers >= 5.24


def _hold_cache_slot(cache: Any, idx: int, x: torch.Tensor) -> None:
    """Keep a dropped Hugging Face layer's key/value cache slot as long as the sequence, with one-head, size-1 zero
    entries (a slot of no elements counts as empty). Why: models and ``generate`` read the past length from slot 0
    (``get_seq_length()``); a dropped first layer left it empty, so cached decoding took every new token for the
    first one (wrong positions and masks). Dynamic and static slots alike (a static one allocates one head of size
    1 over its length); a recurrent layer's state slot is left alone."""
    try:
        from transformers.cache_utils import CacheLayerMixin
    except ImportError:
        return
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: the decoder's own slots
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not callable(getattr(cache, "update", None)) or x.dim() != 3:
        return
    if idx < len(layers):
        if not isinstance(layers[idx], CacheLayerMixin):  # a key/value slot (not a recurrent layer's state)
            return
    else:
        make = getattr(cache, "layer_class_to_replicate", None)
        if not (isinstance(make, type) and issubclass(make, CacheLayerMixin)):
            return
    filler = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
    cache.update(filler, filler, idx)


def _plain_attrs(block: nn.Module) -> dict[str, Any]:
    """The block's own plain attributes, for ``Skipped`` to carry (``training`` and private ones aside), and the
    ``layer_idx`` of its attention (a Hugging Face layer's cache slot, which ``Skipped`` keeps in step)."""
    out = {k: v for k, v in vars(block).items()
           if not k.startswith("_") and k not in ("training", "was", "arg", "tuple_len", "attrs")
           and (v is None or type(v) in (str, int, float, bool))}
    if "layer_idx" not in out:
        idx = next((m.layer_idx for m in block.modules() if type(getattr(m, "layer_idx", None)) is int), None)
        if idx is not None:
            out["layer_idx"] = idx
    return out


@dataclass(frozen=True)
class Block:
    """A droppable block: where its input comes from and how its output is shaped (for ``Skipped``)."""
    name: str
    kind: str
    arg: int | str
    tuple_len: int | None
    attrs: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DepthResult:
    """What ``drop_blocks`` did: the blocks dropped (lowest score first), every candidate's score (none where the
    caller named the blocks), and the model's MACs / params before and after."""
    dropped: tuple[str, ...]
    scores: dict[str, float] = field(default_factory=dict)
    criterion: str = "output"
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def __str__(self) -> str:
        return (f"dropped {len(self.dropped)} blocks ({', '.join(self.dropped) or 'none'}): MACs "
                f"{self.macs_before:,} -> {self.macs_after:,}, params {self.params_before:,} -> {self.params_after:,}")


def _primary(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    """The block's main input: its first positional tensor, else ``hidden_states`` (Hugging Face layers called with
    keywords), else None."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    x = kwargs.get("hidden_states")
    return ("hidden_states", x) if isinstance(x, torch.Tensor) else None


def _containers(model: nn.Module) -> dict[str, str]:
    """name -> class name of every element of an nn.Sequential / nn.ModuleList (the repeated units). A module held
    in several places goes by its ``named_modules`` name (the first), the one hooks and MACs counts know it by."""
    out = {}
    mods = list(model.named_modules())
    names = {id(m): n for n, m in mods}
    for pname, parent in mods:
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            for child in parent.children():
                if not isinstance(child, Skipped) and any(True for _ in child.parameters()):
                    out[names[id(child)]] = type(child).__name__
    rank = {n: i for i, (n, _) in enumerate(mods)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))  # model order


class _AddWatch(TorchFunctionMode):
    """Marks a block when its own forward (not a nested block's) adds the block's input to another tensor shaped
    like it: the skip connection (``x + 1`` or ``x + bias`` inside ``f(...)`` is not one). ``running``: the
    candidate blocks being run, innermost last, with their inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[tuple[str, torch.Tensor | None]] = []
        self.residual: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and self.running:
            name, x = self.running[-1]
            operands = (*args, *kwargs.values())
            if x is not None and any(a is x for a in operands) and any(
                    isinstance(a, torch.Tensor) and a is not x and a.shape == x.shape for a in operands):
                self.residual.add(name)
        return func(*args, **kwargs)


def _probe(model: nn.Module, example_inputs: Any, names: dict[str, str]) -> tuple[dict[str, Block], dict[str, str]]:
    """One forward: which container elements are residual blocks, and why each other one is not."""
    mods = dict(model.named_modules())
    watch = _AddWatch()
    seen: dict[str, tuple] = {}
    why: dict[str, str] = {}

    def pre(name):
        def hook(mod, args, kwargs):
            p = _primary(args, kwargs)
            watch.running.append((name, p[1] if p else None))
            seen.setdefault(name, (p[0] if p else None, p[1].shape if p else None, None))
        return hook

    def post(name):
        def hook(mod, args, kwargs, out):
            x = watch.running.pop()[1]
            arg, shape, _ = seen[name]
            if x is None:
                why[name] = "its input is not a tensor (first positional argument or hidden_states)"
            elif isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype:
                seen[name] = (arg, shape, None)
            elif (isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].shape == x.shape
                  and out[0].dtype == x.dtype and all(o is None for o in out[1:])):
                seen[name] = (arg, shape, len(out))
            else:
                why[name] = "its output is not a tensor shaped like its input"
        return hook

    handles = []
    for n in names:
        handles.append(mods[n].register_forward_pre_hook(pre(n), with_kwargs=True))
        handles.append(mods[n].register_forward_hook(post(n), with_kwargs=True))
    try:
        with watch:
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    blocks = {}
    for n, kind in names.items():
        if n not in seen:
            why.setdefault(n, "it does not run on the example inputs")
        elif n not in why and n not in watch.residual:
            why[n] = "it does not add its own input to anything (no skip connection to fall back on)"
        if n not in why:
            blocks[n] = Block(n, kind, seen[n][0], seen[n][2], _plain_attrs(mods[n]))
    return blocks, why


@keeps_statistics
def droppable_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the residual blocks ``drop_blocks`` may drop, in model order: look before dropping, or pick
    ``blocks=`` by hand."""
    check_model_inputs(model, example_inputs, "droppable_blocks")
    return list(_probe(model, example_inputs, _containers(model))[0])


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, attribute, qualified name) that holds it: one block object at two places of a
    stage runs, is scored and is dropped at both."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is not None and (id(parent), cname) not in seen:
                seen.add((id(parent), cname))
                out.setdefault(id(child), []).append((parent, cname, f"{pname}.{cname}" if pname else cname))
    return out


@contextlib.contextmanager
def _skipping(places: list[tuple[nn.Module, str, str]], block: Block) -> Iterator[None]:
    """``Skipped`` stands in for the block while inside: the model exactly as ``drop_blocks`` leaves it (a forward
    hook that returns the input would still run the block, and one that changes its input in place, an in-place
    activation first, would hand back the changed input)."""
    old = [parent._modules[c] for parent, c, _ in places]
    for parent, c, _ in places:
        parent._modules[c] = Skipped(block.kind, block.arg, block.tuple_len, block.attrs)
    try:
        yield
    finally:
        for (parent, c, _), m in zip(places, old):
            parent._modules[c] = m


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative L2 change of the floating outputs ``b`` from ``a`` (nan where ``a`` is all zeros)."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b) if x.is_floating_point())
    den = sum(float(x.double().pow(2).sum()) for x in a if x.is_floating_point())
    return (num / den) ** 0.5 if den > 0 else math.nan


@keeps_statistics
def score_blocks(model: nn.Module, example_inputs: Any, blocks: Iterable[str] | None = None, *,
                 criterion: str = "output") -> dict[str, float]:
    """How much skipping each block changes the model (higher: more important). See the module docstring."""
    check_model_inputs(model, example_inputs, "score_blocks")
    if criterion not in CRITERIA:
        raise fail("unknown block criterion", where="score_blocks", value=criterion, hint=f"one of {CRITERIA}")
    found, why = _probe(model, example_inputs, _containers(model))
    given = list(found) if blocks is None else list(blocks)
    names = _resolve(model, given, found)
    _check_names(names, found, why)
    scores = _scores(model, example_inputs, found, names, criterion)
    return {g: scores[n] for g, n in zip(given, names)}  # under the names asked for


def _scores(model: nn.Module, example_inputs: Any, found: dict[str, Block], names: list[str], criterion: str
            ) -> dict[str, float]:
    """``score_blocks`` on blocks already found by ``_probe``."""
    mods = dict(model.named_modules())
    if criterion == "cosine":
        acc: dict[str, list[float]] = {n: [] for n in names}
        inputs: list[torch.Tensor] = []  # the running blocks' inputs as they came in (a block may change its own)

        def keep(name):
            def hook(mod, args, kwargs):
                inputs.append((kwargs[found[name].arg] if isinstance(found[name].arg, str)
                               else args[found[name].arg]).clone())
            return hook

        def record(name):
            def hook(mod, args, kwargs, out):
                x, y = inputs.pop(), out if isinstance(out, torch.Tensor) else out[0]
                rows = len(x) if x.dim() > 1 else 1  # per sample; an unbatched input is one sample
                cos = nn.functional.cosine_similarity(x.reshape(rows, -1).double(), y.reshape(rows, -1).double(),
                                                      dim=1)
                acc[name].append(float((1 - cos).mean()))
            return hook
        handles = [mods[n].register_forward_pre_hook(keep(n), with_kwargs=True) for n in names]
        handles += [mods[n].register_forward_hook(record(n), with_kwargs=True) for n in names]
        try:
            call_model(model, example_inputs)
        finally:
            for h in handles:
                h.remove()
        return _finite({n: sum(v) / len(v) for n, v in acc.items()}, model)
    ref = _flat_tensors(call_model(model, example_inputs))
    if not any(t.is_floating_point() and bool(t.any()) for t in ref):
        raise fail("the model's outputs are all zeros on the example inputs, so skipping a block changes nothing "
                   "measurable", where=type(model).__name__, hint="use criterion='cosine' (or trained weights)")
    scores, places = {}, _places(model)
    for n in names:
        with _skipping(places[id(mods[n])], found[n]):
            scores[n] = _distance(ref, _flat_tensors(_run_skipped(model, example_inputs, [n])))
    return _finite(scores, model)


def _run_skipped(model: nn.Module, example_inputs: Any, names: list[str]) -> Any:
    """The model's forward with ``names`` skipped; model code that reaches into a block it expects to find there
    (RecurrentGemma sets up ``layer.temporal_block``'s cache) fails: refused, naming the blocks."""
    try:
        return call_model(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - the model's own code, failing only with these blocks skipped
        raise fail("the model's code cannot run with this block skipped (it reads the block's insides)",
                   where=", ".join(names), value=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}",
                   hint="leave these blocks in (blocks= names the others)") from e


def _check_runs(model: nn.Module, example_inputs: Any, found: dict[str, Block], names: list[str]) -> None:
    """One forward with every chosen block skipped, before the model changes."""
    if not names:
        return
    places, mods = _places(model), dict(model.named_modules())
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(_skipping(places[id(mods[n])], found[n]))
        _run_skipped(model, example_inputs, names)


def _finite(scores: dict[str, float], model: nn.Module) -> dict[str, float]:
    """A NaN score would rank its block anywhere: refuse, naming the blocks (NaN / inf inputs or weights)."""
    bad = [n for n, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise fail("blocks scored NaN or inf: the model's outputs or a block's input are not finite on the example "
                   "inputs", where=type(model).__name__, value=bad[:5],
                   hint="check the example inputs and the weights with torch.isfinite")
    return scores


def _resolve(model: nn.Module, names: list, found: dict[str, Block]) -> list:
    """Names as ``found`` knows them: a block object held at two places is found under its first name; its other
    name means the same block (dropping it drops both places either way)."""
    first = {id(model.get_submodule(n)): n for n in found}
    out = []
    for n in names:
        if isinstance(n, str) and n not in found:
            try:
                n = first.get(id(model.get_submodule(n)), n)
            except AttributeError:
                pass
        out.append(n)
    return out


def _check_names(names: list[str], found: dict[str, Block], why: dict[str, str]) -> None:
    for n in names:
        if not isinstance(n, str):
            raise fail("block names are strings", where="drop_blocks", value=n)
        if n not in found:
            reason = why.get(n, "it is not an element of an nn.Sequential / nn.ModuleList with parameters")
            raise fail(f"this block cannot be dropped: {reason}", where=n,
                       hint="droppable_blocks(model, example_inputs) lists the ones that can")
    if len(set(names)) != len(names):
        raise fail("a block is named twice (or under both names of one block object)", where="drop_blocks",
                   value=names)


def _inside(name: str, others: Iterable[str]) -> bool:
    return any(name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def _choose(model, example_inputs, scores: dict[str, float], count, target_macs, macs0, stay_above,
            floor: float | None = None, per: dict[str, int] | None = None) -> list[str]:
    """Blocks to drop, lowest score first: ``count`` of them, or until ``target_macs`` is met; with ``stay_above``
    a block that would take the model below ``floor`` (default ``target_macs``; fractions of ``macs0``) is passed
    over. ``per``: the model's `macs_by_layer`, when the caller has it already."""
    order = sorted(scores, key=scores.get)
    if count is not None:
        chosen = []
        for n in order:  # a block nested in a chosen one (or holding it) goes with it: passed over
            if len(chosen) < count and not _inside(n, chosen):
                chosen.append(n)
        if len(chosen) < count:
            raise fail(f"only {len(chosen)} blocks can be dropped together (the others are nested in them)",
                       where="drop_blocks", value=count)
        return chosen
    per = macs_by_layer(model, example_inputs) if per is None else per
    chosen, macs, goal = [], macs0, target_macs * macs0 * (1 + 1e-6)  # 1e-6: a target met exactly is met
    for n in order:
        if macs <= goal:
            break
        if _inside(n, chosen):
            continue
        if stay_above and macs - per.get(n, 0) < (target_macs if floor is None else floor) * macs0 * (1 - 1e-6):
            continue  # would cross the target: passed over, channels take the rest
        chosen.append(n)
        macs -= per.get(n, 0)
    if macs > goal and not stay_above:
        raise fail("dropping every droppable block does not reach the MACs target", where="drop_blocks",
                   value=target_macs, hint=f"the most it removes is {1 - macs / macs0:.3f} of the MACs; "
                   "drop what it can (count=) and prune channels for the rest")
    return chosen


@keeps_statistics
def drop_blocks(model: nn.Module, example_inputs: Any, *, count: int | None = None,
                blocks: Iterable[str] | None = None, target_macs: float | None = None,
                criterion: str = "output", stay_above: bool = False) -> DepthResult:
    """Drop whole residual blocks in place, the least important first (see the module docstring). Say how many with
    exactly one of ``count`` (number of blocks), ``blocks`` (names, from ``droppable_blocks``) or ``target_macs``
    (fraction of the current MACs to keep: blocks are dropped lowest score first until it is met). Blocks come in
    coarse steps, so a target is usually passed, not met; ``stay_above=True`` passes over any block that would take
    the model below ``target_macs`` instead, for ``prune_channels`` to take the rest exactly (depth first, then
    width). Everything is checked before the model changes."""
    check_model_inputs(model, example_inputs, "drop_blocks")
    given = [k for k, v in (("count", count), ("blocks", blocks), ("target_macs", target_macs)) if v is not None]
    if len(given) != 1:
        raise fail("say how much to drop with exactly one of count=, blocks=, target_macs=", where="drop_blocks",
                   value=given or None)
    if criterion not in CRITERIA:
        raise fail("unknown block criterion", where="drop_blocks", value=criterion, hint=f"one of {CRITERIA}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise fail("count is a number of blocks >= 0", where="drop_blocks", value=count)
    if target_macs is not None and (isinstance(target_macs, bool) or not isinstance(target_macs, (int, float))
                                    or not 0 < target_macs <= 1):
        raise fail("target_macs is a fraction of the current model in (0, 1]", where="drop_blocks",
                   value=target_macs)
    if not isinstance(stay_above, bool):
        raise fail("stay_above is True or False", where="drop_blocks", value=stay_above)
    if stay_above and target_macs is None:
        raise fail("stay_above applies to target_macs", where="drop_blocks", value=given)
    if blocks is not None and not isinstance(blocks, (str, Iterable)):
        raise fail("blocks is a block name or an iterable of them", where="drop_blocks", value=blocks,
                   hint="droppable_blocks(model, example_inputs) lists them")
    if blocks is not None:
        blocks = [blocks] if isinstance(blocks, str) else list(blocks)
    found, why = _probe(model, example_inputs, _containers(model))
    if blocks is not None:
        blocks = _resolve(model, blocks, found)
        _check_names(blocks, found, why)
        for a in blocks:
            inner = [b for b in blocks if b.startswith(a + ".")]
            if inner:
                raise fail("a block inside another dropped block: dropping the outer one removes it already",
                           where=a, value=inner[0])
    if count is not None and count > len(found):
        raise fail(f"only {len(found)} blocks can be dropped", where="drop_blocks", value=count,
                   hint="droppable_blocks(model, example_inputs) lists them")
    macs0, params0 = count_macs(model, example_inputs), count_params(model)
    if blocks is not None or count == 0 or target_macs == 1:  # chosen by the caller, or none: nothing to score
        scores, chosen = {}, blocks or []
    else:
        scores = _scores(model, example_inputs, found, list(found), criterion) if found else {}
        chosen = sorted(_choose(model, example_inputs, scores, count, target_macs, macs0, stay_above),
                        key=scores.get)
    _check_runs(model, example_inputs, found, chosen)
    _replace(model, [found[n] for n in chosen])
    return DepthResult(tuple(chosen), scores, criterion, macs0, count_macs(model, example_inputs) if chosen else macs0,
                       params0, count_params(model))


def _replace(model: nn.Module, blocks: list[Block]) -> None:
    structure = getattr(model, STRUCTURE_ATTR, None) or {}
    places = _places(model)
    for b in blocks:
        for parent, child, name in places[id(model.get_submodule(b.name))]:  # every place the block is held
            skipped = Skipped(b.kind, b.arg, b.tuple_len, b.attrs)
            parent._modules[child] = skipped
            for k in [k for k in structure if k == name or k.startswith(name + ".")]:
                structure.pop(k)  # channel records of modules that went with the block
            structure[name] = {"skipped": skipped.spec()}
    if blocks:
        setattr(model, STRUCTURE_ATTR, structure)


def skip_recorded(model: nn.Module, structure: dict) -> None:
    """Replay the drops of a structure record on a fresh model (``secateur.load``)."""
    for name, entry in structure.items():
        spec = entry.get("skipped") if isinstance(entry, dict) else None
        if spec is None:
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = parent._modules[child]
        except (AttributeError, KeyError) as e:
            raise fail("a dropped block of the structure is not in this model", where=name) from e
        if old is None or type(old).__name__ != spec.get("was"):
            raise fail("the structure dropped a different block here", where=name,
                       value=type(old).__name__ if old is not None else None,
                       hint=f"load into the architecture that was saved (it had a {spec.get('was')} here)")
        parent._modules[child] = Skipped(spec["was"], spec.get("arg", 0), spec.get("tuple_len"), spec.get("attrs"))
