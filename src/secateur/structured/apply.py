"""Applying a plan: slice parameters and buffers, update size attributes and Hugging Face config fields, and keep the
structure record that ``apply_structure`` (and ``secateur.load``) replays on a fresh model."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateur.errors import fail
from secateur.graph.modules import key_value_groups, own, snapshot, structure_class, update_attrs
from secateur.structured.plan import Plan, STRUCTURE_ATTR


_OTHER_MODEL = "a plan applies to the model it was made for (or a fresh copy of it), and this one differs"


def _tensor(mod: nn.Module, name: str) -> torch.Tensor:
    t = getattr(mod, name, None)
    if t is None:
        raise fail("the plan slices a tensor this module does not have", where=type(mod).__name__, value=name,
                   hint=_OTHER_MODEL)
    if not isinstance(t, torch.Tensor):
        raise fail("not a tensor", where=name, value=type(t))
    return t


def _in_range(t: torch.Tensor, d: int, pos: torch.Tensor, where: str) -> None:
    if d >= t.dim() or (pos.numel() and int(pos[-1]) >= t.size(d)):
        raise fail("the plan removes positions this tensor does not have", where=where, shape=t.shape,
                   value=(d, int(pos[-1]) if pos.numel() else None), hint=_OTHER_MODEL)


def check_extents(model: nn.Module, plan: Plan) -> None:
    """Every tensor a pruned group slices has the size along that dim it had when the plan was made: a plan made for
    one width and applied to a wider model of the same layout would otherwise slice it at positions that mean other
    channels there, and run. Members made without a size (``extent`` -1) are not checked."""
    mods = dict(model.named_modules())
    seen: set[tuple[str, str, int]] = set()
    for g, chans in plan.choices:
        if not chans.numel():
            continue
        for m in g.members:
            key = (m.module, m.name, m.dim)
            if m.extent < 0 or key in seen:
                continue
            seen.add(key)
            mod = mods.get(m.module)
            if mod is None:
                raise fail("the plan names a module this model does not have", where=m.module or type(model).__name__,
                           hint=_OTHER_MODEL)
            t = _tensor(mod, m.name)
            if m.dim >= t.dim() or t.size(m.dim) != m.extent:
                raise fail(f"the plan was made for a tensor of size {m.extent} along dim {m.dim}",
                           where=m.qualname, shape=tuple(t.shape), hint=_OTHER_MODEL)


def check_fits(model: nn.Module, plan: Plan) -> None:
    """What ``_apply`` checks before it slices (every module, tensor and position the plan names exists, at the
    sizes the plan was made for), for a caller that works on a copy of the model first (``Plan.apply_checked``)."""
    check_extents(model, plan)
    mods = dict(model.named_modules())
    for (mname, tname), dims in plan.removed.items():
        if mname not in mods:
            raise fail("the plan names a module this model does not have", where=mname or type(model).__name__,
                       hint=_OTHER_MODEL)
        t = _tensor(mods[mname], tname)
        for d, pos in dims.items():
            if pos.dim() == 1:
                _in_range(t, d, pos, f"{mname}.{tname}")


@dataclass
class _Slices:
    """What applying a plan to the dry run's twin computed (``prune_channels`` applies the same plan to the model
    right after, nothing changing in between): ``removed`` (``Plan.removed``) and the new tensors by (module,
    tensor). The twin's parameters share the model's storage, so its sliced parameters are the model's; its
    buffers were copies (as the model's were then), kept here as copies again, since the twin's forward may update
    them (BatchNorm in training mode)."""
    removed: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


_CHUNK = 1 << 20  # elements of one block of rows in ``_take_rows_cols``: 4 MB in float32


def _take(t: torch.Tensor, keep: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``t`` with only the ``keep`` positions ((dim, sorted positions), by dim) left, as a new contiguous tensor."""
    dims = [d for d, _ in keep]
    if t.device.type == "cpu" and t.dim() >= 2 and t.numel() and dims in ([0, 1], [1]):
        return _take_rows_cols(t, keep[0][1] if dims == [0, 1] else None, keep[-1][1])
    for d, idx in keep:
        t = t.index_select(d, idx.to(t.device))
    return t.contiguous()


def in_layout_of(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new``, contiguous in ``old``'s memory format: a channels-last model stays channels-last once pruned (a
    conv weight in another layout than its input is converted by the kernel on every call, or makes it convert the
    input)."""
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.dim() == new.dim() == dims and not old.is_contiguous() and old.is_contiguous(memory_format=fmt):
            return new.contiguous(memory_format=fmt)
    return new.contiguous()


def _take_rows_cols(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """``t[rows][:, cols]`` (``rows`` None: every row) on the CPU, block of rows by block of rows, each block's
    columns gathered straight into the result. Two whole-tensor passes wrote a half-size copy first, whose fresh
    pages fault in one by one, and one advanced-indexing gather is slow per element: a (7392, 1056, 1, 1) conv
    halved both ways took 10.7 ms advanced, 4.8 ms in two passes, 3.8 ms here; a (7392, 7392) Linear 111, 162 and
    80 ms (1 thread). The rows of a block (~4 MB) go into one buffer, allocated once: a fresh one per block raised
    regnet_y_128gf's peak RSS from 3.93 to 4.03 GB (freed blocks the C allocator keeps, most likely)."""
    n = t.size(0) if rows is None else rows.numel()
    inner = t[0, 0].numel() if t.size(1) else 0
    out = torch.empty((n, cols.numel(), inner), dtype=t.dtype)
    step = max(1, _CHUNK // max(1, t[0].numel()))
    src = t.reshape(t.size(0), t.size(1), inner)  # a view (a copy only where t's layout has no such view)
    buf = None if rows is None else torch.empty((min(step, n), t.size(1), inner), dtype=t.dtype)
    for i in range(0, n, step):
        if rows is None:
            block = src[i:i + step]
        else:
            block = buf[:min(step, n - i)]
            torch.index_select(src, 0, rows[i:i + step], out=block)
        torch.index_select(block, 1, cols, out=out[i:i + step])
    return out.reshape(n, cols.numel(), *t.shape[2:])


def _apply(model: nn.Module, plan: Plan, reuse: _Slices | None = None, record: _Slices | None = None
           ) -> dict[str, Any]:
    """Slice, then set sizes. ``reuse``: slices computed already (the dry run's, see ``_Slices``) for this plan on
    this model; ``record``: fill with the slices made here."""
    removed = reuse.removed if reuse is not None else plan.removed
    if record is not None:
        record.removed = removed
    mods = dict(model.named_modules())  # one walk; get_submodule per tensor was a tenth of a small model's apply

    def module(name: str) -> nn.Module:
        mod = mods.get(name)
        if mod is None:
            try:
                return model.get_submodule(name)
            except AttributeError:
                raise fail("the plan names a module this model does not have", where=name or type(model).__name__,
                           hint=_OTHER_MODEL) from None
        return mod

    folds = _fold_factors(plan)
    missing = set(folds) - set(removed)
    if missing:
        raise fail("internal: a scale fold's q rows are not sliced", where=".".join(sorted(missing)[0]))
    # compute everything first: a PruningError must leave the model as it was
    new_tensors = []
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (id(pos), size) -> (pos, kept positions)
    for (mname, tname), dims in removed.items():
        mod = module(mname)
        t = _tensor(mod, tname)
        new = reuse.tensors.get((mname, tname)) if reuse is not None else None
        if new is not None and not isinstance(t, nn.Parameter):
            new = new.clone()  # a buffer: the model's forward may update it in place (BatchNorm in training mode)
        if new is None or new.device != t.device or new.dtype != t.dtype:
            keep, per_slice = [], []
            for d, pos in dims.items():  # pos: sorted, unique (Plan.removed)
                if pos.dim() == 2:  # per expert (Plan docstring): after the shared dims
                    per_slice.append((d, _kept_per_slice(t, d, pos, f"{mname}.{tname}")))
                    continue
                _in_range(t, d, pos, f"{mname}.{tname}")
                if pos.numel() >= t.size(d):
                    raise fail("pruning would remove every channel", where=f"{mname}.{tname}", shape=t.shape,
                               value=d)
                hit = kept.get((id(pos), t.size(d)))  # tensors of one member set share ``pos`` (Plan.removed)
                if hit is None or hit[0] is not pos:
                    mask = torch.ones(t.size(d), dtype=torch.bool).index_fill_(0, pos, False)
                    hit = kept[(id(pos), t.size(d))] = (pos, mask.nonzero().flatten())
                keep.append((d, hit[1]))
            keep.sort(key=lambda k: k[0])
            new = _take(t.detach(), keep)
            for d, idx in per_slice:
                new = _take_per_slice(new, d, idx)
            new = _folded(new, t, dict(keep), folds.get((mname, tname), ()))
        new = in_layout_of(new, t)
        if record is not None:
            record.tensors[(mname, tname)] = new if isinstance(t, nn.Parameter) else new.clone()
        new_tensors.append((mod, mname, tname, t, new))
    sliced = {id(t) for *_, t, _ in new_tensors}
    touched = {m for m, *_ in new_tensors}
    for mod in mods.values():  # tied weights: every owner's size attributes change
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None and id(t) in sliced:
                touched.add(mod)
    names = {m: n for n, m in mods.items()}
    parents = {}
    for mod in list(touched):
        n = names[mod]
        while n:
            n = n.rpartition(".")[0]
            if n in parents:  # so are its ancestors
                break
            parents[n] = module(n)
    # head-dim units sliced in a module or its children: its head sizes shrink; elsewhere head counts do (a
    # head_dim plan can still hold whole heads where dims could not be split, e.g. eager q @ k^T)
    dims_in = {m.module for g, _ in plan.choices if g.block is not None for m in g.members}
    mode = {mod: "head_dim" if any(d == names[mod] or d.rpartition(".")[0] == names[mod] for d in dims_in)
            else "heads" for mod in [*touched, *parents.values()]}
    # grouped convs: the mode their capture used (whole groups or the same channels from every group)
    grouped = {n: g_mode for g, _ in plan.choices for n, g_mode in g.grouped.items()}
    snaps = {m: {**snapshot(m), "_heads": mode[m], "_grouped": grouped.get(names[m])}
             for m in [*touched, *parents.values()]}
    done = set()
    with torch.no_grad():
        for mod, mname, tname, t, new in new_tensors:
            if id(t) in done:
                continue
            done.add(id(t))
            if isinstance(t, nn.Parameter):
                t.data = new
                t.grad = None
            else:
                mod._buffers[tname] = new
    structure = getattr(model, STRUCTURE_ATTR, None) or {}
    for mod, snap in snaps.items():
        attrs = update_attrs(mod, snap)
        name = names[mod]
        entry = structure.setdefault(name, {"params": {}, "buffers": {}, "attrs": {}})
        entry["attrs"].update({k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()})
        for pn, p in own(mod._parameters):
            entry["params"][pn] = list(p.shape)
        for bn, b in own(mod._buffers):  # a non-persistent buffer left whole is not recorded:
            if b is not None and (bn not in mod._non_persistent_buffers_set or (name, bn) in removed):
                entry["buffers"][bn] = list(b.shape)  # it is not in the state_dict a reload checks against
            if b is not None and bn in mod._non_persistent_buffers_set and (name, bn) in removed:
                _record_unsaved(entry, bn, removed[(name, bn)], b)
        for (fm, tn), parts in folds.items():
            if fm == name:  # what the saved weights carry already: recorded for whoever reads the structure
                rec = entry.setdefault("scale_folds", {}).setdefault(tn, {"dim": parts[0][0], "factor": 1.0})
                rec["factor"] *= parts[0][2]
        if not attrs and not entry["params"] and not entry["buffers"]:
            structure.pop(name)
    from secateur.graph.size_attrs import clear_caches, set_attrs
    clear_caches(model, mods.values())  # cached tensors of the unpruned sizes (timm's attention_bias_cache)
    if plan.attrs:  # proven by the dry run (graph/size_attrs.py); recorded so that a reload sets them too
        set_attrs(model, plan.attrs)
        for name, kv in plan.attrs.items():
            entry = structure.setdefault(name, {"params": {}, "buffers": {}, "attrs": {}})
            entry["attrs"].update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kv.items()})
    for name, kv in _fold_scales(model, plan).items():  # the eager path's stored scale agrees with the fold
        set_attrs(model, {name: kv})
        structure.setdefault(name, {"params": {}, "buffers": {}, "attrs": {}})["attrs"].update(kv)
    for mod, snap in snaps.items():  # from the widths every update above left
        kv = key_value_groups(mod, snap)
        if kv:
            structure.setdefault(names[mod], {"params": {}, "buffers": {}, "attrs": {}})["attrs"].update(kv)
    _update_hf_config(model, structure, "head_dim" if any(g.block is not None for g, _ in plan.choices) else "heads")
    setattr(model, STRUCTURE_ATTR, structure)
    return structure


