"""Capture: run the model once under an ATen-level ``TorchDispatchMode`` and label every tensor's channels.

Why a dispatch mode (and not autograd-graph walking or ``torch.export``), with the evidence we measured
(torch 2.14, 2 shared CPU cores, 64x64 inputs):
- ``torch.export`` took 4.4 s on resnet18 and 8.6 s on swin_t where this capture takes 0.34 s and 0.45 s; it
  failed on a model with data-dependent control flow (GuardOnDataDependentSymNode) and on a tiny Hugging Face
  LLaMA (DynamicCache in the output), both of which this capture handles: it runs the model's own eager Python,
  so control flow, ``-1`` in ``view`` and shape arithmetic behave exactly as in normal use;
- autograd-graph walking (Torch-Pruning) needs a grad graph (memory, no meta tensors) and recovers index maps of
  flatten/reshape symbolically, which is what hangs on Swin/MaxViT; here every op arrives with its real arguments
  and output shapes, so view/reshape/permute/window-partition index maps are computed by running the *same op* on
  an int64 label tensor: exact, and bounded by the activation size;
- it needs no gradients (``no_grad``) and works on ``meta`` tensors, so a 7B-parameter plan allocates no weights;
- module boundaries come from forward hooks: known leaf modules (a registry keyed by type, ``modules.py``) are
  handled as one op with their parameters; everything between them is handled per ATen op (``rules/``).
An ATen op the registry does not know, reached by a labelled (channel-carrying) tensor, is a PruningError naming the
op and the module, never a guess."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from secateur.errors import PruningError, fail
from secateur.graph.labels import Atoms, compress


OUTPUT = "<model output>"  # the site of the blocks that keep the model's output shapes (graph/kept.py)


class Tracer:
    """State of one capture: labels of live tensors, slots (param dims owned by atoms), notes."""

    def __init__(self, model: nn.Module, heads: str = "heads", grouped: str = "channels",
                 named: list[tuple[str, nn.Module]] | None = None) -> None:
        """``named``: ``list(model.named_modules())`` where the caller has it (one walk per capture)."""
        self.model = model
        # grouped convolutions (not depthwise): "channels" couples local channel j of every conv group (the same
        # channels leave every group, the group count stays), "groups" removes whole conv groups; ``convs``
        # records, per grouped conv module, the mode its rule used (the size updater reads it, never guesses)
        self.grouped = grouped
        self.convs: dict[str, str] = {}
        # heads="head_dim": attention rules make per-head dims the units (q/k dim d of a head together, v dim d
        # with what reads it) instead of whole heads; ``blocks`` rows are heads (same count removed from each),
        # ``contracted`` units are read only by q.k (zeroing their producers is the oracle's reference)
        self.head_dim = heads == "head_dim"
        self.blocks: list[torch.Tensor] = []
        self.contracted: list[torch.Tensor] = []
        self.links: list[tuple[torch.Tensor, torch.Tensor]] = []  # (q/k unit, v unit): one head size for both
        self.folds: list[dict[str, Any]] = []  # SDPA calls whose scale follows the head size (graph/scale_fold.py)
        # fused experts (graph/moe.py): (channel atoms, expert count, qualified names of the tensors they may own);
        # each slice along dim 0 of those tensors (an expert) keeps its own channels (groups.py ``Group.experts``)
        self.experts: list[tuple[torch.Tensor, int, frozenset[str]]] = []
        # (atoms, n): every group holding these atoms keeps a multiple of n channels (a kernel's alignment, e.g.
        # grouped_mm's 16-byte strides for fused experts; groups.py ``Group.align``)
        self.aligned: list[tuple[torch.Tensor, int]] = []
        self.weight_views: dict[int, torch.Tensor] = {}  # id(W.t()) -> W, an nn.Linear weight used by F.linear
        self.fixed_rows: set[int] = set()  # ids of such W whose rows are kept (rules/matmul.py ``_fixed_rows``)
        self.same_width: dict[int, torch.Tensor] = {}  # id(child) -> its parent's input channels (inner_width.py)
        self.gathered_tables: set[int] = set()  # ids of ``table[:, idx]`` results, heads first (rules/matmul.py)
        self.atoms = Atoms()
        self.labels: dict[int, torch.Tensor | None] = {}
        self.alive: list[torch.Tensor] = []  # keep ids unique while capturing
        self.shapes_only = False  # captured without values (graph/shapes_only.py): dry runs may skip them too
        self.slots: dict[tuple[str, int], dict[str, Any]] = {}
        self.notes: list[str] = []
        self.constraints: list[tuple[torch.Tensor, list[int]]] = []  # view splits, see groups.py
        self.norms: list[dict[str, Any]] = []  # normalisations over prunable channels, see norm_site
        self.cuts: list[Any] = []  # splits / slices at positions the model names (graph/splits.py)
        self.calls: dict[Any, int] = {}  # ATen calls per op (all, labelled or not) and norm-module calls
        self.depth = 0  # >0 while inside a leaf module handled as a whole
        self.stack: list[str] = [""]
        # every op output outside leaf modules and every leaf module output, in order: (op, shapes, labels); the
        # dry run (verify.py) compares a pruned model's shapes with the ones these labels predict
        self.trace: list[tuple[str, tuple, tuple]] = []
        self.leaf_names: set[str] = set()  # modules handled as one op (the dry run skips inside them too)
        # the first trace step whose output size depends on values (nonzero, masked_select, an op without a rule
        # such as NMS): from there a pruned model's sizes may differ for other reasons than the plan (verify.py)
        self.dynamic: int | None = None
        self.owner: dict[int, tuple[str, str, bool]] = {}  # id(tensor) -> (module name, attr, is_param)
        self._layouts: dict[tuple, torch.Tensor] | None = None  # see param_view
        # tensors made by a filling factory (torch.zeros / ones / full ...) and not written since: one value
        # everywhere, so meeting channels they do not vary along them (graph/rules/dispatch.py ``track_uniform``)
        self.uniform: dict[int, torch.Tensor] = {}  # storage address -> a tensor holding it
        self.was_uniform: list[int] = []  # storages the running in-place op found uniform (rules/scatter.py)
        # unlabelled tensors computed elementwise from one parameter or buffer (Mamba's ``A = -exp(A_log)[None, :,
        # None, :]``, a sinusoidal position table's rows): id -> (tensor, root, {tensor dim: root dim}); sliced like
        # the root where they meet channels (graph/rules/constants.py)
        self.derived: dict[int, tuple[torch.Tensor, torch.Tensor, dict[int, int]]] = {}
        # labelled tensors computed pointwise from one free parameter and nothing labelled (a norm's ``1 + weight``):
        # id -> weak reference (the id of a freed tensor is reused: ``of_param`` checks it); met like the parameter
        # itself (graph/rules/elementwise.py ``_shared_params``)
        self._of_param: dict[int, Any] = {}
        # in-place writes through views (rules/inplace.py): id(base) -> how many times its labels were rewritten, and
        # id(view) -> the count its labels reflect (a view made before a write is read again from its base)
        self.writes: dict[int, int] = {}
        self.read_at: dict[int, int] = {}
        self.made: dict[int, tuple[int, Any]] = {}  # id(buffer a factory made) -> (its trace step, weak reference)
        self.values: Any = None  # on meta: the values known there (graph/meta_values.py), for index rules
        # each module's first call: what its inputs and outputs were (graph/local_proof.py proves size-attribute
        # updates and scale folds on a CPU copy of one module from these, where the whole model cannot run here)
        self.module_calls: dict[str, Any] = {}
        for mname, mod in model.named_modules() if named is None else named:
            for attr, p in mod._parameters.items():
                if p is not None and id(p) not in self.owner:
                    self.owner[id(p)] = (mname, attr, True)
            for attr, b in mod._buffers.items():
                if b is not None and id(b) not in self.owner:
                    self.owner[id(b)] = (mname, attr, False)

    # ---- labels of tensors
    def get(self, t: Any) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor):
            return None
        return self.labels.get(id(t))

    def set(self, t: Any, lab: torch.Tensor | None, *, compressed: bool = False) -> None:
        """``compressed``: the caller knows ``compress`` would return ``lab`` as it is (distinct atoms along one dim,
        a producer's new ones; a label this tracer stored, passed on): a reduction per op saved."""
        if isinstance(t, torch.Tensor):
            if lab is not None:
                assert lab.dim() == t.dim(), (lab.shape, t.shape)
            self.labels[id(t)] = lab.contiguous() if compressed and lab is not None and lab.numel() else compress(lab)
            self.alive.append(t)

    def param_label(self, p: torch.Tensor, *, buffers: bool = False) -> torch.Tensor | None:
        """A free parameter (cls token, layer scale, BN-subclass affine/stat) with one non-1 dim gets atoms
        along that dim, so it is sliced with whatever channels it meets. Others are constants."""
        if id(p) not in self.owner:
            return None
        if id(p) in self.labels:
            return self.labels[id(p)]
        _, _, is_param = self.owner[id(p)]
        big = [d for d in range(p.dim()) if p.size(d) > 1]
        if (not is_param and not buffers) or len(big) != 1:
            return None
        return self._new_param_label(p, big[0])

    def of_param(self, t: Any) -> bool:
        """Is ``t`` a tensor computed pointwise from one free parameter alone (``_of_param``)?"""
        ref = self._of_param.get(id(t))
        return ref is not None and ref() is t

    def param_label_along(self, p: torch.Tensor, dim: int, *, buffers: bool = False) -> torch.Tensor | None:
        """A free parameter with several non-1 dims (a position embedding [1, tokens, C]) that meets channels
        along exactly one of them: atoms along that dim (sliced with those channels), constant along the
        others. None if it is not a model parameter or already labelled another way."""
        if id(p) not in self.owner or not (self.owner[id(p)][2] or buffers):
            return None
        if id(p) in self.labels:
            lab = self.labels[id(p)]
            return lab if lab is not None and lab.size(dim) == p.size(dim) and lab.numel() == p.size(dim) else None
        return self._new_param_label(p, dim)

    def _new_param_label(self, p: torch.Tensor, dim: int) -> torch.Tensor:
        """Fresh atoms along ``dim`` of parameter ``p`` (sliced with those channels), constant along the rest."""
        atoms = self.atoms.new(p.size(dim))
        self.slot(p, dim, atoms, "param")
        shape = [1] * p.dim()
        shape[dim] = p.size(dim)
        lab = atoms.reshape(shape)
        self.labels[id(p)] = lab
        return lab

    def param_view(self, t: Any) -> torch.Tensor | None:
        """The model parameter ``t`` is, or is an exact view of (same storage, offset, shape and strides: the
        same values, e.g. Mamba's ``conv1d.weight.squeeze(1)`` later ``.unsqueeze(1)``-ed back into
        ``F.conv1d``); None for anything else (a slice, a transpose, a computed tensor). Lets op-level rules give
        such a weight its module's rule: slicing the parameter slices every exact view of it."""
        if not isinstance(t, torch.Tensor) or id(t) in self.labels:
            return None
        if id(t) in self.owner:
            return t if self.owner[id(t)][2] else None
        if self._layouts is None:
            self._layouts = {self._layout(p): p for _, p in self.model.named_parameters(remove_duplicate=False)}
        return self._layouts.get(self._layout(t))

    @staticmethod
    def _layout(t: torch.Tensor) -> tuple:
        return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)

    # ---- slots: (tensor name, dim) -> atom per index
    def name_of(self, p: torch.Tensor) -> tuple[str, str]:
        mname, attr, _ = self.owner[id(p)]
        return mname, attr

    def slot(self, p: torch.Tensor, dim: int, atoms: torch.Tensor, kind: str, consumer: bool = False, *,
             atoms_ok: bool = False, new: bool = False) -> None:
        """``consumer``: an "out" slice that the oracle zeroes too (q/k rows, whose only reader is q.k);
        ``atoms_ok``: the caller knows ``atoms`` holds no -1 (a label it checked), so only the size is checked here;
        ``new``: ``atoms`` are new (``Atoms.new``, 1-d, written by nobody): checked for size only, and kept as they are."""
        mname, attr = self.name_of(p)
        key = (f"{mname}.{attr}" if mname else attr, dim)
        n = p.size(dim)
        atoms = atoms.reshape(-1)
        if atoms.numel() == 1:
            atoms = atoms.expand(n)
        if atoms.numel() != n or (n and not (atoms_ok or new) and int(atoms.min()) < 0):  # (one reduction, no mask)
            raise fail("internal: slot size mismatch", where=key[0], shape=p.shape, value=atoms.numel())
        prev = self.slots.get(key)
        if prev is None:  # (a copy: the caller's tensor may be a view of a label; not of new atoms, never written)
            self.slots[key] = {"module": mname, "name": attr, "dim": dim, "atoms": atoms if new else atoms.clone(),
                               "kind": kind,
                               "consumer": kind == "in" or consumer}
        else:
            self.atoms.union(prev["atoms"], atoms)
            prev["consumer"] |= kind == "in" or consumer
            if kind == "out" or (kind == "in" and prev["kind"] == "param"):
                prev["kind"] = kind

    def norm_site(self, kind: str, key: Any, op: str, atoms: torch.Tensor, dim: int = -1) -> None:
        """A normalisation whose statistics run over prunable channels (``atoms``: one per position along the
        normalised dim). Removing a channel there is not zeroing it; the plan notes it, and ``Plan.kept_norms``
        rebuilds the reference (statistics over the kept channels) from ``kind`` ("op": ATen op packet, or
        "module": module name; "reduce": a statistic op reduced over ``dim``, rules/reductions.py _statistic_site)
        and the call
        number ``key`` is at."""
        self.norms.append({"kind": kind, "key": key, "call": self.calls.get(key, 0) - 1, "where": self.where(),
                           "op": op, "atoms": atoms.clone(), "dim": dim})

    def record(self, op: str, out: Any) -> None:
        """One step of ``trace``: shapes and labels (atoms per element, shared objects, nothing copied)."""
        outs = _flat_tensors(out)
        self.trace.append((op, tuple(tuple(t.shape) for t in outs), tuple(self.labels.get(id(t)) for t in outs)))

    def where(self) -> str:
        return self.stack[-1] or "<root>"

    def error(self, msg: str, t: torch.Tensor | None = None, hint: str | None = None) -> PruningError:
        return fail(msg, where=self.where(), shape=None if t is None else t.shape, hint=hint)


