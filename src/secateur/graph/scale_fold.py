"""Head dims of attention whose softmax scale follows the head size: the scale change folded into the query rows.

``F.scaled_dot_product_attention`` without ``scale`` (timm's ``Attention`` and ``ConvAttention``, many hand-written
blocks) uses ``1/sqrt(d)`` with ``d`` read from q's last dim. Keeping ``d'`` of ``d`` dims per head then computes
``q'.k' / sqrt(d')``, where the oracle's reference (removed dims zeroed) computes ``q'.k' / sqrt(d)``. Multiplying the
kept q rows of the Linear or conv that produces q (weight and bias) by ``sqrt(d'/d)`` gives back exactly
``q'.k' / sqrt(d)``: reshapes, permutes and chunks between that producer and the call are linear and pass the factor
through. Anything else on the way is not known to: a norm over q (timm ``q_norm``: its affine parameters hold q's
channels), a bias or position term from another tensor, q read by another consumer, q and k one tensor. There the
fold is refused and q/k dims are kept (noted); a one-head attention is then one unit, as before.

Why fold at the producer rather than keep the dims: the q/k dims are half of what an attention's head dims cost
(timm's ViT-Ti under ``heads="head_dim"``: 0.432 of its MACs with them kept), and a one-head attention (timm's
cpubone) has no other unit at all. Why not change the call: the pruned model must stay an ordinary module running its
own code. The folded weights are what the pruned model holds, so ``secateur.save`` / ``load`` reproduce them; the
structure record also names each fold (``scale_folds``) for whoever reads it. A float attribute of the calling module
equal to ``1/sqrt(d)`` (timm's ``self.scale``, read only by its eager path ``q * self.scale``) becomes ``1/sqrt(d')``
(``stored_scales``, recorded as a size attribute): switching ``fused_attn`` off after pruning gives the same logits.

The eager path itself (``(q * scale) @ k^T`` as separate ops) is not folded: the matmul rule makes each head one unit
there (whole heads), whatever the scale's origin, since a scalar computed from ``q.size(-1)`` and a stored one look
the same to the capture.

The fold is proven, not assumed: ``structured/proof.py`` compares the attention logits (``q.k * scale``) of every
SDPA call of the pruned copy with the reference's on the example input, which a wrong scale moves by tens of
percent even where the softmax on random weights hides it; a plan whose folds fail keeps those q/k dims."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from secateur.errors import fail


@dataclass
class ScaleFold:
    """One SDPA call whose q/k head dims are units although its scale follows the head size. ``head_size``: q's last
    dim at the call; ``heads``: query heads; ``targets``: (module, tensor, dim, positions) of the q rows to scale
    (positions in the unpruned tensor); ``where``: the calling module."""
    where: str
    head_size: int
    heads: int
    units: torch.Tensor  # [heads, head_size]: the group channel each q dim belongs to
    targets: list[tuple[str, str, int, torch.Tensor]] = field(default_factory=list)

    def kept(self, chans: torch.Tensor) -> int:
        """q's head size once the group's channels ``chans`` are removed (the same count from every head that stays;
        a unit may hold one dim of every head, where a reshape made them one, or a whole head, where the heads'
        dims were collapsed into heads: a head removed whole leaves the others' size as it was)."""
        per = torch.isin(self.units, chans).sum(dim=1)
        per = per[per < self.head_size]
        if bool((per != per[:1]).any()):
            raise fail("internal: a scale fold's heads lose different counts", where=self.where,
                       value=per.tolist())
        return self.head_size - (int(per[0]) if per.numel() else 0)

    def factor(self, chans: torch.Tensor) -> float:
        """``sqrt(d'/d)``: what q's kept rows are multiplied by."""
        return (self.kept(chans) / self.head_size) ** 0.5


def record(tr: Any, lq: torch.Tensor, lk: torch.Tensor, lv: torch.Tensor | None, head_size: int,
           one_head: bool) -> None:
    """Called by the SDPA rule where the scale follows the head size: q/k dims are units, pending ``resolve``."""
    tr.folds.append({"q": lq.clone(), "k": lk.clone(), "v": None if lv is None else lv.clone(), "d": head_size,
                     "where": tr.where(), "one_head": one_head})


def _refuse(tr: Any, fold: dict, why: str) -> None:
    """Keep the q/k dims of ``fold``'s call (a one-head attention: the whole head is one unit, never pruned)."""
    if fold["one_head"]:
        labs = [lab.reshape(-1) for lab in (fold["q"], fold["k"], fold["v"]) if lab is not None]
        every = torch.cat(labs)
        tr.atoms.union(every, every[:1].expand_as(every))
        tr.notes.append(f"{fold['where']}: aten::_scaled_dot_product_attention scale follows the head size and {why}: "
                        "the one head is one unit (kept)")
    else:
        tr.atoms.block(fold["q"])
        tr.atoms.block(fold["k"])
        tr.notes.append(f"{fold['where']}: attention scale follows q's head size and {why}; q/k head dims are kept")


def resolve(tr: Any, graph: Any) -> bool:
    """Attach a ``ScaleFold`` to the group of each recorded call's q/k units, or refuse the fold (``_refuse``).
    Returns True where something was refused: the caller recomputes the groups."""
    refused = False
    pending = []
    for fold in tr.folds:
        why, found = _targets(tr, graph, fold)
        if why is not None:
            _refuse(tr, fold, why)
            refused = True
        elif found is not None:
            pending.append(found)
    if refused:
        tr.folds = [f for f in tr.folds if f.get("ok")]
        return True
    for g, sf in pending:
        g.scale_fold = sf
    return False


def _targets(tr: Any, graph: Any, fold: dict) -> tuple[str | None, tuple | None]:
    """(why the fold is refused, None) or (None, (group, ScaleFold)); (None, None) where the units are not
    prunable anyway (blocked elsewhere)."""
    q, k = fold["q"].reshape(-1), fold["k"].reshape(-1)
    if bool((q < 0).any()) or bool((k < 0).any()):
        return "q or k holds unlabelled positions", None
    if bool(torch.isin(q, k).any()):
        return "q and k are one tensor", None
    root, where = graph.root, graph.where
    gl = where[root[q]][:, 0]
    if bool((gl < 0).all()):
        fold["ok"] = True
        return None, None
    if bool((gl < 0).any()) or int(gl.min()) != int(gl.max()):
        return "its q/k units are not one group", None
    group = graph.groups[int(gl[0])]
    comp = root[q].unique()
    targets, covered = [], torch.zeros(0, dtype=torch.long)
    qset = q.unique()
    for key, slot in tr.slots.items():
        raw = slot["atoms"]
        mine = torch.isin(root[raw], comp)
        if not bool(mine.any()):
            continue
        # (other atoms of the group: v dims a reshape made one with q/k dims, or a term added to q, which the
        # logits proof refuses: its rows are not scaled)
        is_q = torch.isin(raw, qset) & mine
        if not bool(is_q.any()):
            continue
        if slot["kind"] == "in":
            return f"q is also read by {key[0]}", None
        if slot["kind"] != "out":
            return f"q passes through {key[0]} (a norm or a scale on the way)", None
        pos = is_q.nonzero().flatten()
        targets.append((slot["module"], slot["name"], slot["dim"], pos))
        covered = torch.cat([covered, raw[pos]])
    if not targets or not bool(torch.isin(qset, covered).all()):
        return "q is not made by a Linear or convolution the engine slices", None
    fold["ok"] = True
    heads = int(fold["q"].size(0))
    units = where[root[fold["q"]]][..., 1]
    if bool((units == units[:, :1]).all()):  # each head one unit (dims collapsed into heads): the size never changes
        return None, None
    return None, (group, ScaleFold(fold["where"], int(fold["d"]), heads, units, targets))


def stored_scales(model: Any, fold: ScaleFold, kept: int) -> dict[str, float]:
    """Float attributes of the calling module equal to ``1/sqrt(head size)`` (timm's ``self.scale``), set to
    ``1/sqrt(kept)``: the module's eager path (``q * self.scale``, taken where ``fused_attn`` is off) then computes
    ``q'.k' * sqrt(kept/d) / sqrt(kept)``, the folded SDPA path's logits, so both paths stay the reference's."""
    import math
    try:
        mod = model.get_submodule(fold.where)
    except AttributeError:
        return {}
    old = fold.head_size ** -0.5
    return {k: kept ** -0.5 for k, v in vars(mod).items()
            if isinstance(v, float) and not k.startswith("_") and math.isclose(v, old, rel_tol=1e-9)}
