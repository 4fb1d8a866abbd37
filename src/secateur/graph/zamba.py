"""Zamba's multi-head Mamba mixer (transformers' ``ZambaMambaMixer``) as one op.

Its forward runs one Mamba-1 scan per head in a Python loop (``for head_idx in range(self.n_mamba_heads)``) on
``hidden_states[head_idx]``, ``A[head_idx]``, ``self.D[head_idx]``..., and projects each head with its own slice of
3-d parameters (``self.x_proj_weight[:, None] @ x``, ``[heads, rank + 2 * state, head_dim]``). Traced op by op, the
``select`` at a loop index is a fixed position along the heads dim, so every head was one unit, and the inner width
stayed whole (0.42 of dense MACs at ratio 0.5, only the residual stream pruned); a pruned loop also runs fewer
times, which no op-by-op comparison of the dry run can follow. Here the parameters' dims are the units:

* whole heads (``heads="head_dim"``: dim ``j`` of every head, the head count stays): in_proj's interleaved x / gate
  rows (``view(b, -1, 2, L)``: row ``2i`` is x, ``2i + 1`` its gate), the depthwise conv, ``x_proj_weight``'s
  columns, ``dt_proj_weight`` / ``dt_proj_bias``'s rows, ``A_log`` / ``D``, ``out_proj``'s columns. A head's
  channels meet only their own ``dt`` / ``A`` / ``D`` / B / C; each channel is its own recurrence;
* the time-step rank ``r`` of every head: ``x_proj`` row ``r`` and ``dt_proj_weight``'s column ``r`` (a Linear
  bottleneck, zeroed at its consumer);
* the state ``n`` of every head: x_proj's B row ``n`` and C row ``n``, ``A_log[..., n]``. Contracted (``C.state``
  sums over it) and nothing else reads it: zeroing its two rows (B_n = C_n = 0, state n stays 0) removes term
  ``n`` exactly, as for q / k dims.

Sizes follow from the sliced tensors (``n_mamba_heads``, ``mamba_head_dim``, ``time_step_rank``,
``ssm_state_size``, ``intermediate_size``), and the config fields that rebuild them, each proven by a build on
meta. Only this class, by name: the rule states what its forward computes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.graph.modules import LEAF_PROBES, UPDATER_PROBES, _channels, _consumed, _produce, _shape_for

_CLASS = "transformers.models.zamba.modeling_zamba.ZambaMambaMixer"


def _is_zamba(mod: nn.Module) -> bool:
    cls = type(mod)
    return f"{cls.__module__}.{cls.__name__}" == _CLASS


def _layout(mod: nn.Module) -> tuple[int, int, int, int] | None:
    """(heads, head_dim, rank, state) when the tensors agree with the sizes the forward splits them by."""
    w = getattr(mod, "x_proj_weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return None
    h, rows, hd = w.shape
    r, n = int(mod.time_step_rank), int(mod.ssm_state_size)
    ok = (rows == r + 2 * n and h == mod.n_mamba_heads and hd == mod.mamba_head_dim
          and mod.in_proj.out_features == 2 * h * hd and mod.conv1d.out_channels == h * hd == mod.conv1d.groups
          and mod.out_proj.in_features == h * hd and mod.dt_proj_weight.shape == (h, hd, r)
          and mod.A_log.shape == (h, hd, n) and mod.D.shape == (h, hd)
          and (mod.dt_proj_bias is None or mod.dt_proj_bias.shape == (h, hd)))
    return (h, hd, r, n) if ok else None


def zamba_rule(mod: nn.Module):
    """The leaf rule for transformers' ``ZambaMambaMixer`` (None for any other module)."""
    return _zamba if _is_zamba(mod) and _layout(mod) is not None else None


