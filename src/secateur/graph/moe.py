"""Hugging Face mixture-of-experts ``Experts`` modules (transformers 5.x) as one op: the residual stream ``H`` and
each expert's intermediate width ``I``.

Why a leaf: transformers 5 stores experts as fused 3-D parameters (Mixtral: ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) and the forward it dispatches to (``use_experts_implementation``: an eager loop over the
experts that tokens hit, ``batched_mm`` or ``grouped_mm``) is routed by a data-dependent top-k. Traced op by op, it
meets ``_grouped_mm``, ``histc``, ``floor_divide``, ``index_put_`` with no channel rule, so ``H`` and ``I`` stayed
whole in every MoE model (mixtral, qwen*_moe, olmoe, gpt_oss ... kept 0.5-1.0 of their MACs at ratio 0.5). As one op
the routing is never traced: it picks *which* expert reads a token, never mixes channels; every expert reads all of
``H`` and writes all of ``H``, and intermediate channel ``i`` of an expert is its gate row ``i``, its up row ``i``
and its down column ``i``. Zeroing down column ``i`` (the oracle's reference) removes exactly that channel's
contribution, whatever the gate function, provided the gate is applied to each (gate_i, up_i) pair on its own.

What is proven before a module is handled (else it is kept whole, with a note naming the reason):
- its forward is transformers' experts dispatcher (the code object ``use_experts_implementation`` installs), so the
  layout flags it set (``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``) describe every
  implementation it may run;
- its only tensors are the expert weights (and biases) with shapes that agree with those flags;
- no post-expert norm (``has_post_expert_norm``: a norm over ``H`` inside each expert);
- the gate (``_apply_gate``, the default or a model's own: gpt_oss / deepseek_v4 clamp, gpt_oss interleaves gate and
  up) or, without a gate, the activation acts on each channel on its own: on random inputs, the outputs for a subset
  of channels equal the gate of that subset alone.

Each expert keeps its own intermediate channels, the same count in each (S16): experts are trained apart, so
channel ``i`` of one expert has nothing to do with channel ``i`` of another, and one set for all (a channel's
importance summed over the experts, what this did before) keeps channels that matter in some experts and drops
ones that matter in others. The capture registers the intermediate atoms with the expert count
(``Tracer.experts``); the group they form is marked ``Group.experts`` when its members are only this module's
tensors (groups.py ``_assign_experts``), each expert ranks its own channels (importance.py ``expert_scores``), the
choice is ``[E, n]`` and the slicer gathers per expert along the channel dim (structured/apply.py
``_take_per_slice``), so the fused tensors stay dense ``[E, 2I', H]`` / ``[E, H, I']`` and the module stays the same
class with a smaller ``I``, which every implementation (eager, batched_mm, grouped_mm) runs unchanged. The oracle
zeroes each expert's own down columns (``Plan.zero_consumers``); a reload needs only the shapes (the values come
from the saved state_dict). Measured at ratio 0.5, L1 (benchmarks/bench_moe_experts.py): MACs unchanged (mixtral
0.280, qwen2_moe 0.287, qwen3_moe 0.297, olmoe / gpt_oss / phimoe 0.280), oracle within 2e-7; the experts'
importance kept is 0.529-0.531 vs 0.514-0.518 shared on random weights, 0.838-0.841 vs 0.686-0.707 where each
expert's channels are scaled by factors of its own. No option keeps the shared set: per expert keeps at least the
importance a shared set keeps in every expert (each expert's top ``n``), at the same shapes and cost; a 1-d choice
on such a group (``allocate``'s latency allocator, which ranks one score per channel) still means one set for all.
DBRX's flat ``[E * I, H]`` rows and the model-specific modules (moe_models.py) and ``bmm`` experts (rules/matmul.py)
still share one set. Experts written as separate modules (an ``nn.ModuleList`` / ``ModuleDict`` of MLPs) are one
group each, so they always chose their own channels.

The expert count ``E`` is never pruned (routing inputs are blocked: the router's outputs stay).

Routers (``MixtralTopKRouter`` and kin: ``F.linear(x, self.weight)`` on a module of their own) are read as Linears
(``is_router``), so the residual stream they read is pruned with the rest; a router left a constant made every
channel of ``H`` one unit with the experts it feeds. Measured at ratio 0.5 over the registry's MoE causal LMs
(``benchmarks/bench_zoo_depth.py --hf-causal-lm --moe``, MACs after / dense, ``_grouped_mm`` counted in both):
mixtral, olmoe, gpt_oss, phimoe, granitemoe* 0.901 -> 0.280, qwen2_moe 0.774 -> 0.287, qwen3_moe 0.847 -> 0.297,
ernie4_5_moe 0.665 -> 0.286, minimax 0.954 -> 0.328; 25 of 35 runnable types now under 0.4 (3 before)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import LEAF_PROBES, UPDATER_PROBES, _channels, _consumed, _input, _shape_for

_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
_INTER_ATTRS = ("intermediate_dim", "intermediate_size", "moe_intermediate_size", "expert_dim")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size")


@dataclass(frozen=True)
class Layout:
    """Where ``H`` and ``I`` sit in the expert tensors. ``up``: ``gate_up_proj`` or ``up_proj``; ``up_rows``: the
    dim of ``up`` holding its ``2I`` (or ``I``) rows; ``pairs``: 2 with a gate (gate and up rows), else 1."""
    up: str
    up_rows: int
    up_hidden: int
    down_inter: int
    down_hidden: int
    pairs: int
    interleaved: bool
    bias: bool
    experts: int
    hidden: int
    inter: int


_DISPATCH: list[Any] = []


def _dispatcher_code() -> Any:
    """The code object of the forward ``use_experts_implementation`` installs (one for every decorated class)."""
    if not _DISPATCH:
        from transformers.integrations.moe import use_experts_implementation

        class _Probe(nn.Module):
            def __init__(self, config):
                super().__init__()

            def forward(self, x):
                return x
        _DISPATCH.append(use_experts_implementation(_Probe).forward.__code__)
    return _DISPATCH[0]


def _is_candidate(mod: nn.Module) -> bool:
    return all(isinstance(getattr(mod, f, None), bool) for f in _FLAGS)


def layout(mod: nn.Module) -> Layout | str:
    """The module's layout, or why it is refused (a sentence)."""
    cls = type(mod)
    try:
        if getattr(cls.forward, "__code__", None) is not _dispatcher_code():
            return "its forward is not transformers' experts dispatcher"
    except ImportError:
        return "transformers.integrations.moe is not importable"
    if mod.has_post_expert_norm:
        return "a norm over the hidden size inside each expert (has_post_expert_norm)"
    up = "gate_up_proj" if mod.has_gate else "up_proj"
    names = {up, "down_proj"} | ({f"{up}_bias", "down_proj_bias"} if mod.has_bias else set())
    tensors = {n for n, _ in mod.named_parameters()} | {n for n, _ in mod.named_buffers()}
    if tensors != names:
        return f"tensors {sorted(tensors)}, expected {sorted(names)}"
    w, d = getattr(mod, up), mod.down_proj
    if w.dim() != 3 or d.dim() != 3:
        return f"expert weights of {w.dim()} and {d.dim()} dims, expected 3"
    t = mod.is_transposed
    rows, hid = (2, 1) if t else (1, 2)
    d_inter, d_hid = (1, 2) if t else (2, 1)
    e, h, i = int(d.shape[0]), int(d.shape[d_hid]), int(d.shape[d_inter])
    pairs = 2 if mod.has_gate else 1
    if tuple(w.shape[i_] for i_ in (0, rows, hid)) != (e, pairs * i, h):
        return f"{up} {tuple(w.shape)} does not match down_proj {tuple(d.shape)} (transposed={t})"
    if mod.has_bias and (tuple(getattr(mod, f"{up}_bias").shape) != (e, pairs * i)
                         or tuple(mod.down_proj_bias.shape) != (e, h)):
        return "bias shapes do not match the weights"
    lay = Layout(up, rows, hid, d_inter, d_hid, pairs, pairs == 2 and not mod.is_concatenated, mod.has_bias, e, h, i)
    reason = _channelwise(mod, lay)
    return reason if reason else lay


