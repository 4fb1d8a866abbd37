"""Which rule runs for an op: the registry first, then the op tags torch provides (pointwise), then the fallback
that keeps what it cannot follow; and the special cases where an unlabelled input still makes channels."""
from __future__ import annotations

import weakref

import torch

from secateur.graph.capture import Tracer
from secateur.graph.rules.constants import is_uniform, track_derived, track_uniform
from secateur.graph.rules.elementwise import pointwise
from secateur.graph.rules.inplace import FACTORIES, made, refresh_inputs, write_through, written_to
from secateur.graph.rules.matmul import _TRANSPOSES, _gathered_table, _weight_view, gathered_row
from secateur.graph.rules.movement import move
from secateur.graph.rules.reductions import _SPATIAL, _resampled_param
from secateur.graph.rules.registry import BY_NAME, RULES, _outs, _tensors, aten, not_understood, op_facts
from secateur.graph.rules.weighted import _OWN_WEIGHT


def _labelled(tr: Tracer, args, kwargs) -> bool:
    """Does any tensor among the arguments carry labels? (the generator over ``_tensors`` per op, unrolled)"""
    labels = tr.labels
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            if labels.get(id(a)) is not None:
                return True
        elif isinstance(a, (list, tuple)) and any(labels.get(id(t)) is not None for t in _tensors(a)):
            return True
    return False


def apply_rule(tr: Tracer, func, args, kwargs, out) -> None:
    mutable, tagged, inplace_of = op_facts(func)
    # memory a filling factory wrote and nothing since (zeros_like): a write into a view of it labels the lines it
    # writes whole (rules/inplace.py); asked before ``track_uniform`` forgets it for this very write
    fresh = (mutable and bool(args) and isinstance(args[0], torch.Tensor) and args[0]._is_view()
             and is_uniform(tr, args[0]))
    if func.overloadpacket in FACTORIES and isinstance(out, torch.Tensor):
        made(tr, out)
    if tr.writes:  # some base was written through a view: views of it made before read its new labels
        refresh_inputs(tr, [t for a in (*args, *kwargs.values()) for t in _tensors(a)])
    track_uniform(tr, func, args, out)
    labelled = _labelled(tr, args, kwargs)
    packet = func.overloadpacket
    if not labelled and packet in _TRANSPOSES and _weight_view(tr, func, args, out):
        return
    if not labelled and packet is aten.index and _gathered_table(tr, args):
        labelled = True
        if args[1][0] is None:  # table[:, idx]: the heads lead the result (a constant row of it: ``gathered_row``)
            tr.gathered_tables.add(id(out))
    if packet is aten.select and tr.gathered_tables and gathered_row(tr, args, out):
        return
    if not labelled and packet in _OWN_WEIGHT:
        labelled = True  # a conv / embedding reached at op level produces channels even from the model's input
    if not labelled and packet in _SPATIAL and _resampled_param(tr, args[0]):
        labelled = True
    freed = None  # the free parameter a pointwise op of its own labelled (its result: ``Tracer.of_param``)
    if not labelled and (RULES.get(packet) is move or _free_pointwise(func, packet)):
        # a free parameter entering a view/cat (cls token, pos emb), or a pointwise op of its own (see below)
        for t in _tensors(args):
            if id(t) in tr.owner and tr.param_label(t) is not None:
                labelled = True
                freed = t if RULES.get(packet) is not move else None
    if not labelled:
        track_derived(tr, func, args, kwargs, out)
        if mutable and out is not None:
            for t in _outs(out):
                if id(t) in tr.labels and tr.labels[id(t)] is not None:
                    tr.set(t, None)
        return
    fn = RULES.get(packet) or BY_NAME.get(packet._qualified_op_name)
    if fn is None and (tagged or inplace_of):
        fn = pointwise
    if fn is None:
        fn = not_understood
    mutated = args[0] if mutable and args and isinstance(args[0], torch.Tensor) else None
    inplace_view = mutated is not None and mutated._is_view()
    before = tr.get(mutated) if mutated is not None else None
    fn(tr, func, args, kwargs, out)
    if freed is not None and isinstance(out, torch.Tensor) and tr.get(out) is not None:
        tr._of_param[id(out)] = weakref.ref(out)
    if mutated is not None:
        after = tr.get(mutated)
        changed = not (before is None and after is None) and (before is None or after is None or
                                                                not torch.equal(before, after))
        if changed and not inplace_view:
            written_to(tr, mutated)  # views made earlier read the new labels
        elif changed and not write_through(tr, mutated, fresh):
            # the base's labels cannot be rewritten exactly through the view (rules/inplace.py): keep every
            # channel on either side of the write (before and after), so nothing there changes under any plan
            tr.atoms.block(before)
            tr.atoms.block(after)
            note = (f"{tr.where()}: in-place {packet._qualified_op_name} writes channels into a view of another "
                    "tensor; the channels on both sides of the write are kept")
            if note not in tr.notes:
                tr.notes.append(note)


def _free_pointwise(func, packet) -> bool:
    """An out-of-place pointwise op, which may read a free parameter and nothing labelled: Swin V2's per-head
    ``torch.clamp(self.logit_scale, max=...).exp()`` [heads, 1, 1]. The parameter gets its atoms there (as on
    entering a view) and the result carries them, so it is sliced with the heads it then scales; left a constant,
    it varied along the heads dim and made every head one unit (timm swinv2_tiny_window8_256: 0.69 of dense MACs).
    Only a parameter with one non-1 dim is labelled (``Tracer.param_label``); other constants stay constants."""
    mutable, tagged, _ = op_facts(func)
    if mutable:
        return False
    return RULES.get(packet) is pointwise or tagged
