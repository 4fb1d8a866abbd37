"""Mixture-of-experts modules of single Hugging Face models that do not use transformers' experts dispatcher
(graph/moe.py): DBRX's ``DbrxExperts``, JetMoE's ``JetMoeMoE`` and mixture-of-attention ``JetMoeAttention``,
LongCat-Flash's ``LongcatFlashMoE`` (its experts and router). Each is handled as one op, like the dispatcher's modules,
with a shape-checked stand-in forward on meta (graph/moe.py ``meta_stand_ins``: their routing does not run there).

Why leaves: their forwards route tokens with ``one_hot`` / ``scatter`` / ``sort`` and merge the experts' outputs with
``index_add`` into a ``zeros`` tensor. Traced op by op, those ops have no channel rule, so the residual stream they
read and write was kept in every layer. Measured at ratio 0.5 (``bench_zoo_depth.py --hf-causal-lm --moe``, MACs
after / dense, oracle exact): dbrx 1.000 -> 0.376, jetmoe 1.000 -> 0.336, longcat_flash 0.713 -> 0.406 (the rest of
longcat's is its MLA attention: an in-place ``copy_`` into a view).
The routing picks *which* expert reads a token and never mixes channels: each expert is a linear map (or a gated
MLP) of the hidden channels, and ``index_add`` adds rows, channel by channel.

What is proven before a module is handled (else its channels are kept, with a note naming the reason):
- its class is exactly the transformers class (a subclass may have another forward), and so are the children whose
  code its forward runs (``DbrxExpertGLU``, ``JetMoeParallelExperts``, ``JetMoeTopKGating``, ``JetMoeMoA``);
- its tensors are exactly the expected ones, with shapes that agree with each other and with the sizes the module
  stores (the forwards reshape with them);
- its activation acts on each channel on its own (random inputs, a subset of channels gives the subset's values).

Units, as in graph/moe.py: the hidden channels (input columns, output rows and biases of every expert, the router's
columns) go with the residual stream; intermediate channel ``i`` is row ``i`` of every expert's gate and up and
column ``i`` of its down projection: one set shared by all experts (graph/moe.py says why). JetMoE's attention
experts keep their width (their outputs are queries, whose per-head dims meet RoPE and the repeated keys inside the
module): only the stream they read and write is pruned there. LongCat's zero-compute experts return their input
rows: its output channels are the input's, so they are one unit with the stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from secateur.graph.capture import Tracer
from secateur.graph.modules import LEAF_PROBES, UPDATERS_BY_NAME, _channels, _consumed, _shape_for
from secateur.graph.moe import _kept, need, with_meta

_DBRX = "transformers.models.dbrx.modeling_dbrx."
_JET = "transformers.models.jetmoe.modeling_jetmoe."
_LONGCAT = "transformers.models.longcat_flash.modeling_longcat_flash."


def _path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tensors(mod: nn.Module) -> dict[str, tuple[int, ...]]:
    out = {n: tuple(p.shape) for n, p in mod.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in mod.named_buffers()})
    return out


def _elementwise(fn: Callable | None) -> str | None:
    """None if ``fn`` acts on each channel on its own (inputs wide enough to cross clamps); else why not."""
    if fn is None:
        return "no activation"
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)) * 8
    keep = torch.tensor([0, 2, 5])
    try:
        with torch.no_grad():
            full, part = fn(z), fn(z[:, keep])
    except Exception as e:  # noqa: BLE001 - an activation that cannot run on its own is not proven
        return f"its activation does not run on a plain tensor ({type(e).__name__})"
    if tuple(full.shape) != (5, 6) or not torch.allclose(part, full[:, keep], rtol=1e-5, atol=1e-6):
        return "its activation mixes channels"
    return None


def _expect(mod: nn.Module, want: dict[str, tuple[int, ...]]) -> str | None:
    got = _tensors(mod)
    if got != want:
        return f"tensors {sorted(got.items())}, expected {sorted(want.items())}"
    return None


def _block_others(tr: Tracer, x: torch.Tensor, args, kwargs) -> None:
    """Every tensor input but the hidden states (routing, masks, RoPE tables, caches) is kept as it is."""
    stack = [*args, *kwargs.values()]
    while stack:
        a = stack.pop()
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        elif isinstance(a, torch.Tensor) and a is not x:
            tr.atoms.block(tr.get(a))


def _stream_in(tr: Tracer, x: torch.Tensor, *slots: tuple[torch.Tensor, int]) -> torch.Tensor | None:
    """The input's channels (last dim) consumed by each (tensor, dim); returns them (None: unlabelled input)."""
    chan = _channels(tr, x, -1)
    if chan is not None:
        chan = _consumed(tr, chan)
        for t, d in slots:
            tr.slot(t, d, chan, "in")
    return chan