def _fold_factors(plan: Plan) -> dict[tuple[str, str], list[tuple[int, torch.Tensor, float]]]:
    """(module, tensor) -> (dim, positions, factor) of the q rows scaled where a chosen group is the q/k units of an
    attention whose scale follows the head size (graph/scale_fold.py)."""
    out: dict[tuple[str, str], list[tuple[int, torch.Tensor, float]]] = {}
    for g, chans in plan.choices:
        fold = getattr(g, "scale_fold", None)
        if fold is None:
            continue
        factor = fold.factor(chans)
        if factor == 1.0:  # whole heads only: the head size, and so the scale, is unchanged
            continue
        for mname, tname, dim, pos in fold.targets:
            out.setdefault((mname, tname), []).append((dim, pos, factor))
    return out


def _fold_scales(model: nn.Module, plan: Plan) -> dict[str, dict[str, float]]:
    """module -> {attribute: 1/sqrt(new head size)} for the stored scales of calls with a fold
    (``scale_fold.stored_scales``)."""
    from secateur.graph.scale_fold import stored_scales
    out: dict[str, dict[str, float]] = {}
    for g, chans in plan.choices:
        fold = getattr(g, "scale_fold", None)
        if fold is not None and fold.kept(chans) != fold.head_size:
            found = stored_scales(model, fold, fold.kept(chans))
            if found:
                out.setdefault(fold.where, {}).update(found)
    return out


