"""Mamba-2 mixers (transformers' Mamba2, Bamba, Zamba2, Falcon-H1, Nemotron-H, GraniteMoeHybrid): the sizes they
keep after whole heads are removed.

The channels themselves are found op by op like any other model's (the capture runs the mixer's own torch path):
``in_proj``'s rows split at ``[intermediate_size, conv_dim, num_heads]``, the depthwise conv, ``A_log`` / ``D`` /
``dt_bias`` per head, the gated grouped RMSNorm, ``out_proj``'s columns. What this module adds is the bookkeeping
the forward reads back: ``num_heads``, ``intermediate_size``, ``conv_dim`` (and the gated norm's ``group_size``, by
its own updater, since the norm is a module of its own in the structure record), each read from the sliced tensors (never guessed from which int attribute held an old size: with 8 heads of 8
channels and an 8-wide state, the general search in size_attrs.py could not tell them apart), and the Hugging Face
config fields that rebuild those sizes, each proven by building the model from the changed config on the meta
device. Recognised by what a mixer holds, not by class name: the six classes are copies of one another."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from secateur.graph.modules import UPDATER_PROBES

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
    if inner != heads * int(mod.head_dim) or rem or state <= 0 or heads % groups or inner % groups:
        return {}
    new = {"num_heads": heads, "intermediate_size": inner, "conv_dim": conv, "ssm_state_size": state}
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


# ---------------------------------------------------------------- Hugging Face config
_HEADS_KEYS = ("num_heads", "mamba_n_heads", "n_mamba_heads", "mamba_num_heads")
_INNER_KEYS = ("mamba_d_ssm",)  # the inner width stated directly (Falcon-H1); else expand * hidden_size
_EXPAND_KEYS = ("expand", "mamba_expand")


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
    if len(heads) != 1 or len(inner) != 1:
        return {}
    heads, inner = heads.pop(), inner.pop()
    fields = config.to_dict()
    out: dict[str, int] = {}
    widths = {int(m.in_proj.weight.shape[1]) for _, m in mixers}  # the residual stream the mixers read
    if "hidden_size" not in changed and isinstance(fields.get("hidden_size"), int) and len(widths) == 1:
        out["hidden_size"] = widths.pop()  # (Mamba-2 names its embedding ``embeddings``: apply.py did not see it)
    hidden = changed.get("hidden_size", out.get("hidden_size", fields.get("hidden_size")))
    keys = [k for k in _HEADS_KEYS if isinstance(fields.get(k), int)]
    for k in [k for k in keys if "mamba" in k] or keys:  # a hybrid's own name for them, not its attention's
        out[k] = heads
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
    for n, s in after.items():
        s0 = before.get(n)
        if s0 != s and (n not in actual or s0 is None or len(s0) != len(s) or len(actual[n]) != len(s)
                        or any(a != b and actual[n][d] != b for d, (a, b) in enumerate(zip(s0, s)))):
            return {}
    return out


def _meta_shapes(model: nn.Module, config: Any, fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    trial = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(trial, k, v)
    with torch.device("meta"):
        built = type(model)(trial)
    return {n: tuple(p.shape) for n, p in built.named_parameters()}
