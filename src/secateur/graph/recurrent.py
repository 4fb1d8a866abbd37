"""Recurrent layers (nn.LSTM / GRU / RNN and their Cell variants): hidden-size and input-size pruning.

A hidden unit ``j`` owns, in every layer and direction, the rows ``g * H + j`` of ``weight_ih``, ``weight_hh`` and
both biases (one row per gate: 4 for LSTM, 3 for GRU, 1 for RNN), and it *enters* the computation through column
``j`` of ``weight_hh`` (the recurrence), of the next layer's ``weight_ih`` (positions ``j`` and ``H + j`` when
bidirectional: the output is ``[forward | backward]``) and of whatever consumes the outputs. Zeroing those columns
cuts the unit off from everything else, which is exactly what removing it does (a GRU unit's own ``z * h`` term
only feeds itself), so the zeroing oracle holds. With ``proj_size`` (LSTM), the cells (H) enter through
``weight_hr``'s columns and the projected dims (P) through ``weight_hh``'s columns and the outputs.

One atom per hidden unit is shared by every layer and both directions: ``nn.LSTM`` has one ``hidden_size`` for
all of them (its flat-weight kernel and ``h0`` stack layers), so they must keep the same count; removing the same
unit index everywhere is the simplest rule that guarantees it. An initial state ``h0`` / ``c0`` that comes from the
model's own layers joins those units; one that does not (a model input, or zeros made in ``forward`` with the
old size) keeps them, since the model's inputs never change shape."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from secateur.graph.capture import Tracer
from secateur.graph.modules import _channels, _consumed, leaf, updater
from secateur.graph.rules import _pad, aten, rule

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def _last(nd: int, atoms: torch.Tensor) -> torch.Tensor:
    """A label varying along the last dim only."""
    return atoms.reshape((1,) * (nd - 1) + (-1,))


def _state(tr: Tracer, h: torch.Tensor | None, atoms: torch.Tensor) -> None:
    """An initial state joins the units it feeds when the model made it; otherwise those units are kept."""
    if h is None:
        return
    if tr.get(h) is None:
        tr.atoms.block(atoms)
        tr.notes.append(f"{tr.where()}: its initial state is not made by the model's layers; its hidden units are "
                        "kept")
        return
    tr.atoms.union(_channels(tr, h, -1), atoms)


@rule(aten._pack_padded_sequence)
def pack(tr: Tracer, func, args, kwargs, out) -> None:
    """(T, B, *features) -> data (sum of lengths, *features): time and batch merge, features pass through."""
    x = args[0]
    lab = _pad(tr.get(x), x.dim())
    if lab is not None:
        lab = tr.atoms.collapse(lab, [0, 1])[0]
    tr.set(out[0], lab)
    tr.set(out[1], None)


@leaf(nn.LSTM, nn.GRU, nn.RNN)
def recurrent(tr: Tracer, mod: nn.RNNBase, args, kwargs, out) -> None:
    x = _data(args[0] if args else kwargs["input"])
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    gates, dirs = GATES[mod.mode], 2 if mod.bidirectional else 1
    hid = tr.atoms.new(mod.hidden_size)  # the cells, shared by every layer and direction (see module docstring)
    proj = tr.atoms.new(mod.proj_size) if mod.proj_size > 0 else hid  # what h (outputs, weight_hh's input) is
    inp = _channels(tr, x, -1)
    if inp is not None:
        inp = _consumed(tr, inp)  # features straight from the model's input: columns of their own, never pruned
    for layer in range(mod.num_layers):
        ins = inp if layer == 0 else proj.repeat(dirs)
        for sfx in ("", "_reverse")[:dirs]:
            p = lambda name: getattr(mod, f"{name}_l{layer}{sfx}")  # noqa: E731
            tr.slot(p("weight_ih"), 0, hid.repeat(gates), "out")
            tr.slot(p("weight_hh"), 0, hid.repeat(gates), "out")
            if mod.bias:
                tr.slot(p("bias_ih"), 0, hid.repeat(gates), "out")
                tr.slot(p("bias_hh"), 0, hid.repeat(gates), "out")
            tr.slot(p("weight_hh"), 1, proj, "in")
            if ins is not None:
                tr.slot(p("weight_ih"), 1, ins, "in")
            if mod.proj_size > 0:
                tr.slot(p("weight_hr"), 0, proj, "out")
                tr.slot(p("weight_hr"), 1, hid, "in")
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None))
    _state(tr, h0, proj)
    _state(tr, c0, hid)
    output, state = out
    y = _data(output)
    tr.set(y, _last(y.dim(), proj.repeat(dirs)))
    hn, cn = state if isinstance(state, tuple) else (state, None)
    tr.set(hn, _last(hn.dim(), proj))
    if cn is not None:
        tr.set(cn, _last(cn.dim(), hid))


@leaf(*CELL_GATES)
def recurrent_cell(tr: Tracer, mod: nn.RNNCellBase, args, kwargs, out) -> None:
    """One step: called in a loop, every call's units are the same rows (slots union them across calls)."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    gates = CELL_GATES[next(t for t in type(mod).__mro__ if t in CELL_GATES)]
    hid = tr.atoms.new(mod.hidden_size)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if getattr(mod, name, None) is not None:
            tr.slot(getattr(mod, name), 0, hid.repeat(gates), "out")
    tr.slot(mod.weight_hh, 1, hid, "in")
    inp = _channels(tr, x, -1)
    if inp is not None:
        tr.slot(mod.weight_ih, 1, _consumed(tr, inp), "in")
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None))
    _state(tr, h0, hid)
    _state(tr, c0, hid)
    for t in (out if isinstance(out, tuple) else (out,)):
        tr.set(t, _last(t.dim(), hid))


@updater(nn.RNNBase)
def _rnn(mod: nn.RNNBase, old):
    mod.input_size = int(mod.weight_ih_l0.shape[1])
    mod.hidden_size = int(mod.weight_hh_l0.shape[0]) // GATES[mod.mode]
    if mod.proj_size > 0:
        mod.proj_size = int(mod.weight_hr_l0.shape[0])
    return {"input_size": mod.input_size, "hidden_size": mod.hidden_size, "proj_size": mod.proj_size}


@updater(nn.RNNCellBase)
def _cell(mod: nn.RNNCellBase, old):
    mod.input_size, mod.hidden_size = int(mod.weight_ih.shape[1]), int(mod.weight_hh.shape[1])
    return {"input_size": mod.input_size, "hidden_size": mod.hidden_size}
