"""``nn.MultiheadAttention``: whole heads, head dims and the embed dim, and the module a pruned one becomes.

Why a subclass: the stock forward (``F.multi_head_attention_forward`` and the fused fast path) requires
``num_heads * head_dim == embed_dim`` and square q/k/v projections, so removing a head (or a head dim) without
removing as many channels of the residual stream cannot run there. A pruned MHA becomes
``PrunedMultiheadAttention``: the same parameters under the same names (``state_dict``, optimizers and
``isinstance(m, nn.MultiheadAttention)`` keep working), a forward that allows an inner size
``num_heads * head_dim`` different from ``embed_dim`` and a value head size ``v_head_dim`` different from
``head_dim``, and a ``scaling`` attribute that keeps the softmax scale of the *original* head size, so a pruned
model computes exactly what the original computes with the removed slices zeroed."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import STRUCTURE_CLASSES, _channels, _consumed, _shape_for, leaf, updater


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool masks (True = not allowed) as additive float masks, as the stock module reads them."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose heads, head dims or embed dim were removed (see the module docstring).
    Extra attributes: ``v_head_dim`` (value size per head) and ``scaling`` (softmax scale, kept from the original
    head size). ``_qkv_same_embed_dim`` is False so that ``TransformerEncoderLayer`` never takes the fused path,
    which assumes the unpruned layout."""

    v_head_dim: int
    scaling: float

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, hv = self.num_heads * self.head_dim, self.num_heads * self.v_head_dim
        if self.in_proj_weight is not None:
            return self.in_proj_weight.split([hq, hq, hv])
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt, bsz, _ = query.shape
        h, dq, dv = self.num_heads, self.head_dim, self.v_head_dim
        wq, wk, wv = self._projections()
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split([h * dq, h * dq, h * dv])
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        dtype = q.dtype
        # as the stock module: with the hint and nothing else to mask, sdpa's own causal mask is used (over the
        # keys after bias_k / the zero key are appended)
        hint = is_causal and key_padding_mask is None and not need_weights
        mask = None if hint else _float_mask(attn_mask, dtype)
        kpm = _float_mask(key_padding_mask, dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(tgt, bsz * h, dq).transpose(0, 1)
        k = k.reshape(k.size(0), bsz * h, dq).transpose(0, 1)
        v = v.reshape(v.size(0), bsz * h, dv).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz * h, 1, dq)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz * h, 1, dv)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        src = k.size(1)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.bmm(q * self.scaling, k.transpose(1, 2))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = torch.bmm(F.dropout(weights, p=p) if p > 0 else weights, v)
            weights = weights.view(bsz, h, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=hint,
                                                 scale=self.scaling)
        out = F.linear(out.transpose(0, 1).reshape(tgt, bsz, h * dv), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


STRUCTURE_CLASSES["secateur.graph.mha.PrunedMultiheadAttention"] = PrunedMultiheadAttention


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


@leaf(nn.MultiheadAttention, PrunedMultiheadAttention)
def multihead_attention(tr: Tracer, mod: nn.MultiheadAttention, args, kwargs, out):
    """Input columns follow the query/key/value channels; q/k/v rows and out_proj's input columns are whole
    heads (or, with ``heads="head_dim"``, per-head dims: q and k dim d of a head together, v dim d with the
    out_proj column it feeds); out_proj's rows are new output channels. Zeroing q/k rows removes their term from
    q.k, and the scale stays the original one (``PrunedMultiheadAttention.scaling``)."""
    query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    for i, n in ((3, "key_padding_mask"), (5, "attn_mask")):
        m = _arg(args, kwargs, i, n)
        if isinstance(m, torch.Tensor):
            tr.atoms.block(tr.get(m))  # masks never carry channels; if they do, keep them
    h, dq = mod.num_heads, mod.head_dim
    dv = getattr(mod, "v_head_dim", dq)
    cq, ck, cv = (_channels(tr, t, -1) for t in (query, key, value))
    if mod.in_proj_weight is not None:
        chans = [c for c in (cq, ck, cv) if c is not None]
        if len(chans) > 1:  # a column that reads a channel of the model's input (no producer) in one of them stays
            stacked = torch.stack(chans)
            tr.atoms.block(stacked[:, (stacked < 0).any(0)])
        for c in chans[1:]:  # one weight reads all three inputs: their channels are one set of columns
            tr.atoms.union(chans[0], c)
        if chans:
            tr.slot(mod.in_proj_weight, 1, _consumed(tr, chans[0]), "in")
    else:
        for w, c in ((mod.q_proj_weight, cq), (mod.k_proj_weight, ck), (mod.v_proj_weight, cv)):
            if c is not None:
                tr.slot(w, 1, _consumed(tr, c), "in")
    if tr.head_dim:
        qk, v = tr.atoms.new(h * dq), tr.atoms.new(h * dv)
        tr.blocks += [qk.view(h, dq), v.view(h, dv)]
        tr.contracted.append(qk)
        rq = rk = qk
        rv = v
    else:
        heads = tr.atoms.new(h)
        rq = rk = heads.repeat_interleave(dq)
        rv = heads.repeat_interleave(dv)
    if mod.in_proj_weight is not None:
        tr.slot(mod.in_proj_weight, 0, torch.cat([rq, rk, rv]), "out", consumer=tr.head_dim)
    else:
        for w, r in ((mod.q_proj_weight, rq), (mod.k_proj_weight, rk), (mod.v_proj_weight, rv)):
            tr.slot(w, 0, r, "out", consumer=tr.head_dim)
    if mod.in_proj_bias is not None:
        tr.slot(mod.in_proj_bias, 0, torch.cat([rq, rk, rv]), "out", consumer=tr.head_dim)
    if mod.bias_k is not None:
        tr.slot(mod.bias_k, 2, rk, "param")
        tr.slot(mod.bias_v, 2, rv, "param")
    tr.slot(mod.out_proj.weight, 1, rv, "in")
    atoms = tr.atoms.new(mod.out_proj.out_features)
    tr.slot(mod.out_proj.weight, 0, atoms, "out")
    if mod.out_proj.bias is not None:
        tr.slot(mod.out_proj.bias, 0, atoms, "out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    tr.set(outs[0], _shape_for(outs[0].dim(), -1, atoms))
    for t in outs[1:]:
        tr.set(t, None)


@updater(nn.MultiheadAttention)
def _mha(mod: nn.MultiheadAttention, old: dict[str, Any]) -> dict[str, Any]:
    """Sizes from the sliced tensors. Whole heads keep the head sizes; head dims keep the head count."""
    old_dq = old["head_dim"]
    old_dv = old.get("v_head_dim", old_dq)
    inner_v = int(mod.out_proj.weight.shape[1])
    if old.get("_heads") == "head_dim":
        h = old["num_heads"]
        dv = inner_v // h
    else:
        dv = old_dv
        h = inner_v // dv
    if mod.in_proj_weight is not None:
        rows, e = mod.in_proj_weight.shape
        dq = (int(rows) - inner_v) // (2 * h)
        kdim = vdim = int(e)
    else:
        dq = int(mod.q_proj_weight.shape[0]) // h
        e, kdim, vdim = (int(w.shape[1]) for w in (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight))
    scaling = getattr(mod, "scaling", float(old_dq) ** -0.5)
    mod.__class__ = PrunedMultiheadAttention
    mod.embed_dim, mod.kdim, mod.vdim = int(e), kdim, vdim
    mod.num_heads, mod.head_dim, mod.v_head_dim, mod.scaling = h, dq, dv, scaling
    mod._qkv_same_embed_dim = False
    return {"embed_dim": mod.embed_dim, "kdim": kdim, "vdim": vdim, "num_heads": h, "head_dim": dq,
            "v_head_dim": dv, "scaling": scaling, "_qkv_same_embed_dim": False,
            "__class__": "secateur.graph.mha.PrunedMultiheadAttention"}


@updater(nn.TransformerEncoder)
def _encoder(mod: nn.TransformerEncoder, old: dict[str, Any]) -> dict[str, Any]:
    """The nested-tensor fast path feeds its layers nested tensors only the stock fused kernels read; a pruned
    encoder runs its layers' own forwards (outputs at padded positions are then computed, not zero)."""
    if getattr(mod, "use_nested_tensor", False):
        mod.use_nested_tensor = False
        return {"use_nested_tensor": False}
    return {}