def _zamba(tr: Any, mod: nn.Module, args, kwargs, out) -> None:
    h, hd, r, n = _layout(mod)
    x = args[0] if args else kwargs["hidden_states"]
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(mod.in_proj.weight, 1, _consumed(tr, chan), "in")
    heads, dims = tr.atoms.new(h), tr.atoms.new(hd)
    if tr.head_dim:  # dim j of every head
        tr.atoms.block(heads)
        inner = dims.repeat(h)
    else:  # whole heads
        tr.atoms.block(dims)
        inner = heads.repeat_interleave(hd)
    tr.notes.append(f"{tr.where()}: {type(mod).__name__} keeps its {'head count' if tr.head_dim else 'head size'}"
                    f" (an in_proj row is one unit: {'dim j of every head' if tr.head_dim else 'whole heads'} here)")
    rank, state = tr.atoms.new(r), tr.atoms.new(n)
    tr.contracted.append(state)
    rows = torch.stack([inner, inner], dim=1).reshape(-1)  # x_i, gate_i interleaved
    tr.slot(mod.in_proj.weight, 0, rows, "out")
    if mod.in_proj.bias is not None:
        tr.slot(mod.in_proj.bias, 0, rows, "out")
    tr.convs[tr.owner[id(mod.conv1d.weight)][0]] = "groups"  # depthwise: whole one-channel groups
    tr.slot(mod.conv1d.weight, 0, inner, "out")
    if mod.conv1d.bias is not None:
        tr.slot(mod.conv1d.bias, 0, inner, "out")
    tr.slot(mod.x_proj_weight, 0, heads, "param")
    tr.slot(mod.x_proj_weight, 1, torch.cat([rank, state, state]), "out")
    tr.slot(mod.x_proj_weight, 2, dims, "in")
    tr.slot(mod.dt_proj_weight, 0, heads, "param")
    tr.slot(mod.dt_proj_weight, 1, dims, "out")
    tr.slot(mod.dt_proj_weight, 2, rank, "in")
    per_channel = [mod.A_log, mod.D] + ([mod.dt_proj_bias] if mod.dt_proj_bias is not None else [])
    for p in per_channel:
        tr.slot(p, 0, heads, "param")
        tr.slot(p, 1, dims, "param")
    tr.slot(mod.A_log, 2, state, "param")
    tr.slot(mod.out_proj.weight, 1, inner, "in")
    atoms = _produce(tr, mod.out_proj, mod.out_proj.out_features, 0)
    tr.set(out, _shape_for(out.dim(), -1, atoms), compressed=True)


LEAF_PROBES.append(zamba_rule)


# ---------------------------------------------------------------- sizes
def _sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The sizes the forward reads, from the sliced tensors; none where they do not agree (the dry run refuses)."""
    h, rows, hd = mod.x_proj_weight.shape
    r, n = int(mod.dt_proj_weight.shape[2]), int(mod.A_log.shape[2])
    if rows != r + 2 * n or mod.out_proj.weight.shape[1] != h * hd:
        return {}
    new = {"n_mamba_heads": h, "mamba_head_dim": hd, "intermediate_size": h * hd, "time_step_rank": r,
           "ssm_state_size": n, "hidden_size": int(mod.in_proj.weight.shape[1])}
    set_ = {k: v for k, v in new.items() if isinstance(old.get(k), int) and old[k] != v}
    for k, v in set_.items():
        setattr(mod, k, v)
    return set_


UPDATER_PROBES.append(lambda mod: _sizes if _is_zamba(mod) and isinstance(getattr(mod, "x_proj_weight", None),
                                                                          torch.Tensor) else None)


def config_sizes(model: nn.Module, changed: dict[str, Any]) -> dict[str, int]:
    """``n_mamba_heads``, ``mamba_dt_rank``, ``mamba_d_state`` and ``mamba_expand`` (inner width over the hidden
    size) when every mixer agrees and a build from the config on meta gives every mixer tensor its pruned shape;
    otherwise the structure record reloads them."""
    from secateur.graph.mamba2 import _meta_shapes
    config = getattr(model, "config", None)
    mixers = [(name, m) for name, m in model.named_modules() if _is_zamba(m)]
    if config is None or not mixers or not hasattr(config, "to_dict"):
        return {}
    vals = {k: {int(getattr(m, a)) for _, m in mixers} for k, a in (
        ("n_mamba_heads", "n_mamba_heads"), ("mamba_dt_rank", "time_step_rank"), ("mamba_d_state", "ssm_state_size"),
        ("inner", "intermediate_size"))}
    if any(len(v) != 1 for v in vals.values()):
        return {}
    fields = config.to_dict()
    hidden = changed.get("hidden_size", fields.get("hidden_size"))
    out = {k: v.pop() for k, v in vals.items()}
    inner = out.pop("inner")
    if isinstance(hidden, int) and hidden > 0 and inner % hidden == 0:
        out["mamba_expand"] = inner // hidden
    out = {k: v for k, v in out.items() if isinstance(fields.get(k), int) and fields[k] != v}
    if not out:
        return {}
    try:
        after = _meta_shapes(model, config, {**changed, **out})
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: the record reloads it
        return {}
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}
    mine = [k for k in actual if any(k.startswith(name + ".") for name, _ in mixers)]
    return out if all(after.get(k) == actual[k] for k in mine) else {}
