"""``prune_llm``: one-shot, calibration-based pruning of transformer blocks (magnitude, Wanda, SparseGPT).

The result is in the masking engine's form (a mask per pruned Linear weight; SparseGPT also writes its
updated weights into the stored parameter), so ``finalize``, reports, saving and fine-tuning work as for
``prune``. Everything that can be checked is checked before the model is touched; if a block fails later
(e.g. the user's forward raises), every mask and weight already changed is restored."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from secateur.errors import fail
from secateur.llm.blocks import BlocksSpec, find_blocks, is_linear_like
from secateur.llm.calibration import catch_inputs, check_batches, count_tokens, run_block
from secateur.llm.methods import METHODS, Method
from secateur.llm.offload import (Checkpoint, ShardWriter, block_state, check_checkpoint, materialise,
                                  refuse_accelerate_offload, release)
from secateur.llm.text import token_batches
from secateur.masks import get_mask, original, remove_mask, set_mask
from secateur.modes import keeps_statistics
from secateur.patterns import NM, Element, PatternSpec, get_pattern
from secateur.targets import TargetSpec, is_hf_conv1d, select_targets


@dataclass(frozen=True)
class LayerResult:
    name: str
    shape: tuple
    sparsity: float
    loss: float | None  # SparseGPT's estimate of the added squared output error; None for other methods


@dataclass(frozen=True)
class LLMReport:
    """What ``prune_llm`` did: per-layer sparsity, the calibration size and the time taken."""

    method: str
    pattern: str
    sparsity: float
    blocks: str
    n_blocks: int
    tokens: int
    seconds: float
    layers: tuple[LayerResult, ...]

    @property
    def total_sparsity(self) -> float:
        n = sum(torch.Size(r.shape).numel() for r in self.layers)
        return sum(r.sparsity * torch.Size(r.shape).numel() for r in self.layers) / max(n, 1)

    def table(self) -> str:
        lines = [f"{self.method} {self.pattern} on {self.n_blocks} blocks ({self.blocks}), {self.tokens} "
                 f"calibration tokens, {self.seconds:.2f} s, sparsity {self.total_sparsity:.4f}",
                 f"{'layer':<48} {'shape':>14} {'sparsity':>9} {'loss':>11}"]
        for r in self.layers:
            loss = "" if r.loss is None else f"{r.loss:.4g}"
            lines.append(f"{r.name:<48} {'x'.join(map(str, r.shape)):>14} {r.sparsity:>9.4f} {loss:>11}")
        return "\n".join(lines)


class _Journal:
    """Records each layer's previous mask (and weight, when a method rewrites it) so a failure mid-way
    can put the model back exactly as it was."""

    def __init__(self, keep_weights: bool = True):
        self.keep_weights = keep_weights
        self.entries: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]] = []

    def record(self, module: nn.Module, keep_weight: bool) -> None:
        old = get_mask(module, "weight")
        keep = keep_weight and self.keep_weights
        w = original(module, "weight").detach().to("cpu", copy=True) if keep else None
        self.entries.append((module, None if old is None else old.clone(), w))

    def undo(self) -> None:
        with torch.no_grad():
            for module, old, w in reversed(self.entries):
                if w is not None:
                    original(module, "weight").copy_(w)
                if old is None:
                    remove_mask(module, "weight", bake=False)
                else:
                    set_mask(module, "weight", old)


def _method(method: str) -> Method:
    if method not in METHODS:
        raise fail("unknown one-shot method", value=method, hint=f"Choose one of {sorted(METHODS)}")
    return METHODS[method]


def as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The ``(out, in)`` view the methods work on: a Linear weight as stored, a GPT-2 ``Conv1D`` weight
    (stored ``(in, out)``, ``y = x @ W + b``) transposed. The same call maps results back (a transpose
    is its own inverse)."""
    return tensor.T if is_hf_conv1d(module) else tensor


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_hf_conv1d(module) else module.in_features


