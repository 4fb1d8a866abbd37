"""Values on the meta device that do not depend on the inputs or the weights, so model code may read them there.

Why: a meta tensor has a shape and no value, and model code sometimes asks for one (``.item()``, ``bool(t)``,
``.tolist()``, all ``aten._local_scalar_dense``). Hugging Face decoders called the default way with no cache and no
attention mask (``use_cache=False``, or a config whose ``use_cache`` is off) ask in transformers'
``masking_utils.find_packed_sequence_indices``: ``(packed_sequence_mask[:, -1] == 0).all()`` decides whether the
position ids pack several sequences. On meta that call failed ("Tensor.item() cannot be called on meta tensors"),
so a 7B plan on meta needed ``use_cache=True``. Those position ids are the model's own ``torch.arange``: their value
is known without any input value or weight, and the CPU run takes the branch it gives.

So this mode keeps, beside every meta tensor computed only from constants (factories such as ``arange`` / ``full``
/ ``zeros``, CPU tensors, Python numbers, and ops on such tensors), a CPU copy of its value, and answers a read of
it from that copy: the exact answer the CPU run gets, never a guess. A meta tensor that depends on the inputs, the
weights, an uninitialised ``empty`` or a random op has no copy; reading it is a ``PruningError`` naming the op and
the module. Copies are kept only up to ``LIMIT`` elements (index and mask arithmetic, not activations), views of a
copy share its storage (an in-place op on known values updates them all), and an in-place write of an unknown value
forgets the copies of that storage. It runs only where the model runs on meta (capture and dry run); a CPU capture
never enters it."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from secateur.errors import fail
from secateur.graph.meta_sdpa import CpuAttention

LIMIT = 1 << 20  # elements: beyond this a value copy would cost real memory for no control-flow question
_CPU = torch.device("cpu")
_UNDEFINED = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted")


class KnownValues(TorchDispatchMode):
    """See the module docstring. ``where``: names the running module for the error of an unknown read."""

    def __init__(self, where: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.forgotten: dict[int, Any] = {}  # data_ptr -> storage (held so the address is not reused)
        self.where = where

    def value(self, t: Any) -> torch.Tensor | None:
        """The CPU copy of ``t``'s value, ``t`` itself off meta, None where unknown."""
        if not isinstance(t, torch.Tensor):
            return None
        if t.device.type != "meta":
            return t
        v = self.values.get(t)
        if v is None or (self.forgotten and v.untyped_storage().data_ptr() in self.forgotten):
            return None
        return v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        metas = [t for t in flat if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if not metas and not any(isinstance(a, torch.device) and a.type == "meta" for a in flat):
            return func(*args, **kwargs)  # off meta: nothing to know (a factory on meta has a device argument)
        known = all(self.value(t) is not None for t in metas) and _deterministic(func)
        off_meta = any(isinstance(a, torch.device) and a.type != "meta" for a in flat)  # .cpu(), .tolist()
        if off_meta or not _returns_tensors(func):  # a value read: only a known value can answer it
            if known:
                return func(*_on_cpu(self, args), **_on_cpu(self, kwargs))
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as e:
                where = self.where() if self.where is not None else None
                raise fail(f"reads the value of a tensor on the meta device ({func}: {e}); it depends on the "
                           "inputs or the weights, which meta tensors do not have", where=where,
                           shape=metas[0].shape if metas else None, hint="plan on the CPU, or call the model so that it reads no "
                           "value (for Hugging Face models: leave out the attention mask)") from None
        out = func(*args, **kwargs)
        mutated = _mutated(func, args, kwargs)
        if not known:
            for t in mutated:
                self._forget(t)
            return out
        if mutated or _small(out):
            got = func(*_on_cpu(self, args), **_on_cpu(self, kwargs))
            if not mutated:
                self._keep(out, got)
        return out

    def _keep(self, out: Any, got: Any) -> None:
        outs, _ = tree_flatten(out)
        cpus, _ = tree_flatten(got)
        for o, c in zip(outs, cpus):
            if (isinstance(o, torch.Tensor) and isinstance(c, torch.Tensor) and o.device.type == "meta"
                    and o.shape == c.shape and o.dtype == c.dtype):
                self.values[o] = c

    def _forget(self, t: torch.Tensor) -> None:
        v = self.values.get(t)
        if v is not None:
            s = v.untyped_storage()
            self.forgotten[s.data_ptr()] = s


class ListIndices(TorchFunctionMode):
    """``x[..., [-2], :]`` on a meta tensor: PyTorch turns the Python list into an index tensor in C++, without a
    dispatched op, so :class:`KnownValues` never sees its value (Falcon's fused q/k/v split does this, and the
    index rule needs the positions). Here the list becomes that tensor first (``torch.tensor(list)`` on the CPU,
    its meta twin made outside any mode, as PyTorch makes it), with the value known: the ops are the CPU's (its
    ``lift_fresh``, then the index op)."""

    def __init__(self, known: KnownValues) -> None:
        super().__init__()
        self.known = known

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__) and len(args) > 1 \
                and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            idx = args[1]
            if _int_list(idx):
                idx = self._tensor(idx)
            elif isinstance(idx, tuple) and any(_int_list(i) for i in idx):
                idx = tuple(self._tensor(i) if _int_list(i) else i for i in idx)
            args = (args[0], idx, *args[2:])
        return func(*args, **kwargs)

    def _tensor(self, idx: list) -> torch.Tensor:
        with no_dispatch():
            cpu = torch.tensor(idx)
            meta = torch.empty_like(cpu, device="meta")
        self.known.values[meta] = cpu
        return torch.ops.aten.lift_fresh.default(meta)  # the one op the CPU dispatches for a list index


