"""Matrix products: a weight's rows/columns tie the channels they read and make, including F.linear on a
module's weight and gathered bias tables."""
from __future__ import annotations

import torch

from secateur.graph.rules.registry import _pad, aten, not_understood, rule


# ---------------------------------------------------------------- matmul
def _join(tr, res, lab):
    """Labels of a result that several operands feed: their channels are one group (unioned), and
    each position takes whichever operand labels it (``-1`` means unlabelled)."""
    if res is None:
        return lab
    tr.atoms.union(res, lab)
    x, y = torch.broadcast_tensors(res, lab)
    return torch.where(x >= 0, x, y)


def _outer_side(k: int, lab: torch.Tensor, labs: list[torch.Tensor]) -> bool:
    """Whether operand ``k`` of an outer product is the side to keep whole. Two operands whose channels vary along
    disjoint dims (Mamba's ``dt[:, :, :, None] * B[:, None, :, :]``: intermediate channels x state channels) make
    each result element belong to two channels; unioning them tied every channel of both into one all-or-nothing
    unit. Keeping one side whole (its channels blocked, a constant here) and labelling the result by the other is
    exact for any plan: a removed channel removes its whole slice of the result. The side kept is the one with
    fewer channels (ties: the later operand); only for two operands."""
    if len(labs) != 2:
        return False
    other = labs[1 - k]
    mine_dims = {d for d in range(lab.dim()) if lab.size(d) > 1}
    their_dims = {d for d in range(other.dim()) if other.size(d) > 1}
    if not mine_dims or not their_dims or mine_dims & their_dims:
        return False
    mine, theirs = lab[lab >= 0].unique().numel(), other[other >= 0].unique().numel()
    return mine < theirs or (mine == theirs and k == 1)


def _matmul(tr, a, c):
    """a [..., n, k] @ c [..., k, m] -> label of [..., n, m]."""
    nd = max(a.dim(), c.dim())
    la = _pad(tr.get(a), a.dim())
    lc = _pad(tr.get(c), c.dim())
    if a.dim() == 1 or c.dim() == 1:
        raise tr.error("matmul with a 1-d channel-carrying operand is not supported", a)
    ka = a.dim() - 1
    kc = c.dim() - 2

    def others_vary(lab, kdim):
        return any(lab.size(d) > 1 for d in range(lab.dim()) if d != kdim)

    va = la is not None and la.size(ka) > 1
    vc = lc is not None and lc.size(kc) > 1
    if va and vc and not others_vary(la, ka) and not others_vary(lc, kc):
        tr.atoms.union(la.reshape(-1), lc.reshape(-1))  # contracted pair: removing k from both drops a term
        tr.contracted.append(la.reshape(-1))  # read only here: the oracle zeroes them at their producers
        la = lc = None
    elif va and lc is not None and not vc and not others_vary(la, ka):
        tr.atoms.block(la)  # see below, the other way round
        la = None
    elif vc and la is not None and not va and not others_vary(lc, kc):
        # c's channels are only along k, and a's labels do not vary along k (its elements belong to its rows:
        # Mamba's scan state [.., intermediate, state] @ C [.., state, 1]). Removing a row of a removes that output
        # row, whatever k is; removing channel k of c would need a's column k gone, which is no channel of a's.
        # So c's channels are kept and a's rows stay free; collapsing c into one unit joined to every row of a
        # made all of a's channels all-or-nothing
        tr.atoms.block(lc)
        lc = None
    else:
        if va:
            la = tr.atoms.collapse(la, [ka])
        if vc:
            lc = tr.atoms.collapse(lc, [kc])
        if la is not None and lc is not None:
            # rows of a and columns of c carry channels along disjoint dims (EfficientViM's ``x @ (a * b)^T``:
            # stream channels x state channels): an outer product in the free dims, kept exact by keeping the
            # smaller side whole, as elementwise ``_outer_side`` does (a union tied both into one unit)
            pa, pc = _pad(la, nd), _pad(lc, nd)
            if _outer_side(0, pa, [pa, pc]):
                tr.atoms.block(la)
                la = None
            elif _outer_side(1, pc, [pa, pc]):
                tr.atoms.block(lc)
                lc = None
    res = None
    if la is not None:
        res = _pad(la, nd)  # [..., n, 1]
    if lc is not None:
        res = _join(tr, res, _pad(lc, nd))  # [..., 1, m]
    return res


