"""Proof of a plan before it touches the model: dry runs on a copy (graph/verify.py) that drop the groups whose
removal breaks the model's own forward, the size-attribute search and count ties that keep more of them, and the
numeric proof (``_exact``) that a plan with updated sizes computes the oracle's reference."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur.errors import fail
from secateur.graph.groups import Graph, Group
from secateur.structured.apply import _Slices, _apply
from secateur.structured.choose import _matches
from secateur.structured.plan import Plan


def _verified(model: nn.Module, example_inputs: Any, plan: Plan, graph: Graph | None = None,
              done: dict | None = None, rechoose: Callable | None = None) -> Plan:
    """Dry-run the plan on a copy (graph/verify.py); drop the groups whose removal breaks the model's own forward (its
    code keeps a size the engine cannot update), or makes an op output a shape other than the plan predicts (the same
    code, where a ``-1`` hides the stale size: a silently wrong model), and try again. Never returns such a plan.

    ``done`` (for a caller that applies the returned plan to ``model`` right after, nothing changing in between):
    filled with what the successful dry run computed, so that it is not computed again: ``"slices"`` (``_Slices``,
    where the dry run ran on the model's own device) and ``"macs"`` (the pruned model's ``count_macs``, or None).

    ``rechoose(ties, fixed)`` (the plan's own choice with count ties and left-out groups): before dropping groups
    at a failing module, try tying the counts of the groups inside it to the stream that enters it (graph/ties.py);
    the ties stay (on ``graph.ties``) when the dry run then passes that module's class."""
    memo: dict = {}  # one plan's dry runs by what they run (``_DryRuns``): the loops below repeat some
    if graph is not None and graph.cuts:
        # cuts at attribute positions (graph/splits.py) need their sizes updated wherever channels leave a section:
        # the search first, taken straight away where it keeps every group and computes the reference; otherwise the
        # plan without it is found below as before (that first, then the search, took dpn68 7.1 s, this 4.9 s)
        d1, ties = ({} if done is not None else None), graph.ties
        first = _verify_loop(model, example_inputs, _copy(plan), graph, search=True, done=d1, rechoose=rechoose,
                             memo=memo)
        if len(first.choices) == len(plan.choices) and _exact(model, example_inputs, first, memo, graph):
            if done is not None:
                done.update(d1)
            return _local_noted(first, memo)
        graph.ties = ties
    d0 = {} if done is not None else None
    base = _verify_loop(model, example_inputs, _copy(plan), graph, search=False, done=d0, rechoose=rechoose,
                        memo=memo)
    if graph is not None and graph.ties and _exact(model, example_inputs, base, memo) is False:
        graph.ties = None  # count ties proven by shapes, refuted by values: the plan without them
        d0 = {} if done is not None else None
        base = _verify_loop(model, example_inputs, _copy(plan), graph, search=False, done=d0, memo=memo)
        base.notes.append("count ties gave a pruned model that differs from the reference; not used")
    picked, d = base, d0
    if len(base.choices) != len(plan.choices) and graph is not None:
        # groups were dropped: would updating sizes the model keeps (graph/size_attrs.py) keep more of them? The
        # search is greedy (an update that gets the dry run further may still lead to a refusal later), so its plan
        # is taken only where it removes more channels than the plan without it, and only where it computes the
        # reference: shapes prove a stored size is the pruned dim's, not that it is not also used as a number
        # (a 1-head attention's ``head_dim`` sized its reshape *and* its softmax scale)
        # (with the count ties found above, and without them: a tie can hold a stream whole where an updated size
        # would have let it shrink, efficientvim's HSMSSD)
        ties, kept_ties = graph.ties, graph.ties
        for tied in ([True, False] if ties else [True]):
            graph.ties = ties if tied else None
            d1 = {} if done is not None else None
            found = _verify_loop(model, example_inputs, _copy(plan), graph, search=True, done=d1,
                                 rechoose=rechoose if tied else None, memo=memo)
            # (without ties and without any update it is still a plan of its own: DeepSeek-V4's stream, held whole
            # by a tie to heads its grouped output projection cannot lose, shrinks there: 0.98 -> 0.55 of dense MACs
            # with the grouped rule off, tests/test_batched_weights.py)
            if ((found.attrs or not tied) and found.channels > picked.channels
                    and _exact(model, example_inputs, found, memo, graph)):
                picked, d, kept_ties = found, d1, graph.ties
        graph.ties = kept_ties
    folded = [g for g, _ in picked.choices if g.scale_fold is not None]
    if folded and _exact(model, example_inputs, picked, memo, graph) is not True:
        # a scale fold not proven (logits differ, or the model cannot be run here): those q/k dims are kept
        bad = frozenset(id(g) for g in folded)
        notes = list(plan.notes) + [f"{g.scale_fold.where}: attention scale follows q's head size and folding it into "
                                    "q's rows was not proven on the example input; q/k head dims are kept"
                                    for g in folded]
        again = Plan(plan.groups, [c for c in plan.choices if id(c[0]) not in bad], notes, heads=plan.heads,
                     norms=plan.norms, attrs=plan.attrs)
        rech = None if rechoose is None else (lambda ties, fixed=frozenset(): rechoose(ties, frozenset(fixed) | bad))
        return _verified(model, example_inputs, again, graph, done, rech)
    where_proven = ("a CPU copy of the module" if memo.get(("local", *_DryRuns.plan_key(picked))) is True
                    else "the example input")
    for g, chans in picked.choices:
        f = g.scale_fold
        if f is not None:
            kept = f.kept(chans)
            if kept == f.head_size:  # only whole heads removed from this call: its scale is unchanged
                continue
            rows = ", ".join(dict.fromkeys(f"{m}.{t}" if m else t for m, t, _, _ in f.targets))
            from secateur.graph.scale_fold import stored_scales
            stored = ", ".join(f"`{k}`" for k in stored_scales(model, f, kept))
            also = (f"; its stored {stored} (read by its eager path) becomes 1/sqrt({kept}) so both paths agree"
                    if stored else "")
            note = (f"{f.where}: attention scale follows q's head size ({f.head_size} -> {kept}): q rows of {rows} "
                    f"scaled by sqrt({kept}/{f.head_size}) so the softmax keeps 1/sqrt({f.head_size}) (logits "
                    f"proven on {where_proven}){also}")
            if note not in picked.notes:
                picked.notes.append(note)
    if done is not None:
        done.update(d)
    return _local_noted(picked, memo)


def _local_noted(plan: Plan, memo: dict) -> Plan:
    """The plan, with a note where its size attributes or scale folds were proven on module copies only
    (graph/local_proof.py)."""
    if memo.get(("local", *_DryRuns.plan_key(plan))) is True and LOCAL_NOTE not in plan.notes:
        plan.notes.append(LOCAL_NOTE)
    return plan


def _exact(model: nn.Module, example_inputs: Any, plan: Plan, memo: dict | None = None, graph: Graph | None = None
           ) -> bool | None:
    """Does ``plan`` applied to a copy compute the oracle's reference (the original with the chosen channels zeroed
    at their consumers, norms over the kept ones) on the example inputs? None where it cannot be run here (not a
    CPU model within ``verify.HERE_BYTES``): a numeric proof costs two forwards of copies, or one where ``memo``
    (``_DryRuns``') holds the outputs of this plan's dry run on a CPU twin: the same copy (the model's weights,
    the plan's slices and sizes) run on the same inputs with the same seed, so its outputs are the ones a fresh
    pruned copy gives (tnt_b_patch16_224's proof: 1.25 s, 0.92 s this way). A plan with scale folds compares the
    attention logits too (``_Logits``), remembered in ``memo`` per plan. With ``graph``, a model that cannot run
    here still gets its size-attribute updates and scale folds proven on CPU copies of the modules concerned
    (graph/local_proof.py): the rest of such a plan has only the dry run's shape proof, as before."""
    if not plan.choices:
        return None
    if not _runs_here(model, example_inputs, False, memo):
        if not (plan.attrs or any(g.scale_fold is not None for g, _ in plan.choices)) or graph is None:
            return None
        key = ("local", *_DryRuns.plan_key(plan))  # the updated sizes, on a CPU copy of their module
        if memo is None or key not in memo:
            from secateur.graph.local_proof import prove
            res = prove(model, example_inputs, plan, graph)
            if memo is None:
                return res
            memo[key] = res
        return memo[key]
    folds = any(g.scale_fold is not None for g, _ in plan.choices)
    key = ("exact", *_DryRuns.plan_key(plan))
    if folds and memo is not None and key in memo:
        return memo[key]
    res = _compare(model, example_inputs, plan, memo, folds)
    if folds and memo is not None:
        memo[key] = res
    return res


def _compare(model: nn.Module, example_inputs: Any, plan: Plan, memo: dict | None, folds: bool) -> bool:
    """``_exact``'s comparison (``folds``: the attention logits too, see ``_Logits``)."""
    from secateur.graph import verify
    from secateur.graph.capture import _flat_tensors, call
    got = memo.get(("outputs", *_DryRuns.plan_key(plan))) if memo is not None and _MEMO and not folds else None
    ref = _writable_twin(model, plan)
    plan.zero_consumers(ref)
    logits_ref, logits_got = _Logits(), _Logits()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(0)
        with plan.kept_norms(ref), (logits_ref if folds else contextlib.nullcontext()):
            want = _flat_tensors(call(ref, example_inputs))
        if got is None:
            pruned = verify.twin(model)
            try:  # a plan whose copy does not apply or run is not proven (it never reaches the model)
                plan.apply(pruned)
                torch.manual_seed(0)
                with logits_got if folds else contextlib.nullcontext():
                    got = _flat_tensors(call(pruned, example_inputs))
            except Exception:  # noqa: BLE001 - the model's own code may raise anything on wrong sizes
                return False
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return False
    if folds and not logits_ref.same(logits_got):
        return False
    return all(agree(a, b) for a, b in zip(want, got))


def agree(want: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> bool:
    """The proof's comparison of one output: the same shape; floats within ``tol`` of the reference's largest
    finite magnitude, NaN and infinities at the same places (a NaN in the reference made ``max`` NaN, and every
    comparison with it passed: one NaN anywhere proved any output); other dtypes equal."""
    if want.shape != got.shape:
        return False
    if not want.is_floating_point():
        return torch.equal(want, got)
    if not want.numel():
        return True
    fin = torch.isfinite(want)
    if not torch.equal(fin, torch.isfinite(got)):
        return False
    if not bool(fin.all()):
        odd = ~fin  # NaN where NaN, the same infinities
        if not torch.equal(torch.isnan(want[odd]), torch.isnan(got[odd])):
            return False
        inf = odd & ~torch.isnan(want)
        if not torch.equal(want[inf], got[inf]):
            return False
        if not bool(fin.any()):
            return True
        want, got = want[fin], got[fin]
    scale = float(want.abs().max())
    return float((want - got).abs().max()) <= tol * max(scale, 1e-3)


class _Logits(TorchFunctionMode):
    """The attention logits ``q.k^T * scale`` of every ``F.scaled_dot_product_attention`` call, in order. A scale
    fold (graph/scale_fold.py) must give the reference's logits: unlike the model's output, they show a wrong
    softmax scale on random weights too (there the softmax is near uniform and hides it: cpubone_nano's logits
    moved less than the output check's 1e-4 with a halved head size)."""

    _NAMES = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) >= 2:
            opts = {**dict(zip(self._NAMES, args[3:])), **kwargs}
            q, k = args[0], args[1]
            scale = opts.get("scale")
            scale = q.size(-1) ** -0.5 if scale is None else scale
            if q.dim() >= 3 and k.dim() >= 3 and 0 < k.size(-3) < q.size(-3) and q.size(-3) % k.size(-3) == 0:
                k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)  # grouped-query attention
            self.logits.append((q.double() @ k.double().transpose(-2, -1)) * scale)
        return func(*args, **kwargs)

    def same(self, other: "_Logits") -> bool:
        """Every call's logits agree to float tolerance where the shapes agree (whole heads removed elsewhere change
        them: those calls are compared by the output check)."""
        if len(self.logits) != len(other.logits):
            return False
        for a, b in zip(self.logits, other.logits):
            if a.shape == b.shape and a.numel():
                if float((a - b).abs().max()) > 1e-4 * max(float(a.abs().max()), 1e-3):
                    return False
        return True


