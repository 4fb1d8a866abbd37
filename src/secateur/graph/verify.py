"""Dry run of a plan on a meta-device skeleton of the model: catches model code that re-splits a pruned dim
with a size it keeps itself (e.g. ``reshape(B * self.num_heads, ...)`` where ``num_heads`` is an attribute the
engine does not know), before anything is changed. The skeleton shares no memory with the model: every
parameter and buffer is replaced by a meta tensor of the same shape."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn


def skeleton(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, Mapping):
        return {k: to_meta(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(v) for v in x)
    return x


def _shapes(out: Any) -> list:
    from secateur.graph.capture import _flat_tensors
    return [tuple(t.shape) for t in _flat_tensors(out)]


def run(model: nn.Module, example_inputs: Any) -> tuple[list | None, str | None, str | None]:
    """Forward on meta: (output shapes, failing module name, error) — shapes None on failure."""
    from secateur.graph.capture import call
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(m, a):
        stack.append(names[m])

    def post(m, a, o):
        stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.no_grad():
            out = call(model, to_meta(example_inputs))
        return _shapes(out), None, None
    except Exception as e:  # noqa: BLE001 - any failure of the pruned forward is reported, never hidden
        return None, (stack[-1] if stack else ""), f"{type(e).__name__}: {e}"
    finally:
        for h in hooks:
            h.remove()


def check(model: nn.Module, example_inputs: Any, apply: Callable[[nn.Module], Any], want: list | None = None
          ) -> tuple[bool, str | None, str | None]:
    """(ok, failing module, error) of applying ``apply`` to a skeleton and running it. ok is True also when the
    unpruned model cannot run on meta (nothing to compare with; the caller notes it). ``want``: the unpruned
    model's output shapes when already known (the capture saw them), which saves one meta forward."""
    try:
        base = skeleton(model)
    except Exception as e:  # noqa: BLE001 - a model that cannot be deep-copied is not verified (noted)
        return True, None, f"not verified on meta (skeleton: {type(e).__name__}: {e})"
    if want is None:
        want, _, err0 = run(base, example_inputs)
        if want is None:
            return True, None, f"not verified on meta ({err0})"
    known = want is not None
    if known:
        want = [tuple(w) for w in want]
    apply(base)
    got, where, err = run(base, example_inputs)
    if got is None:
        if known:  # was it the plan, or does the model not run on meta at all?
            base_ok, _, err0 = run(skeleton(model), example_inputs)
            if base_ok is None:
                return True, None, f"not verified on meta ({err0})"
        return False, where, err
    if got != want:
        return False, "", f"output shapes changed {want} -> {got}"
    return True, None, None