_TRANSPOSES = {aten.t, aten.transpose, aten.permute, aten.numpy_T}


def _gathered_table(tr, args) -> bool:
    """A relative position bias table ``[distances, heads]`` read as ``table[index]`` (BEiT, timm Swin): its
    columns pass through the gather, so it gets atoms along them and is sliced with the heads it meets; the rows
    are positions, never channels. Only when the columns are its module's ``num_heads``: a table over head dims
    (SAM's ``rel_pos_h [distances, head_dim]``, shared by all heads) would tie every head into one unit
    (measured: samvit 0.50 -> 0.90 of dense MACs), so it stays a constant there. The head count is the owner's
    ``num_heads``, or, for a bias module that keeps none (timm's ``RelPosBias``, only ``bias_shape``), the one of
    the attention that holds it (its parent): else the table stayed a constant while the heads it is added to
    shrank, and the dry run kept every head of the model (maxvit_nano_rw_256: 0.84 of dense MACs)."""
    p, idx = args[0], args[1]
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or id(p) not in tr.owner or not tr.owner[id(p)][2]:
        return False
    if len(idx) == 1 and idx[0] is not None:
        gathered, hdim = idx[0], 1  # table[idx]: rows are positions, columns heads
    elif len(idx) == 2 and idx[0] is None and idx[1] is not None:
        gathered, hdim = idx[1], 0  # table[:, idx] (timm LeViT / TinyViT / EfficientFormerV2: [heads, offsets])
    else:
        return False
    if gathered.dtype == torch.bool:
        return False
    name = tr.owner[id(p)][0]
    heads = getattr(tr.model.get_submodule(name), "num_heads", None)
    if heads is None and name:
        heads = getattr(tr.model.get_submodule(name.rpartition(".")[0]), "num_heads", None)
    if heads != p.size(hdim):
        return False
    return tr.param_label_along(p, hdim) is not None


def gathered_row(tr, args, out) -> bool:
    """``bias[i]`` with a constant ``i`` on a gathered table [heads, N, N] (timm EfficientViT-MSRA's cascaded heads,
    each a module of its own, read ``attn_bias[head_idx]``): one head's row is a constant of that head, which is
    never removed by its own (whole cascaded heads are not units). Left labelled, its atom would be added to the
    head's scores and joined to every v channel there (``v @ attn``), making them one unit (efficientvit_m0: 0.29
    -> 0.65 of dense MACs). So the row is a constant: the table's atoms are blocked, the result carries none."""
    x = args[0]
    if id(x) not in tr.gathered_tables or args[1] % x.dim() != 0:
        return False
    tr.atoms.block(tr.get(x))
    tr.set(out, None)
    return True


