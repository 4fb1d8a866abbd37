"""Numeric proofs on a CPU copy of one module, for models the whole-model proof cannot run (on meta, on a GPU, or
over ``verify.HERE_BYTES``): size-attribute updates and attention scale folds.

Why: a size the model keeps in an attribute (Falcon's and GPT-BigCode's ``num_heads``) is found by the dry run's
shapes (graph/size_attrs.py), but shapes only prove that the attribute sizes a pruned dim, not that it is not also
used as a number (a one-head attention's ``head_dim`` sized its reshape and its softmax scale); a scale folded into
q's rows (graph/scale_fold.py) is not seen by shapes at all. So the plan takes either only with a numeric proof,
which ran on a copy of the whole model: a 7B Falcon, or any model planned on meta, kept its query heads. Most such
updates concern one module's own forward, and one module is small:

* the capture keeps, for every module's first call, its inputs (shapes, dtypes, channel labels, and the values of
  integer and boolean tensors where they are known: on the CPU, or on meta through graph/meta_values.py), its
  outputs' labels, the op counts at entry and the plain attributes that were None (``Call``);
* a meta run of the unpruned model with the updated attributes watched checks that nothing outside the module's
  own forward reads them (a parent reading ``self.attn.num_heads`` would not be covered): no proof otherwise;
* one module per class, flavour (its bool / str attributes: branch switches) and update (for a fold: the module
  calling the attention, which must also make q's rows)
  is copied to the CPU in float32 (its own weights, or random ones where they are on meta), with state a forward
  left behind reset to None as at the capture's call; its float inputs are random, its integer / boolean ones the
  recorded values (no proof where those are unknown). The reference is the copy with the plan's channels zeroed at
  their consumers inside the module and its normalisations over the kept channels (the oracle's, restricted to the
  module: a site's call is counted from the module's entry), on the full inputs; the pruned copy runs on the inputs
  without their removed channels. Outputs must agree on the kept channels (1e-4 relative), and with a fold the
  attention logits too (structured/proof.py ``_Logits``).

The proof is of the module, not of the model: the rest of the plan is proven by the dry run's shapes, as for every
model too large to run here. ``None`` wherever it cannot be run (no recorded call, unknown index values, state the
module held at the capture's call, a module over ``MODULE_BYTES``), and the update is then not taken."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._mode_utils import no_dispatch
from torch.utils._pytree import tree_flatten, tree_map

_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
LIMIT = 1 << 20  # elements of an integer / boolean input kept as its value (index and mask arithmetic)
MODULE_BYTES = 2 ** 30  # the largest float32 copy of one module proven here (a 40B model's attention: ~140 M
# parameters, 0.57 GB); the proof holds it, the reference's copies of the tensors it zeroes and the sliced ones
TOLERANCE = 1e-4  # relative to the reference's largest output, as the whole-model proof (structured/proof.py)


@dataclass
class Spec:
    """A tensor input of a recorded call: enough to make one like it on the CPU."""
    shape: tuple
    dtype: torch.dtype
    label: torch.Tensor | None
    value: torch.Tensor | None  # integer / boolean inputs: the CPU value where known


@dataclass
class Call:
    """A module's first call in the capture: ``args`` / ``kwargs`` with ``Spec`` for tensors (None where a leaf is
    neither a tensor nor a plain value, a cache object say: no proof then), and the labels of its outputs."""
    args: Any
    kwargs: Any
    outputs: list | None = None
    calls: dict | None = None  # the capture's op / norm-module call counts at entry (norm sites count from there)
    unset: frozenset = frozenset()  # plain attributes that were None at entry (state a later call may have set)

    @staticmethod
    def of(tracer: Any, mod: nn.Module, args: tuple, kwargs: dict) -> "Call":
        usable = [True]

        def spec(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return Spec(tuple(v.shape), v.dtype, tracer.get(v), _value(tracer, v))
            if not isinstance(v, _PLAIN):
                usable[0] = False
            return v if isinstance(v, _PLAIN) else None

        try:  # bookkeeping only: whatever the model passes, the capture goes on (no proof for this module)
            a, k = tree_map(spec, args), tree_map(spec, kwargs)
        except Exception:  # noqa: BLE001
            return Call(None, None)
        if not usable[0]:
            return Call(None, None)
        return Call(a, k, calls=dict(tracer.calls), unset=frozenset(n for n, v in vars(mod).items() if v is None))


def _value(tracer: Any, t: torch.Tensor) -> torch.Tensor | None:
    if t.is_floating_point() or t.is_complex() or t.numel() > LIMIT:
        return None  # float inputs are drawn at random: the proof compares two runs on the same values
    from secateur.graph.meta_values import value_of
    v = value_of(tracer, t)
    if v is None or v.device.type == "meta":
        return None
    with no_dispatch():  # a CPU copy (the model may write the original in place), not an op of the capture
        return v.detach().to("cpu", copy=True)


def prove(model: nn.Module, example_inputs: Any, plan: Any, graph: Any) -> bool | None:
    """True where every module whose size attributes ``plan`` updates, and every module whose attention scale it
    folds into q's rows (graph/scale_fold.py), computes, pruned, what the oracle's reference does on a CPU copy of it
    (a fold: the attention logits too); False where one does not; None where that cannot be run (see the module
    docstring)."""
    from secateur.graph import verify
    calls = getattr(getattr(graph, "tracer", None), "module_calls", None)
    folds = [(g.scale_fold, c) for g, c in plan.choices if g.scale_fold is not None]
    if not (plan.attrs or folds) or not calls or "" in plan.attrs:
        return None
    scopes: dict[tuple, str] = {}  # one module per class, flavour and update: the others run the same code
    for path, kv in plan.attrs.items():
        mod = model.get_submodule(path)
        scopes.setdefault((type(mod), _flavour(mod), repr(sorted(kv.items()))), path)
    for f, c in folds:
        if not f.where or any(not _inside(t[0], f.where) for t in f.targets):
            return None  # q's rows made outside the calling module: not its proof alone
        mod = model.get_submodule(f.where)
        scopes.setdefault((type(mod), _flavour(mod), "fold", f.head_size, f.kept(c)), f.where)
    try:  # a proof that cannot be set up or run is no proof (the update is not taken), never the plan's failure
        if plan.attrs and _read_outside(model, example_inputs, plan.attrs) is not False:
            return None
        exp = verify.Expected(graph, plan.choices)
        for path in dict.fromkeys(scopes.values()):
            ok = _prove_module(model, path, plan, calls, exp)
            if ok is not True:
                return ok
    except Exception:  # noqa: BLE001 - the module's own code on random inputs may raise anything
        return None
    return True


def _flavour(mod: nn.Module) -> tuple:
    """The bool and str attributes of ``mod`` and its descendants: the switches that send instances of one class
    down other branches (Gemma's sliding-window layers: ``is_sliding``, ``attention_type``), proven apart."""
    return tuple((n, k, v) for n, m in mod.named_modules() for k, v in sorted(vars(m).items())
                 if isinstance(v, (bool, str)) and not k.startswith("_"))


def _inside(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _read_outside(model: nn.Module, example_inputs: Any, attrs: dict[str, dict[str, Any]]) -> bool | None:
    """Does code outside a module's own forward read one of its attributes in ``attrs``, in a meta run of the
    unpruned model? None where that run fails."""
    from secateur.graph import verify
    sk = verify.skeleton(model)
    outside = [False]
    handles, swapped = [], []
    for path, kv in attrs.items():
        mod = sk.get_submodule(path)
        depth = [0]
        names = frozenset(kv)

        def pre(m, a, depth=depth):
            depth[0] += 1

        def post(m, a, o, depth=depth):
            depth[0] -= 1

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        cls = type(mod)
        try:
            mod.__class__ = _watching(cls, names, depth, outside)
        except Exception:  # noqa: BLE001 - a class whose instances cannot change class (slots, C types): no proof
            for h in handles:
                h.remove()
            for m, c in swapped:
                m.__class__ = c
            return None
        swapped.append((mod, cls))
    try:
        shapes, _, _, _ = verify.run(sk, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for mod, cls in swapped:
            mod.__class__ = cls
    return None if shapes is None else outside[0]


def _watching(cls: type, names: frozenset, depth: list[int], outside: list[bool]) -> type:
    """A subclass of ``cls`` that flags a read of ``names`` while its forward is not running (``depth``)."""
    def __getattribute__(self, name):
        if name in names and not depth[0]:
            outside[0] = True
        return super(sub, self).__getattribute__(name)

    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
    return sub


def _prove_module(model: nn.Module, path: str, plan: Any, calls: dict[str, Call], exp: Any) -> bool | None:
    """The proof on the module at ``path`` (see the module docstring): the plan restricted to the members, norm
    sites and size attributes inside it, on a CPU copy; True, False, or None where it cannot be run."""
    from secateur.graph.capture import _flat_tensors
    from secateur.graph.reference import kept_norms
    from secateur.structured.apply import _apply
    from secateur.structured.plan import Plan
    from secateur.structured.proof import _Logits, _writable_twin, agree
    call = calls.get(path)
    if call is None or call.args is None or call.outputs is None:
        return None
    choices = []
    for g, c in plan.choices:
        members = [m for m in g.members if _inside(m.module, path)]
        if members:
            choices.append((dataclasses.replace(g, members=members), c))
    norms = []  # the normalisations inside the module, their calls counted from its entry (the reference's count)
    for site, keep in plan._norm_keeps():
        where = site.key if site.kind in ("module", "wstd") else site.where
        if isinstance(where, str) and _inside(where, path):
            n = site.call - call.calls.get(site.key, 0)
            if n < 0:
                return None
            norms.append((dataclasses.replace(site, call=n), keep))
    local = Plan([g for g, _ in choices], choices, heads=plan.heads,
                 attrs={n: dict(kv) for n, kv in plan.attrs.items() if _inside(n, path)})
    gen = torch.Generator().manual_seed(0)
    mod = _cpu_copy(model.get_submodule(path), gen)
    if mod is None or not _state_as_captured(mod, path, calls):
        return None
    inputs = _inputs(call, exp, gen)
    if inputs is None:
        return None
    (args, kwargs), (pargs, pkwargs) = inputs
    pruned = _mounted(path, mod)
    ref = _writable_twin(pruned, local)  # shares the weights it does not zero (apply never writes into them)
    local.zero_consumers(ref)
    folds = any(g.scale_fold is not None for g, _ in choices)
    logits_ref, logits_got = _Logits(), _Logits()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with kept_norms(ref, norms), (logits_ref if folds else contextlib.nullcontext()):
            want = _flat_tensors(ref.get_submodule(path)(*args, **kwargs))
        try:
            _apply(pruned, local)
            torch.manual_seed(0)
            with logits_got if folds else contextlib.nullcontext():
                got = _flat_tensors(pruned.get_submodule(path)(*pargs, **pkwargs))
        except Exception:  # noqa: BLE001 - the module's own code may raise anything on wrong sizes
            return False
    if len(want) != len(got) or len(want) != len(call.outputs):
        return False
    if folds and not logits_ref.same(logits_got):
        return False
    for a, b, lab in zip(want, got, call.outputs):
        a = _kept(a, lab, exp)
        if a is None:
            return None
        if not agree(a, b, TOLERANCE):
            return False
    return True


def _state_as_captured(mod: nn.Module, path: str, calls: dict[str, Call]) -> bool:
    """Put the copy's plain tensor attributes (state a forward leaves behind: RecurrentGemma's RG-LRU keeps
    ``recurrent_states``, which its model resets before a new sequence) back to None where they were None when the
    capture called the module; False where one held a tensor then too (a state the proof cannot rebuild)."""
    for name, m in mod.named_modules():
        call = calls.get(f"{path}.{name}" if name else path)
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor):
                if call is None or k not in call.unset:
                    return False
                setattr(m, k, None)
    return True


def _cpu_copy(mod: nn.Module, gen: torch.Generator) -> nn.Module | None:
    """``mod`` on the CPU in float32, with random weights where it has none (meta); None where an integer tensor
    has no value or the copy would exceed ``MODULE_BYTES``."""
    from secateur.graph import verify
    params, buffers = verify._tensors_of(mod)
    if sum(t.numel() * 4 for t in (*params, *buffers)) > MODULE_BYTES:
        return None
    memo: dict[int, Any] = {}
    for t in (*params, *buffers):
        if t.device.type == "meta":
            if not t.is_floating_point():
                return None
            v = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1] if t.dim() > 1 else 1)
        else:
            v = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(v, requires_grad=False) if isinstance(t, nn.Parameter) else v
    try:
        return verify.deepcopy_module(mod, memo)
    except Exception:  # noqa: BLE001 - a module that cannot be copied is not proven here
        return None