def _writable_twin(model: nn.Module, plan: Plan) -> nn.Module:
    """A ``verify.twin`` of ``model`` whose tensors ``plan.zero_consumers`` writes into are its own copies (the
    others still share the model's memory): the oracle's reference without a deep copy of every weight. A
    consumer tensor that is neither a parameter nor a buffer: a plain deep copy."""
    from secateur.graph import verify
    ref = verify.twin(model)
    for g, _ in plan.choices:
        for m in g.members:
            if not m.consumer:
                continue
            mod = ref.get_submodule(m.module)
            if m.name in mod._parameters and mod._parameters[m.name] is not None:
                p = mod._parameters[m.name]
                if p.data_ptr() == getattr(model.get_submodule(m.module), m.name).data_ptr():
                    p.data = p.data.clone()  # once per tensor (a tied weight is one Parameter in the twin too)
            elif m.name not in mod._buffers:  # buffers: the twin's are copies already
                return copy.deepcopy(model)
    return ref


def _copy(plan: Plan) -> Plan:
    return Plan(plan.groups, list(plan.choices), list(plan.notes), heads=plan.heads, norms=plan.norms,
                attrs={k: dict(v) for k, v in plan.attrs.items()})


def _verify_loop(model: nn.Module, example_inputs: Any, plan: Plan, graph: Graph | None, search: bool,
                 done: dict | None = None, rechoose: Callable | None = None, memo: dict | None = None) -> Plan:
    from secateur.graph import verify
    out = getattr(getattr(graph, "tracer", None), "output", None)
    want = verify._shapes(out) if out is not None else None  # the capture saw the unpruned output shapes
    dry = _DryRuns(model, example_inputs, graph, want, memo)
    here = done is not None and dry.cpu[True]
    # dry runs spent on attribute searches: greedy, backtracking (size_attrs.MAX_TRIALS, ...); a plan with scale folds
    # (graph/scale_fold.py) starts with FOLD_TRIALS in hand: a one-head attention's head size sizes its reshape and
    # its output width together (timm cpubone_nano's ConvAttention: head_dim and o_proj_inpdim, found at trial 15)
    spent = [-FOLD_TRIALS if any(g.scale_fold is not None for g, _ in plan.choices) else 0, 0]
    fixed: set[int] = set()
    tried: dict[type, bool] = {}  # module class -> its broad tie was tried
    pending = None  # (class tried, plan and ties before its ties, the failure they answer)
    if rechoose is not None and graph is not None and graph.ties:  # ties found by an earlier loop hold here too
        plan = Plan(plan.groups, rechoose(graph.ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                    attrs=plan.attrs)
    prev = plan.choices
    for _ in range(32):
        if plan.choices is not prev and plan.attrs:  # choices changed: sizes taken from cuts follow them
            plan.attrs = _recut(model, graph, plan.attrs, prev, plan.choices)
        prev = plan.choices
        ok, where, err, bad, expected, slices, macs = dry.check(plan, here)
        if pending is not None:
            cls, plan0, ties0, failure = pending
            if not ok and where and type(model.get_submodule(where)) is cls:  # not enough: broader, or undo
                ties = None if tried[cls] else _tie_class(model, graph, cls, True)
                if ties is not None:
                    tried[cls] = True
                    graph.ties = ties
                    plan = Plan(plan.groups, rechoose(ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                                attrs=plan.attrs)
                    continue
                graph.ties, plan = ties0, plan0
                ok, where, err, bad = failure
            else:
                plan.notes.append(_tie_note(cls))
            pending = None
        if not ok and search and expected is not None:  # a size the model keeps itself? (graph/size_attrs.py)
            attrs = _attr_search(model, plan, expected, where or "", spent, dry)
            if attrs != plan.attrs:
                plan = Plan(plan.groups, plan.choices, plan.notes, heads=plan.heads, norms=plan.norms, attrs=attrs)
                continue
        if err and ok:
            plan.notes.append(err)
        if ok:
            if here:
                done.update(slices=slices if slices.removed else None, macs=macs)
            return _noted(model, plan)
        cls = type(model.get_submodule(where)) if rechoose is not None and where and graph is not None else None
        if cls is not None and cls not in tried:
            ties, tried[cls] = _tie_class(model, graph, cls, False), False
            if ties is None:
                ties, tried[cls] = _tie_class(model, graph, cls, True), True
            if ties is not None:
                pending = (cls, plan, graph.ties, (ok, where, err, bad))
                graph.ties = ties
                plan = Plan(plan.groups, rechoose(ties, fixed), plan.notes, heads=plan.heads, norms=plan.norms,
                            attrs=plan.attrs)
                continue
        if bad:  # a shape mismatch names the groups removed there: those, and the same role in its class
            keep = _without_role(model, plan, {id(graph.groups[i]) for i in bad}, where or "")
        else:
            keep = _without_module(model, plan, where or "", dry)
        fixed |= {id(g) for g, _ in plan.choices} - {id(g) for g, _ in keep}
        dropped = len(plan.choices) - len(keep)
        what = "pruned forward failed" if bad is None else "pruned shapes differ from the plan's"
        plan.notes.append(f"{where or '<model>'}: {what} ({err}); kept {dropped} group(s) there")
        if graph is not None and graph.ties and rechoose is not None:  # tied groups follow the ones left out
            keep = rechoose(graph.ties, fixed)
        plan = Plan(plan.groups, keep, plan.notes, heads=plan.heads, norms=plan.norms,
                    attrs=_outside(model, plan.attrs, where or "") if keep else {})
        if not keep:
            return _noted(model, plan)
    raise fail("could not find a plan whose pruned forward runs", where="prune_channels", value=plan.notes[-1])


def _outside(model: nn.Module, attrs: dict, where: str) -> dict:
    """``attrs`` without the updates found for the failing module, its children and every module of its class: they
    answered the choices just left out there (DeepSeek-V4's ``num_key_value_groups`` halved with the heads; kept
    once the heads were, the dry run failed on it, and the loop left the residual stream out as well: 0.98 of
    dense MACs where 0.55 runs and holds the oracle, with rules/matmul.py ``_grouped_weight`` off). Updates
    elsewhere stay (attrs found for other choices are revised on the next failure)."""
    if not where or not attrs:
        return attrs
    cls = type(model.get_submodule(where))

    def stale(name: str) -> bool:
        return (name == where or name.startswith(where + ".")
                or type(model.get_submodule(name)) is cls)

    return {m: a for m, a in attrs.items() if not stale(m)}


def _recut(model: nn.Module, graph: Graph | None, attrs: dict, old: list, new: list) -> dict:
    """``attrs`` where the values that came from cut sizes under choices ``old`` (graph/splits.py ``proposals``)
    are recomputed for ``new`` (dropped where ``new`` no longer moves them): a size found for other choices is
    stale, and would fail the dry run of a plan that drops groups or adds count ties."""
    if graph is None or not graph.cuts:
        return attrs
    from secateur.graph.splits import proposals
    before, after = proposals(model, graph.cuts, old), proposals(model, graph.cuts, new)
    out: dict[str, dict[str, Any]] = {}
    for n, kv in attrs.items():
        for k, v in kv.items():
            if k not in before.get(n, {}) or before[n][k] != v:
                out.setdefault(n, {})[k] = v
            elif k in after.get(n, {}):
                out.setdefault(n, {})[k] = after[n][k]
    return out


def _tie_class(model: nn.Module, graph: Graph, cls: type, broad: bool):
    """``graph.ties`` plus the count ties of every module of class ``cls`` (graph/ties.py ``candidates``: the
    same code sizes them all), or None where that adds none."""
    from secateur.graph.ties import Ties, candidates
    ties = graph.ties.copy() if graph.ties else Ties()
    new = False
    for name, mod in model.named_modules():
        if type(mod) is cls and name:
            for a, b in candidates(graph.groups, name, broad):
                new = ties.tie(a, b, name) or new
    return ties if new else None


def _tie_note(cls: type) -> str:
    return (f"{cls.__name__}: reads its inner width from its input's shape; its groups keep as many channels as "
            f"the stream that enters it (count ties, graph/ties.py)")


def _attr_search(model: nn.Module, plan: Plan, expected, where: str, spent: list[int], dry_runs: "_DryRuns"
                 ) -> dict[str, dict[str, Any]]:
    """``plan.attrs`` plus the attribute updates that get the failed dry run further (graph/size_attrs.py)."""
    from secateur.graph import size_attrs, verify
    if spent[0] >= size_attrs.MAX_TRIALS:
        return plan.attrs
    pairs = size_attrs.size_pairs(expected)
    if not pairs:
        return plan.attrs

    def dry(attrs):  # a trial still counts against MAX_TRIALS when its dry run is a repeat (memo): same search
        trial = Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms, attrs=attrs)
        ok, w, _, _, exp, _, _ = dry_runs.check(trial)
        return ok, w or "", exp.step_no

    done: set[tuple[str, str]] = set()  # attributes the updaters already set (Linear.out_features): not tried
    try:
        sk = verify.skeleton(model)
        _apply(sk, Plan(plan.groups, plan.choices, heads=plan.heads, norms=plan.norms))
        mods = dict(model.named_modules())
        done = {(n, k) for n, m in sk.named_modules() if n in mods for k, v in vars(m).items()
                if not k.startswith("_") and k in vars(mods[n]) and _differs(v, vars(mods[n])[k])}
    except Exception:  # noqa: BLE001 - only a shortcut: without it every candidate is tried
        pass
    from secateur.graph.splits import proposals
    graph = dry_runs.graph
    moves = proposals(model, graph.cuts, plan.choices) if graph is not None and graph.cuts else None
    return size_attrs.Search(model, pairs, dry, spent, done, moves).run(plan.attrs, where, expected.step_no)


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - tensors and other values without a plain comparison
        return False


def _noted(model: nn.Module, plan: Plan) -> Plan:
    """The plan, its attribute updates written in its notes (a kept size is never changed silently)."""
    if plan.attrs:
        from secateur.graph.size_attrs import notes
        plan.notes.extend(n for n in notes(model, plan.attrs) if n not in plan.notes)
    return plan


def _without_module(model: nn.Module, plan: Plan, scope: str, dry: "_DryRuns") -> list:
    """The plan's choices without the groups inside the failing module and every module of its class (same code,
    same problem); where that is the model's own forward, without the first group that breaks it."""
    while True:
        cls = type(model.get_submodule(scope)) if scope else None
        scopes = {n for n, mod in model.named_modules() if type(mod) is cls} | {scope} if scope else set()
        # first the groups made there (a residual stream the module only reads is kept pruned: DeepSeek-V4's
        # compressor failing dropped the stream of the whole model); if it fails there again, every group it reads
        made = [(g, c) for g, c in plan.choices if not any(
            m.kind == "out" and _matches(m.module, scopes) for m in g.members)] if scope else []
        if scope and len(made) < len(plan.choices):
            return made
        keep = [(g, c) for g, c in plan.choices if not any(
            _matches(m.module, scopes) for m in g.members)] if scope else []
        if len(keep) < len(plan.choices) or not scope:
            break
        scope = scope.rpartition(".")[0]
    if not scope and len(plan.choices) > 1:  # the model's own forward: find the culprit, keep the rest
        bad = _culprit(plan, dry)
        keep = [c for i, c in enumerate(plan.choices) if i != bad]
    return keep


def _without_role(model: nn.Module, plan: Plan, bad: set[int], where: str) -> list:
    """The plan's choices without the groups ``bad`` (ids) and, in every module of the class of ``where``, the
    groups produced at the same place (same relative module path, tensor and dim) as a bad group's producers there:
    the other layers run the same code. Groups elsewhere keep their channels pruned."""
    def rel(name: str, base: str) -> str | None:
        if not base:
            return name
        return name[len(base):] if name == base or name.startswith(base + ".") else None

    cls = type(model.get_submodule(where))
    peers = [n for n, mod in model.named_modules() if type(mod) is cls] if where else [""]
    roles = {(rel(m.module, where), m.name, m.dim) for g, _ in plan.choices if id(g) in bad for m in g.members
             if m.kind == "out" and rel(m.module, where) is not None}

    def same_role(g: Group) -> bool:
        return any(m.kind == "out" and (rel(m.module, p), m.name, m.dim) in roles for m in g.members for p in peers)

    return [(g, c) for g, c in plan.choices if id(g) not in bad and not same_role(g)]


def _culprit(plan: Plan, dry: "_DryRuns") -> int:
    """Index of the first choice whose addition breaks the forward (bisection on prefixes: log2(n) dry runs)."""
    lo, hi = 0, len(plan.choices)  # prefix lo runs, prefix hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = dry.check(Plan(plan.groups, plan.choices[:mid]))[0]
        lo, hi = (mid, hi) if ok else (lo, mid)
    return hi - 1


class _DryRuns:
    """``verify.check`` of plans on one model, graph and input, remembered by what the dry run runs: the choices
    (group and channels, in order), the size attributes and the device it runs on. A dry run's outcome depends on
    nothing else, and one plan's verification repeats some (the search loop starts where the first loop ended; a
    size-attribute trial whose value is the model's own is the plan without it): efficientformerv2_l ran 18 dry
    runs, 9 of them repeats. Where ``here`` (the caller applies the slices), the twin's slices and MAC count are
    kept too. ``memo``: shared by the loops of one ``_verified``."""

    def __init__(self, model: nn.Module, example_inputs: Any, graph: Graph | None, want, memo: dict | None) -> None:
        self.model, self.inputs, self.graph, self.want = model, example_inputs, graph, want
        self.memo = memo if memo is not None else {}
        self.cpu = {a: _runs_here(model, example_inputs, a, self.memo) for a in (False, True)}  # see _key

    @staticmethod
    def plan_key(plan: Plan) -> tuple:
        """What a dry run of ``plan`` runs, but the device: the choices, the size attributes, the heads mode."""
        return (plan.heads, repr(plan.attrs), tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))

    def _key(self, plan: Plan, here: bool) -> tuple:
        return ("applied" if here else self.cpu[False], *self.plan_key(plan))

    def _expected(self, plan: Plan):
        """``verify.expected`` for the plan's choices: one per choices, reset for each dry run (its set-up walks
        every atom of the capture: 65 ms a trial on efficientformerv2_l)."""
        from secateur.graph import verify
        if self.graph is None:
            return None
        if not _MEMO:
            return verify.expected(self.graph, plan.choices)
        key = ("expected", tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))
        exp = self.memo.get(key)
        if exp is None or getattr(exp.tracer, "meta_trace", ()) is None:  # (no meta trace: verify.expected's None)
            exp = self.memo[key] = verify.expected(self.graph, plan.choices)
            return exp
        exp.reset()
        return exp

    def _apply(self, plan: Plan, here: bool, record: "_Slices | None") -> Callable[[nn.Module], Any]:
        """The plan's apply for the dry run's copy. The slices depend on the choices only (the size attributes are
        set after them), so the trials of one search, which differ in attributes, slice once: the later ones
        take the first one's tensors (``_apply``'s ``reuse``: new tensors, never written in place)."""
        if not _MEMO:
            return plan.apply if record is None else (lambda base: _apply(base, plan, record=record))
        device = "cpu" if self.cpu[here] else "meta"
        key = ("slices", device, tuple((id(g), c.numpy().tobytes()) for g, c in plan.choices))
        reuse = self.memo.get(key)
        if reuse is not None:
            return lambda base: _apply(base, plan, reuse=reuse, record=record)

        def first(base: nn.Module) -> Any:
            made = record if record is not None else _Slices()
            out = _apply(base, plan, record=made)
            self.memo[key] = made  # only complete slices: an apply that raised leaves none
            return out
        return first

    def check(self, plan: Plan, here: bool = False) -> tuple:
        """(ok, failing module, error, groups of a shape mismatch, ``verify.Expected`` or None, slices, MACs):
        ``verify.check``'s answer, then what ``_verify_loop`` and the size-attribute search read from its run
        (the slices and MACs only where ``here``)."""
        from secateur.graph import verify
        from secateur.metrics import MacTally
        expected = self._expected(plan)
        key = self._key(plan, here) if _MEMO else None
        hit = self.memo.get(key) if key is not None else None
        if hit is not None:
            (ok, where, err, bad), step_no, trace, slices, macs = hit
            if expected is not None:  # as the run left it: how far it got, on which trace
                expected.step_no, expected.trace = step_no, trace
            return ok, where, err, bad, expected, slices, macs
        tally, slices = (MacTally(), _Slices()) if here else (None, None)
        apply = self._apply(plan, here, slices)
        outputs: list = []
        res = verify.check(self.model, self.inputs, apply, self.want, expected, tally, applied=here,
                           here=self.cpu[here], outputs=outputs)
        macs = tally.total if here else None
        if key is not None:
            self.memo[key] = (res, getattr(expected, "step_no", None), getattr(expected, "trace", None), slices, macs)
            if res[0] and res[2] is None and outputs:  # ran here to the end: for _exact
                self.memo[("outputs", *self.plan_key(plan))] = outputs
        return (*res, expected, slices, macs)


LOCAL_NOTE = ("size attributes / scale folds: the model does not run here, so their numeric proof ran on a CPU copy "
              "of one module per class (graph/local_proof.py), with random weights where the model has none")
FOLD_TRIALS = 4  # more size-search dry runs for a plan with scale folds: the logits proof checks what they find
_MEMO = True  # tests turn it off to compare with the plain path (tests/test_engine_fast_paths.py)


def _runs_here(model: nn.Module, example_inputs: Any, applied: bool, memo: dict | None) -> bool:
    """``verify.runs_here``, once per plan (``memo``: ``_DryRuns``'): it walks every tensor of the model, and one
    plan asked it four times (mobilenet_v3_small: 2 ms each)."""
    from secateur.graph import verify
    if memo is None:
        return verify.runs_here(model, example_inputs, applied)
    if "here_bytes" not in memo:  # one walk for both answers
        memo["here_bytes"] = verify.here_bytes(model, example_inputs)
    size = memo["here_bytes"]
    return size is not None and size <= (verify.HERE_BYTES_APPLIED if applied else verify.HERE_BYTES)