def _columns(lay: Layout, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of the ``up`` tensor (``pairs * n`` of them) that intermediate channels ``keep`` own."""
    if lay.pairs == 1:
        return keep
    if lay.interleaved:
        return torch.stack([2 * keep, 2 * keep + 1], dim=1).reshape(-1)
    return torch.cat([keep, keep + n])


def _channelwise(mod: nn.Module, lay: Layout) -> str | None:
    """None if the gate (or activation) acts on each intermediate channel on its own, on random inputs wide enough
    to cross the clamps models use; else why not."""
    fn = mod._apply_gate if lay.pairs == 2 else getattr(mod, "act_fn", None)
    if fn is None:
        return "no act_fn"
    n = 6
    z = torch.randn(5, lay.pairs * n, generator=torch.Generator().manual_seed(0)) * 8
    keep = torch.tensor([0, 2, 5])
    try:
        with torch.no_grad():
            full, part = fn(z), fn(z[:, _columns(lay, keep, n)])
    except Exception as e:  # noqa: BLE001 - a gate that cannot run on its own is not proven
        return f"its gate does not run on a plain tensor ({type(e).__name__})"
    if tuple(full.shape) != (5, n) or tuple(part.shape) != (5, keep.numel()):
        return f"its gate maps {lay.pairs * n} columns to {tuple(full.shape)}, expected {n} per row"
    if not torch.allclose(part, full[:, keep], rtol=1e-5, atol=1e-6):
        return "its gate mixes intermediate channels"
    return None


# ---------------------------------------------------------------- capture
def _experts(tr: Tracer, mod: nn.Module, args, kwargs, out, lay: Layout) -> None:
    """Input channels -> the up tensor's hidden dim; one atom per intermediate channel on its up rows (gate and up
    together), its bias and ``down_proj``'s input dim; ``down_proj``'s hidden dim (and bias) are new channels.
    Routing inputs (top-k indices and weights) are blocked: the expert count stays."""
    x = _input(args, kwargs)
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a is not x:
            tr.atoms.block(tr.get(a))
    up, down = getattr(mod, lay.up), mod.down_proj
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(up, lay.up_hidden, _consumed(tr, chan), "in")
    inter = tr.atoms.new(lay.inter)
    rows = inter if lay.pairs == 1 else inter.repeat_interleave(2) if lay.interleaved else torch.cat([inter, inter])
    owners = [up, down]
    tr.slot(up, lay.up_rows, rows, "out")
    if lay.bias:
        owners.append(getattr(mod, f"{lay.up}_bias"))
        tr.slot(owners[-1], 1, rows, "out")
    tr.slot(down, lay.down_inter, inter, "in")
    names = frozenset(".".join(p for p in tr.name_of(t) if p) for t in owners)
    tr.experts.append((inter, lay.experts, names))  # each expert keeps its own channels (groups.py)
    hidden = tr.atoms.new(lay.hidden)
    tr.slot(down, lay.down_hidden, hidden, "out")
    if lay.bias:
        tr.slot(mod.down_proj_bias, 1, hidden, "out")
    tr.set(out, _shape_for(out.dim(), -1, hidden))


def _kept(reason: str):
    def rule(tr: Tracer, mod: nn.Module, args, kwargs, out) -> None:
        """An experts module whose layout is not proven: its inputs' channels are kept, its outputs are new
        channels that are never pruned."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                tr.atoms.block(tr.get(a))
        if isinstance(out, torch.Tensor):
            atoms = tr.atoms.new(out.size(-1))
            tr.atoms.block(atoms)
            tr.set(out, _shape_for(out.dim(), -1, atoms))
        tr.notes.append(f"{tr.where()}: {type(mod).__name__} experts kept whole: {reason}")
    return with_meta(rule, lambda m, args, kwargs: _own_or_refuse(m, args, kwargs, reason))