def _weight_view(tr, func, args, out) -> bool:
    """``F.linear(x, self.qkv.weight, bias)`` outside the Linear's own forward (timm BEiT / EVA attention, with a
    q/k/v bias built by concatenation): remember ``W.t()`` so the matmul reading it is handled like the Linear
    (its rows are new channels, its columns consume the input's). Only an ``nn.Linear``'s 2-d weight: its
    layout is known, and its size updater follows the sliced weight; or a mixture-of-experts router's (graph/moe.py
    ``is_router``: the same product, its rows are the experts, which the experts rule never lets go)."""
    w = args[0]
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or id(w) not in tr.owner or not tr.owner[id(w)][2]:
        return False
    mname, attr, _ = tr.owner[id(w)]
    mod = tr.model.get_submodule(mname)
    fixed = False
    if attr != "weight" or not isinstance(mod, torch.nn.Linear):
        from secateur.graph.moe import router_refusal
        why = router_refusal(tr.model, mname) if attr == "weight" else ""  # a mixture-of-experts router: a
        if why is not None:  # Linear's layout, its own class; else a matrix whose rows no size records
            if not _fixed_rows(tr, mod, w):
                return False
            fixed = True
            note = f"{mname}: {type(mod).__name__} is not read as a router, {why}; its rows are kept, its " \
                   "columns are sliced with the stream it reads"
            if why and note not in tr.notes:
                tr.notes.append(note)
    if func.overloadpacket is aten.permute and [d % 2 for d in args[1]] != [1, 0]:
        return False
    if func.overloadpacket is aten.transpose and args[1] % 2 == args[2] % 2:
        return False
    tr.weight_views[id(out)] = w
    if fixed:
        tr.fixed_rows.add(id(w))
    tr.set(out, None)  # keeps ``out`` alive, so its id stays unique
    return True


def _fixed_rows(tr, mod, w) -> bool:
    """``F.linear(x, self.fn)`` on a free matrix of a module that is not a Linear (DeepSeek-V4 / HY-V4
    hyper-connections mix the ``hc_mult`` residual copies with ``fn [2 * hc_mult, hc_mult * hidden]``; a hash router
    whose extra tables make it no router): its columns read the stream, its rows are a count no size attribute
    of ours records. Read as a constant, the product collapsed every stream channel into one atom, which the gate
    it makes then kept whole (hy_v4 0.60, deepseek_v4 0.98 of their MACs at ratio 0.5). Read as a Linear whose
    rows are kept (their atoms blocked, never sliced), each column is sliced with its channel: zeroing a column is
    removing that channel from ``x @ W.t()``, exact for any plan. Not an embedding table (a tied LM head reads its
    rows as the vocabulary, which its own rule owns) nor a matrix a rule labelled already."""
    return not isinstance(mod, torch.nn.Embedding) and id(w) not in tr.labels


def _linear_of(tr, x, wt):
    """Label of ``x @ W.t()`` for a remembered Linear weight ``W`` [out, in] (see ``_weight_view``)."""
    w = tr.weight_views[id(wt)]
    lab = _pad(tr.get(x), x.dim())
    if lab is not None and lab.size(-1) > 1:
        chan = tr.atoms.collapse(lab, range(x.dim() - 1)).reshape(-1)
        tr.slot(w, 1, tr.atoms.own(chan), "in")  # positions no producer labels: atoms of their own, never pruned
    elif lab is not None:
        tr.atoms.block(lab)  # channels on the token dims reaching a matmul: not a per-channel map
    atoms = tr.atoms.new(w.size(0))
    if id(w) in tr.fixed_rows:  # rows kept (``_fixed_rows``): never sliced, nothing they meet is either
        tr.atoms.block(atoms)
    else:
        tr.slot(w, 0, atoms, "out")
    return atoms.reshape((1,) * (x.dim() - 1) + (-1,))


