"""timm modules whose forward splits a channel dim by sizes stored at construction (issue #3).

``torch.split(x, self.splits)`` with equal parts is pruned part-aligned (the same channels leave every part, see
rules/movement.py ``_check_split``), but the stored sizes stay stale, so the dry run found the pruned forward
broken and kept
every group there: MixNet's ``MixedConv2d`` (0.92 of dense MACs at ratio 0.5), Res2Net's ``Bottle2neck`` (0.95),
SK-ResNet's ``SelectiveKernel`` (1.0), CSPNet's ``CrossStage`` (0.94), InceptionNeXt's ``InceptionDWConv2d``. Each
updater reads the new sizes from the module's own (already sliced) convolutions, never from a guess about which
int attribute was a channel count. Also timm's ``RelPosBias`` (MaxViT / CoAtNet ``*_rw``, GCViT) and
``RelPosMlp``, whose ``bias_shape`` / ``num_heads`` stored at construction must follow their sliced heads.
Registered by class name: timm is never imported here."""
from __future__ import annotations

from typing import Any

from torch import nn

from secateur.graph.modules import UPDATERS_BY_NAME, heads_updater
from secateur.graph.ties import COUNTED_BY


def _first_conv(mod: nn.Module) -> nn.Conv2d | None:
    return next((m for m in mod.modules() if isinstance(m, nn.Conv2d)), None)


def _set(mod: nn.Module, **attrs) -> dict[str, Any]:
    for k, v in attrs.items():
        setattr(mod, k, v)
    return attrs


def _mixed_conv(mod, old):
    """``MixedConv2d`` (a ModuleDict of convs, one per kernel size): ``splits`` are their input widths."""
    convs = list(mod.values())
    splits = [int(c.in_channels) for c in convs]
    return _set(mod, splits=splits, in_channels=sum(splits), out_channels=sum(int(c.out_channels) for c in convs))


def _bottle2neck(mod, old):
    """Res2Net ``Bottle2neck``: ``width`` is every scale's conv input width."""
    return _set(mod, width=int(mod.convs[0].in_channels))


def _selective_kernel(mod, old):
    """``SelectiveKernel``: with ``split_input`` the input is split into ``num_paths`` equal parts."""
    conv = _first_conv(mod.paths[0])
    n = int(conv.in_channels) * (mod.num_paths if mod.split_input else 1)
    return _set(mod, in_channels=n, out_channels=int(conv.out_channels))


def _cross_stage(mod, old):
    """CSPNet ``CrossStage`` / ``CrossStage3``: the expanded features are split in two halves of
    ``expand_chs // 2``; the new width is ``conv_exp``'s output (part-aligned halves stay equal)."""
    conv = _first_conv(mod.conv_exp) if mod.conv_exp is not None else None
    if conv is None:
        return heads_updater(mod, old)
    return _set(mod, expand_chs=int(conv.out_channels))


def _rel_pos_bias(mod, old):
    """timm ``RelPosBias`` (MaxViT / CoAtNet ``*_rw`` models): ``get_bias`` views the gathered table as
    ``bias_shape = (N, N, heads)``; the heads are the table's (sliced) columns."""
    shape = tuple(old.get("bias_shape") or mod.bias_shape)
    return _set(mod, bias_shape=shape[:-1] + (int(mod.relative_position_bias_table.shape[1]),))


def _rel_pos_mlp(mod, old):
    """timm ``RelPosMlp`` (``*_rmlp_*`` MaxViT / CoAtNet, Swin V2 CR style): the bias MLP's outputs are the heads;
    ``get_bias`` views them with ``num_heads`` and ``bias_shape``."""
    fc2 = getattr(mod.mlp, "fc2", None)
    if not isinstance(fc2, nn.Linear):
        return {}
    heads = int(fc2.weight.shape[0])
    shape = tuple(old.get("bias_shape") or mod.bias_shape)
    return _set(mod, num_heads=heads, bias_shape=shape[:-1] + (heads,))


def _inception_dw(mod, old):
    """InceptionNeXt ``InceptionDWConv2d``: (identity, hw, w, h) parts. Equal parts shrink alike (the identity part
    too); unequal ones are kept whole by the engine, so the sizes then stay."""
    gc = int(mod.dwconv_hw.in_channels)
    before = tuple(old.get("split_indexes") or mod.split_indexes)
    if gc == before[1]:
        return {}
    if len(set(before)) != 1:  # not reached: unequal parts are never pruned (rules/movement.py _check_split)
        return {}
    return _set(mod, split_indexes=(gc, gc, gc, gc))