def _folded(new: torch.Tensor, old: torch.Tensor, keep: dict[int, torch.Tensor],
            parts: tuple | list) -> torch.Tensor:
    """``new`` (``old`` sliced to the kept positions ``keep`` by dim) with the folds' q rows multiplied."""
    for dim, pos, factor in parts:
        mult = torch.ones(old.size(dim), dtype=torch.float64)
        mult[pos] = factor
        if dim in keep:
            mult = mult[keep[dim]]
        shape = [1] * new.dim()
        shape[dim] = -1
        new = new * mult.to(device=new.device, dtype=new.dtype).view(shape)
    return new


def _kept_per_slice(t: torch.Tensor, d: int, pos: torch.Tensor, where: str) -> torch.Tensor:
    """Kept positions ``[E, size - k]`` along dim ``d`` of each slice ``t[e]`` from removed ``pos [E, k]``."""
    if d == 0 or t.dim() < 2 or pos.size(0) != t.size(0) or pos.size(1) >= t.size(d):
        raise fail("per-expert positions do not fit the tensor (experts along dim 0, some channels kept)",
                   where=where, shape=t.shape, value=(d, tuple(pos.shape)))
    mask = torch.ones(t.size(0), t.size(d), dtype=torch.bool).scatter_(1, pos, False)
    return mask.nonzero()[:, 1].reshape(t.size(0), -1)


