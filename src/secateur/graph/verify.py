"""Dry run of a plan on a copy of the model, before anything is changed. It catches model code that re-splits a
pruned dim with a size it keeps itself: either the pruned forward fails (``reshape(B * self.num_heads, ...)`` where
``num_heads`` is an attribute the engine does not know), or, worse, it runs and computes something else
(``view(b, t, 3, self.n_h, -1)``: the ``-1`` absorbs the smaller size, the output shape is right, the model is
silently wrong). For the second kind the capture records the shape of every op output together with its channel
labels (``Tracer.trace``); the labels say which positions of which dims the plan removes, so the shapes the pruned
model must produce are known, and the dry run compares them op by op.

Where it runs: a model on the CPU whose tensors take at most ``HERE_BYTES`` is dry-run there, on a ``twin`` (its
parameters share the model's memory; the plan's slicing makes new tensors): the capture ran on the same device, so
the op sequence is the capture's, and a small model's forward costs a few ms where the same forward on meta costs
0.1-0.2 s (most meta kernels are Python decompositions: measured 0.12 s vs 0.007 s for mobilenet_v3_small). Any
other model (on meta, on a GPU, or large) is dry-run on a meta ``skeleton`` (shapes only, no values, no weight
memory: every parameter and buffer is replaced by a meta tensor of the same shape). Both check the same shapes."""
from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from secateur.graph.meta_values import meta_run


HERE_BYTES = 256 * 2 ** 20  # above this the twin's sliced copies would cost real memory: dry-run on meta
# ... unless the caller moves the twin's slices into the model afterwards (prune_channels, ``applied``): they are
# then the pruned model's own tensors, and a dry run on meta would cost more (its Python kernels, a second trace
# where the ops differ, and a MAC count on the real device after: beit_base 3.4 s where the CPU run takes 0.8 s)
HERE_BYTES_APPLIED = 64 * 2 ** 30


def skeleton(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return deepcopy_module(model, memo)


_ATOMIC = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                     torch.memory_format})


@functools.lru_cache(maxsize=None)
def _plain(cls: type) -> bool:
    """Does ``copy.deepcopy`` copy instances of this module class the generic way (``cls.__new__``, a deep copy
    of ``nn.Module.__getstate__``'s state, the class's ``__setstate__``)?"""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and not copyreg._slotnames(cls))