def _own_or_refuse(mod: nn.Module, args, kwargs, reason: str):
    """On meta, an experts module whose layout is not proven runs its own forward (no stand-in: its output shape is
    not known); where that fails, as transformers' experts code does on meta, a PruningError names the module, the
    op's error and why no stand-in was used, never a raw meta-kernel error from deep inside transformers."""
    try:
        return type(mod).forward(mod, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the meta kernels raise
        from secateur.errors import fail
        raise fail(f"{type(mod).__name__} does not run on the meta device ({type(e).__name__}: {str(e)[:200]}) and "
                   f"has no stand-in there: its layout is not proven ({reason})", where=type(mod).__name__,
                   hint="plan on real (small) inputs on the CPU") from e


def experts_rule(mod: nn.Module):
    """The leaf rule for a transformers experts module (None for any other module)."""
    if not _is_candidate(mod):
        return None
    lay = layout(mod)  # once per module and capture (the gate probe runs here)
    if not isinstance(lay, Layout):
        return _kept(lay)
    return with_meta(lambda tr, m, args, kwargs, out: _experts(tr, m, args, kwargs, out, lay),
                     lambda m, args, kwargs: _experts_meta(m, args, kwargs, lay))


def _experts_meta(mod: nn.Module, args, kwargs, lay: Layout) -> torch.Tensor:
    """The dispatcher's output on meta: the hidden states' shape, ``H`` from ``down_proj``."""
    x = args[0] if args else kwargs["hidden_states"]
    up, down = getattr(mod, lay.up), mod.down_proj
    need(x.size(-1) == up.size(lay.up_hidden) and up.size(lay.up_rows) == lay.pairs * down.size(lay.down_inter),
         mod, f"input {tuple(x.shape)}, {lay.up} {tuple(up.shape)}, down_proj {tuple(down.shape)}")
    return x.new_empty((*x.shape[:-1], down.size(lay.down_hidden)))


LEAF_PROBES.append(experts_rule)


# ---------------------------------------------------------------- meta device
def with_meta(rule, meta_forward):
    """``rule`` (a leaf rule) with the stand-in forward ``meta_stand_ins`` runs on meta."""
    rule.meta_forward = meta_forward
    return rule


def need(ok: bool, mod: nn.Module, what: str) -> None:
    """A stand-in's shape check: the error the module's own forward would raise (the dry run reports it)."""
    if not ok:
        raise RuntimeError(f"{type(mod).__name__}: shapes do not agree: {what}")


@contextlib.contextmanager
def meta_stand_ins(rules: dict, tally: Any = None):
    """While the model runs on meta, every proven experts module (``rules``: module -> leaf rule; those with a
    ``meta_forward``) whose tensors are on meta returns an empty tensor of its output shape instead of running.

    Why: no experts code of transformers runs on meta. ``grouped_mm``'s meta kernel takes only bf16 / fp16 (the CPU
    kernel takes fp32), the eager loop asks which experts the tokens hit (``nonzero``, ``.item()``), DBRX and JetMoE
    route with ``.tolist()``, LongCat's router gathers with top-k indices. A meta forward of an MoE model failed
    inside them (planning a large MoE model on meta did not work at all). The stand-in is exact where it is used:
    these modules are leaves, whose labels follow from their tensors and their output's shape only, and the output
    shape follows from the input's and the proven layout (routing picks which expert reads a token, never a size).
    It checks what the module's forward would check (input width against the expert weights, the sizes the module
    reshapes with), so a meta dry run of a plan still fails where the pruned forward would. The MACs of a meta
    forward are then unknown (``tally`` gives up); ``count_macs`` on the real model counts them."""
    patched = []
    try:
        for mod, rule in rules.items():
            fn = getattr(rule, "meta_forward", None)
            if fn is None:  # (most modules: no parameter walk for them)
                continue
            t = next(mod.parameters(), None)
            if t is None or t.device.type != "meta" or "forward" in vars(mod):
                continue
            mod.forward = _stand_in(mod, fn, tally)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def _stand_in(mod: nn.Module, fn, tally: Any):
    def forward(*args, **kwargs):
        if tally is not None:
            tally.flops = None
        return fn(mod, args, kwargs)
    return forward


def meta_rules(model: nn.Module) -> dict:
    """The leaf rules with a stand-in of a model whose tensors are on meta (empty for any other model)."""
    from secateur.graph.modules import leaf_rule
    if not any(t.device.type == "meta" for t in model.parameters()):
        return {}
    rules = {m: leaf_rule(m) for m in model.modules() if _is_candidate(m) or _model_specific(m)}
    return {m: r for m, r in rules.items() if getattr(r, "meta_forward", None) is not None}


def _model_specific(mod: nn.Module) -> bool:
    from secateur.graph.moe_models import known
    return known(mod)


# ---------------------------------------------------------------- sizes after slicing
def _experts_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The intermediate and hidden sizes the module stores (``intermediate_dim`` / gpt_oss ``intermediate_size``,
    ``hidden_dim`` / ``hidden_size``), from the sliced ``down_proj``."""
    d = mod.down_proj
    t = mod.is_transposed
    new = {"inter": int(d.shape[1 if t else 2]), "hidden": int(d.shape[2 if t else 1])}
    set_ = {}
    for kind, attrs in (("inter", _INTER_ATTRS), ("hidden", _HIDDEN_ATTRS)):
        for k in attrs:
            if isinstance(old.get(k), int) and not isinstance(old.get(k), bool):
                setattr(mod, k, new[kind])
                set_[k] = new[kind]
    return set_


def experts_updater(mod: nn.Module):
    return _experts_attrs if _is_candidate(mod) and hasattr(mod, "down_proj") else None


UPDATER_PROBES.append(experts_updater)


def _router_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    mod.hidden_dim = int(mod.weight.shape[1])
    return {"hidden_dim": mod.hidden_dim}


def router_updater(mod: nn.Module):
    """transformers' routers (``MixtralTopKRouter`` and ~40 kin) run ``F.linear(x.reshape(-1, self.hidden_dim),
    self.weight)``: ``hidden_dim`` is the weight's column count whenever the model runs, so it follows the sliced
    weight. Without this the size search found it on the CPU (and the oracle proved it), but a plan on meta, where
    no numeric proof runs, kept the whole residual stream of every model with such a router."""
    cls = type(mod)
    w = getattr(mod, "weight", None)
    if (cls.__module__.startswith("transformers.") and "Router" in cls.__name__ and isinstance(w, nn.Parameter)
            and w.dim() == 2 and isinstance(getattr(mod, "hidden_dim", None), int)):
        return _router_attrs
    return None


UPDATER_PROBES.append(router_updater)


# ---------------------------------------------------------------- Hugging Face config
def config_sizes(model: nn.Module, changed: dict[str, Any]) -> dict[str, int]:
    """Config fields that state a width of a model with recognised experts (``moe_intermediate_size``,
    ``intermediate_size``, ``shared_expert_intermediate_size``, LongCat's ``expert_ffn_hidden_size`` ...), each
    proven by building the model on the meta device: a trial value shows which tensor dims the field sizes (those
    that change with it); the new value is read from the pruned model along the first of them and kept only when a
    build with it gives the pruned model's size along every one of them (other dims follow other fields: a pruned
    hidden size the config does not state). A field that also sizes dense MLPs that kept another width, or layers
    of differing widths, is left: the structure record reloads those. ``changed``: fields already updated (the
    builds start from them)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    from secateur.graph.moe_models import proven as model_proven
    if not any(isinstance(layout(m), Layout) if _is_candidate(m) else model_proven(m) for m in model.modules()):
        return {}
    base = copy.deepcopy(config)
    for k, val in changed.items():
        setattr(base, k, val)
    fields = {k: val for k, val in base.to_dict().items() if ("intermediate" in k or "ffn_hidden" in k)
              and isinstance(val, int) and not isinstance(val, bool) and val > 0}
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = {}
    try:
        before = _meta_shapes(model, base)
        for k, old in fields.items():
            trial = _meta_shapes(model, _with(base, k, old + 1))
            sized = _sized(before, trial)
            if not sized or any(n not in actual or len(actual[n]) != len(before[n]) for n in sized):
                continue
            n, dims = next(iter(sized.items()))
            d = dims[0]
            v, rem = divmod(actual[n][d] * old, before[n][d])
            if rem or v == old or v <= 0:
                continue
            after = _meta_shapes(model, _with(base, k, v))
            if _sized(before, after).keys() == sized.keys() and all(
                    actual[n][d] == after[n][d] for n, dims in sized.items() for d in dims):
                out[k] = v
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: the record reloads it
        return {}
    return out


