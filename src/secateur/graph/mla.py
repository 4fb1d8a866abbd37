"""Multi-head latent attention (DeepSeek-V2 / V3 and the models that copy it: Kimi-Linear, LongCat-Flash, HY-V4):
the sizes it keeps after whole heads or latent ranks are removed.

The channels are found op by op like any other attention's. What makes the heads free is the rotary key: one
``k_rot`` computed once (``kv_a_proj_with_mqa``'s last rows) and ``expand``-ed to every head; rules/movement.py
``_repeat_to_heads`` gives each copy the atom of its head and keeps the source whole (before, the copies carried the
source's channels into every head, and the q.k contraction tied all heads into one unit: deepseek_v3 kept every
head). What this module adds is the bookkeeping: ``num_heads`` (which the forward does not read, it views with
``-1``, but a rebuild from the config does), ``q_lora_rank`` / ``kv_lora_rank`` (``kv_lora_rank`` splits the
compressed key/value), each read from the sliced tensors, never guessed from which int attribute held an old size;
and the Hugging Face config fields that rebuild those sizes, proven by building the model from the changed config
on the meta device. Recognised by what the module holds, not by class name: the classes are copies of one another."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.graph.modules import UPDATER_PROBES

_SIZES = ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")


def is_mla(mod: nn.Module) -> bool:
    """An MLA attention: the int sizes its forward reads, ``kv_a_proj_with_mqa`` / ``kv_b_proj`` / ``o_proj`` Linears
    and a query projection (``q_b_proj`` after a low-rank ``q_a_proj``, or a plain ``q_proj``)."""
    if not all(isinstance(getattr(mod, k, None), int) and not isinstance(getattr(mod, k), bool) for k in _SIZES):
        return False
    q = getattr(mod, "q_b_proj", None) or getattr(mod, "q_proj", None)
    return all(isinstance(m, nn.Linear) for m in (q, getattr(mod, "kv_a_proj_with_mqa", None),
                                                  getattr(mod, "kv_b_proj", None), getattr(mod, "o_proj", None)))


def _sizes(mod: nn.Module) -> dict[str, int] | None:
    """Head count and latent ranks from the sliced tensors (not from the Linears' attributes, which may not be updated
    yet: update order is the plan's); None where they disagree with each other (a head cut in part)."""
    nope, rope, dv = int(mod.qk_nope_head_dim), int(mod.qk_rope_head_dim), int(mod.v_head_dim)
    inner = int(mod.o_proj.weight.shape[1])
    heads, rem = divmod(inner, dv)
    q = mod.q_b_proj if isinstance(getattr(mod, "q_b_proj", None), nn.Linear) else mod.q_proj
    if (rem or heads <= 0 or int(q.weight.shape[0]) != heads * (nope + rope)
            or int(mod.kv_b_proj.weight.shape[0]) != heads * (nope + dv)):
        return None
    out = {"num_heads": heads, "kv_lora_rank": int(mod.kv_b_proj.weight.shape[1])}
    if isinstance(getattr(mod, "q_b_proj", None), nn.Linear) and isinstance(getattr(mod, "q_lora_rank", None), int):
        out["q_lora_rank"] = int(mod.q_b_proj.weight.shape[1])
    if int(mod.kv_a_proj_with_mqa.weight.shape[0]) != out["kv_lora_rank"] + rope:
        return None
    return out


def _mla_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    new = _sizes(mod)
    if new is None:
        return {}
    if isinstance(old.get("hidden_size"), int):
        new["hidden_size"] = int(mod.o_proj.weight.shape[0])
    set_ = {k: v for k, v in new.items() if old.get(k) != v}
    for k, v in set_.items():
        setattr(mod, k, v)
    return set_


def mla_updater(mod: nn.Module):
    return _mla_sizes if is_mla(mod) else None


UPDATER_PROBES.append(mla_updater)


# ---------------------------------------------------------------- Hugging Face config
_FIELDS = {"num_heads": "num_attention_heads", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank"}
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")


def config_sizes(model: nn.Module, changed: dict[str, Any]) -> dict[str, int]:
    """Config fields that rebuild the pruned MLA layers: ``num_attention_heads`` and the latent ranks, and
    ``num_key_value_heads`` with the heads where it equalled them (MLA's keys are per head already: one key/value
    group per head, which the pruned modules keep). Kept only when every MLA layer has the same sizes and a build of
    the model from the config with them (on meta, no weights) gives every MLA tensor its pruned shape, sizes nothing
    else differently, and builds the same ``num_key_value_groups``; otherwise the structure record reloads them.
    ``changed``: fields already updated (the build starts from them)."""
    config = getattr(model, "config", None)
    layers = [(n, m) for n, m in model.named_modules() if is_mla(m)]
    if config is None or not layers or not hasattr(config, "to_dict"):
        return {}
    sizes = [_sizes(m) for _, m in layers]
    if any(s is None for s in sizes) or any(s != sizes[0] for s in sizes):
        return {}
    fields = config.to_dict()
    out = {f: sizes[0][k] for k, f in _FIELDS.items() if k in sizes[0] and isinstance(fields.get(f), int)}
    heads = fields.get("num_attention_heads")
    if isinstance(heads, int) and fields.get("num_key_value_heads") == heads and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]
    out = {k: v for k, v in out.items() if fields.get(k) != v}
    if not out:
        return {}
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        before, _ = _meta_build(model, config, changed)
        after, built = _meta_build(model, config, {**changed, **out})
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: the record reloads it
        return {}
    mine = [n for n in actual if any(n.startswith(name + ".") for name, _ in layers)]
    if any(after.get(n) != actual[n] for n in mine):
        return {}
    for n, s in after.items():  # every other dim these fields size has its pruned size
        s0 = before.get(n)
        if s0 != s and (n not in actual or s0 is None or len(s0) != len(s) or len(actual[n]) != len(s)
                        or any(a != b and actual[n][d] != b for d, (a, b) in enumerate(zip(s0, s)))):
            return {}
    mods = dict(built.named_modules())
    for name, m in layers:
        twin = mods.get(name)
        if twin is None or getattr(twin, "num_key_value_groups", None) != getattr(m, "num_key_value_groups", None):
            return {}
    return out


def _meta_build(model: nn.Module, config: Any, fields: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], nn.Module]:
    import copy
    trial = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(trial, k, v)
    with torch.device("meta"):
        built = type(model)(trial)
    return {n: tuple(p.shape) for n, p in built.named_parameters()}, built
