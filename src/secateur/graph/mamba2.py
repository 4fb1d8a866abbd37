"""Mamba-2 mixers (transformers' Mamba2, Bamba, Zamba2, Falcon-H1, Nemotron-H, GraniteMoeHybrid): the sizes they
keep after whole heads are removed.

The channels themselves are found op by op like any other model's (the capture runs the mixer's own torch path):
``in_proj``'s rows split at ``[intermediate_size, conv_dim, num_heads]``, the depthwise conv, ``A_log`` / ``D`` /
``dt_bias`` per head, the gated grouped RMSNorm, ``out_proj``'s columns. What this module adds is the bookkeeping
the forward reads back: ``num_heads``, ``intermediate_size``, ``conv_dim`` (and the gated norm's ``group_size``, by
its own updater, since the norm is a module of its own in the structure record), each read from the sliced tensors (never guessed from which int attribute held an old size: with 8 heads of 8
channels and an 8-wide state, the general search in size_attrs.py could not tell them apart), and the Hugging Face
config fields that rebuild those sizes, each proven by building the model from the changed config on the meta
device. Recognised by what a mixer holds, not by class name: the six classes are copies of one another.

transformers' six classes themselves are one op (``mixer_rule``, by class name: what their torch path computes is
stated there), so that the B / C state prunes too; a mixer of another class is traced op by op (heads only)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from secateur.graph.modules import LEAF_PROBES, UPDATER_PROBES, _channels, _consumed, _produce, _shape_for

_SIZES = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size", "conv_dim")


def is_mixer(mod: nn.Module) -> bool:
    """A Mamba-2 mixer: per-head ``A_log`` / ``D`` / ``dt_bias``, ``in_proj`` / ``out_proj`` Linears, a depthwise
    ``conv1d``, and the int sizes its forward reads."""
    if not all(isinstance(getattr(mod, k, None), int) and not isinstance(getattr(mod, k), bool) for k in _SIZES):
        return False
    per_head = [getattr(mod, k, None) for k in ("A_log", "D", "dt_bias")]
    if not all(isinstance(p, torch.Tensor) and p.dim() == 1 for p in per_head):
        return False
    return (isinstance(getattr(mod, "in_proj", None), nn.Linear) and isinstance(getattr(mod, "out_proj", None),
            nn.Linear) and isinstance(getattr(mod, "conv1d", None), nn.Conv1d))


def _mixer_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The sizes from the sliced tensors: heads from ``A_log``, the inner width from ``out_proj``'s inputs (whole
    heads: ``num_heads * head_dim``), the conv width from the conv; the state width follows the conv's rest. Set
    only when they agree with each other (a plan that cut a head in part, or one group's state and not another's,
    leaves the sizes alone, and the dry run refuses it)."""
    heads = int(mod.A_log.numel())
    inner = int(mod.out_proj.weight.shape[1])  # the tensors, not their modules' attributes: those may not be
    conv = int(mod.conv1d.weight.shape[0])  # updated yet (update order is the plan's)
    groups = int(mod.n_groups)
    state, rem = divmod(conv - inner, 2 * groups)
    if inner % heads or rem or state <= 0 or heads % groups or inner % groups:
        return {}
    if inner // heads != old.get("head_dim") and heads != old.get("num_heads"):
        return {}  # heads and head dims both cut: no rule makes such a plan
    # whole heads leave (heads mode) or dim j of every head (head_dim mode, leaf rule below): the head size is
    # what is left per head either way
    new = {"num_heads": heads, "head_dim": inner // heads, "intermediate_size": inner, "conv_dim": conv,
           "ssm_state_size": state}
    if isinstance(old.get("groups_time_state_size"), int):  # Falcon-H1 keeps n_groups * state as well
        new["groups_time_state_size"] = groups * state
    if isinstance(old.get("hidden_size"), int):
        new["hidden_size"] = int(mod.in_proj.weight.shape[1])
    set_ = {k: v for k, v in new.items() if old.get(k) != v}
    for k, v in set_.items():
        setattr(mod, k, v)
    return set_


