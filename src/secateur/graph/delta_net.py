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