def deepcopy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)``, the same result, without its generic path for what every module holds: a
    dozen hook dicts (empty), ints, tuples of ints, the parameter / buffer / child dicts. deepcopy spent most of
    the dry run's copy there (mobilenet_v3_small: 11,000 deepcopy calls, 0.05 s). A module class with its own copy
    or pickling protocol, and every other attribute, goes through ``copy.deepcopy`` with the same memo."""
    if id(mod) in memo:
        return memo[id(mod)]
    cls = type(mod)
    if not _plain(cls):
        return copy.deepcopy(mod, memo)
    new = cls.__new__(cls)
    memo[id(mod)] = new
    state = {}
    for k, v in mod.__dict__.items():
        t = type(v)
        if k == "_compiled_call_impl":  # what nn.Module.__getstate__ leaves out
            continue
        if t in _ATOMIC:
            state[k] = v
        elif k == "_modules" and t is dict:
            state[k] = {n: None if c is None else deepcopy_module(c, memo) if isinstance(c, nn.Module)
                        else copy.deepcopy(c, memo) for n, c in v.items()}
        elif k in ("_parameters", "_buffers") and t is dict:
            state[k] = {n: memo[id(p)] if id(p) in memo else copy.deepcopy(p, memo) for n, p in v.items()}
        elif t in (dict, OrderedDict, set, list) and not v:
            state[k] = t()
        elif (t is tuple or t is set) and _ATOMIC.issuperset(map(type, v)):  # in C: long tuples of ints
            state[k] = v if t is tuple else set(v)
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def twin(model: nn.Module) -> nn.Module:
    """A copy that runs on the model's device: parameters are new Parameter objects over the model's storage (the
    plan's apply replaces them by sliced copies, it never writes into them); buffers are copied, since a forward in
    training mode updates BatchNorm statistics in place."""
    memo: dict[int, Any] = {}
    params, buffers = _tensors_of(model)
    for t in (*params, *buffers):
        if id(t) not in memo:
            memo[id(t)] = (nn.Parameter(t.detach(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                           else t.detach().clone())
    return deepcopy_module(model, memo)


def _tensors_of(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``list(model.parameters()), list(model.buffers())`` in one walk over the modules (each walk is a generator per
    module; a dry run took four)."""
    params, buffers, seen_p, seen_b = [], [], set(), set()
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in seen_p:
                seen_p.add(id(p))
                params.append(p)
        for b in mod._buffers.values():
            if b is not None and id(b) not in seen_b:
                seen_b.add(id(b))
                buffers.append(b)
    return params, buffers


def runs_here(model: nn.Module, example_inputs: Any, applied: bool = False) -> bool:
    """Dry-run on the CPU with real values (see the module docstring) rather than on meta? ``applied``: the caller
    applies the twin's slices to the model (see ``HERE_BYTES_APPLIED``)."""
    size = here_bytes(model, example_inputs)
    return size is not None and size <= (HERE_BYTES_APPLIED if applied else HERE_BYTES)


def here_bytes(model: nn.Module, example_inputs: Any, tensors: list[torch.Tensor] | None = None) -> int | None:
    """The bytes of the model's tensors, or None where any of them or the inputs is not on the CPU (``runs_here``).
    ``tensors``: the model's parameters and buffers (``_tensors_of``) where the caller has them."""
    from secateur.graph.capture import _flat_tensors
    if tensors is None:
        params, buffers = _tensors_of(model)
        tensors = [*params, *buffers]
    if any(t.device.type != "cpu" for t in (*tensors, *_flat_tensors(example_inputs))):
        return None
    return sum(t.numel() * t.element_size() for t in tensors)


def to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, Mapping):
        return {k: to_meta(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(v) for v in x)
    return x


def _shapes(out: Any) -> list:
    from secateur.graph.capture import _flat_tensors
    return [tuple(t.shape) for t in _flat_tensors(out)]


class Mismatch(Exception):
    """A pruned op output whose shape is not the one the plan predicts, or an op sequence that differs from the
    unpruned one's. ``groups``: indices (in ``Graph.groups``) of the groups removed in that output (empty when the
    op sequence differs)."""

    def __init__(self, msg: str, groups: list[int]) -> None:
        super().__init__(msg)
        self.groups = groups


class Expected:
    """The shapes a plan must leave at every step of the capture's ``trace``: a dim whose labels carry removed
    channels shrinks by the positions whose whole slice is removed (whole heads, channels of a flatten); what is
    left must be the same count on every line of one dim (head dims: each head loses as many); dims without labels
    stay. Where the labels cannot say (several dims could have shrunk), the step is not compared.

    The steps are the capture's own until an op differs; then (once per capture) the unpruned model's run on meta
    becomes the reference, since the device can change the ops (see ``_meta_trace``)."""

    def __init__(self, graph: Any, choices: list) -> None:
        tr = graph.tracer
        self.tracer, self.leaves = tr, tr.leaf_names
        self.reset()
        index = {id(g): i for i, g in enumerate(graph.groups)}
        sizes = torch.tensor([0] + [g.size for g in graph.groups])
        offset = torch.cumsum(sizes, 0)[:-1]
        pick = torch.zeros(int(sizes.sum()), dtype=torch.bool)
        for g, chans in choices:  # per expert ([E, n]): the expert channels are slots only (the experts module is
            pick[offset[index[id(g)]] + (chans[0] if chans.dim() == 2 else chans)] = True  # a leaf), the count counts
        per_atom = graph.__dict__.get("_per_atom")  # the same for every plan of the graph: once (an index per atom)
        if per_atom is None or per_atom[0] is not graph.root:
            per_atom = graph.__dict__["_per_atom"] = (graph.root, graph.where[graph.root])
        self.group = per_atom[1][:, 0]  # per atom: its group, -1 where not prunable
        local = per_atom[1][:, 1]
        ok = self.group >= 0
        self.removed = torch.zeros(self.group.numel(), dtype=torch.bool)
        self.removed[ok] = pick[offset[self.group[ok]] + local[ok]]
        # ``removed`` with one False more at the end, read by a label directly: its -1 (no atom) lands there, so no
        # clamp and mask per label (``_shape``)
        self._removed_or_none = torch.cat([self.removed, torch.zeros(1, dtype=torch.bool)])
        self.memo: dict[tuple, tuple | None] = {}  # (label shape, label bytes, shape) -> shape()

    def reset(self) -> None:
        """As new, for another dry run of the same choices (what ``__init__`` computes from them is kept: the
        removed atoms, and the shapes memoised from them)."""
        tr = self.tracer
        self.trace = tr.meta_trace if getattr(tr, "meta_trace", None) else tr.trace
        self.sequence = False  # the last run failed on the op sequence (not on a shape)
        # from this step on, sizes may follow values (tracer.dynamic): only channel dims are compared, and where
        # the ops part from the capture's (another number of detections) the rest is not compared (``loose``)
        self.dynamic = tr.dynamic if getattr(tr, "dynamic", None) is not None else len(self.trace) + 1
        self.loose = False
        self.failed: Mismatch | None = None
        self.step_no = 0

    def shape(self, lab: torch.Tensor | None, shape: tuple) -> tuple | None:
        """The shape the plan leaves for an output of unpruned ``shape`` labelled ``lab`` (None: not compared).
        Memoised on the label's content: a chain of ops (conv, norm, activation) carries the same atoms."""
        if lab is None:
            return None
        fast = (id(lab), tuple(shape))  # the trace's label objects live as long as this: ids are stable
        if fast in self.memo:
            return self.memo[fast]
        key = (tuple(lab.shape), lab.numpy().tobytes(), tuple(shape))
        if key not in self.memo:
            self.memo[key] = self._shape(lab, shape)
        self.memo[fast] = self.memo[key]
        return self.memo[key]

    def _shape(self, lab: torch.Tensor, shape: tuple) -> tuple | None:
        rem = self._removed_or_none[lab]  # (-1 reads the False at the end: ``removed[lab.clamp_min(0)] & (lab >= 0)``)
        dims = [d for d in range(lab.dim()) if lab.size(d) > 1]
        if len(dims) == 1:  # channels along one dim (the common case): every removed position is a whole slice
            n = int(rem.sum())
            return tuple(shape) if not n else tuple(s - n if d == dims[0] else s for d, s in enumerate(shape))
        if not bool(rem.any()):
            return tuple(shape)
        kept, new = ~rem, list(shape)
        for d in dims:  # positions whose whole slice is removed
            alive = kept.movedim(d, 0).reshape(kept.size(d), -1).any(dim=1).nonzero().flatten()
            kept, new[d] = kept.index_select(d, alive), alive.numel()
        if bool(kept.all()):
            return tuple(new)
        counts = []  # the same count removed from every line of one dim (head dims)
        for d in dims:
            per = kept.sum(d)
            if kept.size(d) > 1 and bool((per == per.flatten()[0]).all()) and int(per.flatten()[0]) < kept.size(d):
                counts.append((d, int(per.flatten()[0])))
        if len(counts) != 1:
            return None
        new[counts[0][0]] = counts[0][1]
        return tuple(new)

    def groups(self, lab: torch.Tensor) -> list[int]:
        atoms = lab[(lab >= 0)]
        atoms = atoms[self.removed[atoms]]
        return torch.unique(self.group[atoms]).tolist()

    def step(self, op: str, out: Any) -> None:
        try:
            self._step(op, out)
        except Mismatch as e:
            self.failed = self.failed or e  # sticky: model code that catches it still fails the check
            raise

    def _step(self, op: str, out: Any) -> None:
        if self.failed is not None:
            raise self.failed
        if self.loose:
            return
        i, self.step_no = self.step_no, self.step_no + 1
        shapes = (tuple(out.shape),) if isinstance(out, torch.Tensor) else tuple(tuple(t.shape) for t in _flat(out))
        self.sequence = True
        dyn = i >= self.dynamic
        if dyn and (i >= len(self.trace) or op != self.trace[i][0] or len(shapes) != len(self.trace[i][1])):
            self.loose, self.sequence = True, False
            return
        if i >= len(self.trace):
            raise Mismatch(f"the pruned model runs more ops than the unpruned one ({op} after {len(self.trace)}): "
                           "its control flow depends on a pruned size", [])
        op0, shapes0, labs = self.trace[i]
        if op != op0:
            op0, i = _copy_step(self.trace, i, op)
            if op0 is None:  # a reshape's copy the pruned run needs and the unpruned one did not: not a step
                self.step_no = i
                return
            self.step_no = i + 1
            _, shapes0, labs = self.trace[i]
        if op != op0 or len(shapes) != len(shapes0):
            raise Mismatch(f"the pruned model runs {op} where the unpruned one ran {op0} (op #{i}): its control "
                           "flow depends on a pruned size", [])
        self.sequence = False
        for lab, s0, s in zip(labs, shapes0, shapes):
            want = self.shape(lab, s0)
            if want is not None and dyn and len(want) == len(s):  # only the dims the plan shrinks: a gathered
                want = tuple(w if w != w0 else g for w, w0, g in zip(want, s0, s))  # dim is labelled and follows values
            if want is not None and want != s:
                raise Mismatch(f"{op} (op #{i}) gives shape {list(s)} where the plan needs {list(want)} (unpruned "
                               f"{list(s0)}): the code keeps a size of its own", self.groups(lab))

    def split_failed(self, func: Any, args: tuple, kwargs: dict) -> None:
        """A ``split_with_sizes`` that failed (its sizes no longer sum to the dim): raise the Mismatch naming the
        groups of the sections whose requested size is not the plan's (graph/splits.py: a stale size attribute
        there), so that only those are kept whole, not every group of the module. Returns when it cannot say."""
        if func.overloadpacket not in (torch.ops.aten.split_with_sizes, torch.ops.aten.split_with_sizes_copy):
            return
        i = self.step_no
        if self.failed is not None or self.loose or i >= len(self.trace) or len(args) < 2:
            return
        op0, shapes0, labs = self.trace[i]
        sizes = list(args[1])
        if op0 != func.overloadpacket.__name__ or len(labs) != len(sizes):
            return
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        wants = [self.shape(lab, s0) for lab, s0 in zip(labs, shapes0)]
        bad = sorted({gi for lab, w, n in zip(labs, wants, sizes) if w is not None and w[dim] != n
                      for gi in self.groups(lab)})
        if bad:
            self.failed = Mismatch(f"split_with_sizes (op #{i}) asks for sections {sizes} where the plan leaves "
                                   f"{[None if w is None else w[dim] for w in wants]}: the code keeps a size of "
                                   "its own", bad)
            raise self.failed

    def finish(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.loose or (self.step_no > self.dynamic and self.step_no != len(self.trace)):
            self.loose, self.sequence = True, False
            return
        self.sequence = self.step_no != len(self.trace)
        if self.sequence:
            raise Mismatch(f"the pruned model runs {self.step_no} ops where the unpruned one ran {len(self.trace)}: "
                           "its control flow depends on a pruned size", [])


def _flat(out: Any) -> list:
    from secateur.graph.capture import _flat_tensors
    return _flat_tensors(out)


_VIEWS = ("view", "_unsafe_view")
_NO_OPS = ("detach", "alias")


def _copy_step(trace: list, i: int, op: str) -> tuple[str | None, int]:
    """Align a reshape whose copy comes and goes with the sizes: ``reshape`` copies (``clone`` then
    ``_unsafe_view``) only where strides forbid a view, and pruning a dim to 1 (a last head) can allow one, or the
    reverse. Returns (the unpruned op to compare with, its step): the step after the unpruned clone where the
    pruned run views straight away; (None, i) for a clone only the pruned run makes; else (trace op, i).
    Also a ``detach`` the capture saw and the dry run does not: ``torch.zeros_like`` dispatches one under the
    capture's mode only (transformers' Mamba cache init); it changes no shape, so the next step is compared."""
    op0 = trace[i][0]
    if op0 in _NO_OPS and op != op0 and i + 1 < len(trace) and trace[i + 1][0] == op:
        return op, i + 1
    if op in _VIEWS and op0 == "clone" and i + 1 < len(trace) and trace[i + 1][0] in _VIEWS:
        return trace[i + 1][0] if op == trace[i + 1][0] else op, i + 1
    if op == "clone" and op0 in _VIEWS:
        return None, i
    if op in _VIEWS and op0 in _VIEWS:
        return op, i
    return op0, i


class _Record:
    """Stands in for :class:`Expected` in ``run``: records the steps instead of comparing them."""

    def __init__(self, leaves: set[str]) -> None:
        self.leaves, self.steps, self.step_no = leaves, [], 0

    def step(self, op: str, out: Any) -> None:
        from secateur.graph.capture import _flat_tensors
        self.steps.append((op, tuple(tuple(t.shape) for t in _flat_tensors(out))))

    def finish(self) -> None:
        pass


def _meta_trace(model: nn.Module, example_inputs: Any, tr: Any) -> list | None:
    """The capture's trace as the unpruned model runs it on meta, where the dry run compares. The device can change
    the ops (SDPA's CPU kernel vs its decomposition, scalar constants): steps are aligned by op name, and labels are
    kept only where op and shapes agree; the other meta steps are compared by op name only. Cached on the tracer;
    None when the unpruned model does not run on meta (``tr.meta_error`` says why)."""
    if not hasattr(tr, "meta_trace"):
        import difflib
        rec = _Record(tr.leaf_names)
        got, _, tr.meta_error, _ = run(skeleton(model), example_inputs, rec)
        if got is None:
            tr.meta_trace = None
            return None
        ops0, ops1 = [t[0] for t in tr.trace], [t[0] for t in rec.steps]
        labels: list[tuple] = [(None,) * len(shapes) for _, shapes in rec.steps]
        pairs = zip(range(len(ops0)), range(len(ops1))) if ops0 == ops1 else (
            (b.a + k, b.b + k) for b in difflib.SequenceMatcher(None, ops0, ops1, autojunk=False).get_matching_blocks()
            for k in range(b.size))
        for i, j in pairs:
            if tr.trace[i][1] == rec.steps[j][1]:
                labels[j] = tr.trace[i][2]
        tr.meta_trace = [(op, shapes, lab) for (op, shapes), lab in zip(rec.steps, labels)]
    return tr.meta_trace


def expected(graph: Any, choices: list) -> Expected | None:
    """The shape check for ``choices`` (None without a capture trace, or where the unpruned model does not run on
    meta: then only the final output shapes are compared)."""
    tr = getattr(graph, "tracer", None)
    if tr is None or not getattr(tr, "trace", None) or getattr(tr, "meta_trace", ()) is None:
        return None
    return Expected(graph, choices)


class _Steps(TorchDispatchMode):
    def __init__(self, expected: Expected, depth: list[int], tally: Any = None, shapes: Any = None) -> None:
        super().__init__()
        self.expected, self.depth, self.tally, self.shapes = expected, depth, tally, shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            out = func(*args, **(kwargs or {})) if self.shapes is None else self.shapes.run(func, args, kwargs or {})
        except RuntimeError:
            if self.depth[0] == 0:
                self.expected.split_failed(func, args, kwargs or {})  # a Mismatch naming the stale sections
            raise
        if self.tally is not None:  # every op, as count_macs sees them (the comparison's own ops are not dispatched)
            self.tally.add(func, args, kwargs or {}, out)
        if self.depth[0] == 0:
            self.expected.step(func.overloadpacket.__name__, out)
        return out


def run(model: nn.Module, example_inputs: Any, expected: Expected | None = None, here: bool = False,
        tally: Any = None, outputs: list | None = None) -> tuple[list | None, str | None, str | None, list[int] | None]:
    """Forward on meta (``here``: on the inputs' own device, seeded with 0 as ``structured/proof.py _exact`` runs, the
    caller's CPU RNG state kept): (output shapes, failing module name, error, groups of a shape mismatch); shapes
    None on failure, groups None unless the failure is a :class:`Mismatch`. With ``expected``, every op output
    outside leaf modules, and every leaf module output, is compared with the capture's (shapes only); ``tally``
    (``metrics.MacTally``, with ``expected`` only) counts the forward's MACs meanwhile; ``outputs`` (a list) gets
    the output tensors of a run that succeeded (the numeric proof reuses a CPU dry run's: one forward fewer).
    Where the capture ran without values (graph/shapes_only.py), a dry run here does too, and again with values if
    the pruned code reads them; its outputs are then not handed back (they hold no values)."""
    from secateur.graph import shapes_only
    if here and getattr(getattr(expected, "tracer", None), "shapes_only", False):
        res = shapes_only.attempt(model, example_inputs,
                                  lambda runner: _run(model, example_inputs, expected, here, tally, None, runner),
                                  accept=lambda res: res[0] is not None)  # a failure is confirmed with values
        if res is not None:
            return res
    return _run(model, example_inputs, expected, here, tally, outputs, None)


def _run(model: nn.Module, example_inputs: Any, expected: Expected | None, here: bool, tally: Any,
         outputs: list | None, shapes: Any) -> tuple[list | None, str | None, str | None, list[int] | None]:
    from secateur.graph.capture import call
    names = {m: n for n, m in model.named_modules()}  # (every module once, in ``modules()`` order)
    leaves = expected.leaves if expected is not None else set()
    if expected is not None:
        expected.step_no, expected.sequence, expected.failed = 0, False, None
    if tally is not None:
        tally.flops = 0 if expected is not None else None
    stack: list[str] = []
    depth = [0]

    def pre(m, a):
        stack.append(names[m])
        if stack[-1] in leaves:
            depth[0] += 1

    def post(m, a, o):
        if stack[-1] in leaves:
            depth[0] -= 1
            if depth[0] == 0:
                depth[0] += 1  # the comparison's own tensor ops are not the model's (nor dispatched: see capture)
                try:
                    with no_dispatch():
                        expected.step(f"module {stack[-1]}", o)
                finally:
                    depth[0] -= 1
        stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in names]
    hooks += [m.register_forward_hook(post) for m in names]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as in the capture: the same ops
    try:
        inputs = example_inputs if here else to_meta(example_inputs)
        from secateur.graph.moe import meta_rules, meta_stand_ins
        stand_ins = meta_stand_ins({} if here else meta_rules(model), tally)  # experts modules on meta
        # on meta: values known without inputs or weights, attention kernels as the CPU picks them (meta_values.py)
        values = contextlib.nullcontext() if here else meta_run(model, lambda: stack[-1] if stack else "<root>")
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=here), stand_ins, values:
            if here:
                torch.manual_seed(0)
            if expected is None:
                out = call(model, inputs)
            else:
                with _Steps(expected, depth, tally, shapes):
                    out = call(model, inputs)
                expected.finish()
        if outputs is not None:
            from secateur.graph.capture import _flat_tensors
            outputs.extend(_flat_tensors(out))
        return _shapes(out), None, None, None
    except Mismatch as e:
        return None, (stack[-1] if stack else ""), str(e), e.groups
    except Exception as e:  # noqa: BLE001 - any failure of the pruned forward is reported, never hidden
        return None, (stack[-1] if stack else ""), f"{type(e).__name__}: {e}", None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()


