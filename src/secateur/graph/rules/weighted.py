"""Convolutions and embeddings reached at op level: a weight that is a model parameter gets its module's rule."""
from __future__ import annotations

from typing import Any

import torch

from secateur.graph.capture import Tracer
from secateur.graph.rules.registry import _outs, _tensors, aten, rule


# ---------------------------------------------------------------- convolution / embedding reached at op level
_OWN_WEIGHT = (aten.convolution, aten._convolution, aten.conv2d, aten.conv1d, aten.conv3d, aten.embedding)


@rule(aten.convolution, aten._convolution, aten.conv2d, aten.conv1d, aten.conv3d, aten.mkldnn_convolution,
      aten.convolution_overrideable, aten.embedding, aten._embedding_bag, aten.embedding_bag)
def opaque_weighted(tr, func, args, kwargs, out):
    """A weighted op outside a known module (a custom forward: timm's Conv2dSame pads, then calls F.conv2d; Gemma's
    scaled embedding multiplies F.embedding's output). When its weight (and bias) is a model parameter used as
    it is, the op is the module's own rule at op level (``weighted_op``): its channels prune. A computed weight (a
    standardised or masked one) cannot be sliced where it is made: its channels are kept (all-or-nothing, noted)."""
    if func.overloadpacket in _OWN_WEIGHT and weighted_op(tr, func, args, kwargs, out):
        return
    for t in _tensors(args):
        tr.atoms.block(tr.get(t))
    for t in _outs(out):
        tr.set(t, None)
    note = (f"{tr.where()}: {func.overloadpacket._qualified_op_name} with a weight that is not a parameter used "
            "as it is; its channels are kept")
    if note not in tr.notes:
        tr.notes.append(note)


class _Weights:
    """The attributes the module-level conv rules read, for a conv reached at op level."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
        self.weight, self.bias, self.groups = weight, bias, int(groups)
        self.out_channels, self.in_channels = weight.size(0), weight.size(1) * self.groups


def _own_param(tr: Tracer, t: Any) -> torch.Tensor | None:
    """The model parameter ``t`` is (or exactly views, ``Tracer.param_view``), unlabelled; else None."""
    p = tr.param_view(t)
    return p if p is not None and id(p) not in tr.labels else None


def weighted_op(tr: Tracer, func, args, kwargs, out) -> bool:
    """``aten::embedding`` / ``aten::convolution`` whose weight is a model parameter: the rule of
    ``nn.Embedding`` / ``nn.Conv*d`` (graph/modules.py) with the op's own arguments. False (nothing done) when the
    weight is computed, the conv transposed, or the indices carry channels."""
    from secateur.graph.modules import _channels, _produce, _shape_for, conv_inputs
    names = [a.name for a in func._schema.arguments]
    val = {**dict(zip(names, args)), **kwargs}
    weight, res = _own_param(tr, val.get("weight")), _outs(out)
    if weight is None or len(res) != 1:
        return False
    if func.overloadpacket is aten.embedding:
        if weight.dim() != 2 or tr.get(val.get("indices")) is not None:
            return False
        atoms = tr.atoms.new(weight.size(1))
        tr.slot(weight, 1, atoms, "out")
        tr.set(res[0], _shape_for(res[0].dim(), -1, atoms))
        return True
    bias, x = val.get("bias"), val.get("input")
    if bias is not None:
        bias = _own_param(tr, bias)
        if bias is None:
            return False
    if val.get("transposed", False) or not isinstance(x, torch.Tensor):
        return False
    stub = _Weights(weight, bias, val.get("groups", 1))
    cdim = x.dim() - weight.dim() + 1
    if cdim not in (0, 1) or x.size(cdim) != stub.in_channels:
        return False
    atoms = _produce(tr, stub, stub.out_channels, 0)
    conv_inputs(tr, stub, _channels(tr, x, cdim), atoms)
    if stub.groups > 1 and tr.where() in tr.convs:  # the grouped mode belongs to the weight's module (its updater
        tr.convs[tr.owner[id(weight)][0]] = tr.convs.pop(tr.where())  # reads it), not to the one running the op
    tr.set(res[0], _shape_for(res[0].dim(), cdim, atoms))
    return True