def _int_list(x: Any) -> bool:
    """A (nested) list of Python ints or bools: an index PyTorch turns into a tensor."""
    if not isinstance(x, list) or not x:
        return False
    return all(_int_list(y) if isinstance(y, list) else isinstance(y, (int, bool)) for y in x)


def _on_cpu(mode: KnownValues, tree: Any) -> Any:
    def conv(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return mode.value(a)
        if isinstance(a, torch.device) and a.type == "meta":
            return _CPU
        return a
    return tree_map(conv, tree)


def _small(out: Any) -> bool:
    outs, _ = tree_flatten(out)
    return all(not isinstance(o, torch.Tensor) or o.numel() <= LIMIT for o in outs)


def _deterministic(func: Any) -> bool:
    return (torch.Tag.nondeterministic_seeded not in func.tags and func.overloadpacket.__name__ not in _UNDEFINED)


def _returns_tensors(func: Any) -> bool:
    return all(isinstance(r.type, (torch.TensorType, torch.ListType, torch.OptionalType)) for r in func._schema.returns)


def _mutated(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (in-place and ``out=`` arguments)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    got = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
            if isinstance(v, torch.Tensor):
                got.append(v)
    return got



_WARNING = "warn_if_padding_and_no_attention_mask"


def runs_on_meta(model: torch.nn.Module, example_inputs: Any) -> bool:
    flat, _ = tree_flatten(example_inputs)
    p = next(iter(model.parameters()), None)
    return (any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in flat)
            or (p is not None and p.device.type == "meta"))


@contextlib.contextmanager
def meta_run(model: torch.nn.Module, where: Callable[[], str] | None = None):
    """While ``model`` runs on meta: :class:`KnownValues`, attention kernels as the CPU picks them
    (``meta_sdpa.py``), and Hugging Face's padding warning off. That warning
    (``PreTrainedModel.warn_if_padding_and_no_attention_mask``, GPT-2, BERT, OPT ... call it when no attention mask
    is given) asks whether ``pad_token_id in input_ids[:, [-1, 0]]``, a value of the inputs, only to log a warning:
    its answer changes nothing the model computes, so on meta it is skipped on this model's modules only."""
    quiet = [m for m in model.modules() if callable(getattr(type(m), _WARNING, None)) and _WARNING not in vars(m)]
    for m in quiet:
        setattr(m, _WARNING, _no_warning)
    try:
        with KnownValues(where) as mode, CpuAttention(), ListIndices(mode):
            yield mode
    finally:
        for m in quiet:
            vars(m).pop(_WARNING, None)


def _no_warning(*args: Any, **kwargs: Any) -> None:
    return None


def known_values(model: torch.nn.Module, example_inputs: Any, tracer: Any) -> Any:
    """:func:`meta_run` (giving its :class:`KnownValues`) where the model or its inputs are on meta, else a no-op
    context giving None (a CPU run reads real values)."""
    if runs_on_meta(model, example_inputs):
        return meta_run(model, tracer.where)
    return contextlib.nullcontext()


def value_of(tracer: Any, t: Any) -> torch.Tensor | None:
    """What a rule reads of an index tensor: ``t`` itself off meta, its known value on meta (CPU), else None."""
    if not isinstance(t, torch.Tensor) or t.device.type != "meta":
        return t
    return tracer.values.value(t) if tracer.values is not None else None