def _batched_weight(tr, x, w) -> torch.Tensor | None:
    """``torch.bmm(x [E, T, K], W [E, K, M])`` with ``W`` a model parameter used as it is (Llama 4's experts:
    one weight matrix per expert, ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``): a batch of Linears
    sharing their channels, so ``x``'s channels are W's dim 1 and the result's are new channels on W's dim 2, the
    same for every batch entry. Before, W was a constant the channels met: all-or-nothing (llama4_text kept its
    stream and its expert width). Or ``W`` an exact ``p.transpose(1, 2)`` of a parameter ``p [E, M, K]`` (Inkling's
    shared experts, ``bmm(x, self.gate_proj.transpose(1, 2))``, one Linear layout per expert): then x's channels are
    p's dim 2 and the result's its dim 1; before, the transposed weight tied the residual stream into one unit, which
    the routing weights it is scaled by kept whole. None where it does not apply."""
    p, rows, cols = tr.param_view(w), 1, 2
    if p is None and isinstance(w, torch.Tensor) and w.dim() == 3:
        p, rows, cols = tr.param_view(w.transpose(1, 2)), 2, 1
    lab = _pad(tr.get(x), x.dim())
    if p is None or p.dim() != 3 or x.dim() != 3 or x.size(0) != p.size(0) or lab is None:
        return None
    if any(lab.size(d) > 1 for d in (0, 1)) and lab.size(2) == 1:
        return None  # channels on the batch or token dims: not a per-channel map
    chan = tr.atoms.collapse(lab, [0, 1]).reshape(-1)
    tr.slot(p, rows, tr.atoms.own(chan), "in")
    atoms = tr.atoms.new(p.size(cols))
    tr.slot(p, cols, atoms, "out")
    return atoms.reshape(1, 1, -1)


def _grouped_weight(tr, x, w) -> torch.Tensor | None:
    """``torch.bmm(x [G, T, K], p.view(G, R, K).transpose(1, 2))`` for a Linear-shaped parameter ``p [G * R, K]``
    (DeepSeek-V4's grouped output projection ``o_a_proj``: group ``g`` of the heads' output goes through its own
    ``R x K`` block of rows, the ``G * R`` results feed ``o_b_proj``). Before, the view was a constant: the ``G * R``
    channels between the two projections were never a group (deepseek_v4 0.55 of dense MACs at ratio 0.5). Here
    result channel ``r`` of every group is one unit (row ``g * R + r`` for each ``g``): removing it keeps ``R``
    equal across groups, so ``view(G, -1, K)`` and the forward's own reshapes still hold, exact for any plan. The
    columns read input channel ``k`` of every group (one unit, unioned over ``g``): a column of ``p`` is removed only
    with all of them. None where ``w`` is not that view."""
    p = w._base if isinstance(w, torch.Tensor) and w.dim() == 3 and id(w) not in tr.labels else None
    if p is None or id(p) not in tr.owner or not tr.owner[id(p)][2] or p.dim() != 2 or not p.is_contiguous():
        return None
    g, k, r = w.shape
    if (g * r, k) != tuple(p.shape) or w.stride() != (r * k, 1, k) or w.storage_offset() != p.storage_offset():
        return None
    lab = _pad(tr.get(x), x.dim())
    if x.dim() != 3 or x.size(0) != g or lab is None or lab.size(1) > 1 and lab.size(2) == 1:
        return None
    chan = tr.atoms.collapse(lab, [0, 1]).reshape(-1)
    tr.slot(p, 1, tr.atoms.own(chan), "in")
    atoms = tr.atoms.new(r)
    tr.slot(p, 0, atoms.repeat(g), "out")
    return atoms.reshape(1, 1, -1)


def _batched_bias(tr, bias):
    """The parameter under the bias of ``torch.baddbmm(b, x, W)`` on a batched weight (``_batched_weight``):
    ``[E, M]`` read as ``b[:, None, :]``, or ``[E, 1, M]``: one bias row per batch entry, sliced with the result's
    channels along M (RecurrentGemma's block-diagonal RG-LRU gates, ``baddbmm(self.input_gate_bias[:, None, :], x,
    self.input_gate_weight)``: before, every LRU channel was kept). None where the bias is not that."""
    p = bias if id(bias) in tr.owner else bias._base
    if (p is None or id(p) not in tr.owner or not tr.owner[id(p)][2] or tr.get(bias) is not None
            or p.numel() != bias.numel() or bias.dim() != 3 or p.size(0) != bias.size(0)
            or p.size(-1) != bias.size(2) or bias.size(1) != 1 or p.dim() not in (2, 3)
            or (bias.stride(0), bias.stride(2), bias.storage_offset()) != (p.stride(0), p.stride(-1),
                                                                          p.storage_offset())):
        return None
    return p


