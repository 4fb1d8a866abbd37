"""Size attributes of gated delta net mixers (Hugging Face Qwen3-Next, Qwen3.5, Qwen3.5-MoE: ``*GatedDeltaNet``).

Their code splits the fused projections with counts it keeps (``view(..., self.num_k_heads, 2 * self.head_k_dim +
...)``, ``split([self.key_dim, self.key_dim, self.value_dim])``). The capture makes one unit of each key head with
the value heads it serves (the q/k L2 norm and the chunked recurrence mix a head's dims), so pruning removes whole
key-head groups: every count scales by the same ratio and the head sizes stay. The ratio is read from the sliced
per-value-head parameter ``A_log``. Found by the dry run (``pruned forward failed: shape '[1, 6, 2, 48]' is
invalid``) before this; the dry run still proves the result."""
from __future__ import annotations

from typing import Any

from torch import nn

from secateur.graph.modules import UPDATER_PROBES

_COUNTS = ("num_k_heads", "num_v_heads", "key_dim", "value_dim", "conv_dim")


def _delta_net_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    now, before = int(mod.A_log.shape[0]), old["num_v_heads"]
    if now == before:
        return {}
    set_ = {}
    for k in _COUNTS:
        v = old.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v * now % before == 0:
            setattr(mod, k, v * now // before)
            set_[k] = v * now // before
    return set_


def delta_net_updater(mod: nn.Module):
    ok = (isinstance(getattr(mod, "A_log", None), nn.Parameter) and mod.A_log.dim() == 1
          and all(isinstance(getattr(mod, k, None), int) for k in ("num_k_heads", "num_v_heads", "head_k_dim")))
    return _delta_net_attrs if ok else None


UPDATER_PROBES.append(delta_net_updater)


# ---------------------------------------------------------------- Hugging Face config
# (which modules, {config field: the module attribute that holds its size}); a gated delta net of the Qwen3-Next
# family (by what ``delta_net_updater`` accepts) and Kimi Linear's delta attention (by class name)
_CONFIG_FIELDS = (
    (lambda m: delta_net_updater(m) is not None,
     {"linear_num_key_heads": "num_k_heads", "linear_num_value_heads": "num_v_heads"}),
    (lambda m: type(m).__name__ == "KimiLinearDeltaAttention" and isinstance(getattr(m, "num_heads", None), int),
     {"linear_num_heads": "num_heads"}),
)


def config_sizes(model: nn.Module, changed: dict[str, Any]) -> dict[str, int]:
    """The head counts of the linear-attention mixers in their config fields, so that the config rebuilds the pruned
    model (``from_pretrained``, a cache sized from the config). Kept only when every such mixer agrees and a build
    from the config on meta gives every dim these fields size its pruned size (a field that also sized something
    else would be refused); otherwise the structure record reloads them. Before, Kimi Linear's and Qwen3-Next's
    configs kept the unpruned head counts."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    fields = config.to_dict()
    out: dict[str, int] = {}
    for pick, table in _CONFIG_FIELDS:
        mods = [m for m in model.modules() if pick(m)]
        for key, attr in table.items():
            vals = {getattr(m, attr) for m in mods}
            if len(vals) == 1 and isinstance(fields.get(key), int) and fields[key] != next(iter(vals)):
                out[key] = vals.pop()
    if not out:
        return {}
    from secateur.graph.mamba2 import _meta_shapes, rebuilt_as_pruned
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        before, after = _meta_shapes(model, config, changed), _meta_shapes(model, config, {**changed, **out})
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: the record reloads it
        return {}
    return out if rebuilt_as_pruned(before, after, actual) else {}
