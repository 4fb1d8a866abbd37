"""Why channels are kept: a note for every producer whose channels no plan can remove, naming the op that keeps them.

Rules that keep channels (an op with no rule, an in-place write into a view) note it themselves, but many blocks
and ties happen in passing: a model output that is the residual stream (XLNet's ``mems``, Moshi's
``last_hidden_state``), a constant that varies along the channels it meets, a reduction over the channel dim that
makes every channel one unit (a group of one channel is never pruned: the model would lose the whole layer). A
model then came back barely pruned with no reason given (moshi 0.60, xlnet 0.52, gemma3n_text 0.68, inkling2_text
1.0 of their MACs at ratio 0.5). ``Atoms`` records what ran at every block and at every collapse that joined
several atoms (``Atoms.reasons``); here each kept producer is traced back to the first of them, by the components
the atoms form when nothing is blocked (``Atoms.unblocked``). A producer kept only because it is the model's output
and read by nothing else (a classifier, an LM head), and a MoE router (whose rows are the expert count), are the
documented defaults and not noted."""
from __future__ import annotations

from typing import Any

import torch

from secateur.graph.capture import OUTPUT, Tracer
from secateur.graph.labels import BLOCKED


def explain(tr: Tracer, graph: Any) -> list[str]:
    """Notes for kept channels that no rule has explained yet (appended to ``tr.notes`` by the caller)."""
    return _blocked(tr, graph.root) + _tied(tr, graph)


def _noted(tr: Tracer, site: tuple[str, str]) -> bool:
    where, op = site
    return any(n.startswith(f"{where}:") and op in n for n in tr.notes)


def _names(names: list[str]) -> str:
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _by_component(reasons: list, kind: str, comp: torch.Tensor) -> dict[int, list[int]]:
    """component -> ids of the reasons of ``kind`` whose atoms lie in it, in the order they happened."""
    ids = [i for i, r in enumerate(reasons) if r[1] == kind]
    if not ids:
        return {}
    atoms = torch.cat([reasons[i][2].reshape(-1) for i in ids])
    rid = torch.repeat_interleave(torch.tensor(ids), torch.tensor([reasons[i][2].numel() for i in ids]))
    n = len(reasons)
    pairs = torch.unique(comp[atoms] * n + rid)  # sorted: by component, then reason
    out: dict[int, list[int]] = {}
    for c, i in zip((pairs // n).tolist(), (pairs % n).tolist()):
        out.setdefault(c, []).append(i)
    return out


def _blocked(tr: Tracer, root: torch.Tensor) -> list[str]:
    outs = [s for s in tr.slots.values() if s["kind"] == "out"]
    if not outs:
        return []
    # which producers hold blocked atoms: one test over all of them, then the few that do (a mask per producer was
    # most of this pass on small CNNs)
    hit = root[torch.cat([s["atoms"] for s in outs])] == root[BLOCKED]
    if not bool(hit.any()):
        return []
    sizes = [s["atoms"].numel() for s in outs]
    per = torch.zeros(len(outs), dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(len(outs)), torch.tensor(sizes, dtype=torch.long)), hit.long()).tolist()
    kept = [(s, s["atoms"][h]) for s, h, k in zip(outs, hit.split(sizes), per) if k]
    free = tr.atoms.unblocked(root)
    read = torch.zeros(tr.atoms.count, dtype=torch.bool)  # components some layer reads (not only the output)
    for s in tr.slots.values():
        if s["consumer"]:
            read[free[s["atoms"]]] = True
    reasons = tr.atoms.reasons
    by_comp = _by_component(reasons, "block", free)
    # components kept only as the model's output and read by no layer (a classifier's rows) get no note: skipped
    # up front, not one by one (mobilenet_v3_small's 1000 classes were most of this pass's time)
    quiet = {c for c, ids in by_comp.items() if all(reasons[i][0][0] == OUTPUT for i in ids)}
    quiet -= set(read.nonzero().flatten().tolist()) if quiet else set()
    what: dict[tuple[str, str] | None, list[str]] = {}
    from secateur.graph.moe import is_router
    for s, a in kept:
        if is_router(tr.model, s["module"]):  # its rows are the expert count, never pruned (graph/moe.py)
            continue
        name = f"{s['module']}.{s['name']}" if s["module"] else s["name"]
        for c in free[a].unique().tolist():
            if c in quiet:
                continue
            sites = [reasons[i][0] for i in by_comp.get(c, [])]
            if any(_noted(tr, site) for site in sites):
                continue
            inner = [site for site in sites if site[0] != OUTPUT]
            if inner:
                what.setdefault(inner[0], []).append(name)
            elif sites and bool(read[c]):  # the model returns channels its own layers read (a residual stream)
                what.setdefault(sites[0], []).append(name)
            elif not sites:
                what.setdefault(None, []).append(name)
    notes = []
    for site, names in what.items():
        if site is None:
            notes.append(f"{_names(names)}: channels kept where the engine cannot remove them exactly (no op named)")
        elif site[0] == OUTPUT:
            notes.append(f"{OUTPUT}: {site[1]} carries the channels of {_names(names)}, which the model's layers "
                         "read too; they are kept (a pruned model keeps its output shapes)")
        else:
            notes.append(f"{site[0]}: {site[1]} needs every channel of {_names(names)} it reaches (removing one "
                         "would change what it computes); they are kept")
    return notes


def _tied(tr: Tracer, graph: Any) -> list[str]:
    """Groups of one channel that own several positions of a producer: the model's computation made all of its
    channels one unit, and a group is never pruned whole. Named: the op whose union first made the producer's
    channels one component (``Atoms.joined_at``, for the first ``_SEARCHED`` such groups), else the collapse that
    joined the most atoms at once (a reduction over the channels, not over tokens)."""
    single = [i for i, g in enumerate(graph.groups) if g.size == 1 and
              max((m.index.numel() for m in g.members if m.kind == "out"), default=0) > 1]
    if not single:
        return []
    gi = graph.where[:, 0]
    by_group: dict[int, list[int]] = {}
    for c, ids in _by_component(tr.atoms.reasons, "tie", graph.root).items():
        by_group[int(gi[c])] = ids
    notes = []
    for k, i in enumerate(single):
        g = graph.groups[i]
        out = max((m for m in g.members if m.kind == "out"), key=lambda m: m.index.numel())
        n = out.index.numel()
        site = None
        if k < _SEARCHED:
            slot = tr.slots.get((out.qualname, out.dim))
            site = None if slot is None else tr.atoms.joined_at(slot["atoms"], graph.root)
        ids = by_group.get(i, [])
        if site is None and ids:
            site = tr.atoms.reasons[max(ids, key=lambda r: (tr.atoms.reasons[r][3], -r))][0]
        if site is not None:
            notes.append(f"{site[0]}: {site[1]} makes the {n} channels of {g.name} one unit (all or nothing); a "
                         "group is never pruned whole, so they are kept")
        else:
            notes.append(f"{g.name}: its {n} channels are one unit (the model's computation joins them); a group is "
                         "never pruned whole, so they are kept")
    return list(dict.fromkeys(notes))


_SEARCHED = 8  # binary searches per graph (each on one component's edges); the rest: named by the widest collapse
