"""Detection ops: RoI pooling and index_put writes into fresh tensors."""
from __future__ import annotations

from secateur.graph.rules.matmul import _join
from secateur.graph.rules.registry import BY_NAME, _outs, _pad, _tensors, aten, not_understood, rule


# ---------------------------------------------------------------- detection: RoI pooling, writes into a fresh tensor
def roi_pool(tr, func, args, kwargs, out):
    """``roi_align`` / ``roi_pool`` (features [N, C, H, W], boxes) -> [K, C, h, w]: each channel pooled on its own,
    so the boxes' crops carry the features' channels (position-sensitive variants mix them: not here)."""
    x = args[0]
    for t in _tensors(args[1:]):
        tr.atoms.block(tr.get(t))
    lab = _pad(tr.get(x), x.dim())
    lab = None if lab is None else tr.atoms.collapse(lab, [0, *range(2, x.dim())])
    for t in _outs(out):
        tr.set(t, lab if lab is not None and t.dim() == x.dim() else None)


BY_NAME.update({"torchvision::roi_align": roi_pool, "torchvision::roi_pool": roi_pool})


@rule(aten.index_put_, aten.index_put)
def index_put(tr, func, args, kwargs, out):
    """``result[idx] = values`` with indices on the leading dims only and channels in the trailing ones (torchvision's
    multi-scale RoI pooling gathers each level's crops so): the result carries the values' channels. Anything else
    keeps what it reads (``not_understood``)."""
    self, indices, values = args[0], list(args[1]), args[2]
    lv, ls = _pad(tr.get(values), values.dim()), _pad(tr.get(self), self.dim())
    k = len(indices)
    simple = (lv is not None and values.dim() == self.dim() and all(i is not None for i in indices)
              and all(lv.size(d) == 1 for d in range(k)) and all(tr.get(i) is None for i in indices))
    if not simple:
        not_understood(tr, func, args, kwargs, out)
        return
    lab = _join(tr, ls, lv)
    for t in _outs(out):
        tr.set(t, lab)