def _with(config: Any, key: str, value: int) -> Any:
    c = copy.deepcopy(config)
    setattr(c, key, value)
    return c


def _sized(a: dict, b: dict) -> dict[str, list[int]]:
    """Tensor name -> the dims whose size differs between two builds."""
    return {n: [d for d, (x, y) in enumerate(zip(s, a[n])) if x != y]
            for n, s in b.items() if n in a and len(s) == len(a[n]) and a[n] != s}


def _meta_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        built = type(model)(config)
    return {n: tuple(p.shape) for n, p in built.named_parameters()}


# ---------------------------------------------------------------- routers
def is_router(model: nn.Module, name: str) -> bool:
    """``name`` is a router: a module whose tensors are one 2-d ``weight`` ``[experts, hidden]`` (plus per-expert
    score biases), next to a recognised experts module with as many experts. Its ``F.linear(x, self.weight)`` is read as
    a Linear's (graph/rules/matmul.py ``_weight_view``): the hidden columns go with the residual stream, the expert
    rows are never pruned (the experts rule blocks the routing it feeds).

    The rows may also be routed + shared experts (Inkling's ``InklingTopkRouter``: ``weight [E + S, H]``, the last
    ``S`` logits gate the shared experts, ``e_score_correction_bias [E]``), but only where the module says so itself
    (``_shared_rows``): a row count that matches neither is not a router, so the stream it reads stays whole."""
    return router_refusal(model, name) is None


