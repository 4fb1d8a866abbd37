"""Sizes a model keeps in its own int attributes, found and proven by the dry run (issue #3).

Model code often re-uses a size it stored at construction: timm's ``Scale`` views its vector with
``self.shape = (dim, 1, 1)``, MetaFormer attention reshapes with ``self.attention_dim``, EfficientViT splits q/k/v
with ``[self.key_dim, self.key_dim, self.d]``. Per-class updaters (modules.py, timm_sizes.py) cover the classes we
know; this is the general rule for the others, and it guesses nothing the dry run has not proven:

* the plan says, for every op output of the capture, the shape the pruned model must produce
  (``verify.Expected``); every dim that shrinks gives a pair (old size -> new size);
* when the pruned forward fails or an op's shape differs from the plan's inside module ``M``, the int (or
  tuple / list of int) attributes of ``M``, its descendants and its ancestors whose value equals an old size are candidates, and
  each new size that old size maps to is an option;
* a candidate is taken only when the dry run with it gets strictly further (more ops whose shapes all equal the
  plan's) than without it, and the plan keeps it only if the whole model then runs with every op shape equal to
  the plan's; finally every (class, attribute) taken is dropped again where the dry run passes without it;
* greedy is not enough where two attributes both answer the first failure and only one is the pruned dim's size:
  Qwen4-exp's hyper connections check ``x.shape[-1] == self.hc_count * self.hidden_size``, and both ``hc_count``
  4 -> 2 and ``hidden_size`` 32 -> 16 pass it and get the dry run equally far; the first one taken, ``hc_count``,
  fails later at ``unflatten(-1, (self.hc_count, self.hidden_size))``, where no single further update repairs
  it. So a greedy path that ends with the dry run still failing is followed by the other options of its first
  step, each as a greedy path of its own (``BACKTRACK_TRIALS``); the first that passes replaces it (or else the
  one that gets furthest, if further than the greedy path). Only the first step branches: that is where the
  search chose which attribute the failure is about; the later steps follow from that choice.

Why shapes are enough evidence: an attribute that is not the size of the pruned dim either breaks a shape
(refused) or is not needed (dropped by the last step); one that is, but was left stale, is exactly what
``verify`` exists to catch. Every update is written in ``plan.notes``, the structure record (so a reload sets
it) and ``plan.attrs``. Attributes whose name starts with ``_`` and bools are never touched."""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, Callable, Iterable

from torch import nn

MAX_TRIALS = 12  # dry runs one plan's searches may spend in all; past that, groups are kept whole (noted) as before
# 12, not 32: the models it fixes (caformer, visformer, vit_relpos, efficientvim) need fewer; on the ones it cannot
# fix the CPU time wasted fell (efficientvit_m0 4.4 -> 3.1 s, lowformer_b0 3.1 -> 1.6 s, same MACs everywhere)
BACKTRACK_TRIALS = 8  # dry runs one plan's searches may spend, besides MAX_TRIALS, on other first steps (Search.run)
# a budget of its own, so that the greedy search runs exactly as before and only a failed greedy path costs more;
# 8: qwen4_exp's right path takes 3 (hidden_size with its peers, hc_norm.group_size, one for _minimal), which
# leaves room for a wrong alternative or two before it


def size_pairs(expected: Any) -> dict[int, list[int]]:
    """old size -> new sizes (most frequent first) over every compared op output of the capture."""
    pairs: dict[int, Counter] = {}
    for _, shapes0, labs in expected.trace:
        for lab, s0 in zip(labs, shapes0):
            want = expected.shape(lab, s0)
            if want is None:
                continue
            for a, b in zip(s0, want):
                if a != b:
                    pairs.setdefault(int(a), Counter())[int(b)] += 1
    return {a: [b for b, _ in c.most_common()] for a, c in pairs.items()}


def _ints(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) > 0
            and all(isinstance(e, int) and not isinstance(e, bool) for e in v))


