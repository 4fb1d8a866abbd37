"""torchvision's window attentions (Swin V1/V2 ``ShiftedWindowAttention[V2]``, Video Swin
``ShiftedWindowAttention3d``, MaxViT ``RelativePositionalMultiHeadAttention``): whole heads or per-head dims, the
residual stream around them, and the modules a pruned one becomes.

Video Swin is the same attention over 3D windows ([B, T, H, W, C], window and shift per dim, a 3D bias table
``[distances, heads]``): its stock forward also reads the head size from the input's channels, so it had no rule
and every swin3d stayed at 0.68-0.69 of dense parameters at ratio 0.5. It shares the rule, the updater and the
pruned forward (the window helpers are N-d); only its window / shift adaptation differs (torchvision shrinks a
window to an input that is not larger, drops that shift, and reads the bias of the shrunk window).

Why leaf rules and pruned variants: both stock forwards read the inner attention size from the *input's* channel
count (Swin calls ``shifted_window_attention(x, self.qkv.weight, ...)`` with ``C // num_heads`` as head size and
``reshape(..., C)`` before the projection; MaxViT reshapes ``[B, G, P, D]`` with the input's ``D``), so the
residual stream (embed dim) and the heads can only shrink together there. Traced op by op, Swin's weights are used
outside their ``nn.Linear`` (constants: the whole stream was all-or-nothing) and the per-head relative position
bias is a gathered constant (all heads one unit). Handled as one op instead: input channels are qkv's columns;
each head owns its q/k/v rows, its bias-table column (Swin V2: its ``cpb_mlp`` output row and ``logit_scale``) and
its projection columns; the projection's rows are new channels (the residual stream joins them at the add). A
pruned module becomes ``Pruned<Class>``: same parameters and names, ``isinstance`` still true, a forward whose
inner size is ``num_heads * v_head_dim`` whatever the input size, and the softmax scale of the original. torchvision is never imported here: rules are registered by class name, and the pruned classes are
built on first use (module ``__getattr__``, so ``pickle`` and ``secateur.load`` find them too).

``heads="head_dim"``: every head loses the same number of q/k dims (q dim d and k dim d of a head together: zeroing
both drops one term of q.k, and of Swin V2's cosine normalisation too) and of v dims (with the projection columns
they feed); head counts and per-head tensors stay, Swin V1 keeps the original softmax scale in ``scale`` (MaxViT
stores its own), and the value head size ``v_head_dim`` may differ from ``head_dim``."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import (LAZY_CLASSES, LEAVES_BY_NAME, UPDATERS_BY_NAME, _channels, _consumed, _input,
                                    _shape_for)

_SWIN = "torchvision.models.swin_transformer"
_SWIN3D = "torchvision.models.video.swin_transformer"
_MAXVIT = "torchvision.models.maxvit"
BASES = {"PrunedShiftedWindowAttention": (_SWIN, "ShiftedWindowAttention"),
         "PrunedShiftedWindowAttentionV2": (_SWIN, "ShiftedWindowAttentionV2"),
         "PrunedShiftedWindowAttention3d": (_SWIN3D, "ShiftedWindowAttention3d"),
         "PrunedRelativePositionalMultiHeadAttention": (_MAXVIT, "RelativePositionalMultiHeadAttention")}


# ---------------------------------------------------------------- pruned forwards
def _windows(x: torch.Tensor, win: tuple[int, ...]) -> torch.Tensor:
    """[B, *sizes, C] -> [B * windows, prod(win), C], windows in row-major order per sample (2D or 3D)."""
    n, b, c = len(win), x.size(0), x.size(-1)
    x = x.view(b, *[v for s, w in zip(x.shape[1:-1], win) for v in (s // w, w)], c)
    x = x.permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
    return x.reshape(-1, math.prod(win), c)


def _unwindows(x: torch.Tensor, b: int, sizes: tuple[int, ...], win: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``_windows``."""
    n = len(win)
    x = x.view(b, *[s // w for s, w in zip(sizes, win)], *win, x.size(-1))
    x = x.permute(0, *[v for i in range(1, n + 1) for v in (i, i + n)], 2 * n + 1)
    return x.reshape(b, *sizes, -1)


def _bands(n: int, win: int, shift: int) -> list[slice]:
    """Rows (or columns) that came from the same side of the cyclic shift: one band when nothing was shifted."""
    return [slice(0, n)] if shift == 0 else [slice(0, n - win), slice(n - win, n - shift), slice(n - shift, n)]


def _shift_mask(like: torch.Tensor, sizes: tuple[int, ...], win: tuple[int, ...], shift: tuple[int, ...]
                ) -> torch.Tensor:
    """[windows, N, N] additive mask: tokens of one window that were not neighbours before the roll (-100)."""
    import itertools
    region = like.new_zeros(sizes)
    for i, cell in enumerate(itertools.product(*[_bands(n, w, s) for n, w, s in zip(sizes, win, shift)])):
        region[cell] = i
    ids = _windows(region[None, ..., None], win)[..., 0]
    apart = ids.unsqueeze(1) != ids.unsqueeze(2)
    return like.new_zeros(apart.shape).masked_fill_(apart, -100.0)


def _swin_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention whose inner size (``num_heads * head_dim``) need not equal the input's channels;
    otherwise the stock computation (pad, roll, windows, scaled or cosine attention + relative bias + shift mask,
    projection, back). 2D Swin keeps its window and drops a shift where the window covers the padded input; video
    Swin (``ShiftedWindowAttention3d``, [B, T, H, W, C]) shrinks the window to the input where it is not larger,
    drops that shift, and reads the bias for the shrunk window, as torchvision does."""
    sizes = tuple(x.shape[1:-1])
    if len(sizes) == 3:
        win = tuple(min(s, w) for s, w in zip(sizes, self.window_size))
        shift = tuple(0 if s <= w else sh for s, w, sh in zip(sizes, self.window_size, self.shift_size))
        bias = self.get_relative_position_bias(list(win))
    else:
        win, bias = tuple(self.window_size), self.get_relative_position_bias()
    pad = [(-s) % w for s, w in zip(sizes, win)]
    x = F.pad(x, [0, 0] + [v for p in reversed(pad) for v in (0, p)])
    padded = tuple(x.shape[1:-1])
    if len(sizes) == 2:
        shift = tuple(sh if w < p else 0 for sh, w, p in zip(self.shift_size, win, padded))
    dims = tuple(range(1, len(sizes) + 1))
    if any(shift):
        x = torch.roll(x, shifts=tuple(-v for v in shift), dims=dims)
    return _window_attention(self, x, bias, padded, win, shift, dims)[(slice(None),) + tuple(
        slice(0, s) for s in sizes)].contiguous()


def _window_attention(self, x: torch.Tensor, bias: torch.Tensor, padded: tuple[int, ...], win: tuple[int, ...],
                      shift: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """The attention over the windows of the padded, rolled ``x``, rolled back (still padded)."""
    heads, dq, dv = self.num_heads, self.head_dim, getattr(self, "v_head_dim", self.head_dim)
    cosine = getattr(self, "logit_scale", None) is not None
    b = x.size(0)
    tokens = _windows(x, win)
    qkv_bias = self.qkv.bias
    n = heads * dq
    if cosine and qkv_bias is not None:  # V2 has no key bias (its slot is zeroed on every call)
        qkv_bias = torch.cat([qkv_bias[:n], torch.zeros_like(qkv_bias[n:2 * n]), qkv_bias[2 * n:]])
    qkv = F.linear(tokens, self.qkv.weight, qkv_bias).split([n, n, heads * dv], dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv)  # [windows, heads, N, d]
    if cosine:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
    else:  # the scale of the original head size (head dims may have been removed since)
        attn = (q * getattr(self, "scale", dq ** -0.5)) @ k.transpose(-2, -1)
    attn = attn + bias
    n_tok = tokens.size(1)
    if any(shift):
        mask = _shift_mask(x, padded, win, shift)
        attn = (attn.view(b, -1, heads, n_tok, n_tok) + mask.unsqueeze(1)).view(-1, heads, n_tok, n_tok)
    attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
    y = (attn @ v).transpose(1, 2).reshape(tokens.size(0), n_tok, heads * dv)
    y = F.dropout(F.linear(y, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)
    y = _unwindows(y, b, padded, win)
    return torch.roll(y, shifts=shift, dims=dims) if any(shift) else y


def _maxvit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MaxViT's relative-position attention over ``[B, G, P, D]`` with an inner size ``n_heads * v_head_dim`` that
    need not equal ``D``; the stored ``scale_factor`` (of the original width) is kept."""
    b, g, p, _ = x.shape
    heads, dq, dv = self.n_heads, self.head_dim, getattr(self, "v_head_dim", self.head_dim)
    qkv = self.to_qkv(x).split([heads * dq, heads * dq, heads * dv], dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in qkv)  # [B, G, heads, P, d]
    attn = q @ (k * self.scale_factor).transpose(-2, -1)
    attn = F.softmax(attn + self.get_relative_positional_bias(), dim=-1)
    out = (attn @ v).transpose(-3, -2).reshape(b, g, p, heads * dv)
    return self.merge(out)


_FORWARDS = {"PrunedShiftedWindowAttention": _swin_forward, "PrunedShiftedWindowAttentionV2": _swin_forward,
             "PrunedShiftedWindowAttention3d": _swin_forward,
             "PrunedRelativePositionalMultiHeadAttention": _maxvit_forward}
_BUILT: dict[str, type] = {}


def pruned_class(name: str) -> type:
    """The pruned variant ``name`` (a key of ``BASES``), built once as a subclass of the torchvision class."""
    if name not in _BUILT:
        import importlib
        module, base = BASES[name]
        cls = getattr(importlib.import_module(module), base)
        doc = f"A pruned ``{base}``: inner size ``heads * head_dim`` independent of the input (secateur)."
        _BUILT[name] = type(name, (cls,), {"forward": _FORWARDS[name], "__module__": __name__, "__doc__": doc,
                                           "__qualname__": name})
    return _BUILT[name]


def __getattr__(name: str) -> Any:  # PEP 562: pickle and secateur.load find the pruned classes by name
    if name in BASES:
        return pruned_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _name in BASES:
    LAZY_CLASSES[f"{__name__}.{_name}"] = (lambda n: lambda: pruned_class(n))(_name)


# ---------------------------------------------------------------- capture
def _heads(tr: Tracer, mod: nn.Module, args, kwargs, out, qkv: nn.Linear, proj: nn.Linear, heads: int,
           per_head: list[tuple[torch.Tensor, int]]) -> None:
    """Input channels -> qkv columns. Whole heads: head h owns its q/k/v rows (layout [q | k | v], each
    [heads, head size]), the ``per_head`` slices and its ``proj`` columns. Head dims: q/k dim d of head h is one
    unit, v dim d of head h another (with its ``proj`` column); every head loses as many. proj's rows are new
    channels."""
    x = _input(args, kwargs)
    dv = proj.weight.shape[1] // heads
    dq = (qkv.weight.shape[0] - heads * dv) // (2 * heads)
    if proj.weight.shape[1] != heads * dv or qkv.weight.shape[0] != heads * (2 * dq + dv):
        raise tr.error(f"{type(mod).__name__}: qkv rows {qkv.weight.shape[0]} and projection inputs "
                       f"{proj.weight.shape[1]} do not split into {heads} heads", x)
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(qkv.weight, 1, _consumed(tr, chan), "in")
    if tr.head_dim:
        qk, v = tr.atoms.new(heads * dq), tr.atoms.new(heads * dv)
        tr.blocks += [qk.view(heads, dq), v.view(heads, dv)]
        tr.contracted.append(qk)  # zeroing q and k rows is the oracle's reference there
        rows, vrows = torch.cat([qk, qk, v]), v
    else:
        units = tr.atoms.new(heads)
        vrows = units.repeat_interleave(dv)
        rows = torch.cat([units.repeat_interleave(dq), units.repeat_interleave(dq), vrows])
        for t, dim in per_head:
            tr.slot(t, dim, units, "param")
    tr.slot(qkv.weight, 0, rows, "out", consumer=tr.head_dim)
    if qkv.bias is not None:
        tr.slot(qkv.bias, 0, rows, "out", consumer=tr.head_dim)
    tr.slot(proj.weight, 1, vrows, "in")
    atoms = tr.atoms.new(proj.weight.shape[0])
    tr.slot(proj.weight, 0, atoms, "out")
    if proj.bias is not None:
        tr.slot(proj.bias, 0, atoms, "out")
    tr.set(out, _shape_for(out.dim(), -1, atoms))


def _swin(tr: Tracer, mod, args, kwargs, out) -> None:
    if getattr(mod, "logit_scale", None) is not None:  # V2: the bias comes from cpb_mlp's last layer
        per_head = [(mod.cpb_mlp[-1].weight, 0), (mod.logit_scale, 0)]
        if getattr(mod.cpb_mlp[-1], "bias", None) is not None:
            per_head.append((mod.cpb_mlp[-1].bias, 0))
    else:
        per_head = [(mod.relative_position_bias_table, 1)]
    _heads(tr, mod, args, kwargs, out, mod.qkv, mod.proj, mod.num_heads, per_head)


def _maxvit(tr: Tracer, mod, args, kwargs, out) -> None:
    _heads(tr, mod, args, kwargs, out, mod.to_qkv, mod.merge, mod.n_heads, [(mod.relative_position_bias_table, 1)])


for _cls in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
    LEAVES_BY_NAME[f"{_SWIN}.{_cls}"] = _swin
    LEAVES_BY_NAME[f"{__name__}.Pruned{_cls}"] = _swin
LEAVES_BY_NAME[f"{_SWIN3D}.ShiftedWindowAttention3d"] = _swin  # video Swin: the same heads, a 3D window
LEAVES_BY_NAME[f"{__name__}.PrunedShiftedWindowAttention3d"] = _swin
LEAVES_BY_NAME[f"{_MAXVIT}.RelativePositionalMultiHeadAttention"] = _maxvit
LEAVES_BY_NAME[f"{__name__}.PrunedRelativePositionalMultiHeadAttention"] = _maxvit


# ---------------------------------------------------------------- size attributes
def _become(mod: nn.Module, name: str) -> dict[str, Any]:
    mod.__class__ = pruned_class(name)
    return {"__class__": f"{__name__}.{name}"}


def _sizes(heads: int, qkv: nn.Linear, proj: nn.Linear) -> tuple[int, int]:
    """(q/k head size, v head size) from the sliced projections."""
    dv = int(proj.weight.shape[1]) // heads
    return (int(qkv.weight.shape[0]) - heads * dv) // (2 * heads), dv


def _swin_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """Head count from the per-head tensors, head sizes from the projections; V1's softmax scale stays the one of
    the original head size (the stock forward derives it from the input's channels)."""
    v2 = getattr(mod, "logit_scale", None) is not None
    heads = int(mod.logit_scale.shape[0]) if v2 else int(mod.relative_position_bias_table.shape[1])
    if not v2 and not isinstance(getattr(mod, "scale", None), float):
        mod.scale = float(old["_children_out"]["qkv"] // 3 // old["num_heads"]) ** -0.5
    mod.num_heads = heads
    mod.head_dim, mod.v_head_dim = _sizes(heads, mod.qkv, mod.proj)
    return {"num_heads": heads, "head_dim": mod.head_dim, "v_head_dim": mod.v_head_dim,
            **({} if v2 else {"scale": mod.scale}),
            **_become(mod, "PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention3d"
                      if "3d" in type(mod).__name__ else "PrunedShiftedWindowAttention")}


def _maxvit_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    mod.n_heads = int(mod.relative_position_bias_table.shape[1])
    mod.head_dim, mod.v_head_dim = _sizes(mod.n_heads, mod.to_qkv, mod.merge)
    return {"n_heads": mod.n_heads, "head_dim": mod.head_dim, "v_head_dim": mod.v_head_dim,
            **_become(mod, "PrunedRelativePositionalMultiHeadAttention")}


def _partition_layer(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """MaxViT's ``PartitionAttentionLayer.n_heads`` / ``head_dim`` (informational): its attention's."""
    attn = [m for m in mod.attn_layer if hasattr(m, "relative_position_bias_table")]
    if len(attn) != 1:
        return {}
    mod.n_heads = int(attn[0].relative_position_bias_table.shape[1])
    mod.head_dim = _sizes(mod.n_heads, attn[0].to_qkv, attn[0].merge)[0]
    return {"n_heads": mod.n_heads, "head_dim": mod.head_dim}


def _patch_merging(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """Swin's ``PatchMerging.dim`` (informational): the merged input is 4 * dim wide."""
    mod.dim = int(mod.reduction.weight.shape[1]) // 4
    return {"dim": mod.dim}


_ATTRS: dict[str, Callable[[nn.Module, dict[str, Any]], dict[str, Any]]] = {
    f"{_SWIN}.ShiftedWindowAttention": _swin_attrs, f"{_SWIN}.ShiftedWindowAttentionV2": _swin_attrs,
    f"{__name__}.PrunedShiftedWindowAttention": _swin_attrs, f"{__name__}.PrunedShiftedWindowAttentionV2": _swin_attrs,
    f"{_SWIN3D}.ShiftedWindowAttention3d": _swin_attrs, f"{__name__}.PrunedShiftedWindowAttention3d": _swin_attrs,
    f"{_MAXVIT}.RelativePositionalMultiHeadAttention": _maxvit_attrs,
    f"{__name__}.PrunedRelativePositionalMultiHeadAttention": _maxvit_attrs,
    f"{_MAXVIT}.PartitionAttentionLayer": _partition_layer,
    f"{_SWIN}.PatchMerging": _patch_merging, f"{_SWIN}.PatchMergingV2": _patch_merging,
}
UPDATERS_BY_NAME.update(_ATTRS)