def _norm_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The gated grouped RMSNorm (``MambaRMSNormGated``): ``group_size`` is its width over the number of groups,
    which stays (whole heads leave, the same count from each group): the old width over the old ``group_size``."""
    before = old.get("_shapes", {}).get("weight")
    size = old.get("group_size")
    if not before or not isinstance(size, int) or size <= 0 or before[0] % size:
        return {}
    groups, width = before[0] // size, int(mod.weight.numel())
    if width % groups:
        return {}
    mod.group_size = width // groups
    return {"group_size": width // groups}


def _is_gated_norm(mod: nn.Module) -> bool:
    """``MambaRMSNormGated`` and its copies: a 1-d weight, an RMS epsilon and an int ``group_size``."""
    w = getattr(mod, "weight", None)
    return (isinstance(getattr(mod, "group_size", None), int) and isinstance(w, torch.Tensor) and w.dim() == 1
            and hasattr(mod, "variance_epsilon"))


def mixer_updater(mod: nn.Module):
    return _mixer_sizes if is_mixer(mod) else _norm_sizes if _is_gated_norm(mod) else None


UPDATER_PROBES.append(mixer_updater)


# ---------------------------------------------------------------- the mixer as one op
# transformers' Mamba-2 mixers whose torch path this rule states (read from transformers 5.x; each a copy of
# Mamba2Mixer, Falcon-H1's with a ``mup_vector`` scale on in_proj's rows and an optional norm). Only these classes:
# the rule says what the forward computes, so a class it has not read is traced op by op (heads only, as before)
_MIXER_CLASSES = frozenset({
    "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer",
    "transformers.models.bamba.modeling_bamba.BambaMixer",
    "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer",
    "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer",
    "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer",
})


def _layout(mod: nn.Module) -> tuple[int, int, int, int, int] | None:
    """(heads, head_dim, n_groups, state, inner) when the tensors have the layout the forward splits them by:
    ``in_proj`` rows ``[z: inner | x: inner | B: G*N | C: G*N | dt: H]``, a depthwise conv over ``[x | B | C]``,
    per-head ``A_log`` / ``D`` / ``dt_bias``, ``out_proj`` reading the inner width; None otherwise."""
    h, p, g, n, inner = (int(getattr(mod, k)) for k in ("num_heads", "head_dim", "n_groups", "ssm_state_size",
                                                          "intermediate_size"))
    conv = inner + 2 * g * n
    norm = getattr(mod, "norm", None)
    w = getattr(norm, "weight", None)
    ok = (inner == h * p and g > 0 and h % g == 0 and mod.in_proj.out_features == inner + conv + h
          and mod.conv1d.out_channels == conv and mod.conv1d.groups == conv and mod.out_proj.in_features == inner
          and all(getattr(mod, k).numel() == h for k in ("A_log", "D", "dt_bias"))
          and (isinstance(norm, nn.Identity) or (isinstance(w, torch.Tensor) and w.shape == (inner,))))
    return (h, p, g, n, inner) if ok else None


def mixer_rule(mod: nn.Module):
    """The leaf rule for a transformers Mamba-2 mixer (None for any other module)."""
    cls = type(mod)
    if f"{cls.__module__}.{cls.__name__}" not in _MIXER_CLASSES or not is_mixer(mod) or _layout(mod) is None:
        return None
    return _mixer


def _mixer(tr: Any, mod: nn.Module, args, kwargs, out) -> None:
    """Two kinds of units, each exact on its own. Traced op by op, the scan's tensors hold a head's channels
    and the B / C state channels on two dims of one element (``B.repeat_interleave(heads)`` times the per-head
    decay, ``states [heads, head_dim, state]``): an element has one atom there, so one side was kept whole (the
    state: 0.50 of dense MACs at ratio 0.5, the chunk scan's ``C.B`` and ``M.x`` products left at half). Here:

    * heads: head ``j`` of every group (``repeat_interleave`` copies group ``g`` to its heads, so every group keeps
      as many) with its z / x rows, conv channels, ``dt`` row, ``A_log`` / ``D`` / ``dt_bias``, gated-norm weight and
      ``out_proj`` columns; the heads meet nowhere but the gated norm's statistic over a group's channels (a norm
      site: the reference recomputes it over the kept positions). ``heads="head_dim"``: dim ``j`` of every head
      instead (each channel of x is its own recurrence given the per-head ``dt`` / ``A`` / B / C), heads kept;
    * the state: position ``n`` of every group's B and C (in_proj rows, conv channels; Falcon-H1's ``mup_vector``).
      It is contracted, ``C.B`` and ``C.states``, and nothing else reads it, so zeroing its conv channels (weight
      and bias: the activation maps 0 to 0, checked) removes exactly term ``n`` of every sum: a contracted unit,
      zeroed at its producers by the oracle as q / k dims are. Where the activation does not map 0 to 0 it is kept.

    The chunk size, the conv kernel and the time-step limits are sizes of positions, never channels."""
    h, p, g, n, inner = _layout(mod)
    x = args[0] if args else kwargs["hidden_states"]
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(mod.in_proj.weight, 1, _consumed(tr, chan), "in")
    heads = tr.atoms.new(h)
    if tr.head_dim:  # dim j of every head; the heads stay
        inner_atoms = tr.atoms.new(p).repeat(h)
        tr.atoms.block(heads)
        tr.notes.append(f"{tr.where()}: {type(mod).__name__} keeps its head count (an in_proj row is one unit: "
                        "dim j of every head here)")
    else:  # head j of every group: one atom
        tr.atoms.union(heads.view(g, -1), heads.view(g, -1)[:1])
        inner_atoms = heads.repeat_interleave(p)
    state = tr.atoms.new(n)
    bc = state.repeat(g)  # position n of every group
    with torch.no_grad():
        zero_safe = float(mod.act(torch.zeros(1))) == 0.0
    if zero_safe:
        tr.contracted.append(state)
    else:
        tr.atoms.block(state)
        tr.notes.append(f"{tr.where()}: the B / C state of {type(mod).__name__} is kept (its activation "
                        f"{mod.activation!r} does not map 0 to 0, so zeroing a state channel would not remove it)")
    rows = torch.cat([inner_atoms, inner_atoms, bc, bc, heads])
    conv = torch.cat([inner_atoms, bc, bc])
    tr.convs[tr.owner[id(mod.conv1d.weight)][0]] = "groups"  # depthwise: whole one-channel groups
    for lin_or_conv, lab in ((mod.in_proj, rows), (mod.conv1d, conv)):
        tr.slot(lin_or_conv.weight, 0, lab, "out")
        if lin_or_conv.bias is not None:
            tr.slot(lin_or_conv.bias, 0, lab, "out")
    mup = getattr(mod, "mup_vector", None)
    if isinstance(mup, torch.Tensor) and mup.dim() and mup.size(-1) == rows.numel() and mup.numel() == rows.numel():
        tr.slot(mup, mup.dim() - 1, rows, "param")
    for k in ("A_log", "D", "dt_bias"):
        tr.slot(getattr(mod, k), 0, heads, "param")
    norm = mod.norm
    if not isinstance(norm, nn.Identity):
        tr.slot(norm.weight, 0, inner_atoms, "param")
        from secateur.graph.rules.registry import aten
        if tr.calls.get(aten.mean, 0):  # the norm's statistic, the mixer's last mean, over a group's channels
            tr.norm_site("reduce", aten.mean, "aten::mean", inner_atoms[: inner // g], dim=-1)
    tr.slot(mod.out_proj.weight, 1, inner_atoms, "in")
    atoms = _produce(tr, mod.out_proj, mod.out_proj.out_features, 0)
    tr.set(out, _shape_for(out.dim(), -1, atoms), compressed=True)


LEAF_PROBES.append(mixer_rule)


# ---------------------------------------------------------------- Hugging Face config
_HEADS_KEYS = ("num_heads", "mamba_n_heads", "n_mamba_heads", "mamba_num_heads")
_INNER_KEYS = ("mamba_d_ssm",)  # the inner width stated directly (Falcon-H1); else expand * hidden_size
_EXPAND_KEYS = ("expand", "mamba_expand")
# the state width and the head size (the leaf rule prunes the first, heads="head_dim" the second); a hybrid's
# mamba-named field first (Nemotron-H's ``head_dim`` is its attention's)
_STATE_KEYS = ("state_size", "mamba_d_state", "ssm_state_size")
_HEAD_DIM_KEYS = ("head_dim", "mamba_d_head", "mamba_headdim", "mamba_head_dim")


def config_sizes(model: nn.Module, changed: dict[str, Any]) -> dict[str, int]:
    """Config fields that rebuild the pruned mixers: the head count, the inner width (``mamba_d_ssm``) or the
    expansion factor over the (possibly pruned) hidden size. Kept only when every mixer has the same sizes and a
    build of the model from the config with them (on meta, no weights) gives every mixer tensor the pruned shape;
    otherwise the structure record reloads them. ``changed``: fields already updated (the build starts from them)."""
    config = getattr(model, "config", None)
    mixers = [(n, m) for n, m in model.named_modules() if is_mixer(m)]
    if config is None or not mixers or not hasattr(config, "to_dict"):
        return {}
    heads = {int(m.num_heads) for _, m in mixers}
    inner = {int(m.intermediate_size) for _, m in mixers}
    per = {k: {int(getattr(m, a)) for _, m in mixers} for k, a in (("state", "ssm_state_size"), ("dim", "head_dim"))}
    if len(heads) != 1 or len(inner) != 1 or any(len(v) != 1 for v in per.values()):
        return {}
    heads, inner = heads.pop(), inner.pop()
    state, head_dim = per["state"].pop(), per["dim"].pop()
    fields = config.to_dict()
    out: dict[str, int] = {}
    widths = {int(m.in_proj.weight.shape[1]) for _, m in mixers}  # the residual stream the mixers read
    if "hidden_size" not in changed and isinstance(fields.get("hidden_size"), int) and len(widths) == 1:
        out["hidden_size"] = widths.pop()  # (Mamba-2 names its embedding ``embeddings``: apply.py did not see it)
    hidden = changed.get("hidden_size", out.get("hidden_size", fields.get("hidden_size")))
    keys = [k for k in _HEADS_KEYS if isinstance(fields.get(k), int)]
    for k in [k for k in keys if "mamba" in k] or keys:  # a hybrid's own name for them, not its attention's
        out[k] = heads
    for names, v in ((_STATE_KEYS, state), (_HEAD_DIM_KEYS, head_dim)):
        keys = [k for k in names if isinstance(fields.get(k), int)]
        for k in [k for k in keys if "mamba" in k] or keys:
            out[k] = v
    for k in _INNER_KEYS:
        if isinstance(fields.get(k), int):
            out[k] = inner
    for k in _EXPAND_KEYS:
        if isinstance(fields.get(k), int) and isinstance(hidden, int) and hidden > 0 and inner % hidden == 0:
            out[k] = inner // hidden
    out = {k: v for k, v in out.items() if fields.get(k) != v}
    if not out:
        return {}
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        before = _meta_shapes(model, config, changed)
        after = _meta_shapes(model, config, {**changed, **out})
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: the record reloads it
        return {}
    # every dim these fields size (those that differ between the two builds) has its pruned size, and every mixer
    # tensor its pruned shape: a field that also sizes something else (an attention's ``num_heads``) is refused;
    # dims other fields size (an MLP width apply.py did not state) are theirs
    mixer = [n for n in actual if any(n.startswith(name + ".") for name, _ in mixers)]
    if any(after.get(n) != actual[n] for n in mixer):
        return {}
    return out if rebuilt_as_pruned(before, after, actual) else {}


def rebuilt_as_pruned(before: dict, after: dict, actual: dict) -> bool:
    """Every tensor the config change resizes (``before`` -> ``after``, meta rebuilds) exists in the pruned model
    with the rebuilt size in each dim that changed."""
    for n, s in after.items():
        s0 = before.get(n)
        if s0 != s and (n not in actual or s0 is None or len(s0) != len(s) or len(actual[n]) != len(s)
                        or any(a != b and actual[n][d] != b for d, (a, b) in enumerate(zip(s0, s)))):
            return False
    return True


def _meta_shapes(model: nn.Module, config: Any, fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    trial = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(trial, k, v)
    with torch.device("meta"):
        built = type(model)(trial)
    return {n: tuple(p.shape) for n, p in built.named_parameters()}