def _mounted(path: str, mod: nn.Module) -> nn.Module:
    """A root holding ``mod`` at ``path``, so that the plan's member names and norm sites resolve unchanged."""
    root = cur = nn.Module()
    parts = path.split(".")
    for p in parts[:-1]:
        nxt = nn.Module()
        cur.add_module(p, nxt)
        cur = nxt
    cur.add_module(parts[-1], mod)
    return root


def _inputs(call: Call, exp: Any, gen: torch.Generator) -> tuple | None:
    """((args, kwargs) for the reference, (args, kwargs) for the pruned copy), or None."""
    full_leaves, spec = tree_flatten((call.args, call.kwargs))
    full, pruned = [], []
    for s in full_leaves:
        if not isinstance(s, Spec):
            full.append(s)
            pruned.append(s)
            continue
        if s.value is not None:
            x = s.value.clone()
        elif s.dtype.is_floating_point:
            x = torch.randn(s.shape, generator=gen)
        else:
            return None
        p = _kept(x, s.label, exp)
        if p is None:
            return None
        full.append(x)
        pruned.append(p)
    from torch.utils._pytree import tree_unflatten
    return tree_unflatten(full, spec), tree_unflatten(pruned, spec)


def _kept(x: torch.Tensor, lab: torch.Tensor | None, exp: Any) -> torch.Tensor | None:
    """``x`` without the positions the plan removes (by its capture label), or None where what is left is not a
    box (a head dim losing other positions per head)."""
    if lab is None:
        return x
    if lab.dim() != x.dim():
        return None
    rem = exp._removed_or_none[lab]
    if not bool(rem.any()):
        return x
    kept = ~rem
    for d in range(lab.dim()):
        if lab.size(d) <= 1:
            continue
        alive = kept.movedim(d, 0).reshape(kept.size(d), -1).any(dim=1).nonzero().flatten()
        kept, x = kept.index_select(d, alive), x.index_select(d, alive)
    return x if bool(kept.all()) else None