@rule(aten.mm, aten.bmm)
def mm(tr, func, args, kwargs, out):
    if id(args[1]) in tr.weight_views and func.overloadpacket is aten.mm:
        return tr.set(out, _linear_of(tr, args[0], args[1]))
    if func.overloadpacket is aten.bmm:
        res = _batched_weight(tr, args[0], args[1])
        if res is None:
            res = _grouped_weight(tr, args[0], args[1])
        if res is not None:
            return tr.set(out, res)
    tr.set(out, _matmul(tr, args[0], args[1]))


@rule(aten.addmm, aten.baddbmm)
def addmm(tr, func, args, kwargs, out):
    if id(args[2]) in tr.weight_views and func.overloadpacket is aten.addmm:
        res = _linear_of(tr, args[1], args[2])
        bias = tr.get(args[0])
        if bias is None and args[0].numel() > 1:  # an unsliceable bias: the outputs are all-or-nothing
            res = tr.atoms.collapse(res, [res.dim() - 1])
        elif bias is not None:
            res = _join(tr, res, _pad(bias, out.dim()))
        return tr.set(out, res)
    p = _batched_bias(tr, args[0]) if func.overloadpacket is aten.baddbmm else None
    res = None if p is None else _batched_weight(tr, args[1], args[2])
    if res is not None:
        tr.slot(p, p.dim() - 1, res.reshape(-1), "param")  # one bias row per batch entry, sliced with M
        return tr.set(out, res)
    res = _matmul(tr, args[1], args[2])
    bias = tr.get(args[0])
    if bias is None and args[0].numel() > 1 and res is not None:
        b = args[0]
        csh = (1,) * (out.dim() - b.dim()) + tuple(b.shape)
        dims = [d for d in range(out.dim()) if csh[d] > 1 and res.size(d) > 1]
        res = tr.atoms.collapse(res, dims)
    elif bias is not None:
        res = _join(tr, res, _pad(bias, out.dim()))
    tr.set(out, res)


# ---------------------------------------------------------------- triangular solves (gated delta net's UT transform)
@rule(aten.linalg_solve_triangular)
def solve_triangular(tr, func, args, kwargs, out):
    """``X = A^-1 B`` (``left=True``; ``X = B A^-1`` when False) with ``A [..., n, n]`` a system over positions (the
    gated delta net's chunk of time steps, Qwen3-Next / Qwen3.5 / OLMo-hybrid): each column of B is solved on its
    own, so B's channels along its free dim (the last; the rows when ``left=False``) are X's, exactly (zeroing a
    column of B zeroes that column of X). Along the solved dim X mixes B's positions: channels there are one unit.
    A must carry no channels along its two system dims (then the solve mixes channels: kept, ``not_understood``);
    along the batch dims (heads) A and B meet as in a matmul (unioned). A constant A that varies along a batch dim
    where B carries channels cannot be sliced with them: those channels go all together."""
    a, b = args[0], args[1]
    left = kwargs.get("left", True)  # keyword-only in the schema
    nd = out.dim()
    la, lb = _pad(tr.get(a), a.dim()), _pad(tr.get(b), b.dim())
    if la is not None and (la.size(-1) > 1 or la.size(-2) > 1):
        return not_understood(tr, func, args, kwargs, out)
    solved = nd - 2 if left else nd - 1
    res = None
    if lb is not None:
        res = _pad(lb, nd)
        if res.size(solved) > 1:
            res = tr.atoms.collapse(res, [solved])
        if la is None:
            ash = (1,) * (nd - a.dim()) + tuple(a.shape)
            dims = [d for d in range(nd - 2) if ash[d] > 1 and res.size(d) > 1]
            res = tr.atoms.collapse(res, dims)
    if la is not None:
        res = _join(tr, res, _pad(la, nd))
    tr.set(out, res)