def _take_per_slice(t: torch.Tensor, d: int, idx: torch.Tensor) -> torch.Tensor:
    """``t[e]`` keeps positions ``idx[e]`` along ``d`` (one batched gather: ``take_along_dim`` broadcasts the
    index over the other dims, so no index the size of the weight is built)."""
    shape = [t.size(0) if i == 0 else idx.size(1) if i == d else 1 for i in range(t.dim())]
    return torch.take_along_dim(t, idx.to(t.device).reshape(shape), dim=d)


_HF_SIZES = {  # config field -> (module attribute, module-name suffixes): set when every layer agrees
    "intermediate_size": ("out_features", ("mlp.up_proj", "mlp.gate_proj", "intermediate.dense", "mlp.fc1")),
    "n_inner": ("nf", ("mlp.c_fc",)),
    "encoder_ffn_dim": ("out_features", ("encoder.layers.*.fc1",)),
    "decoder_ffn_dim": ("out_features", ("decoder.layers.*.fc1",)),
    "d_ff": ("out_features", ("DenseReluDense.wi",)),
}
_HF_HEADS = {"num_attention_heads": ("q_proj", "attention.self.query", "attention.attention.query", "attn.c_attn"),
             "num_key_value_heads": ("k_proj",), "n_head": ("attn.c_attn",), "num_heads": ("SelfAttention.q",)}


