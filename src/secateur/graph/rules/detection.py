"""Detection ops: RoI pooling (index_put writes into fresh tensors: rules/scatter.py)."""
from __future__ import annotations

from secateur.graph.rules.registry import BY_NAME, _outs, _pad, _tensors


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