class _Mode(TorchDispatchMode):
    def __init__(self, tracer: Tracer, tally: Any = None, shapes: Any = None) -> None:
        super().__init__()
        self.tracer, self.tally, self.shapes = tracer, tally, shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs) if self.shapes is None else self.shapes.run(func, args, kwargs)
        calls = self.tracer.calls
        calls[func.overloadpacket] = calls.get(func.overloadpacket, 0) + 1
        if self.tally is not None:
            self.tally.add(func, args, kwargs, out)
        if self.tracer.depth == 0:
            self.tracer.atoms.site = (self.tracer.where(), func.overloadpacket._qualified_op_name)
            with no_dispatch():  # label ops reach no mode below (a MAC counter sees the model's ops only)
                _apply_rule()(self.tracer, func, args, kwargs, out)
            if self.tracer.dynamic is None and torch.Tag.dynamic_output_shape in func.tags:
                self.tracer.dynamic = len(self.tracer.trace)
            self.tracer.record(func.overloadpacket.__name__, out)
        return out


_RULE: list = []


def _apply_rule():
    """``rules.apply_rule``, imported once (the rules import this module; an import statement per op cost more than
    most ops' own rule)."""
    if not _RULE:
        from secateur.graph.rules import apply_rule
        _RULE.append(apply_rule)
    return _RULE[0]


