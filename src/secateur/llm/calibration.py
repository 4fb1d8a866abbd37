"""Layer-wise calibration: catch the inputs of the first block, then run blocks one at a time.

Why layer-wise: running the whole model on every calibration batch for every block costs O(blocks^2)
and needs all weights on the device at once. Catching the first block's inputs (hidden states plus the
keyword arguments the model passes, e.g. attention masks and rotary embeddings) and then feeding each
block's output to the next needs one block on the device and one block's activations in memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from secateur.errors import PruningError, fail


class _Caught(Exception):
    """Raised by the first block's pre-hook to stop the model's forward once its inputs are caught."""


def to_device(obj: Any, device, memo: dict | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``; with ``memo`` (id -> (tensor,
    moved)), a tensor met again is moved once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is held so that its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return getattr(emb, "num_embeddings", None)


def _position_limit(model: nn.Module) -> tuple[str, int] | None:
    """``(config field, value)`` of the longest sequence a Hugging Face model takes (GPT-2's
    ``n_positions``, others' ``max_position_embeddings``), or None if the model does not say."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_batches(model: nn.Module, calibration: Iterable) -> list:
    """Materialise and validate calibration batches: 2-D integer token tensors ``[B, T]`` or dicts
    with such an ``input_ids`` (plus e.g. ``attention_mask``), no longer than the model's position
    limit. Returns the list."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    try:
        batches = list(calibration)
    except TypeError:
        raise fail("calibration must be an iterable of token batches", value=type(calibration).__name__,
                   hint="Pass a list of LongTensor [batch, seq] or of dicts with 'input_ids'") from None
    if not batches:
        raise fail("calibration is empty", value=0, hint="Pass at least one batch of tokens")
    vocab = _vocab_size(model)
    limit = _position_limit(model)
    for i, b in enumerate(batches):
        where = f"calibration[{i}]"
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(b, Mapping) and ids is None:
            raise fail("batch dict has no 'input_ids'", where=where, value=sorted(b))
        if not isinstance(ids, torch.Tensor):
            raise fail("batch is not a tensor", where=where, value=type(ids).__name__,
                       hint="Token batches are LongTensor [batch, seq]")
        if ids.dim() != 2 or ids.numel() == 0:
            raise fail("token batch must be 2-D [batch, seq] and non-empty", where=where, shape=ids.shape)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise fail("token batch must hold integer token ids", where=where, shape=ids.shape, value=ids.dtype,
                       hint="Tokenize text first (tokenizer(..., return_tensors='pt'))")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise fail(f"token ids out of the vocabulary range [0, {vocab})", where=where, shape=ids.shape,
                       value=(lo, hi))
        if limit is not None and ids.shape[1] > limit[1]:
            raise fail(f"sequence length {ids.shape[1]} exceeds the model's position limit {limit[1]} "
                       f"(config.{limit[0]})", where=where, shape=ids.shape,
                       hint=f"Use sequences of at most {limit[1]} tokens (seq_len= for the built-in text)")
    return batches


def count_tokens(batches: list) -> int:
    return sum(int((b["input_ids"] if isinstance(b, Mapping) else b).numel()) for b in batches)


@dataclass
class BlockInput:
    """What the model passed to its blocks for one calibration batch: the first block's hidden states
    (replaced by each block's output as the driver advances) and, per block, the other arguments. Those
    can differ from block to block: Gemma2's and Qwen2's sliding-window layers get another attention
    mask than their full-attention layers, Gemma3's local layers other rotary embeddings."""

    hidden: torch.Tensor
    calls: list = field(default_factory=list)  # per block: (args, kwargs, hidden passed by keyword)


def _is_cache(obj: Any) -> bool:
    """A transformers ``Cache`` (duck-typed, so transformers need not be imported)."""
    return callable(getattr(obj, "update", None)) and callable(getattr(obj, "get_seq_length", None))


_NO_CACHE = {"past_key_values": None, "past_key_value": None, "layer_past": None, "use_cache": False}


def _input_device(model: nn.Module):
    """Where the token embedding lives (token batches are moved there), or None if unknown or meta."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    w = getattr(emb, "weight", None)
    return w.device if isinstance(w, torch.Tensor) and not w.is_meta else None


def catch_inputs(model: nn.Module, blocks: list[nn.Module], batches: list, device=None) -> list[BlockInput]:
    """Run the model on each batch with every block's forward swapped for a stub that keeps the block's
    inputs (moved to ``device``) and passes the hidden states on uncomputed; the last block's stub stops
    the forward. A model that changes the hidden states between two blocks (or blocks with one left out)
    is refused: the driver runs the blocks back to back. One whose code between the blocks cannot run on
    the stubs' pass-through at all: its later blocks get the first block's arguments."""
    caught: list[BlockInput] = []

    def stub(i: int, block: nn.Module):
        def forward(*args, **kwargs):
            # no cache: by its old names, and by value (transformers 5.24 passes it as ``cache=``)
            kwargs = {k: (_NO_CACHE[k] if k in _NO_CACHE else None if _is_cache(v) else v) for k, v in kwargs.items()}
            if args:  # a KV cache passed by position (GPT-2 does) would grow on every block run: drop it
                hidden, rest, by_kw = args[0], tuple(None if _is_cache(a) else a for a in args[1:]), False
            elif "hidden_states" in kwargs:
                hidden, rest, by_kw = kwargs.pop("hidden_states"), (), True
            else:
                raise fail("a block was called without a hidden-state tensor", where=f"blocks[{i}] "
                           f"({type(block).__name__})", value=sorted(kwargs))
            if i == 0:
                dev = device if device is not None else hidden.device
                caught.append(BlockInput(hidden.detach().to(dev)))
            elif len(caught) == batch_start[0] or len(caught[-1].calls) != i:
                raise fail("the blocks are not given in the order the model calls them", where=f"blocks[{i}]",
                           value=type(block).__name__, hint="Pass blocks=None, the name of the block list, "
                           "or the blocks in their order")
            elif hidden is not passed[0] and hidden is not passed[1]:
                raise fail("the model changes the hidden states between two of the blocks (a block left out of "
                           "blocks=..., or work of its own between them), which block-by-block pruning would skip",
                           where=f"blocks[{i - 1}] -> blocks[{i}]", value=type(block).__name__,
                           hint="Pass blocks=None, the name of the block list, or every block in its order")
            dev, memo = caught[-1].hidden.device, moved[-1]  # tensors shared between blocks are moved once
            caught[-1].calls.append((to_device(rest, dev, memo), to_device(kwargs, dev, memo), by_kw))
            if i == len(blocks) - 1:
                raise _Caught
            passed[:] = [(hidden,) if wrap[0] else hidden, hidden]  # a tuple: models take outputs[0] or
            return passed[0]                                          # pass the output on to the next block
        return forward

    passed: list = [None, None]  # what the last stub returned, and the hidden states inside it
    wrap = [True]  # the stubs return (hidden,); False: hidden itself
    saved = [b.__dict__.get("forward") for b in blocks]  # accelerate's hooks set an instance forward
    for i, b in enumerate(blocks):
        b.forward = stub(i, b)
    home = _input_device(model)
    moved: list[dict] = []
    batch_start = [0]  # len(caught) when the current batch began
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                b = to_device(b, home) if home is not None else b
                moved.append({})
                n = batch_start[0] = len(caught)
                for bare in (False, True):  # the blocks' outputs passed on as (hidden,), then as hidden itself
                    del caught[n:]  # what a failed first try caught
                    moved[-1], wrap[0] = {}, not bare
                    try:
                        model(**b) if isinstance(b, Mapping) else model(b)
                    except _Caught:
                        break
                    except PruningError:
                        raise
                    except Exception:
                        if len(caught) == n:  # failed before the first block: the model's own error
                            raise
                        if not bare:  # its code between the blocks may take a block's output bare: try that
                            continue
                        calls = caught[-1].calls
                        calls += calls[:1] * (len(blocks) - len(calls))
                        break
                    missing = "first block" if len(caught) == n else f"block {len(caught[-1].calls)}"
                    raise fail(f"the model's forward never reached the {missing}", where=f"calibration[{i}]",
                               value=type(blocks[0]).__name__,
                               hint="Check that blocks=... names modules the forward calls, in that order")
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
    return caught


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple/list)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise fail("cannot find the hidden states in the block's output", value=type(out).__name__)


def run_block(block: nn.Module, index: int, inp: BlockInput, device) -> torch.Tensor:
    """Block number ``index`` on the current hidden states, with the arguments the model passed it."""
    hidden = inp.hidden.to(device)
    args, kwargs, by_keyword = inp.calls[index]
    args, kwargs = to_device(args, device), to_device(kwargs, device)
    if by_keyword:
        return block_output(block(*args, hidden_states=hidden, **kwargs))
    return block_output(block(hidden, *args, **kwargs))
