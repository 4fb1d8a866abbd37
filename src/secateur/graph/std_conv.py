"""Weight-standardised convolutions (timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``,
``ScaledStdConv2dSame``: BiT / ResNetV2, NFNets, NF-RegNets, hybrid ViT backbones).

Their forward standardises each output channel's weight over (inputs x kernel) before the convolution. Traced op by
op, that weight is computed (a constant to the engine), so every channel around them was all-or-nothing: a whole
ResNetV2 backbone stayed dense (vit_small_r26_s32_224 kept 0.76 of its MACs at ratio 0.5). As one op:
- output channels are exact to remove: each row is standardised on its own (``gain`` follows them);
- input channels are not the same as zeroing: zeroing a column of the raw weight still leaves it in the row's
  mean and variance (and the standardised column is not zero), while the pruned layer standardises over the kept
  columns only. So the layer is recorded as a normalisation site ("wstd") like a LayerNorm over pruned channels:
  the plan notes it, and ``Plan.kept_norms`` rebuilds the reference (the layer run on the kept inputs only).
``ScaledStdConv2d.scale`` (gamma / sqrt(fan-in)) stays the original float: the pruned layer keeps its scale, as
attention keeps its softmax scale under head-dim pruning, and the reference copy has the same one."""
from __future__ import annotations

import copy

import torch
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import _channels, _input, _produce, _shape_for, conv_inputs, leaf

_NAMES = tuple(f"timm.layers.std_conv.{c}" for c in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                      "ScaledStdConv2dSame"))


@leaf(names=_NAMES)
def std_conv(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    name = tr.where()
    tr.calls[name] = tr.calls.get(name, 0) + 1
    chan = _channels(tr, x, 1)
    atoms = _produce(tr, mod, mod.out_channels, 0)
    gain = getattr(mod, "gain", None)
    if isinstance(gain, torch.Tensor) and gain.size(0) == mod.out_channels:
        tr.slot(gain, 0, atoms, "out")
    local = conv_inputs(tr, mod, chan, atoms)
    if local is not None:
        tr.norm_site("wstd", name, "weight standardisation", local)
    tr.set(out, _shape_for(out.dim(), 1, atoms))


def sliced_inputs(mod: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a weight-standardised conv that reads the kept (local) input channels only: the reference for a
    "wstd" site. Its standardisation then runs over the kept columns, as the pruned layer's does."""
    small = copy.copy(mod)
    small._parameters = dict(mod._parameters)
    small._forward_hooks, small._forward_pre_hooks = type(mod._forward_hooks)(), type(mod._forward_pre_hooks)()
    small.weight = nn.Parameter(mod.weight.detach().index_select(1, keep.to(mod.weight.device)),
                                requires_grad=False)
    small.in_channels = int(keep.numel()) * mod.groups
    return small