def _ratio(pattern, sparsity) -> float:
    if isinstance(pattern, NM):
        implied = 1 - pattern.n / pattern.m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise fail(f"an N:M pattern fixes the sparsity at {implied}", value=sparsity,
                       hint="Leave sparsity=None for N:M patterns")
        return implied
    if not isinstance(pattern, Element):
        raise fail("one-shot LLM pruning supports 'element' and N:M patterns", value=pattern,
                   hint="Use pattern='element', '2:4' or '4:8'")
    sparsity = 0.5 if sparsity is None else sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise fail("sparsity must be a ratio in [0, 1)", value=sparsity)
    return float(sparsity)


def _check_nm(pattern: NM, module: nn.Module, where: str) -> None:
    """N:M groups must run along the layer's input dimension (dim 1 of a Linear weight, dim 0 of a
    ``Conv1D`` weight), and that dimension must divide into groups of M."""
    w = original(module, "weight")
    tp = pattern.for_module(module)
    want = 0 if is_hf_conv1d(module) else 1
    if tp.dim % w.dim() != want:
        raise fail(f"one-shot N:M groups run along the layer's input dimension (dim {want} of this weight)",
                   where=where, shape=w.shape, value=pattern, hint=f"Use NM({pattern.n}, {pattern.m})")
    tp.check(tuple(w.shape), where)


def _layers(model: nn.Module, blocks: list[nn.Module], targets: TargetSpec, pattern,
            on_disk: bool = False) -> list[list[tuple[str, nn.Module]]]:
    """Per block, the (name, Linear or Conv1D) pairs to prune, validated."""
    spec = (lambda n, m: is_linear_like(m)) if targets is None else targets
    chosen = {id(t.module): t for t in select_targets(model, spec)}
    names = {id(m): n for n, m in model.named_modules()}
    per_block, total = [], 0
    for block in blocks:
        layers = []
        for m in block.modules():
            t = chosen.get(id(m))
            if t is None:
                continue
            if not is_linear_like(m):
                raise fail("one-shot LLM pruning handles nn.Linear and GPT-2 Conv1D layers only", where=t.name,
                           value=type(m).__name__, hint="Narrow targets= to Linear layers")
            w = original(m, "weight")
            if w.is_meta and not on_disk:  # from disk, values are checked as each block is read
                raise fail("weight is on the meta device (not materialised)", where=t.name, shape=w.shape,
                           hint="For a skeleton built on meta, pass offload_dir=<its safetensors> and save_dir=")
            if not w.is_meta and not bool(torch.isfinite(w).all()):
                raise fail("weight holds NaN or infinite values", where=t.name, shape=w.shape)
            if isinstance(pattern, NM):
                _check_nm(pattern, m, t.name)
            layers.append((names[id(m)], m))
        per_block.append(layers)
        total += len(layers)
    if total == 0:
        raise fail("the blocks hold no targeted Linear layer", value=targets)
    return per_block


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain counter
        def gen():
            for i, x in enumerate(items):
                print(f"block {i + 1}/{total}", flush=True)
                yield x
        return gen()
    return tqdm(items, total=total, desc="prune_llm", leave=False)