def _levit_attn(mod, old):
    """LeViT ``Attention`` / ``AttentionDownsample``: q, k, v are read per head with ``view(B, N, num_heads, -1)``
    and ``split([key_dim, key_dim, val_dim])``, the result reshaped to ``val_attn_dim``; the heads are the rows of
    the (sliced) ``attention_biases`` table [heads, offsets], which is gathered and added to every head's scores."""
    heads = int(mod.attention_biases.shape[0])
    if heads == old.get("num_heads"):
        return {}
    return _set(mod, num_heads=heads, key_attn_dim=mod.key_dim * heads, val_attn_dim=mod.val_dim * heads)


def _tiny_vit_attn(mod, old):
    """TinyViT ``Attention``: as LeViT's (``view(B, N, num_heads, -1).split([key_dim, key_dim, val_dim])``), the
    result reshaped to ``out_dim`` = heads x ``val_dim``; the heads are the rows of ``attention_biases``."""
    heads = int(mod.attention_biases.shape[0])
    if heads == old.get("num_heads"):
        return {}
    return _set(mod, num_heads=heads, out_dim=mod.val_dim * heads)


def _efficientformer_v2_attn(mod, old):
    """EfficientFormerV2 ``Attention2d`` / ``Attention2dDownsample``: q, k and v are reshaped with ``num_heads``
    (their counts tied, graph/ties.py ``COUNTED_BY``), the result with ``dh`` = heads x ``d``; the q/k heads are
    the rows of ``attention_biases``, the v heads the outputs of ``v``. The talking heads' convs (their own width,
    not reshaped) are set by the conv updater."""
    heads = int(mod.attention_biases.shape[0])
    if heads == old.get("num_heads"):
        return {}
    return _set(mod, num_heads=heads, dh=int(mod.v.conv.weight.shape[0]))  # not out_channels: set later


def _conv_rel_pos_enc(mod, old):
    """CoaT ``ConvRelPosEnc`` (shared by a stage's attentions): ``torch.split(v, channel_splits)`` feeds one
    depthwise conv per window size, each over a section of whole heads; the sections are the convs' (sliced)
    widths, ``head_splits`` and the ``window`` dict (window -> heads) their head counts."""
    splits = [int(c.weight.shape[0]) for c in mod.conv_list]
    before = list(old.get("channel_splits") or mod.channel_splits)
    if splits == before:
        return {}
    heads = list(mod.head_splits)
    per = {b // h for b, h in zip(before, heads)}
    if len(per) != 1 or any(s % next(iter(per)) for s in splits):  # not whole heads: the dry run decides
        return _set(mod, channel_splits=splits)
    heads = [s // next(iter(per)) for s in splits]
    return _set(mod, channel_splits=splits, head_splits=heads, window=dict(zip(mod.window, heads)))


for _name, _fn in {"timm.layers.mixed_conv2d.MixedConv2d": _mixed_conv,
                   "timm.models.res2net.Bottle2neck": _bottle2neck,
                   "timm.layers.selective_kernel.SelectiveKernel": _selective_kernel,
                   "timm.models.cspnet.CrossStage": _cross_stage,
                   "timm.models.cspnet.CrossStage3": _cross_stage,
                   "timm.models.inception_next.InceptionDWConv2d": _inception_dw,
                   "timm.layers.pos_embed_rel.RelPosBias": _rel_pos_bias,
                   "timm.layers.pos_embed_rel.RelPosMlp": _rel_pos_mlp,
                   "timm.models.levit.Attention": _levit_attn,
                   "timm.models.levit.AttentionDownsample": _levit_attn,
                   "timm.models.tiny_vit.Attention": _tiny_vit_attn,
                   "timm.models.efficientformer_v2.Attention2d": _efficientformer_v2_attn,
                   "timm.models.efficientformer_v2.Attention2dDownsample": _efficientformer_v2_attn,
                   "timm.models.coat.ConvRelPosEnc": _conv_rel_pos_enc}.items():
    UPDATERS_BY_NAME[_name] = _fn
COUNTED_BY["timm.models.efficientformer_v2.Attention2d"] = ("num_heads", ("q", "k", "v"))
COUNTED_BY["timm.models.efficientformer_v2.Attention2dDownsample"] = ("num_heads", ("q", "k", "v"))
