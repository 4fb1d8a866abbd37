"""The rule registry: ATen op (overload packet) -> rule, small helpers every rule uses, and the fallback
for an op with no rule (``not_understood``: keep what it reads)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from secateur.graph.capture import Tracer


aten = torch.ops.aten
RULES: dict[Any, Callable] = {}
BY_NAME: dict[str, Callable] = {}  # ops of optional libraries ("torchvision::roi_align"), never imported here

_POINTWISE_UNTAGGED = {aten.hardswish, aten.hardswish_, aten.mish, aten.mish_, aten.silu, aten.gelu_,
                       aten.elu, aten.elu_, aten.selu, aten.selu_, aten.celu, aten.celu_, aten.softplus,
                       aten.hardsigmoid, aten.threshold, aten.threshold_, aten.rrelu, aten.glu,
                       # elementwise, untagged in torch: masked_fill with a 0-d tensor value (cpmant's attention:
                       # 0.548 -> 0.259 of its MACs at ratio 0.5), integer floor division (MoE routing indices)
                       aten.masked_fill, aten.masked_fill_, aten.floor_divide, aten.floor_divide_,
                       # log(sigmoid(x)) per element (a router's gate, inkling_text); its CPU kernel returns a buffer
                       # beside the result, which carries the same labels (or none where it is empty)
                       aten.log_sigmoid_forward, aten.log_sigmoid}


_OPS: dict[int, tuple] = {}  # id(op) -> (op, facts): see op_facts


def op_facts(func) -> tuple[bool, bool, bool]:
    """(its schema is mutable, pointwise by its tags or ``_POINTWISE_UNTAGGED``, the in-place form of a pointwise op)
    of an op overload, worked out once per op: ``func._schema.is_mutable`` and the tag tests, asked several times per
    op, cost more than most ops' own rules. Ops are long-lived singletons (kept alive here, so their ids stay theirs;
    keyed by id: ops hash in Python)."""
    known = _OPS.get(id(func))
    if known is None or known[0] is not func:
        packet = func.overloadpacket
        known = _OPS[id(func)] = (func, (bool(func._schema.is_mutable),
                                         torch.Tag.pointwise in func.tags or packet in _POINTWISE_UNTAGGED,
                                         _inplace_of_pointwise(packet)))
    return known[1]


def _inplace_of_pointwise(packet) -> bool:
    name = packet.__name__
    if not name.endswith("_"):
        return False
    base = getattr(aten, name[:-1], None)
    return base is not None and any(torch.Tag.pointwise in getattr(base, o).tags for o in base.overloads())


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _outs(out):
    return list(_tensors(out))


def _pad(lab: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    if lab is None or lab.dim() == ndim:
        return lab
    return lab.reshape((1,) * (ndim - lab.dim()) + tuple(lab.shape))


def not_understood(tr: Tracer, func, args, kwargs, out, why: str = "has no rule in the structural engine") -> None:
    """An op with no rule (``torchvision::nms``, ``aten::nonzero``, a custom kernel) that reads channels: every
    channel it reads is kept (its atoms are blocked: all-or-nothing, never pruned) and its new outputs carry no
    channels, like the model's inputs. Nothing the op sees changes under any plan, so the pruned model computes
    there what the original computes; what it returns is data the engine does not prune through. Raising instead
    (the first design) refused every detector for its post-processing (NMS, top-k, nonzero on class scores),
    whose channels are the model's outputs and kept anyway. Noted once per op and module."""
    ins = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
    if tr.dynamic is None:  # what it returns may be any size (NMS keeps a data-dependent count)
        tr.dynamic = len(tr.trace)
    for t in ins:
        tr.atoms.block(tr.get(t))
    note = f"{tr.where()}: {func.overloadpacket._qualified_op_name} {why}; the channels it reads are kept"
    if note not in tr.notes:
        tr.notes.append(note)
    alias = {id(t) for t in ins}
    for t in _outs(out):
        if id(t) not in alias:
            tr.set(t, None)