def router_refusal(model: nn.Module, name: str) -> str | None:
    """None for a router (``is_router``); else why not: a sentence where ``name`` looks like one (a 2-d ``weight``
    reading the hidden size of a recognised experts module beside it), "" for any other module."""
    if not name:
        return ""
    mod = model.get_submodule(name)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return ""
    parent = model.get_submodule(name.rpartition(".")[0])
    lays = [lay for s in parent.children() if s is not mod and _is_candidate(s) for lay in [layout(s)]
            if isinstance(lay, Layout) and lay.hidden == w.size(1)]
    if not lays:
        return ""
    shared = _shared_rows(mod)
    tensors = [(n, t) for n, t in [*mod.named_parameters(), *mod.named_buffers()] if t is not w]
    per_expert = {1, w.size(0), w.size(0) - shared}
    odd = [f"{n} {tuple(t.shape)}" for n, t in tensors if set(t.shape) - per_expert]
    if odd:  # other tensors: per-expert statistics only (score biases, ernie's moe_statics [1, E])
        return f"tensors {', '.join(odd)} are not per-expert"
    if any(lay.experts + shared == w.size(0) for lay in lays):
        return None
    return (f"its {w.size(0)} rows are neither the {lays[0].experts} experts beside it nor routed + shared experts "
            f"its attributes prove (n_shared_experts, num_experts, n_total_experts)")


def _shared_rows(mod: nn.Module) -> int:
    """How many of a router's rows score shared experts, from its own attributes: ``n_shared_experts``, agreeing
    with ``num_experts`` + it = ``n_total_experts`` where those are recorded; 0 where any is missing or disagrees
    (then only a router with exactly one row per routed expert is recognised)."""
    s, e, total = (getattr(mod, a, None) for a in ("n_shared_experts", "num_experts", "n_total_experts"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, e, total)) or s <= 0:
        return 0
    w = mod.weight
    return s if e + s == total == w.size(0) else 0