_LEAVES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    """(Run on every op's arguments: the common leaves are answered before the ``Mapping`` check, an ABC
    ``isinstance`` that was most of this function's time on a giant model's capture.)"""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, _LEAVES):
        return []
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_tensors(v)]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    return []


@contextlib.contextmanager
def _popped(mode: Any):
    """``mode`` off the torch-function mode stack meanwhile, where it is on top. A leaf rule's label ops (thousands
    per model: ``size``, ``reshape``, ``clone``) otherwise each went through ``MathAttention``, a Python call that
    passes them on untouched inside leaf modules (``tracer.depth``): a tenth of a small model's capture."""
    from torch._C import _get_function_stack_at, _len_torch_function_stack, _pop_torch_function_stack, \
        _push_on_torch_function_stack
    n = _len_torch_function_stack()
    if not n or _get_function_stack_at(n - 1) is not mode:
        yield
        return
    _pop_torch_function_stack()
    try:
        yield
    finally:
        _push_on_torch_function_stack(mode)


def call(model: nn.Module, example_inputs: Any):
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def capture(model: nn.Module, example_inputs: Any, heads: str = "heads", grouped: str = "channels", *,
            macs: bool = False) -> Tracer:
    """Run ``model(example_inputs)`` once, recording channel labels and slots. The model is not changed.
    PyTorch's fused MHA / TransformerEncoderLayer fast path is off meanwhile: its single op hides the layout.
    ``macs``: count the forward's MACs meanwhile (``tracer.macs``, what ``count_macs`` says, one forward saved; None
    where the tally cannot be sure, see ``metrics.MacTally``): the dispatch mode sees exactly the model's ops, as
    ``count_macs`` does (the label work runs under ``no_dispatch``).
    A CPU model too large for the numeric proof is first captured without computing its convolutions and matrix
    products (graph/shapes_only.py), and again with values if its code turns out to read them
    (``tracer.shapes_only`` says which ran)."""
    from secateur.graph import shapes_only
    try:
        if shapes_only.usable(model, example_inputs):
            tracer = shapes_only.attempt(model, example_inputs,
                                         lambda runner: _capture(model, example_inputs, heads, grouped, macs, runner))
            if tracer is not None:
                tracer.shapes_only = True
                return tracer
        return _capture(model, example_inputs, heads, grouped, macs, None)
    except PruningError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error (inputs it does not take), named as ours
        raise fail(f"capturing the forward on the example inputs failed ({type(e).__name__}: {str(e)[:300]})",
                   where=type(model).__name__, value=_input_shapes(example_inputs),
                   hint="the model must run as model(example_inputs) (a tuple is unpacked, a dict passed as keywords)"
                   ) from e


