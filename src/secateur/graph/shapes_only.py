"""Capture and dry-run a large model without computing its values.

Why: the capture needs every op's shapes and labels, not its values, wherever the model's code makes no decision
from values. On a large CPU model the forward is most of a plan's time (regnet_y_128gf: 4.7 s of a 9.4 s prune,
then a second, pruned forward in the dry run), and such a model gets no numeric proof anyway (``verify.HERE_BYTES``),
so its values buy nothing. Here the heavy ops (``HEAVY``: convolutions, matrix products, CPU attention) run on meta
and hand back uninitialised memory of the shape and strides the meta kernel gives; every tensor computed from such
memory is *tainted* (per storage), and every later op on tainted tensors runs on meta too (views run as they are:
they are metadata; in-place value writes are checked on meta and skipped). Memory is allocated, never touched:
writing it costs page faults, which were a third of the remaining time.

The contract, checked op by op: a tainted tensor may only reach ops whose output shapes, Python results and label
rules do not depend on input values (``_value_free``: pointwise ops, reductions to values, norms, movement,
convolutions, matrix products, attention, pooling). Anything else (``.item()``, a comparison read back, ``nonzero``,
an index or a ``topk`` computed from activations, a write of tainted values into a parameter or buffer, such as
train-mode BatchNorm's running statistics) aborts the attempt before the op runs, and the caller runs the forward
again with real values. So an attempt either sees the op sequence and shapes a real forward sees, or is thrown
away (tests/test_shapes_only.py compares the groups of both on torchvision and Hugging Face models).

Used only where no numeric proof is made (a CPU model above ``verify.HERE_BYTES``) and the example inputs are
plain tensors (a cache object in the inputs would be fed twice by a retry)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map

from secateur.graph.capture import _flat_tensors

aten = torch.ops.aten

HEAVY = frozenset({aten.convolution, aten.mm, aten.addmm, aten.bmm, aten.baddbmm,
                   aten._scaled_dot_product_flash_attention_for_cpu})

# ops whose output shapes, Python results and label rules never depend on input values (names: an op this torch
# lacks is skipped); pointwise ops (``torch.Tag.pointwise``) count too
_VALUE_FREE_NAMES = """
matmul dot mv addmv einsum linear conv2d conv1d conv3d convolution_overrideable
_scaled_dot_product_attention_math scaled_dot_product_attention _scaled_dot_product_efficient_attention
native_batch_norm _native_batch_norm_legit_no_training native_layer_norm native_group_norm layer_norm
group_norm batch_norm _native_batch_norm_legit _softmax _log_softmax softmax log_softmax rms_norm
_fused_rms_norm mean sum var var_mean std std_mean amax amin norm linalg_vector_norm prod logsumexp cumsum
avg_pool2d avg_pool1d avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_avg_pool1d max_pool2d
max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool2d adaptive_max_pool1d
upsample_nearest2d upsample_bilinear2d _upsample_nearest_exact2d upsample_bicubic2d view _unsafe_view reshape
permute transpose t expand clone contiguous cat stack split split_with_sizes chunk slice select unsqueeze
squeeze flatten narrow unbind constant_pad_nd pixel_shuffle pixel_unshuffle channel_shuffle
native_channel_shuffle roll flip alias detach _to_copy copy_ unfold im2col col2im repeat tile as_strided
diagonal tril triu movedim swapaxes empty_like zeros_like ones_like full_like new_empty new_zeros new_ones
new_full lift_fresh dropout native_dropout repeat_interleave.self_int as_strided_ transpose_ t_ unsqueeze_ squeeze_
fill_ zero_ detach_
"""


def _resolve(names: str) -> frozenset:
    ops = set(HEAVY)
    for name in names.split():
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        op = getattr(op, overload, None) if op is not None and overload else op
        if op is not None:
            ops.add(op)
    return frozenset(ops)


_VALUE_FREE = _resolve(_VALUE_FREE_NAMES)
# in-place ops that change a tensor's metadata (cheap: they always run)
_METADATA_INPLACE = _resolve("as_strided_ transpose_ t_ unsqueeze_ squeeze_ detach_") - HEAVY
# of these, only the shape comes from the input: the values they make are not tainted
_FRESH = _resolve("empty_like zeros_like ones_like full_like new_empty new_zeros new_ones new_full") - HEAVY


class NeedsValues(BaseException):
    """An op would read values of memory the heavy ops left uninitialised. A BaseException: model code that
    catches ``Exception`` (probing a fast path) must not swallow it."""


class ShapesOnly:
    """One attempt's heavy-op runner and taint bookkeeping (``run`` replaces ``func(*args, **kwargs)`` in a
    dispatch mode). Taint is kept per storage, so a view of tainted memory is tainted, and so is the base a view
    wrote tainted values into; tainted tensors are held until the attempt ends, so their storages' addresses stay
    their own. ``state``: storages the model keeps (its parameters, buffers, inputs): tainted values are never
    written there. ``aborted`` stays set once an op needed values, in case model code swallowed the exception."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any) -> None:
        self.tainted: set[int] = set()
        self.held: list[torch.Tensor] = []
        self.state = {_ptr(t) for t in (*model.parameters(), *model.buffers(), *_flat(example_inputs))}
        self.aborted: str | None = None

    def _taint(self, out: Any) -> None:
        for t in _flat(out):
            self.tainted.add(_ptr(t))
            self.held.append(t)

    def run(self, func, args: tuple, kwargs: dict) -> Any:
        if self.aborted:
            raise NeedsValues(self.aborted)
        ins = _flat((args, kwargs))
        dirty = bool(self.tainted) and any(_ptr(t) in self.tainted for t in ins)
        packet, schema = func.overloadpacket, func._schema
        if not dirty and packet not in HEAVY:
            return func(*args, **kwargs)
        if dirty and not _value_free(func):
            self.aborted = f"{packet._qualified_op_name} reads values computed by skipped ops"
            raise NeedsValues(self.aborted)
        written = [a for a, arg in zip(args, schema.arguments)
                   if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
        if dirty and _trains_norm(func, args, kwargs):
            written = written + [a for a in args[3:5] if isinstance(a, torch.Tensor)]  # its schema hides the write
        if dirty and any(_ptr(a) in self.state for a in written):
            self.aborted = f"{packet._qualified_op_name} writes computed values into the model's state"
            raise NeedsValues(self.aborted)
        if any(t.device.type != "cpu" for t in ins):
            out = func(*args, **kwargs)
        elif schema.is_mutable:
            if packet in _METADATA_INPLACE or len(written) != 1 or len(schema.returns) != 1:
                out = func(*args, **kwargs)
            else:  # values only: the meta kernel still checks the shapes (once per op and metadata)
                _on_meta(func, args, kwargs)
                out = written[0]
            self._taint(written)
        elif schema.returns and schema.returns[0].alias_info is not None:  # a view: metadata, run as it is
            out = func(*args, **kwargs)
        else:
            try:
                out = _map(_like, _on_meta(func, args, kwargs))
            except Exception:  # noqa: BLE001 - no meta kernel (or a real error, which the real kernel raises too)
                out = func(*args, **kwargs)
        if packet not in _FRESH:
            self._taint(out)
        return out

    def release(self) -> None:
        self.held.clear()
        self.tainted.clear()


_TRAINS = frozenset(getattr(aten, n) for n in ("native_batch_norm", "_native_batch_norm_legit", "batch_norm")
                    if hasattr(aten, n))


def _trains_norm(func, args: tuple, kwargs: dict) -> bool:
    """A batch norm in training mode updates its running statistics in place, though its schema says no write."""
    if func.overloadpacket not in _TRAINS:
        return False
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    return bool(training)


def attempt(model: torch.nn.Module, example_inputs: Any, run: Callable[[ShapesOnly], Any],
            accept: Callable[[Any], bool] = lambda res: True) -> Any:
    """``run(runner)`` without values; None where it needed values, raised, or ``accept`` refuses its result (the
    caller then runs with values)."""
    runner = ShapesOnly(model, example_inputs)
    try:
        res = run(runner)
    except (NeedsValues, Exception):  # anything the attempt raises, a run with values says for itself
        return None
    finally:
        runner.release()
    return res if not runner.aborted and accept(res) else None


def usable(model: torch.nn.Module, example_inputs: Any) -> bool:
    """Worth trying and safe to retry: a CPU model too large for the numeric proof, plain tensor inputs."""
    from secateur.graph.verify import HERE_BYTES, _tensors_of, here_bytes
    if not _plain(example_inputs):
        return False
    params, buffers = _tensors_of(model)  # one walk for both questions (three walks were 2 % of a small capture)
    tensors = [*params, *buffers]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    size = here_bytes(model, example_inputs, tensors)
    return size is None or size > HERE_BYTES


def _value_free(func) -> bool:
    """(Indices a max pooling returns are values, but only an index op reads them, and that aborts.) Pointwise, by
    the rules' own cached facts (``registry.op_facts``)."""
    from secateur.graph.rules.registry import op_facts
    _, pointwise, inplace_pointwise = op_facts(func)
    return pointwise or inplace_pointwise or func.overloadpacket in _VALUE_FREE or func in _VALUE_FREE


_META: dict = {}  # (op, the arguments' metadata) -> the meta kernel's result (see _on_meta)
_META_MAX = 1 << 14
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _on_meta(func, args: tuple, kwargs: dict) -> Any:
    """``func`` on meta copies of the arguments, remembered by op and metadata. A meta kernel's result depends on
    nothing else, and many are Python decompositions (meta ``native_batch_norm``: ~2.5 ms a call, 0.42 s of
    regnet_y_128gf's capture and dry run, where 54 blocks repeat a few shapes). A result is a tree of meta tensors
    (``_like`` makes fresh CPU memory from each, and views never come here), so sharing one is safe. Arguments that
    are not plain strided tensors, or hashable values, are not remembered."""
    key = _meta_key(func, args, kwargs)
    out = _META.get(key) if key is not None else None
    if out is None:
        out = func(*_to_meta(args), **_to_meta(kwargs))
        if key is not None:
            if len(_META) >= _META_MAX:
                _META.clear()
            _META[key] = out
    return out


def _meta_key(func, args: tuple, kwargs: dict):
    def part(a):
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or a.layout != torch.strided or a.is_conj() or a.is_neg():
                raise TypeError
            return (tuple(a.shape), a.stride(), a.dtype, a.device.type, a.storage_offset())
        if isinstance(a, (list, tuple)):
            return (type(a), tuple(part(b) for b in a))
        if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                       torch.layout)):
            return (type(a), a)
        raise TypeError
    try:  # (the default dtype: a Python float meeting an integer tensor)
        return (func, torch.get_default_dtype(), part(args),
                tuple((k, part(v)) for k, v in sorted(kwargs.items())))
    except TypeError:
        return None


def _like(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")  # never written: no page touched
    return t


def _to_meta(x: Any) -> Any:
    return _map(_meta, x)


def _meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _map(fn: Callable[[Any], Any], x: Any) -> Any:
    """``tree_map(fn, x)``: plain tuples, lists and dicts (an op's arguments and most results) walked here, anything
    else by ``tree_map`` (named tuples, ``torch.return_types``), whose generic walk was a tenth of the capture."""
    kind = type(x)
    if kind is tuple or kind is list:
        return kind([_map(fn, v) for v in x])
    if kind is dict:
        return {k: _map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list, Mapping)):
        return tree_map(fn, x)
    return fn(x)


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


_flat = _flat_tensors


def _plain(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, Mapping):
        return all(_plain(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (int, float, bool, str))
