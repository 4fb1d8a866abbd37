"""Fused scaled-dot-product attention: heads or head dims, keeping q/k/v consistent, and the softmax scale."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch

from secateur.graph.rules.matmul import _join
from secateur.graph.rules.registry import _outs, _pad, aten, rule


# ---------------------------------------------------------------- attention
@rule(aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
      aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
      aten.scaled_dot_product_attention, aten._scaled_dot_product_fused_attention_overrideable)
def sdpa(tr, func, args, kwargs, out):
    """Whole heads: q, k, v of one head (and of one key/value group under GQA) go together; one key/value head
    broadcast to every query head (multi-query) is kept whole and the query heads stay free."""
    q, k, v = args[:3]
    mask = kwargs.get("attn_mask")
    if mask is None and len(args) > 3 and isinstance(args[3], torch.Tensor):
        mask = args[3]
    if tr.head_dim:
        return _sdpa_dims(tr, q, k, v, mask, kwargs.get("scale"), out)
    if q.dim() >= 3 and q.size(-3) == 1 and _labelled(tr, q, k, v):
        # one head: as a whole head it is one unit (never pruned, a group is never removed whole); its head dims
        # are the only way to prune it, so they are its units here, as under heads="head_dim". Where the scale
        # follows the head size, the change is folded into q's producer (graph/scale_fold.py), or, where it cannot
        # be, the head stays one unit: with only v's dims free the attention's width alone would change (pvt_v2's
        # stage-1 attention, whose width count ties then hold to the stream's, lost its ties that way: 0.387 ->
        # 0.661 of its MACs)
        tr.notes.append(f"{tr.where()}: one attention head: its head dims are pruned instead of whole heads (q/k "
                        "dims together, v dims with what reads them)")
        return _sdpa_dims(tr, q, k, v, mask, kwargs.get("scale"), out, one_head=True)
    heads = []
    for t in (q, k, v, mask):  # a per-head mask (T5's relative position bias) goes with its head
        if t is None or (t is mask and t.dim() < 3):
            heads.append(None)
            continue
        lab = _pad(tr.get(t), t.dim())
        if lab is None:
            heads.append(None)
            continue
        if (t is k or t is v) and t.size(-3) == 1 and q.size(-3) > 1:
            # one key / value head broadcast to every query head (multi-query: Falcon): joined, it tied every query
            # head into one unit. Kept whole instead (blocked), each query head stays a unit of its own: exact for any
            # plan, since head h's output reads only its query and the shared key / value
            tr.atoms.block(lab)
            heads.append(None)
            continue
        lab = tr.atoms.collapse(lab, [t.dim() - 2, t.dim() - 1])
        if lab.size(-3) > 1 and lab.size(-3) != q.size(-3):  # GQA: one kv head serves H/Hkv query heads
            lab = lab.repeat_interleave(q.size(-3) // lab.size(-3), dim=-3)
        heads.append(lab)
    res = None
    for lab in heads:
        if lab is not None:
            res = _join(tr, res, lab)
    for t in _outs(out):
        if t.dim() == q.dim():
            tr.set(t, res)
        elif t.dim() == q.dim() - 1 and res is not None:
            tr.set(t, res[..., 0])
        else:
            tr.set(t, None)


def _labelled(tr, *ts) -> bool:
    return any(tr.get(t) is not None for t in ts)


def _head_rows(tr, t, heads):
    """Label of q/k/v [..., H, L, D] as [H, D] (sequence and batch collapsed; kv heads repeated under GQA)."""
    lab = _pad(tr.get(t), t.dim())
    if lab is None:
        return None
    lab = tr.atoms.collapse(lab, [d for d in range(t.dim()) if d not in (t.dim() - 3, t.dim() - 1)])
    lab = lab.reshape(lab.size(-3), lab.size(-1)).expand(t.size(-3), t.size(-1))
    if t.size(-3) != heads:
        lab = lab.repeat_interleave(heads // t.size(-3), dim=0)
    return lab.contiguous()


def _kept_scale(tr, scale, head_size) -> bool:
    """Will the pruned model still use this scale? Not when derived from q's size (``scale=None``), nor when it
    equals 1/sqrt(head size) and no module on the call stack stores it (it may be recomputed from an updated
    head size); a stored attribute (HF ``scaling``) is left as it is by the engine."""
    if scale is None:
        return False
    if not math.isclose(scale, head_size ** -0.5, rel_tol=1e-9):
        return True
    for name in tr.stack[1:]:
        try:
            mod = tr.model.get_submodule(name)
        except AttributeError:
            continue
        if any(isinstance(v, float) and math.isclose(v, scale, rel_tol=1e-9) for v in vars(mod).values()):
            return True
    return False


def _sdpa_dims(tr, q, k, v, mask, scale, out, one_head=False):
    """heads="head_dim": q dim d and k dim d of a head are one unit (removing both drops one term of q.k), v dim d
    of a head goes to the output's dim d. Where the scale follows the head size (no explicit ``scale``, or one
    equal to 1/sqrt(head size) that no module stores), the new scale is folded into q's producer rows
    (graph/scale_fold.py: recorded here, resolved with the groups, proven by the plan's numeric check)."""
    heads = q.size(-3)
    lq, lk, lv = _head_rows(tr, q, heads), _head_rows(tr, k, heads), _head_rows(tr, v, heads)
    if mask is not None and mask.dim() >= 3:
        tr.atoms.block(tr.get(mask))  # a per-head bias is untouched by head dims: its heads stay
    for lab in (lq, lk, lv):  # partly unlabelled heads (a constant head): nothing there can be split
        if lab is not None and bool((lab < 0).any()):
            tr.atoms.block(lq)
            tr.atoms.block(lk)
            tr.atoms.block(lv)
            lq = lk = lv = None
            break
    if lq is not None or lk is not None:
        if lq is None or lk is None:
            tr.atoms.block(lq)
            tr.atoms.block(lk)
        else:
            if not _kept_scale(tr, scale, q.size(-1)):
                from secateur.graph import scale_fold
                scale_fold.record(tr, lq, lk, lv, q.size(-1), one_head)
            tr.atoms.union(lq, lk)
            tr.blocks.append(lq)
            tr.contracted.append(lq.reshape(-1))
    if lv is not None:
        tr.blocks.append(lv)
        if lq is not None and lk is not None:
            tr.links.append((lq[0, 0], lv[0, 0]))
    for i, t in enumerate(_outs(out)):
        if i == 0 and lv is not None and t.dim() >= 3:
            shape = [1] * t.dim()
            shape[-3], shape[-1] = heads, t.size(-1)
            tr.set(t, lv.reshape(shape))
        else:
            tr.set(t, None)


_FUSED = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
          aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
          aten._scaled_dot_product_fused_attention_overrideable)


class MathAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` without a ``scale`` that runs its math decomposition (no fused kernel: q
    not contiguous in its last dim, dropout, a mask the kernels refuse): the decomposition multiplies q and k by
    ``q.size(-1) ** -0.25``, a number computed from the head size, which the op-level rules see as a constant. So
    head dims looked free there, and a pruned model computed another softmax scale. The numeric proof does not
    catch it on random weights (timm's cpubone_nano at init: q.k within +-0.24, so the halved head size moved the
    attention output 1 % and the logits less than the proof's 1e-4). After such a call the fused kernels' rule
    (``sdpa``) runs on its inputs and output, as if the fused kernel had run: whole heads (heads="heads"), or head
    dims with the scale change folded into q's rows (heads="head_dim", and a one-head attention: graph/scale_fold.py),
    each noted as the fused path notes it."""

    def __init__(self, tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.tracer.depth:
            return func(*args, **kwargs)
        calls = self.tracer.calls
        before = sum(calls.get(p, 0) for p in _FUSED)
        out = func(*args, **kwargs)
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        opts = {**dict(zip(names, args[3:])), **{k: v for k, v in kwargs.items() if k in names}}
        if (opts.get("scale") is None and len(args) >= 3 and sum(calls.get(p, 0) for p in _FUSED) == before
                and all(isinstance(t, torch.Tensor) for t in args[:3])):
            with no_dispatch():  # label ops, not the model's
                sdpa(self.tracer, None, tuple(args[:3]), {"attn_mask": opts.get("attn_mask")}, out)
        return out