def _options(v: Any, pairs: dict[int, list[int]], limit: int = 4) -> list[Any]:
    """New values for attribute value ``v``: an int maps through ``pairs``; a tuple / list maps every element
    that is an old size (one option per combination of the distinct old sizes' new sizes)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return list(pairs.get(v, []))[:limit]
    if not _ints(v):
        return []
    olds = [e for e in dict.fromkeys(v) if e in pairs]
    out = []
    for combo in itertools.islice(itertools.product(*(pairs[e][:2] for e in olds)), limit):
        m = dict(zip(olds, combo))
        out.append(type(v)(m.get(e, e) for e in v))
    return out


def _scopes(name: str, names: list[str]) -> list[str]:
    """``name``, its descendants (its code may call a child's method, not its forward: timm's
    ``rel_pos.get_bias()``), then its ancestors, innermost first (the root, "", last)."""
    out = [name] + ([n for n in names if n.startswith(name + ".")] if name else [])
    while name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out


class Search:
    """Greedy search for attribute updates (see the module docstring). ``dry(attrs)`` runs the dry run with the
    plan plus ``attrs`` ({module: {attr: value}}) and returns (ok, failing module, ops matched)."""

    def __init__(self, model: nn.Module, pairs: dict[int, list[int]],
                 dry: Callable[[dict], tuple[bool, str, int]], spent: list[int] | None = None,
                 done: set[tuple[str, str]] = frozenset(), proposals: dict | None = None) -> None:
        self.model, self.pairs, self.dry, self.done = model, pairs, dry, done  # done: set by the updaters
        # {module: {attr: value}} derived, not guessed, from the plan (graph/splits.py: the sizes of cut sections):
        # tried first, all together, then pruned to what the dry run needs like any other update (``_minimal``)
        self.proposals = {n: {k: v for k, v in kv.items() if (n, k) not in done} for n, kv in (proposals or {}).items()}
        self.mods = dict(model.named_modules())
        # dry runs spent by one plan's searches, greedy then backtracking (shared by them: a list the caller keeps)
        self.spent = spent if spent is not None else [0, 0]
        self.spent.extend([0] * (2 - len(self.spent)))
        self.mode = 0  # which budget the next trials draw on: 0 greedy (MAX_TRIALS), 1 backtracking

    @property
    def trials(self) -> int:
        return self.spent[0]

    def _left(self) -> bool:
        return self.spent[self.mode] < (MAX_TRIALS, BACKTRACK_TRIALS)[self.mode]

    def _run(self, attrs: dict) -> tuple[bool, str, int]:
        self.spent[self.mode] += 1
        return self.dry(attrs)

    def _candidates(self, where: str, attrs: dict) -> list[tuple[str, list[dict[str, Any]]]]:
        """(module, options) where an option is {attr: new value}. Per module, first the attributes that hold the
        same old size, together (``split([self.key_dim, self.key_dim, self.d])`` needs both at once), then each
        attribute alone."""
        out = []
        for scope in _scopes(where, list(self.mods)):
            mod = self.mods.get(scope)
            if mod is None:
                continue
            same: dict[int, list[str]] = {}
            singles = []
            for k, v in vars(mod).items():
                if k.startswith("_") or (scope, k) in self.done:
                    continue
                opts = _options(v, self.pairs)
                if k in attrs.get(scope, {}):  # set for other choices (groups dropped since): revise it
                    opts = [o for o in [v, *opts] if o != attrs[scope][k]]
                elif isinstance(v, int) and opts:
                    same.setdefault(v, []).append(k)
                if opts:
                    singles.append((scope, [{k: o} for o in opts]))
            for v, keys in same.items():
                if len(keys) > 1:
                    out.append((scope, [{k: o for k in keys} for o in self.pairs[v][:4]]))
            out.extend(singles)
        return out

    def _peers(self, name: str, keys) -> dict[str, dict[str, Any]]:
        """The same attributes in every module of ``name``'s class, mapped by their most frequent new size: the
        other layers run the same code (each is still proven by the dry run, which must get further)."""
        cls = type(self.mods[name])
        out: dict[str, dict[str, Any]] = {}
        for n, m in self.mods.items():
            if type(m) is cls and n != name:
                for key in keys:
                    opts = _options(vars(m).get(key), self.pairs)
                    if opts:
                        out.setdefault(n, {})[key] = opts[0]
        return out

    def _trials(self, attrs: dict, scope: str, opt: dict[str, Any]) -> list[dict]:
        """``attrs`` with ``opt`` in ``scope``, first in every peer too; a value back to the model's own is no
        update at all."""
        own = vars(self.mods[scope])
        single = _merge(attrs, {scope: opt})
        for k, v in opt.items():
            if own.get(k) == v:
                del single[scope][k]
        single = {n: kv for n, kv in single.items() if kv}
        revert = any(own.get(k) == v for k, v in opt.items())
        both = single if revert or not scope else _merge(single, self._peers(scope, opt))
        return [both, single] if both != single else [single]  # (no peers: one dry run, not the same one twice)

    def run(self, attrs: dict, where: str, reached: int) -> dict:
        """Attribute updates added to ``attrs`` while each one gets the dry run further (``reached``: ops matched
        by the failing run). Returns the new attrs (``attrs`` itself when nothing helped).

        Greedy first (``MAX_TRIALS``); where that path ends with the dry run still failing, the other candidates
        of its first step are tried in their turn, each followed greedily (``BACKTRACK_TRIALS``, see there), and
        a path that passes, or else gets further than the greedy one, replaces it."""
        attrs = {k: dict(v) for k, v in attrs.items()}
        trial = _merge(attrs, self.proposals)
        if trial != attrs and self._left():
            ok, where2, got = self._run(trial)
            if ok:
                return self._minimal(trial, attrs)
            if got > reached:
                attrs, where, reached = trial, where2, got
        ok, best, far, first = self._walk(attrs, where, reached)
        if ok or first is None:
            return best
        self.mode = 1  # backtracking, on its own budget: the greedy search's results elsewhere stay as they were
        try:
            while self._left():
                ok, alt, got, first = self._walk(attrs, where, reached, after=first)
                if first is None:
                    break
                if ok:
                    return alt
                if got > far:
                    best, far = alt, got
        finally:
            self.mode = 0
        return best

    def _walk(self, attrs: dict, where: str, reached: int, after: int = -1) -> tuple[bool, dict, int, int | None]:
        """Greedy path from ``attrs``: (passed, attrs, ops matched at its end, index of its first step's option
        in ``_candidates`` order, None where no step got further). ``after``: the first step only considers the
        options past that index (a path that starts with another update)."""
        first = None
        while True:
            step = self._step(attrs, where, reached, after if first is None else -1)
            if step is None:
                return False, attrs, reached, first
            ok, trial, where, got, k = step
            first = k if first is None else first
            if ok:
                return True, self._minimal(trial, attrs), got, first
            attrs, reached = trial, got

    def _step(self, attrs: dict, where: str, reached: int, after: int) -> tuple | None:
        """The first trial (options past ``after``) that passes or gets the dry run past ``reached``: (passed, its
        attrs, failing module, ops matched, option index); None when none does within the budget."""
        k = -1
        for scope, opts in self._candidates(where, attrs):
            for opt in opts:
                k += 1
                if k <= after:
                    continue
                for trial in self._trials(attrs, scope, opt):
                    if not self._left():
                        return None
                    ok, where2, got = self._run(trial)
                    if ok or got > reached:
                        return ok, trial, where2, got, k
        return None

    def _minimal(self, attrs: dict, base: dict) -> dict:
        """Drop, per (class, attribute) added since ``base``, the updates the dry run passes without."""
        added = {(type(self.mods[n]), k) for n, kv in attrs.items() for k in kv if k not in base.get(n, {})}
        for cls, key in sorted(added, key=lambda ck: (ck[0].__name__, ck[1])):
            if not self._left():
                break
            trial = {n: {k: v for k, v in kv.items() if not (k == key and type(self.mods[n]) is cls
                                                               and k not in base.get(n, {}))}
                     for n, kv in attrs.items()}
            trial = {n: kv for n, kv in trial.items() if kv}
            if trial != attrs and self._run(trial)[0]:
                attrs = trial
        return attrs


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for n, kv in b.items():
        out.setdefault(n, {}).update(kv)
    return out


def set_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    for name, kv in attrs.items():
        mod = model.get_submodule(name)
        for k, v in kv.items():
            setattr(mod, k, v)


def notes(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, kv in attrs.items():
        mod = model.get_submodule(name)
        for k, v in kv.items():
            out.append(f"{name or '<model>'}.{k}: {getattr(mod, k)!r} -> {v!r} (a size the model keeps itself; "
                       "updated because the dry run matched every op shape of the plan only with it)")
    return out


def clear_caches(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> None:
    """Empty the tensor caches modules keep in dict attributes (timm's LeViT / EfficientViT
    ``attention_bias_cache``: ``attention_biases[:, idxs]`` kept per device in eval mode). A cache filled before
    pruning holds tensors of the unpruned sizes, which the pruned model would silently reuse; and a forward that
    hits it runs fewer ops than one that fills it, so the capture and every dry run start from empty caches to run
    the same ops. Only dicts named ``*cache*`` whose values are all tensors: the model recomputes them on a miss.
    ``modules``: ``model.modules()`` where the caller has walked them already (a walk per call, three per plan)."""
    import torch
    for mod in model.modules() if modules is None else modules:
        d = vars(mod)
        for k in [k for k in d if "cache" in k]:  # (a name test per attribute in C, then the few hits)
            v = d[k]
            if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                v.clear()