def _input_shapes(x: Any) -> Any:
    """Shapes of the example inputs, for an error message."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, dict):
        return {k: _input_shapes(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_input_shapes(v) for v in x)
    return type(x).__name__


def _note_unrun(tracer: Tracer, named: list, entered: set[int]) -> None:
    """Modules with weights that did not run on the example inputs (and whose weights no op read) keep them as
    they are, though the channels they read may go: GoogLeNet's and Inception's auxiliary classifiers run only in
    training mode, so a plan made in eval mode leaves that forward broken. Say so, naming them."""
    slotted = {s["module"] for s in tracer.slots.values()}
    unrun = [n for n, m in named if id(m) not in entered and n not in slotted and n
             and any(p is not None for p in m._parameters.values())]
    if unrun:
        tops = [n for n in unrun if not any(n.startswith(o + ".") for o in unrun)]
        tracer.notes.append(
            f"modules that did not run on the example inputs keep their weights, and a forward that runs them "
            f"(a training-mode branch?) may fail after pruning: {', '.join(tops[:6])}"
            f"{f' and {len(tops) - 6} more' if len(tops) > 6 else ''}; prune in the mode that runs them "
            f"(model.train(): GoogLeNet's and Inception's auxiliary classifiers)")


def _capture(model: nn.Module, example_inputs: Any, heads: str, grouped: str, macs: bool, shapes: Any) -> Tracer:
    from secateur.graph.modules import leaf_rule
    from secateur.metrics import MacTally

    from secateur.graph.size_attrs import clear_caches
    named = list(model.named_modules())  # one walk for the caches, the owners, the hooks
    clear_caches(model, [m for _, m in named])  # the dry runs start from empty caches too (see clear_caches)
    tracer = Tracer(model, heads, grouped, named)
    handles = []
    names = {m: n for n, m in named}
    rules = {m: leaf_rule(m) for m in names}  # once per module, not twice per call
    from secateur.graph import inner_width, local_proof
    from secateur.graph.rules.attention import MathAttention
    widths = {type(m) for m in names if f"{type(m).__module__}.{type(m).__name__}" in inner_width.SAME_WIDTH}
    math = MathAttention(tracer)

    entered: set[int] = set()

    def pre(mod, args, kwargs):
        entered.add(id(mod))
        tracer.stack.append(names.get(mod, "?"))
        if tracer.depth == 0 and tracer.stack[-1] not in tracer.module_calls:
            tracer.module_calls[tracer.stack[-1]] = local_proof.Call.of(tracer, mod, args, kwargs)
        if tracer.depth == 0 and (id(mod) in tracer.same_width or type(mod) in widths):
            tracer.atoms.site = (tracer.where(), type(mod).__name__)
            with no_dispatch():  # label ops, not the model's
                inner_width.enter(tracer, mod, args, kwargs)
        if rules.get(mod) is not None:
            tracer.depth += 1

    def post(mod, args, kwargs, out):
        rule = rules.get(mod)
        if rule is not None:
            tracer.depth -= 1
            if tracer.depth == 0:
                tracer.depth += 1  # the rule's own tensor ops (labels) are not the model's
                tracer.atoms.site = (tracer.where(), type(mod).__name__)
                try:  # nor do they go through the dispatch mode: thousands of label ops per model, each a
                    with no_dispatch(), _popped(math):  # Python call there (a third of a small model's capture)
                        rule(tracer, mod, args, kwargs, out)
                finally:
                    tracer.depth -= 1
                tracer.record(f"module {tracer.where()}", out)
        call_ = tracer.module_calls.get(tracer.stack[-1])
        if call_ is not None and call_.outputs is None:
            call_.outputs = [tracer.get(t) for t in _flat_tensors(out)]
        tracer.stack.pop()

    tracer.leaf_names = {n for m, n in names.items() if rules[m] is not None}
    for mod in names:  # (every module once, in ``modules()`` order)
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    tally = MacTally() if macs else None
    from secateur.graph.meta_values import known_values
    from secateur.graph.moe import meta_stand_ins
    try:  # (experts modules on meta: a stand-in forward, see meta_stand_ins; values on meta: see meta_values)
        with torch.no_grad(), known_values(model, example_inputs, tracer) as tracer.values, _Mode(tracer, tally, shapes), \
                meta_stand_ins(rules, tally), math:
            out = call(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    for k, t in enumerate(_flat_tensors(out)):  # never change the model's output shape
        tracer.atoms.site = (OUTPUT, f"output {k} {tuple(t.shape)}")
        tracer.atoms.block(tracer.get(t))
    tracer.atoms.site = None  # what follows (view splits settled in groups.py) is named by no op
    _note_unrun(tracer, named, entered)
    tracer.output = out
    tracer.macs = tally.total if macs else None
    tracer.alive.clear()
    tracer._of_param.clear()
    tracer.labels.clear()
    tracer.writes.clear()
    tracer.read_at.clear()
    tracer.made.clear()
    tracer.values = None
    return tracer
