"""Leaf modules handled as one op (registry keyed by type), and the size attributes to fix after slicing.

A subclass counts as its registered base only when it does not override ``forward`` (timm's StdConv2d does, so its
ops are traced at ATen level, where a computed weight makes its channels all-or-nothing: safe, never wrong)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from secateur.errors import fail
from secateur.graph.capture import Tracer
from secateur.graph.labels import _RUNS, along

LEAVES: dict[type, Callable] = {}
LEAVES_BY_NAME: dict[str, Callable] = {}  # "module.path.ClassName" for optional libraries (transformers)
# module -> rule or None, asked when no class matches: families recognised by what an instance carries rather than
# by class (transformers' experts modules, one class per model: graph/moe.py)
LEAF_PROBES: list[Callable[[nn.Module], Callable | None]] = []


def leaf(*types, names=()):
    def deco(fn):
        for t in types:
            LEAVES[t] = fn
        for n in names:
            LEAVES_BY_NAME[n] = fn
        return fn
    return deco


def leaf_rule(mod: nn.Module) -> Callable | None:
    cls = type(mod)
    fn = LEAVES.get(cls) or LEAVES_BY_NAME.get(f"{cls.__module__}.{cls.__name__}")
    if fn is not None:
        return fn
    for base in cls.__mro__[1:]:
        if base in LEAVES:
            return LEAVES[base] if cls.forward is base.forward else None
    for probe in LEAF_PROBES:
        fn = probe(mod)
        if fn is not None:
            return fn
    return None


def _input(args, kwargs) -> torch.Tensor:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError("module called without a tensor input")


def _pad(lab, nd):
    if lab is None or lab.dim() == nd:
        return lab
    return lab.reshape((1,) * (nd - lab.dim()) + tuple(lab.shape))


def _channels(tr: Tracer, x: torch.Tensor, cdim: int) -> torch.Tensor | None:
    """The atom of each channel along ``cdim`` (other dims collapsed: a channel is one unit everywhere)."""
    lab = _pad(tr.get(x), x.dim())
    if lab is None:
        return None
    cdim %= x.dim()
    if not (0 < lab.size(cdim) == lab.numel()):  # else the other dims are 1 already: nothing to collapse
        lab = tr.atoms.collapse(lab, [d for d in range(x.dim()) if d != cdim])
    return along(lab, cdim, x.size(cdim)).clone()


def _shape_for(nd: int, cdim: int, atoms: torch.Tensor) -> torch.Tensor:
    shape = [1] * nd
    shape[cdim % nd] = atoms.numel()
    return atoms.reshape(shape)


def _produce(tr: Tracer, mod: nn.Module, n: int, wdim: int) -> torch.Tensor:
    atoms = tr.atoms.new(n)
    tr.slot(mod.weight, wdim, atoms, "out", new=True)
    if getattr(mod, "bias", None) is not None:
        tr.slot(mod.bias, 0, atoms, "out", new=True)
    return atoms


@leaf(nn.Linear, names=("transformers.pytorch_utils.Conv1D",))
def linear(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    conv1d = not isinstance(mod, nn.Linear)  # HF Conv1D keeps weight as [in, out]
    lab = _pad(tr.get(x), x.dim())
    if lab is not None and lab.size(-1) == 1 and lab.numel() > 1:
        tr.set(out, lab)  # channels on other dims pass through (token mixing); our outputs are not prunable
        return
    chan = _channels(tr, x, -1)
    if chan is not None:
        tr.slot(mod.weight, 0 if conv1d else 1, _consumed(tr, chan), "in")
    atoms = _produce(tr, mod, out.size(-1), 1 if conv1d else 0)
    tr.set(out, _shape_for(out.dim(), -1, atoms), compressed=True)


def _consumed(tr: Tracer, chan: torch.Tensor) -> torch.Tensor:
    """Input channels of a weight: positions no producer labels (a concat with the model's input) get atoms of
    their own, which nothing produces, so they are never pruned; the labelled ones stay prunable."""
    return tr.atoms.own(chan)


def grouped_mode(tr: Tracer, mod: nn.Module) -> str | None:
    """How a grouped conv loses channels (None: not grouped).

    "channels" (the default, ``Tracer.grouped``): local channel j of every conv group is one unit, for inputs and
    outputs separately, so every group keeps the same width and the group count stays (Torch-Pruning's way too).
    Measured at ratio 0.5 (l1, 224 px, benchmarks/bench_grouped_conv.py), MACs after / before, whole groups ->
    channels: resnext50_32x4d 0.271 -> 0.257, regnet_x_400mf 0.320 -> 0.257, regnet_y_400mf 0.298 -> 0.257,
    regnet_x_3_2gf 0.369 -> 0.251; on all 17 torchvision RegNets/ResNeXts measured, exactly Torch-Pruning's MACs
    (whole groups left 1.05-1.56x more; results/grouped_conv.json), with the oracle exact in both modes:
    whole groups tie a group's inputs to its outputs, and a RegNet's few wide groups are units too coarse to
    prune evenly. "groups": whole groups, which keeps a group width the design fixed (RegNet's), for kernels
    tuned to it. A per-group input width of 1 (depthwise, depthwise multiplier) leaves nothing to remove inside
    a group: whole groups there, whatever the mode."""
    if mod.groups == 1:
        return None
    return "groups" if mod.in_channels == mod.groups else tr.grouped


def _grouped_units(tr: Tracer, mod: nn.Module, ins: torch.Tensor | None, outs: torch.Tensor
                   ) -> tuple[str, torch.Tensor | None]:
    """Couple a grouped conv's input atoms ``ins`` and output atoms ``outs`` (both in channel order) by
    ``grouped_mode``. Returns the mode and, in "channels" mode, one atom per local input index (None when the
    input carries no labels)."""
    g, mode = mod.groups, grouped_mode(tr, mod)
    tr.convs[tr.where()] = mode
    if mode == "channels":  # channel a*width + j of every group a together, for inputs and outputs apart
        tr.atoms.collapse(outs.view(g, -1), [0])
        return mode, None if ins is None else _consumed(tr, tr.atoms.collapse(ins.view(g, -1), [0]).reshape(-1))
    if _depthwise_pairs(tr, g, ins, outs):
        return mode, None
    ins = ins if ins is not None else torch.full((mod.in_channels,), -1, dtype=torch.long)
    tr.atoms.collapse(torch.cat([ins.view(g, -1), outs.view(g, -1)], dim=1), [1])  # a group's ins and outs
    return mode, None


def _depthwise_pairs(tr: Tracer, g: int, ins: torch.Tensor | None, outs: torch.Tensor) -> bool:
    """Whole groups of one input and one output channel each (a depthwise conv, the common grouped conv), input
    atoms all real: what ``collapse`` of the rows [input_i, output_i] along dim 1 does, without it (a quarter of a
    depthwise conv's capture). Every row holds two atoms, the output the larger (``outs`` are new), so the edges
    are (input_i, output_i) in row order, and every row is tied: one "tie" reason naming the outputs, two atoms a
    row. Not for a label too large for ``union``'s plain path (its edges come folded), nor where an input has no
    atom (-1: ``collapse`` keeps such a pair)."""
    if ins is None or ins.numel() != g or outs.numel() != g or 2 * g > _RUNS or (g and int(ins.min()) < 0):
        return False
    if g:
        tr.atoms._add(torch.stack([ins.reshape(-1), outs.reshape(-1)]))
        if tr.atoms.site is not None:
            tr.atoms.reasons.append((tr.atoms.site, "tie", outs.reshape(-1).clone(), 2))
    return True


@leaf(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(tr: Tracer, mod, args, kwargs, out):
    """Weight [out, in / groups, *k]: dim 0 holds the output channels, dim 1 a group's local input index."""
    x = _input(args, kwargs)
    cdim = x.dim() - mod.weight.dim() + 1
    lab = _pad(tr.get(x), x.dim())
    if lab is not None and any(lab.size(d) > 1 for d in range(cdim + 1, x.dim())) and _pointwise_conv(mod):
        # channels on the "length" dims of a 1x1 conv: each position is mixed across the conv's channels only, so
        # they pass through (the channels at one position one unit; the conv's own channels are kept), as a
        # Linear's do on its token dims. timm CoaT's ``aggregate`` Conv1d(3, 1, 1) mixes its three scales' class
        # tokens [B, 3, C]; collapsing C instead kept the stream of three stages whole (coat_tiny)
        tr.set(out, tr.atoms.collapse(lab, [cdim]))
        return
    chan = _channels(tr, x, cdim)
    atoms = _produce(tr, mod, mod.out_channels, 0)
    conv_inputs(tr, mod, chan, atoms)
    tr.set(out, _shape_for(out.dim(), cdim, atoms), compressed=True)


def _pointwise_conv(mod: nn.Module) -> bool:
    """A conv that maps every spatial position to itself: 1-wide kernel, stride 1, no padding, one group."""
    return (all(k == 1 for k in mod.kernel_size) and all(s == 1 for s in mod.stride) and mod.groups == 1
            and not isinstance(mod.padding, str) and all(p == 0 for p in mod.padding))


def conv_inputs(tr: Tracer, mod, chan: torch.Tensor | None, atoms: torch.Tensor) -> torch.Tensor | None:
    """A conv's input channels ``chan`` as its weight's dim-1 slots (a group's local index for grouped convs);
    returns those local atoms, None where the input carries no channels."""
    if mod.groups == 1:
        local = None if chan is None else _consumed(tr, chan)
    else:
        _, local = _grouped_units(tr, mod, chan, atoms)
    if local is not None:
        tr.slot(mod.weight, 1, local, "in")
    return local


@leaf(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(tr: Tracer, mod, args, kwargs, out):
    """Weight [in, out / groups, *k]: dim 0 holds the input channels, dim 1 a group's local output index."""
    x = _input(args, kwargs)
    cdim = x.dim() - mod.weight.dim() + 1
    chan = _channels(tr, x, cdim)
    g = mod.groups
    atoms = tr.atoms.new(mod.out_channels)
    if mod.bias is not None:
        tr.slot(mod.bias, 0, atoms, "out")
    mode = "dense" if g == 1 else _grouped_units(tr, mod, chan, atoms)[0]
    if mode == "groups":  # whole groups: the weight's dim 0 (inputs) follows its group
        per_group = atoms.view(g, -1)[:, :1].expand(g, mod.in_channels // g).reshape(-1)
        tr.slot(mod.weight, 0, _consumed(tr, chan) if chan is not None else per_group,
                "in" if chan is not None else "out")
    else:  # dense, or "channels": local output j of every group is one atom, and so is input j of every group
        tr.slot(mod.weight, 1, atoms.view(g, -1)[0], "out")
        if chan is not None:
            tr.slot(mod.weight, 0, _consumed(tr, chan), "in")
    tr.set(out, _shape_for(out.dim(), cdim, atoms))


@leaf(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
      nn.InstanceNorm3d)
def batch_norm(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    cdim = 1 if x.dim() > 1 and not (isinstance(mod, nn.modules.instancenorm._InstanceNorm)
                                     and x.dim() == mod._get_no_batch_dim()) else 0
    chan = _channels(tr, x, cdim)
    if chan is None:
        return
    lo, hi = (int(v) for v in chan.aminmax()) if chan.numel() else (0, 0)  # once, for the four tensors and the label
    own = chan if lo >= 0 else _consumed(tr, chan)  # channels straight from the model's input: never pruned
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == chan.numel():
            tr.slot(t, 0, own, "param", atoms_ok=True)
    tr.set(out, _shape_for(out.dim(), cdim, chan), compressed=0 <= lo < hi)  # atoms that differ: nothing to shrink


@leaf(nn.GroupNorm)
def group_norm(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    if mod.num_groups == 1:
        return one_group_norm(tr, mod, x, out)
    chan = _channels(tr, x, 1)
    if chan is None:
        return
    per = mod.num_channels // mod.num_groups  # a group is normalised together: whole groups only
    rows = chan.view(mod.num_groups, per)
    if chan.numel() and int(chan.min()) < 0:  # a group holding a channel of the model's input stays whole
        tr.atoms.block(rows[(rows < 0).any(1)])
    chan = tr.atoms.collapse(rows, [1]).expand(mod.num_groups, per).reshape(-1)
    if mod.affine:
        own = _consumed(tr, chan)  # groups of the input's channels only: positions of their own, never pruned
        tr.slot(mod.weight, 0, own, "param")
        tr.slot(mod.bias, 0, own, "param")
    tr.set(out, _shape_for(out.dim(), 1, chan))


def one_group_norm(tr: Tracer, mod: nn.GroupNorm, x: torch.Tensor, out: torch.Tensor) -> None:
    """A GroupNorm with one group (timm's GroupNorm1: PoolFormer, LowFormer, MobileViT) is a LayerNorm over
    channels and positions. Whole groups only made every channel one all-or-nothing unit, so such models kept their
    stream silently (poolformer_s12 0.57 of dense MACs). Like LayerNorm, the channels prune with the affine weight
    and the site is recorded: removal is not zeroing there, the plan says so and the reference normalises over
    the kept channels (``Plan.kept_norms``, along dim 1)."""
    name = tr.where()
    tr.calls[name] = tr.calls.get(name, 0) + 1
    chan = _channels(tr, x, 1)
    if chan is None:
        return
    own = _consumed(tr, chan)  # channels straight from the model's input: never pruned
    if mod.affine:
        tr.slot(mod.weight, 0, own, "param")
        tr.slot(mod.bias, 0, own, "param")
    tr.norm_site("module", name, type(mod).__name__, own, dim=1)
    tr.set(out, _shape_for(out.dim(), 1, chan))


@leaf(nn.LayerNorm, nn.RMSNorm, names=("transformers.models.llama.modeling_llama.LlamaRMSNorm",))
def layer_norm(tr: Tracer, mod, args, kwargs, out):
    """Normalising over the last dim. Channels along it are pruned with the affine weight, but removal is not
    zeroing there (the statistics change): the site is recorded so the plan says so and the reference can
    compute the statistics over the kept channels (``Plan.kept_norms``)."""
    x = _input(args, kwargs)
    name = tr.where()
    tr.calls[name] = tr.calls.get(name, 0) + 1
    lab = _pad(tr.get(x), x.dim())
    if lab is None:
        return
    shape = tuple(getattr(mod, "normalized_shape", (x.size(-1),)))
    weight = getattr(mod, "weight", None)
    if all(lab.size(-1 - d) == 1 for d in range(len(shape))):  # channels on other dims only: each is
        tr.set(out, lab)  # normalised on its own, nothing mixes them
        return
    if len(shape) == 1 and not tr.head_dim and _per_head(lab):
        # channels vary along another dim too: a norm over each head's dims ([.., heads, head_dim], Persimmon's
        # q/k LayerNorm, one weight for all heads). Collapsing across the other dims tied every head's dim j into
        # one unit, so all heads were all-or-nothing. A head is whole here instead (its dims one unit), the norm
        # works inside it and its shared weight is never cut: removing a head removes whole rows, exactly
        tr.set(out, tr.atoms.collapse(lab, [lab.dim() - 1]).expand(out.shape))
        return
    if len(shape) != 1 or not isinstance(weight, torch.Tensor):
        tr.atoms.block(lab)  # several normalised dims, or no tensor that would carry the new size
        tr.notes.append(f"{name}: {type(mod).__name__} normalises over channels "
                        f"({'no affine weight' if len(shape) == 1 else f'shape {shape}'}); its channels are kept")
        return
    chan = _channels(tr, x, -1)
    own = _consumed(tr, chan)  # channels straight from the model's input: never pruned
    for t in (weight, getattr(mod, "bias", None)):
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == chan.numel():
            tr.slot(t, 0, own, "param")
    tr.norm_site("module", name, type(mod).__name__, own)
    tr.set(out, _shape_for(out.dim(), -1, chan))


def _per_head(lab: torch.Tensor) -> bool:
    """Channels on the last dim that differ at every position of some other dim (heads: [.., heads, head_dim]),
    not a stream whose few special rows (a class token) carry other atoms for the same channels."""
    others = [d for d in range(lab.dim() - 1) if lab.size(d) > 1]
    if not others or lab.size(-1) == 1:
        return False
    for d in others:
        rows = lab.movedim(d, 0).reshape(lab.size(d), -1)
        if torch.unique(rows, dim=0).size(0) != lab.size(d):
            return False
    return True


@leaf(nn.PReLU)
def prelu(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    lab = tr.get(x)
    if lab is None:
        return
    if mod.num_parameters > 1:
        chan = _channels(tr, x, 1 if x.dim() > 1 else 0)
        tr.slot(mod.weight, 0, _consumed(tr, chan), "param")
        tr.set(out, _shape_for(out.dim(), 1 if x.dim() > 1 else 0, chan))
    else:
        tr.set(out, lab)


@leaf(nn.Embedding)
def embedding(tr: Tracer, mod, args, kwargs, out):
    x = _input(args, kwargs)
    if tr.get(x) is not None:
        raise tr.error("Embedding indices carry channels", x)
    atoms = tr.atoms.new(mod.embedding_dim)
    tr.slot(mod.weight, 1, atoms, "out")
    tr.set(out, _shape_for(out.dim(), -1, atoms))


@leaf(nn.EmbeddingBag, nn.Bilinear)
def kept(tr: Tracer, mod, args, kwargs, out):
    """Refused on purpose: bags and bilinear forms tie their sizes together in ways the engine does not map.
    Their channels (and their inputs' channels) are kept. (nn.MultiheadAttention: mha.py; recurrent layers:
    recurrent.py.)"""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            tr.atoms.block(tr.get(a))
        elif isinstance(a, (tuple, list)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    tr.atoms.block(tr.get(b))
    tr.notes.append(f"{tr.where()}: {type(mod).__name__} is kept whole (its channels are not pruned)")


# ---------------------------------------------------------------- size attributes after slicing
UPDATERS: dict[type, Callable[[nn.Module, dict[str, Any]], dict[str, Any]]] = {}
UPDATERS_BY_NAME: dict[str, Callable[[nn.Module, dict[str, Any]], dict[str, Any]]] = {}
# classes a module may become when pruned (structure attr "__class__"); only these are rebuilt on load
STRUCTURE_CLASSES: dict[str, type] = {}
UPDATER_PROBES: list[Callable[[nn.Module], Callable | None]] = []  # as LEAF_PROBES, for size updaters
# the same, built on first use (subclasses of an optional library's class: torchvision is imported only then)
LAZY_CLASSES: dict[str, Callable[[], type]] = {}


def structure_class(name: str) -> type | None:
    """The class a pruned module became, from its recorded name; None if it is not one of ours."""
    if name in STRUCTURE_CLASSES:
        return STRUCTURE_CLASSES[name]
    return LAZY_CLASSES[name]() if name in LAZY_CLASSES else None


def updater(*types):
    def deco(fn):
        for t in types:
            UPDATERS[t] = fn
        _BY_CLASS_FOR[0] = None  # (a replaced updater keeps the sizes: resolve classes again)
        return fn
    return deco


def update_attrs(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """Set the module's size attributes from its (already sliced) tensors; return what was set."""
    fn = _class_updater(type(mod))
    if fn is not None:
        return fn(mod, old)
    for probe in UPDATER_PROBES:
        fn = probe(mod)
        if fn is not None:
            return fn(mod, old)
    return heads_updater(mod, old)


_BY_CLASS: dict[type, Callable | None] = {}  # class -> its updater by class (UPDATERS, UPDATERS_BY_NAME) or None
_BY_CLASS_FOR: list = [None]  # the registries' sizes the cache was filled with: any registration empties it


def _class_updater(cls: type) -> Callable | None:
    """The first of ``cls.__mro__`` registered in ``UPDATERS`` or by name: resolved once per class (a name per base
    per module, twice per plan, on every module a plan touches and their parents)."""
    sizes = (len(UPDATERS), len(UPDATERS_BY_NAME))
    if _BY_CLASS_FOR[0] != sizes:
        _BY_CLASS.clear()
        _BY_CLASS_FOR[0] = sizes
    if cls in _BY_CLASS:
        return _BY_CLASS[cls]
    fn = None
    for base in cls.__mro__:
        if base in UPDATERS:
            fn = UPDATERS[base]
            break
        fn = UPDATERS_BY_NAME.get(f"{base.__module__}.{base.__name__}")
        if fn is not None:
            break
    _BY_CLASS[cls] = fn
    return fn


def snapshot(mod: nn.Module) -> dict[str, Any]:
    out = {k: v for k, v in vars(mod).items() if k[:1] != "_" and isinstance(v, (int, tuple))}
    out["_children_out"] = {n: v for n, c in own(mod._modules) for v in [_out_size(c)] if v is not None}
    out["_shapes"] = {n: tuple(p.shape) for n, p in own(mod._parameters)}  # before slicing
    return out


def own(entries: dict[str, Any]) -> list[tuple[str, Any]]:
    """A module's own ``_parameters`` / ``_buffers`` / ``_modules`` as ``named_parameters(recurse=False)``,
    ``named_buffers(recurse=False)`` and ``named_children()`` give them (no None, each object once), read from its
    dict: those generators walk ``named_modules`` on every call, and a plan asks for about a thousand."""
    seen, out = set(), []
    for n, v in entries.items():
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            out.append((n, v))
    return out


def _out_size(m: nn.Module) -> int | None:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) and w is not None:
        return int(w.shape[0])
    if type(m).__name__ == "Conv1D" and w is not None:
        return int(w.shape[1])
    if w is None:  # a wrapper (gemma4_vit's q_proj.linear); (its children listed only here: most modules have a weight)
        kids = list(m.children())
        if len(kids) == 1 and isinstance(kids[0], nn.Linear):
            return _out_size(kids[0])
    return None


@updater(nn.Linear)
def _linear(mod, old):
    mod.in_features, mod.out_features = int(mod.weight.shape[1]), int(mod.weight.shape[0])
    return {"in_features": mod.in_features, "out_features": mod.out_features}


@updater(nn.modules.conv._ConvNd)
def _conv(mod, old):
    """Sizes from the sliced weight. A grouped conv's new group count follows the mode its capture used
    (``old["_grouped"]``, from ``Tracer.convs``): "channels" keeps the count (every group lost the same local
    channels), "groups" keeps each group's widths (whole groups left). Shapes alone cannot tell them apart."""
    w, g = mod.weight, old["groups"]
    if g > 1:
        mode = old.get("_grouped")
        if mode not in ("channels", "groups"):
            raise fail("internal: a grouped convolution was sliced without a recorded grouped mode",
                       where=type(mod).__name__, shape=w.shape, value=mode)
        if mode == "groups":  # dim 0 holds whole groups of a fixed size (outputs, or inputs when transposed)
            g = g * int(w.shape[0]) // old["in_channels" if mod.transposed else "out_channels"]
    mod.groups = g
    if mod.transposed:
        mod.in_channels, mod.out_channels = int(w.shape[0]), int(w.shape[1]) * g
    else:
        mod.out_channels, mod.in_channels = int(w.shape[0]), int(w.shape[1]) * g
    return {"groups": mod.groups, "in_channels": mod.in_channels, "out_channels": mod.out_channels}


@updater(nn.modules.batchnorm._NormBase)
def _bn(mod, old):
    t = mod.weight if mod.weight is not None else mod.running_mean
    mod.num_features = int(t.shape[0])
    return {"num_features": mod.num_features}


@updater(nn.GroupNorm)
def _gn(mod, old):
    c = int(mod.weight.shape[0])  # whole groups went, or channels from the only group (``one_group_norm``)
    mod.num_groups = 1 if old["num_groups"] == 1 else old["num_groups"] * c // old["num_channels"]
    mod.num_channels = c
    return {"num_groups": mod.num_groups, "num_channels": c}


@updater(nn.LayerNorm, nn.RMSNorm)
def _ln(mod, old):
    if not isinstance(getattr(mod, "weight", None), torch.Tensor):
        return {}
    mod.normalized_shape = (int(mod.weight.shape[0]),)
    return {"normalized_shape": mod.normalized_shape}


@updater(nn.PReLU)
def _prelu(mod, old):
    mod.num_parameters = int(mod.weight.shape[0])
    return {"num_parameters": mod.num_parameters}


@updater(nn.Embedding)
def _emb(mod, old):
    mod.embedding_dim = int(mod.weight.shape[1])
    return {"embedding_dim": mod.embedding_dim}


def _hf_conv1d(mod, old):
    mod.nx, mod.nf = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return {"nx": mod.nx, "nf": mod.nf}


UPDATERS_BY_NAME["transformers.pytorch_utils.Conv1D"] = _hf_conv1d


def _tv_vit(mod, old):
    """torchvision ``VisionTransformer`` reshapes the patch grid with ``self.hidden_dim`` (``_process_input``). Its
    class token ``[1, 1, hidden_dim]`` is sliced with the hidden channels (it is concatenated with the patch
    tokens), so its size is the evidence for the new hidden size; a general rule (any int attribute equal to an old
    channel count) could rewrite an unrelated count that happens to be equal."""
    token = getattr(mod, "class_token", None)
    if not isinstance(token, torch.Tensor) or not isinstance(old.get("hidden_dim"), int):
        return heads_updater(mod, old)
    mod.hidden_dim = int(token.shape[-1])
    return {"hidden_dim": mod.hidden_dim}


UPDATERS_BY_NAME["torchvision.models.vision_transformer.VisionTransformer"] = _tv_vit

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads",
              "all_head_size", "split_size", "attn_dim", "inner_dim")


KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")


HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size", "all_head_size", "inner_dim", "attn_dim",
                   "split_size", "key_value_proj_dim")


def heads_updater(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """Attention containers (timm, Hugging Face): when all their q/k/v/qkv projections shrank by the same
    ratio (whole heads removed), scale their head-count attributes by that ratio."""
    if type(mod).__name__ == "Conv1D":
        return {}
    ratios = set()
    for n, c in mod.named_children():
        before = old.get("_children_out", {}).get(n)
        if not before:  # (a child that had no output size: nothing to compare, its size not read)
            continue
        now = _out_size(c)
        if now is not None and now != before and any(k in n for k in ("q", "k", "v", "attn")):
            ratios.add((now, before))
    if not ratios:
        return {}
    fr = {round(a / b, 9) for a, b in ratios}
    if len(fr) != 1:
        return {}
    (now, before) = next(iter(ratios))
    set_ = {}
    if old.get("_heads") == "head_dim":  # head counts stay, head sizes shrink; the softmax scale stays
        for k in HEAD_SIZE_ATTRS:
            v = old.get(k)
            if isinstance(v, int) and v > 0 and v * now % before == 0:
                setattr(mod, k, v * now // before)
                set_[k] = v * now // before
        for k, v in vars(mod).items():  # the scale among them: a model rebuilt from the config recomputes it
            if isinstance(v, float) and not k.startswith("_"):
                set_[k] = v
        return set_
    one_kv = "q_proj" in mod._modules and "k_proj" in mod._modules and _out_size(mod.k_proj) == \
        old.get("_children_out", {}).get("k_proj")  # query heads of one key/value head removed (MQA), k/v whole
    for k in HEAD_ATTRS:
        v = old.get(k)
        if one_kv and k in KV_HEAD_ATTRS:
            continue
        if isinstance(v, int) and v > 0 and v * now % before == 0:
            setattr(mod, k, v * now // before)
            set_[k] = v * now // before
    return set_


def key_value_groups(mod: nn.Module, old: dict[str, Any]) -> dict[str, int]:
    """Hugging Face attention's ``num_key_value_groups`` (query heads per key/value head) from its pruned widths, once
    every other size is set: eager attention and SDPA with a mask repeat k/v by it, SDPA without one reads the heads
    from the tensors, so the dry run (which calls SDPA so) cannot prove it. Under one key/value head (MQA) query heads
    go alone and the count shrinks. The widths are q_proj / k_proj rows, or GPT-BigCode's fused ``embed_dim`` /
    ``kv_dim``, over ``head_dim``; set only where they gave the old count too (Qwen3-Next's q_proj rows hold a gate
    as well). Returns what was set."""
    g = old.get("num_key_value_groups")
    if not isinstance(g, int) or g <= 0:
        return {}
    outs = old.get("_children_out", {})

    def groups(q, k, hd):
        if not all(isinstance(v, int) and v > 0 for v in (q, k, hd)) or q % hd or k % hd or (q // hd) % (k // hd):
            return None
        return (q // hd) // (k // hd)

    q_proj, k_proj = mod._modules.get("q_proj"), mod._modules.get("k_proj")
    if q_proj is not None and k_proj is not None:
        q0, k0, q, k = outs.get("q_proj"), outs.get("k_proj"), _out_size(q_proj), _out_size(k_proj)
    else:
        q0, k0 = old.get("embed_dim"), old.get("kv_dim")
        q, k = getattr(mod, "embed_dim", None), getattr(mod, "kv_dim", None)
    new = groups(q, k, getattr(mod, "head_dim", None))
    if groups(q0, k0, old.get("head_dim")) != g or new in (None, g):
        return {}
    mod.num_key_value_groups = new
    return {"num_key_value_groups": new}


from secateur.graph import mha as _mha  # noqa: E402,F401 - registers nn.MultiheadAttention (needs the above)
from secateur.graph import recurrent  # noqa: E402,F401  (registers the recurrent leaves and updaters)
from secateur.graph import windows  # noqa: E402,F401  (torchvision Swin / MaxViT window attention, by name)
from secateur.graph import timm_sizes  # noqa: E402,F401  (timm modules with stored split sizes, by name)
from secateur.graph import std_conv  # noqa: E402,F401  (timm's weight-standardised convs, by name)
from secateur.graph import video  # noqa: E402,F401  (torchvision MViT positional encoding and attention sizes)
from secateur.graph import moe  # noqa: E402,F401  (transformers' fused mixture-of-experts modules, by instance)
from secateur.graph import mamba2  # noqa: E402,F401  (Mamba-2 mixers' sizes, by what they hold)
from secateur.graph import zamba  # noqa: E402,F401  (Zamba's multi-head Mamba mixer as one op, by class name)
from secateur.graph import moe_models  # noqa: E402,F401  (DBRX, JetMoE, LongCat-Flash experts, by class name)
from secateur.graph import delta_net  # noqa: E402,F401  (gated delta net mixers' head counts, by attributes)
from secateur.graph import mla  # noqa: E402,F401  (multi-head latent attention's head count and ranks, by attributes)