def check(model: nn.Module, example_inputs: Any, apply: Callable[[nn.Module], Any], want: list | None = None,
          expected: Expected | None = None, tally: Any = None, applied: bool = False, here: bool | None = None,
          outputs: list | None = None) -> tuple[bool, str | None, str | None, list[int] | None]:
    """(ok, failing module, error, groups of a shape mismatch) of applying ``apply`` to a copy (``twin`` or meta
    ``skeleton``, see the module docstring) and running it. ok is True also when the unpruned model cannot run on
    meta (nothing to compare with; the caller notes it). ``want``: the unpruned model's output shapes when already
    known (the capture saw them), which saves one forward. ``expected``: the shapes of every step (see
    :class:`Expected`). ``tally`` (``metrics.MacTally``): the MACs of the pruned copy's forward where it ran on the
    model's own device (what ``count_macs`` of the pruned model says: one forward saved); left None otherwise.
    ``applied``: see ``runs_here``; ``here``: its answer, where the caller has it already (a walk over every
    tensor of the model per dry run). ``outputs``: see ``run`` (filled only where the pruned copy ran here)."""
    here = runs_here(model, example_inputs, applied) if here is None else here
    if tally is not None:
        tally.flops = None
    try:
        base = twin(model) if here else skeleton(model)
    except Exception as e:  # noqa: BLE001 - a model that cannot be deep-copied is not verified (noted)
        return True, None, f"not verified on meta (skeleton: {type(e).__name__}: {e})", None
    if want is None:
        want, _, err0, _ = run(base, example_inputs, here=here)
        if want is None:
            return True, None, f"not verified{'' if here else ' on meta'} ({err0})", None
    known = want is not None
    if known:
        want = [tuple(w) for w in want]
    apply(base)
    got, where, err, groups = run(base, example_inputs, expected, here=here, tally=tally if here else None,
                                  outputs=outputs if here else None)
    if not here and groups is not None and expected.sequence and expected.trace is expected.tracer.trace:
        # the ops differ from the capture's: the plan, or the device? compare with the unpruned model on meta
        tr = expected.tracer
        if _meta_trace(model, example_inputs, tr) is None:
            return True, None, f"not verified on meta ({tr.meta_error})", None
        if [t[0] for t in tr.meta_trace] != [t[0] for t in tr.trace]:
            expected.trace = tr.meta_trace
            return check(model, example_inputs, apply, want, expected, tally, applied, here, outputs)
    if got is None:
        if not here and known and groups is None:  # was it the plan, or does the model not run on meta at all?
            base_ok, _, err0, _ = run(skeleton(model), example_inputs)
            if base_ok is None:
                return True, None, f"not verified on meta ({err0})", None
        return False, where, err, groups
    dynamic = expected is not None and expected.dynamic < len(expected.trace)
    if got != want and not (dynamic and len(got) == len(want)):  # sizes that follow values (detections) may differ
        return False, "", f"output shapes changed {want} -> {got}", None
    return True, None, None, None
