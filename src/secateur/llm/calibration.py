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

from secateur.errors import fail


class _Caught(Exception):
    """Raised by the first block's pre-hook to stop the model's forward once its inputs are caught."""


def to_device(obj: Any, device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
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
    """What the model passed to a block for one calibration batch (hidden states replaced per block)."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    by_keyword: bool = False


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


def catch_inputs(model: nn.Module, first: nn.Module, batches: list, device=None) -> list[BlockInput]:
    """Run the model on each batch until ``first`` is called; keep its inputs (moved to ``device``)."""
    caught: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = {k: (_NO_CACHE[k] if k in _NO_CACHE else v) for k, v in kwargs.items()}
        if args:  # a KV cache passed by position (GPT-2 does) would grow on every block run: drop it
            hidden, rest, by_kw = args[0], tuple(None if _is_cache(a) else a for a in args[1:]), False
        elif "hidden_states" in kwargs:
            hidden, rest, by_kw = kwargs.pop("hidden_states"), (), True
        else:
            raise fail("the first block was called without a hidden-state tensor", where=type(module).__name__,
                       value=sorted(kwargs))
        dev = device if device is not None else hidden.device
        caught.append(BlockInput(hidden.detach().to(dev), to_device(rest, dev), to_device(kwargs, dev), by_kw))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    home = _input_device(model)
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                b = to_device(b, home) if home is not None else b
                try:
                    model(**b) if isinstance(b, Mapping) else model(b)
                except _Caught:
                    continue
                raise fail("the model's forward never reached the first block", where=f"calibration[{i}]",
                           value=type(first).__name__, hint="Check that blocks=... names modules the forward calls")
    finally:
        handle.remove()
    return caught


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple/list)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise fail("cannot find the hidden states in the block's output", value=type(out).__name__)


def run_block(block: nn.Module, inp: BlockInput, device) -> torch.Tensor:
    hidden = inp.hidden.to(device)
    args, kwargs = to_device(inp.args, device), to_device(inp.kwargs, device)
    if inp.by_keyword:
        return block_output(block(*args, hidden_states=hidden, **kwargs))
    return block_output(block(hidden, *args, **kwargs))