def _check_device(device) -> None:
    """``device`` names a device this machine has (a tensor can be made there), and not ``meta``."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise fail("not a device", where="prune_llm", value=device, hint="Use e.g. 'cpu', 'cuda' or 'cuda:0'") from e
    if dev.type == "meta":
        raise fail("blocks cannot be computed on the meta device", where="prune_llm", value=device)
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available() \
            and dev.index >= torch.cuda.device_count():
        raise fail(f"no such CUDA device: this machine has {torch.cuda.device_count()}", where="prune_llm",
                   value=device, hint=f"Use 'cuda:0' .. 'cuda:{torch.cuda.device_count() - 1}'")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or AssertionError for a missing backend
        raise fail(f"device not available here ({str(e).splitlines()[0][:120]})", where="prune_llm",
                   value=device, hint="Use device='cpu' or a device this machine has") from e


def _block_device(block: nn.Module, device):
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" is cuda:<current>, as tensors report it
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    p = next(block.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@keeps_statistics(eval=True)  # calibrate as the model serves: no dropout; modes come back as they were
def prune_llm(model: nn.Module, calibration: Iterable | None = None, *, method: str = "wanda",
              sparsity: float | None = None, pattern: PatternSpec = "element", blocks: BlocksSpec = None,
              tokenizer=None, n_samples: int = 128, seq_len: int = 128, device=None,
              targets: TargetSpec = None, progress: bool = True, rollback: bool = True,
              offload_dir=None, save_dir=None) -> LLMReport:
    """Prune the Linear layers inside ``model``'s repeated blocks, one block at a time, in place.

    ``calibration``: an iterable of LongTensor ``[B, T]`` token batches or dicts for Hugging Face models
    (``input_ids``, ``attention_mask``...); None = ``n_samples`` windows of ``seq_len`` tokens of Python's
    own language reference, tokenised with ``tokenizer``. ``method``: ``"magnitude"`` (no calibration),
    ``"wanda"`` or ``"sparsegpt"``. ``sparsity``: ratio for ``pattern="element"`` (default 0.5); N:M
    patterns (``"2:4"``, ``"4:8"``, ``NM(n, m)``) fix it. ``blocks``: None (auto-detect the layer list),
    its dotted name, or the block modules. ``device``: where each block is computed (moved there and
    back; None = where it lives). ``targets``: which Linear layers inside the blocks (default all).
    ``rollback``: if a block fails mid-way, restore every mask and weight already changed; for SparseGPT
    this keeps a CPU copy of each rewritten weight (the size of the pruned layers). ``rollback=False``
    saves that memory; a failure then leaves the blocks already done pruned. The blocks run in eval mode
    (no dropout in the statistics), and every module's mode comes back as it was.

    ``offload_dir``: prune a model too large for memory. ``model`` is a skeleton with parameters on the
    meta device (`secateur.llm.empty_model`) and ``offload_dir`` its safetensors checkpoint (a file or a
    folder of shards). Each block is read to ``device`` (default CPU), pruned, written to ``save_dir``
    (a new folder: safetensors shards in the checkpoint's naming with the zeros baked in, the masks
    beside them) and dropped, so memory holds one block, the activations and the modules outside the
    blocks. The skeleton stays empty; `secateur.llm.load_pruned` reads the result as a masked model.
    A failure leaves no ``save_dir``."""
    start = time.perf_counter()
    meth = _method(method)
    _check_device(device)
    pat = get_pattern(pattern)
    ratio = _ratio(pat, sparsity)
    block_name, mods = find_blocks(model, blocks)
    disk = offload_dir is not None
    if disk != (save_dir is not None):
        raise fail("offload_dir (the checkpoint to read) and save_dir (where the pruned one goes) come together",
                   value=dict(offload_dir=offload_dir, save_dir=save_dir))
    ckpt = Checkpoint(offload_dir) if disk else None
    real = next((n for n, p in model.named_parameters() if not p.is_meta), None) if disk else None
    if real is not None:
        raise fail("offload_dir prunes a skeleton whose parameters are on the meta device; this one holds values",
                   where=real, hint="Build it with secateur.llm.empty_model(...), or prune it in memory "
                   "without offload_dir")
    check_checkpoint(model, ckpt) if disk else refuse_accelerate_offload(model)
    layers = _layers(model, mods, targets, pat, on_disk=disk)
    pat = NM(pat.n, pat.m, 1) if isinstance(pat, NM) else pat  # the methods see (out, in) weights
    batches, tokens = [], 0
    if meth.stats is not None or calibration is not None:
        if calibration is None:
            calibration = token_batches(tokenizer, n_samples, seq_len)
        batches = check_batches(model, calibration)
        tokens = count_tokens(batches)
    if meth.stats is not None and method == "sparsegpt":
        widest = max((in_features(m), n) for lay in layers for n, m in lay)
        if tokens < widest[0]:
            warnings.warn(f"SparseGPT: {tokens} calibration tokens < {widest[0]} input features of {widest[1]}: "
                          f"its Hessian is rank-deficient and only dampening keeps it invertible; use at least "
                          f"{widest[0]} tokens (the papers use 128 x 2048)",
                          stacklevel=3)  # the caller, past keeps_statistics

    results: list[LayerResult] = []
    journal = _Journal(keep_weights=rollback and not disk)
    writer = ShardWriter(save_dir) if disk else None
    names = {id(m): n for n, m in model.named_modules()}
    try:
        inputs = _catch(model, mods, batches, device, meth, ckpt, writer, names)
        for bi, (block, lays) in enumerate(_progress(list(zip(mods, layers)), progress, len(mods))):
            prefix = names[id(block)] + "."
            dev = _block_device(block, device or "cpu") if disk else _block_device(block, device)
            home = _block_device(block, None)
            filled = materialise(model, prefix, ckpt, dev) if disk else None
            if not disk and home != dev:
                block.to(dev)  # Module.to swaps each tensor: the source copy is freed as it goes
            try:
                _prune_block(block, bi, lays, meth, pat, ratio, inputs, dev, journal, results,
                             advance=bi + 1 < len(mods))
                if disk:
                    writer.write(*block_state(block, prefix, ckpt.meta))
            finally:
                if disk:
                    for _, mod in lays:
                        remove_mask(mod, "weight", bake=False)
                    release(model, filled)
                elif home != dev:
                    block.to(home)
        if disk:
            writer.commit()
    except BaseException:
        if disk:
            writer.abort()
        elif rollback:
            journal.undo()
        raise
    return LLMReport(meth.name, _pattern_name(pat), ratio, block_name, len(mods), tokens,
                     time.perf_counter() - start, tuple(results))


def _catch(model, mods, batches, device, meth: Method, ckpt, writer, names) -> list:
    """What the model passes to its blocks. From disk: the modules outside the blocks (embeddings, head...) are
    read for this, copied unchanged to the output, and dropped again."""
    if ckpt is None:
        return catch_inputs(model, mods, batches, device) if meth.stats is not None else []
    filled = materialise(model, "", ckpt, torch.device(device or "cpu"), skip=[names[id(b)] for b in mods])
    try:
        inputs = catch_inputs(model, mods, batches, device) if meth.stats is not None else []
        writer.write({n: _named_tensor(model, n) for n in filled if n in ckpt.meta}, {})
    finally:
        release(model, filled)
    return inputs


def _named_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(mod), leaf).detach()


def _pattern_name(pat) -> str:
    return f"{pat.n}:{pat.m}" if isinstance(pat, NM) else "element"


def _prune_block(block, index, lays, meth: Method, pat, ratio, inputs, dev, journal: _Journal,
                 results: list, *, advance: bool) -> None:
    """Gather statistics on the dense block, prune its layers, then (``advance``) replace the inputs by
    the PRUNED block's outputs, which the next block sees, as in the papers."""
    with torch.no_grad():
        stats = _gather(block, index, lays, meth, inputs, dev)
        for name, mod in lays:
            pruned, new, loss = meth.prune(as_out_in(mod, mod.weight.detach()), stats.get(name), pat, ratio, name)
            journal.record(mod, keep_weight=new is not None)
            if new is not None:
                original(mod, "weight").copy_(as_out_in(mod, new).to(original(mod, "weight").dtype))
            keep = ~as_out_in(mod, pruned)
            old = get_mask(mod, "weight")
            if old is not None:  # as in secateur.prune: a weight pruned before stays pruned (N:M: <= n kept)
                keep = keep & old
            set_mask(mod, "weight", keep)
            results.append(LayerResult(name, tuple(mod.weight.shape), 1.0 - float(keep.float().mean()), loss))
        del stats
        if advance:
            for inp in inputs:
                inp.hidden = run_block(block, index, inp, dev).to(inp.hidden.device)


def _gather(block: nn.Module, index: int, lays, meth: Method, inputs, dev) -> dict:
    """Run the (unpruned) block on every caught input and accumulate each layer's input statistics."""
    if meth.stats is None:
        return {}
    stats = {name: meth.stats(in_features(mod), dev) for name, mod in lays}
    hooks = [mod.register_forward_hook(lambda m, a, o, s=stats[name]: s.add(a[0].detach()))
             for name, mod in lays]
    try:
        for inp in inputs:
            run_block(block, index, inp, dev)
    finally:
        for h in hooks:
            h.remove()
    return stats