def _update_hf_config(model: nn.Module, structure: dict, heads: str = "heads") -> None:
    """Hugging Face: keep ``config`` in step where every layer has the same new size; where layers differ the
    config cannot say it and the structure record is what reloads the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    changed = {}

    def sizes(attr, suffixes, dim=0):
        vals = set()
        for n, mod in model.named_modules():
            if any(fnmatch.fnmatch(n, "*" + s) for s in suffixes):
                w = getattr(mod, "weight", None)
                if w is not None:
                    vals.add(int(getattr(mod, attr, w.shape[dim])))
        return vals

    for key, (attr, suffixes) in _HF_SIZES.items():
        vals = sizes(attr, suffixes)
        if _has(config, key) and len(vals) == 1:
            changed[key] = vals.pop()
    # head counts only where the config states the head size; where it derives it (hidden // heads: BERT, GPT-2,
    # ViT, BART) a new head count would build a different model, so the structure record carries it instead
    head_dim = _field(config, "head_dim") or _field(config, "d_kv")
    if head_dim:  # the hidden size (residual stream, pruned through its RMSNorms) is then free to change too
        vals = sizes("embedding_dim", ("embed_tokens",), dim=1)
        if _has(config, "hidden_size") and len(vals) == 1:
            changed["hidden_size"] = vals.pop()
    if head_dim and heads == "head_dim":  # head counts stay; the stated head size follows the q projections
        key = "head_dim" if _field(config, "head_dim") else "d_kv"
        n = _field(config, "num_attention_heads") or _field(config, "num_heads")
        vals = {v for s in _HF_HEADS["num_attention_heads"] + _HF_HEADS["num_heads"] for v in
                sizes("out_features", (s,))}
        if n and len(vals) == 1:
            changed[key] = vals.pop() // n
    elif head_dim:
        for key, suffixes in _HF_HEADS.items():
            vals = {v for s in suffixes for v in sizes("out_features", (s,))}
            if len(vals) == 1 and _field(config, key) is not None:
                changed[key] = vals.pop() // head_dim
    from secateur.graph.moe import config_sizes
    changed.update(config_sizes(model, changed))  # experts' widths, each proven by a rebuild on meta
    from secateur.graph import mamba2
    changed.update(mamba2.config_sizes(model, changed))  # Mamba-2 heads and inner width, proven the same way
    from secateur.graph import zamba
    changed.update(zamba.config_sizes(model, changed))  # Zamba's mamba heads, rank, state, proven the same way
    from secateur.graph import delta_net
    changed.update(delta_net.config_sizes(model, changed))  # linear attention's head counts, proven the same way
    from secateur.graph import mla
    if any(mla.is_mla(m) for m in model.modules()):  # its query rows are heads x (nope + rope), not x head_dim:
        for k in mla.HEAD_FIELDS:  # the head counts read from q_proj above would be wrong; mla decides them
            changed.pop(k, None)
        changed.update(mla.config_sizes(model, changed))  # MLA heads and latent ranks, proven the same way
    changed = {k: v for k, v in changed.items() if _field(config, k) != v}
    derived = _derived(config)
    for k in _built_values_differ(model, changed):  # a fresh build would compute with another scale
        del changed[k]
    for k, v in list(changed.items()):
        old = _field(config, k)
        setattr(config, k, v)
        if _derived(config) != derived:  # a value the forward computes from it (MiniCPM3's logits_scaling =
            setattr(config, k, old)      # hidden_size / dim_model_base) would change: the record reloads it
            del changed[k]
    if changed:
        structure.setdefault("", {"params": {}, "buffers": {}, "attrs": {}}).setdefault("config", {}).update(changed)


def _built_values_differ(model: nn.Module, changed: dict) -> list[str]:
    """Fields of ``changed`` with which ``type(model)(config)`` builds other values than the pruned model holds: a
    value computed from the config at construction (Gemma's ``embed_scale = hidden_size ** 0.5``, a non-persistent
    buffer, its float twin an attribute; neither is saved), which the pruned model keeps at the old size's value. With
    such a field updated, a model rebuilt from the config (``from_pretrained``) would scale by the new size's value
    and compute something else without any error; left as it was, the structure record reloads the sizes. So too a
    field with which the build makes a parameter smaller than the pruned one (Helium sizes ``o_proj``'s input by
    ``hidden_size``, not by its heads): the record only slices. Builds have parameters on meta (no memory) and real
    buffers; a model its class cannot rebuild keeps every field."""
    from secateur.llm.offload import empty_model
    config = model.config
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())

    def values(cfg):
        built = empty_model(lambda: type(model)(cfg))
        out = {(name, None): p.shape for name, p in built.named_parameters()}
        for name, mod in built.named_modules():
            for k, v in vars(mod).items():
                if isinstance(v, float):
                    out[name, k] = v
            for k in mod._non_persistent_buffers_set:
                if isinstance(mod._buffers.get(k), torch.Tensor):
                    out[name, k] = mod._buffers[k]
        return out

    def same(a, b):
        return a == b if isinstance(a, float) else a.shape != b.shape or torch.equal(a, b)

    def differs(fields) -> bool:
        cfg = copy.deepcopy(config)
        for k in fields:
            setattr(cfg, k, changed[k])
        for (name, attr), new in values(cfg).items():
            if attr is None:  # a parameter the build makes smaller than the pruned one: the record cannot reload it
                if name in params and len(new) == params[name].dim() and any(
                        a < b for a, b in zip(new, params[name].shape)):
                    return True
                continue
            old, mod = base.get((name, attr)), mods.get(name)
            have = getattr(mod, attr, None) if mod is not None else None
            if old is not None and have is not None and not same(old, new) and same(have, old) and not same(have, new):
                return True
        return False

    try:
        with _quiet_transformers():
            base = values(config)
            if not changed or not differs(changed):  # the common case: two builds, whatever the number of fields
                return []
            return [k for k in changed if differs([k])]
    except Exception:  # noqa: BLE001 - a model its class cannot rebuild from its config: nothing to compare
        return []


@contextlib.contextmanager
def _quiet_transformers():
    """Builds of a model from a copy of its config, without transformers' deprecation notices for every copy."""
    import logging
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _field(config, key: str):
    """``config.<key>``, None where absent or where the config states no single value: transformers' per-layer
    configs (Gemma 4, Dots3) raise on reading a field that may differ between layers; the record reloads those."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError (not an AttributeError)
        return None


def _derived(config) -> dict:
    """The number-valued properties a config computes from its fields: a model may read them in its forward."""
    out = {}
    with _quiet_transformers():  # deprecated properties among them say so
        for name in dir(type(config)):
            if not name.startswith("_") and isinstance(getattr(type(config), name, None), property):
                v = _field(config, name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[name] = v
    return out


def _has(config, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - as in _field
        return False


def _record_unsaved(entry: dict, name: str, removed: dict, new: torch.Tensor) -> None:
    """A non-persistent buffer (not in the state_dict: a sinusoidal position table the model rebuilds from its
    config, CTRL's ``pos_encoding``, XGLM's ``weights``) sliced along channels: record which positions of the fresh
    one are kept (composed with an earlier pruning's) and a checksum of the result, so that ``load`` takes the
    same positions from a fresh model and can prove it got the same values (``apply_structure``)."""
    kept = entry.setdefault("kept", {}).setdefault(name, {})
    for d, pos in removed.items():  # positions in the buffer as it was before this slicing
        mask = torch.ones(new.size(d) + int(pos.numel()), dtype=torch.bool)
        mask[pos] = False
        idx = mask.nonzero().flatten().tolist()
        kept[str(d)] = [kept[str(d)][i] for i in idx] if str(d) in kept else idx
    entry.setdefault("checks", {})[name] = _checksum(new)


def _checksum(t: torch.Tensor) -> list[float] | None:
    if t.device.type == "meta":  # a skeleton (dry runs, plans of models larger than memory): no values to check
        return None
    t = t.detach().double().cpu()
    return [float(t.sum()), float(t.abs().sum()), float((t * torch.arange(1, t.numel() + 1, dtype=torch.float64
                                                                          ).reshape(t.shape)).sum())]


def _rebuild_unsaved(mod: nn.Module, where: str, name: str, kept: dict, check: list | None) -> None:
    b = mod._buffers.get(name)
    if b is None:
        raise fail("a pruned non-persistent buffer is missing from the fresh model", where=f"{where}.{name}")
    for d, idx in kept.items():
        d = int(d)
        if d >= b.dim() or (idx and max(idx) >= b.size(d)):
            raise fail("the structure's kept positions do not fit this buffer", where=f"{where}.{name}",
                       shape=tuple(b.shape), value=d)
        b = b.index_select(d, torch.tensor(idx, dtype=torch.long, device=b.device))
    if check is not None and not all(math.isclose(a, c, rel_tol=1e-6, abs_tol=1e-6) for a, c in
                                     zip(_checksum(b), check)):
        raise fail("a pruned non-persistent buffer rebuilt by this model differs from the saved one (its values are "
                   "not in the file: the model must build it as it did when saved)", where=f"{where}.{name}",
                   shape=tuple(b.shape))
    mod._buffers[name] = b.contiguous()


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built, unpruned ``model`` to a recorded structure (values are truncated: load the pruned
    state_dict afterwards). Returns the model."""
    from secateur.structured.depth import skip_recorded
    skip_recorded(model, structure)  # dropped blocks first: their names stay, their tensors go
    with torch.no_grad():
        for name, entry in structure.items():
            if "skipped" in entry:
                continue
            try:
                mod = model.get_submodule(name)
            except AttributeError as e:
                raise fail("module of the structure not found in the model", where=name) from e
            for pn, shape in entry.get("params", {}).items():
                p = getattr(mod, pn)
                p.data = in_layout_of(p.data[tuple(slice(0, s) for s in shape)], p.data)
            kept = entry.get("kept", {})
            for bn, shape in entry.get("buffers", {}).items():
                if bn in kept:
                    _rebuild_unsaved(mod, name, bn, kept[bn], entry.get("checks", {}).get(bn))
                    continue
                b = mod._buffers[bn]
                mod._buffers[bn] = b[tuple(slice(0, s) for s in shape)].contiguous()
            for k, v in entry.get("attrs", {}).items():
                if k == "__class__":  # a module that became a pruned variant (nn.MultiheadAttention)
                    cls = structure_class(v)
                    if cls is None:
                        raise fail("unknown module class in the structure", where=name, value=v)
                    if not isinstance(mod, cls.__mro__[1]):  # a pruned variant only replaces its own base
                        raise fail(f"the structure's {v} does not fit this module", where=name,
                                   value=type(mod).__name__, hint="load into the architecture that was saved")
                    mod.__class__ = cls
                    continue
                old = getattr(mod, k, None)
                setattr(mod, k, tuple(v) if isinstance(old, tuple) else v)
            for k, v in entry.get("config", {}).items():
                setattr(model.config, k, v)
    setattr(model, STRUCTURE_ATTR, {k: v for k, v in structure.items()})
    return model


# ---------------------------------------------------------------- the verb