def _stream_out(tr: Tracer, out: torch.Tensor, n: int, *slots: tuple[torch.Tensor, int]) -> torch.Tensor:
    hidden = tr.atoms.new(n)
    for t, d in slots:
        tr.slot(t, d, hidden, "out")
    tr.set(out, _shape_for(out.dim(), -1, hidden))
    return hidden


def _children(mod: nn.Module, prefix: str, names: dict[str, str]) -> str | None:
    """None if each child ``attr`` is exactly the class ``prefix + cls``; else which is not."""
    for attr, cls in names.items():
        if _path(getattr(mod, attr, None)) != prefix + cls:
            return f"its {attr} is not a {cls}"
    return None


def _hidden_states(args, kwargs) -> torch.Tensor:
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        raise TypeError("module called without hidden states")
    return x


# ---------------------------------------------------------------- DBRX
@dataclass(frozen=True)
class _Sizes:
    experts: int
    hidden: int
    inter: int


def _dbrx_layout(mod: nn.Module) -> _Sizes | str:
    """``mlp.w1`` / ``mlp.v1`` (gate, up) and ``mlp.w2`` (down, used as ``h @ w2``), each ``[E * I, H]``: expert
    ``e``'s rows are ``e*I .. e*I+I-1`` (the forward views them as ``[E, I, H]``)."""
    if _path(mod.mlp) != _DBRX + "DbrxExpertGLU":
        return f"its mlp is a {type(mod.mlp).__name__}"
    e, h, i = mod.num_experts, mod.hidden_size, mod.ffn_hidden_size
    why = _expect(mod, {f"mlp.{n}": (e * i, h) for n in ("w1", "v1", "w2")})
    return why or _elementwise(mod.mlp.activation_fn) or _Sizes(e, h, i)


def _dbrx(tr: Tracer, mod: nn.Module, args, kwargs, out, s: _Sizes) -> None:
    x, glu = _hidden_states(args, kwargs), mod.mlp
    _block_others(tr, x, args, kwargs)
    _stream_in(tr, x, (glu.w1, 1), (glu.v1, 1))
    rows = tr.atoms.new(s.inter).repeat(s.experts)  # row e*I + i of every expert is channel i
    tr.slot(glu.w1, 0, rows, "out")
    tr.slot(glu.v1, 0, rows, "out")
    tr.slot(glu.w2, 0, rows, "in")
    _stream_out(tr, out, s.hidden, (glu.w2, 1))


def _dbrx_meta(mod: nn.Module, args, kwargs) -> torch.Tensor:
    """``next_states.view(batch_size, -1, self.hidden_size)`` of ``hidden_states.reshape(-1, self.hidden_size)``."""
    x, glu = _hidden_states(args, kwargs), mod.mlp
    e, h, i = mod.num_experts, mod.hidden_size, mod.ffn_hidden_size
    need(x.size(-1) == h and all(tuple(w.shape) == (e * i, h) for w in (glu.w1, glu.v1, glu.w2)), mod,
         f"input {tuple(x.shape)}, hidden_size {h}, ffn_hidden_size {i}, w1 {tuple(glu.w1.shape)}, "
         f"v1 {tuple(glu.v1.shape)}, w2 {tuple(glu.w2.shape)}")
    return x.new_empty((x.size(0), x.numel() // (x.size(0) * h), h))


def _dbrx_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """``DbrxExperts`` and ``DbrxExpertGLU`` store the widths they reshape with."""
    glu = mod.mlp if hasattr(mod, "mlp") else mod
    e = old.get("num_experts", old.get("moe_num_experts"))
    new = {"hidden_size": int(glu.w1.shape[1]), "ffn_hidden_size": int(glu.w1.shape[0]) // e}
    for k, v in new.items():
        setattr(mod, k, v)
    return new


# ---------------------------------------------------------------- JetMoE
def _jet_moe_layout(mod: nn.Module) -> _Sizes | str:
    """``input_linear.weight [E, 2I, H]`` (gate rows then up rows: the forward chunks them), ``output_linear.weight
    [E, H, I]``, ``bias [H]`` added to the merged output, ``router.layer.weight [E, H]``."""
    why = _children(mod, _JET, {"input_linear": "JetMoeParallelExperts", "output_linear": "JetMoeParallelExperts",
                              "router": "JetMoeTopKGating"})
    if why:
        return why
    e, h, i = mod.input_linear.num_experts, mod.input_size, mod.hidden_size
    why = _expect(mod, {"bias": (h,), "input_linear.weight": (e, 2 * i, h), "output_linear.weight": (e, h, i),
                        "router.layer.weight": (e, h)})
    return why or _elementwise(mod.activation) or _Sizes(e, h, i)


def _jet_moe(tr: Tracer, mod: nn.Module, args, kwargs, out, s: _Sizes) -> None:
    x = args[0] if args else kwargs["layer_input"]
    _block_others(tr, x, args, kwargs)
    up, down = mod.input_linear.weight, mod.output_linear.weight
    _stream_in(tr, x, (up, 2), (mod.router.layer.weight, 1))
    inter = tr.atoms.new(s.inter)
    tr.slot(up, 1, torch.cat([inter, inter]), "out")
    tr.slot(down, 2, inter, "in")
    _stream_out(tr, out, s.hidden, (down, 1), (mod.bias, 0))


def _jet_moe_meta(mod: nn.Module, args, kwargs) -> torch.Tensor:
    x = args[0] if args else kwargs["layer_input"]
    up, down = mod.input_linear.weight, mod.output_linear.weight
    need(x.size(-1) == up.size(2) == mod.router.layer.weight.size(1) and up.size(1) == 2 * down.size(2)
         and down.size(1) == mod.bias.size(0) == mod.input_size, mod,
         f"input {tuple(x.shape)}, input_linear {tuple(up.shape)}, output_linear {tuple(down.shape)}, "
         f"input_size {mod.input_size}")
    return x.new_empty((x.size(0), x.size(1), mod.input_size))


def _jet_attention_layout(mod: nn.Module) -> _Sizes | str:
    """``experts.input_linear.weight [E, A, H]`` (queries), ``kv_proj.weight [2A, H]``, ``experts.output_linear.weight
    [E, H, A]``, ``experts.bias [H]``, ``experts.router.layer.weight [E, H]``; ``A`` (the attention width) stays."""
    if not isinstance(getattr(mod, "kv_proj", None), nn.Linear) or mod.kv_proj.bias is not None:
        return "its kv_proj is not a Linear without bias"
    why = _children(mod, _JET, {"experts": "JetMoeMoA"}) or _children(
        mod.experts, _JET, {"input_linear": "JetMoeParallelExperts", "output_linear": "JetMoeParallelExperts",
                            "router": "JetMoeTopKGating"})
    if why:
        return why
    moa = mod.experts
    e, h, a = moa.num_experts, moa.input_size, moa.hidden_size
    why = _expect(mod, {"kv_proj.weight": (2 * a, h), "experts.bias": (h,), "experts.input_linear.weight": (e, a, h),
                        "experts.output_linear.weight": (e, h, a), "experts.router.layer.weight": (e, h)})
    return why or _Sizes(e, h, a)


def _jet_attention(tr: Tracer, mod: nn.Module, args, kwargs, out, s: _Sizes) -> None:
    x, moa = _hidden_states(args, kwargs), mod.experts
    _block_others(tr, x, args, kwargs)
    _stream_in(tr, x, (moa.input_linear.weight, 2), (mod.kv_proj.weight, 1), (moa.router.layer.weight, 1))
    first = out[0] if isinstance(out, tuple) else out
    _stream_out(tr, first, s.hidden, (moa.output_linear.weight, 1), (moa.bias, 0))
    tr.notes.append(f"{tr.where()}: JetMoeAttention keeps its attention width (queries from its experts meet "
                    "RoPE and repeated keys inside it); the stream it reads and writes is pruned")


def _jet_attention_meta(mod: nn.Module, args, kwargs):
    """(output, no attention weights, router logits); the cache gets keys and values of the width it would."""
    x, moa = _hidden_states(args, kwargs), mod.experts
    up, down = moa.input_linear.weight, moa.output_linear.weight
    need(x.size(-1) == up.size(2) == mod.kv_proj.weight.size(1) == moa.router.layer.weight.size(1)
         and down.size(1) == moa.bias.size(0) == moa.input_size, mod,
         f"input {tuple(x.shape)}, input_linear {tuple(up.shape)}, kv_proj {tuple(mod.kv_proj.weight.shape)}, "
         f"output_linear {tuple(down.shape)}, input_size {moa.input_size}")
    b, n = x.shape[0], x.shape[1]
    cache = kwargs.get("past_key_values")
    if cache is not None:
        kv = x.new_empty((b, mod.num_key_value_heads, n, mod.head_dim))
        cache.update(kv, kv, mod.layer_idx)
    logits = x.new_empty((b * n, moa.num_experts), dtype=torch.float32)
    return x.new_empty((*x.shape[:-1], moa.input_size)), None, logits


def _jet_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The sizes JetMoE's modules store (``input_size`` sizes the merged output in ``JetMoeMoE`` and
    ``JetMoeMoA.reduce``)."""
    name = type(mod).__name__
    if name == "JetMoeParallelExperts":
        new = {"output_size": int(mod.weight.shape[1]), "input_size": int(mod.weight.shape[2])}
    elif name == "JetMoeTopKGating":
        new = {"input_size": int(mod.layer.weight.shape[1])}
    elif name == "JetMoeMoE":
        new = {"input_size": int(mod.bias.shape[0]), "hidden_size": int(mod.output_linear.weight.shape[2])}
    else:  # JetMoeMoA: its attention width stays
        new = {"input_size": int(mod.bias.shape[0])}
    for k, v in new.items():
        setattr(mod, k, v)
    return new


# ---------------------------------------------------------------- LongCat-Flash
def _longcat_layout(mod: nn.Module) -> _Sizes | str:
    """``LongcatFlashMoE``: ``experts.gate_up_proj [R + Z, 2I, H]`` (gate rows then up rows; the Z zero-compute
    experts' rows are never read), ``experts.down_proj [R, H, I]``, experts ``>= R`` return their input rows;
    ``router.classifier.weight [R + Z, H]`` (with its bias, if any) and ``router.e_score_correction_bias [R + Z]``.
    The router is inside the leaf: it gathers scores with its top-k indices, which a meta capture cannot label."""
    why = _children(mod, _LONGCAT, {"experts": "LongcatFlashExperts", "router": "LongcatFlashTopkRouter"})
    if why:
        return why
    ex, router = mod.experts, mod.router
    r, h, i, t = ex.num_routed_experts, ex.hidden_size, ex.intermediate_size, ex.total_experts
    if r <= 0:
        return "no routed experts"
    if type(ex.identity_expert) is not nn.Identity:
        return "its identity_expert is not an nn.Identity"
    if type(router.classifier) is not nn.Linear or router.hidden_dim != h:
        return "its router is not a Linear over the hidden size"
    want = {"experts.gate_up_proj": (t, 2 * i, h), "experts.down_proj": (r, h, i), "router.classifier.weight": (t, h),
            "router.e_score_correction_bias": (t,)}
    if router.classifier.bias is not None:
        want["router.classifier.bias"] = (t,)
    return _expect(mod, want) or _elementwise(ex.act_fn) or _Sizes(r, h, i)


def _longcat(tr: Tracer, mod: nn.Module, args, kwargs, out, s: _Sizes) -> None:
    x, ex = _hidden_states(args, kwargs), mod.experts
    _block_others(tr, x, args, kwargs)
    chan = _stream_in(tr, x, (ex.gate_up_proj, 2), (mod.router.classifier.weight, 1))
    inter = tr.atoms.new(s.inter)
    tr.slot(ex.gate_up_proj, 1, torch.cat([inter, inter]), "out")
    tr.slot(ex.down_proj, 2, inter, "in")
    hidden = _stream_out(tr, out, s.hidden, (ex.down_proj, 1))
    if ex.zero_expert_num:  # identity experts: an output channel is also the same input channel
        if chan is None:
            tr.atoms.block(hidden)
        else:
            tr.atoms.union(hidden, chan)


def _longcat_meta(mod: nn.Module, args, kwargs) -> torch.Tensor:
    x, ex = _hidden_states(args, kwargs), mod.experts
    h = x.size(-1)
    need(h == mod.router.hidden_dim == mod.router.classifier.weight.size(1) == ex.gate_up_proj.size(2)
         == ex.down_proj.size(1), mod, f"input {tuple(x.shape)}, router hidden_dim {mod.router.hidden_dim}, "
         f"gate_up_proj {tuple(ex.gate_up_proj.shape)}, down_proj {tuple(ex.down_proj.shape)}")
    need(ex.gate_up_proj.size(1) == 2 * ex.down_proj.size(2), mod, "gate_up_proj rows are not twice down_proj's")
    return x.new_empty(x.shape)


def _longcat_sizes(mod: nn.Module, old: dict[str, Any]) -> dict[str, Any]:
    """The widths LongCat's modules store (the router views its input with ``hidden_dim``)."""
    name = type(mod).__name__
    if name == "LongcatFlashTopkRouter":
        new = {"hidden_dim": int(mod.classifier.weight.shape[1])}
    elif name == "LongcatFlashExperts":
        new = {"intermediate_size": int(mod.down_proj.shape[2]), "hidden_size": int(mod.down_proj.shape[1])}
    else:  # LongcatFlashMoE
        new = {"intermediate_size": int(mod.experts.down_proj.shape[2])}
    for k, v in new.items():
        setattr(mod, k, v)
    return new


# ---------------------------------------------------------------- registration
_RULES: dict[str, tuple[Callable, Callable, Callable]] = {  # class -> (layout proof, capture rule, meta stand-in)
    _DBRX + "DbrxExperts": (_dbrx_layout, _dbrx, _dbrx_meta),
    _JET + "JetMoeMoE": (_jet_moe_layout, _jet_moe, _jet_moe_meta),
    _JET + "JetMoeAttention": (_jet_attention_layout, _jet_attention, _jet_attention_meta),
    _LONGCAT + "LongcatFlashMoE": (_longcat_layout, _longcat, _longcat_meta),
}


def model_experts_rule(mod: nn.Module):
    """The leaf rule for one of the classes above (None for any other module), or a rule that keeps it whole with
    a note when its layout is not proven."""
    entry = _RULES.get(_path(mod))
    if entry is None:
        return None
    layout, rule, meta = entry
    try:
        lay = layout(mod)
    except AttributeError as e:  # a size attribute the layout reads is missing: another version of the class
        lay = f"missing attribute ({e})"
    if not isinstance(lay, _Sizes):
        return _kept(lay)
    return with_meta(lambda tr, m, args, kwargs, out: rule(tr, m, args, kwargs, out, lay), meta)


def known(mod: nn.Module) -> bool:
    """``mod`` is of one of the classes above (proven or not)."""
    return _path(mod) in _RULES


def proven(mod: nn.Module) -> bool:
    """``mod`` is one of the classes above with its layout proven."""
    entry = _RULES.get(_path(mod))
    try:
        return entry is not None and isinstance(entry[0](mod), _Sizes)
    except AttributeError:
        return False


LEAF_PROBES.append(model_experts_rule)
for _cls in ("DbrxExperts", "DbrxExpertGLU"):
    UPDATERS_BY_NAME[_DBRX + _cls] = _dbrx_sizes
for _cls in ("JetMoeParallelExperts", "JetMoeTopKGating", "JetMoeMoE", "JetMoeMoA"):
    UPDATERS_BY_NAME[_JET + _cls] = _jet_sizes
for _cls in ("LongcatFlashExperts", "LongcatFlashMoE", "LongcatFlashTopkRouter"):
    UPDATERS_BY_NAME[_LONGCAT + _cls] = _longcat_sizes
