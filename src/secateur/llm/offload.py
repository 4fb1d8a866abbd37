"""Pruning a model that does not fit in memory: weights stay in safetensors files and are materialised
one block at a time.

Why this shape: layer-wise calibration already touches one block at a time, so a model built on the
meta device (parameters without storage) plus its checkpoint on disk is enough. Each block is read
(``safe_open`` reads single tensors, straight to the compute device), pruned, written to the output
folder and dropped back to meta before the next one, so peak memory is about one block, the
calibration activations and the modules outside the blocks (embeddings, head). The output is a
sharded safetensors checkpoint in the input's naming (pruned values baked in, loadable by anything
that reads such checkpoints) plus the masks, which `load_pruned` turns back into a masked model.

Models dispatched by accelerate with offloading hooks keep their weights outside the parameters
(the parameters are meta between calls); masks cannot be attached to them, so they are refused."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

import torch
from torch import nn

from secateur.errors import fail

INDEX = "model.safetensors.index.json"
_MASKS_KEY = "secateur_masks"


@contextlib.contextmanager
def _params_on_meta():
    """While active, every parameter registered on any module is moved to the meta device; buffers
    (e.g. rotary ``inv_freq``, computed at construction and absent from checkpoints) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with parameters on the meta device (no memory, no random init) and buffers real: the
    skeleton `prune_llm(..., offload_dir=...)` fills block by block. E.g.
    ``empty_model(lambda: LlamaForCausalLM(config))``."""
    with _params_on_meta():
        return build()


class Checkpoint:
    """Tensor name -> safetensors file over one file or a folder of shards; reads one tensor at a time."""

    def __init__(self, path: str | os.PathLike, *, skip: Iterable[str] = ()):
        from safetensors import safe_open

        path = os.fspath(path)
        skip = set(skip)  # file names left out (prune_llm's mask shards: their keys are the weights' names)
        if os.path.isfile(path):
            files = [path]
        elif os.path.isdir(path):
            files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors")) if os.path.basename(f) not in skip)
        else:
            raise fail("offload_dir does not exist", value=path, hint="Give a safetensors file or a folder of shards")
        if not files:
            raise fail("no *.safetensors file in offload_dir", value=path)
        self.path = path
        self.where: dict[str, str] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    self.where[k] = f
                    self.meta[k] = (tuple(s.get_shape()), s.get_dtype())
        self._safe_open = safe_open

    def get(self, key: str, device) -> torch.Tensor:
        with self._safe_open(self.where[key], framework="pt", device=str(device)) as h:
            return h.get_tensor(key)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter/buffer names grouped by tensor identity (tied weights share one group), first name first."""
    groups: dict[int, list[str]] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def _persistent(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True))


def check_checkpoint(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every parameter and persistent buffer has a tensor of the same shape in the checkpoint (any one
    name of a tied group will do); every meta tensor is one the checkpoint can fill."""
    refuse_accelerate_offload(model)
    persistent = _persistent(model)
    missing = []
    for first, names in _aliases(model).items():
        t = _tensor(model, first)
        key = next((n for n in names if n in ckpt.meta), None)
        if key is None:
            if t.is_meta or any(n in persistent for n in names):
                missing.append(first)
            continue
        if ckpt.meta[key][0] != tuple(t.shape):
            raise fail("checkpoint tensor has another shape than the model's", where=key, shape=t.shape,
                       value=ckpt.meta[key][0], hint="Build the model from the checkpoint's own config")
    if missing:
        raise fail(f"{len(missing)} model tensors are not in the checkpoint", where=ckpt.path, value=missing[:5],
                   hint="Meta buffers are not saved in checkpoints: build the skeleton with "
                   "secateur.llm.empty_model(...) (parameters on meta, buffers real)")


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod, _, leaf = name.rpartition(".")
    m = model.get_submodule(mod)
    return m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]


def _set(model: nn.Module, names: list[str], value: torch.Tensor, is_param: bool, requires_grad: bool) -> None:
    new = nn.Parameter(value, requires_grad=requires_grad) if is_param else value
    for name in names:
        mod, _, leaf = name.rpartition(".")
        m = model.get_submodule(mod)
        (m._parameters if is_param else m._buffers)[leaf] = new


def materialise(model: nn.Module, prefix: str, ckpt: Checkpoint, device, *, skip: Iterable[str] = ()) -> list[str]:
    """Read the tensors under ``prefix`` ('' = all; names in ``skip`` and their sub-names excluded) from
    the checkpoint to ``device``; tied names get the same tensor. Returns the names filled (those that
    were meta); values must be finite, so that no NaN reaches the calibration silently."""
    skip = tuple(s + "." for s in skip)
    filled: list[str] = []
    try:
        for first, names in _aliases(model).items():
            mine = [n for n in names if n.startswith(prefix) and not n.startswith(skip)]
            if not mine:
                continue
            t = _tensor(model, first)
            if not t.is_meta:
                continue
            key = next(n for n in names if n in ckpt.meta)
            value = ckpt.get(key, device).to(t.dtype)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise fail("checkpoint tensor holds NaN or infinite values", where=key, shape=value.shape)
            _set(model, names, value, isinstance(t, nn.Parameter), getattr(t, "requires_grad", False))
            filled += names
    except BaseException:
        release(model, filled)  # a half-read block is dropped again
        raise
    return filled


def release(model: nn.Module, names: list[str]) -> None:
    """Put the named tensors back on the meta device (their memory is freed) and hand freed heap back
    to the OS."""
    wanted = set(names)
    for first, group in _aliases(model).items():
        if any(n in wanted for n in group):
            t = _tensor(model, first)
            _set(model, group, t.detach().to("meta"), isinstance(t, nn.Parameter), getattr(t, "requires_grad", False))
    trim_heap()


def trim_heap() -> None:
    """glibc keeps freed blocks of a few MB in its heap (its mmap threshold grows with each freed large
    block), so block after block the resident size crept up by most of a block (measured: +220 MB over
    20 blocks of 14 MB); ``malloc_trim`` returns that memory. A no-op off glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class ShardWriter:
    """Writes named tensors to numbered safetensors shards in a temp folder, then (``commit``) an index
    and an atomic rename to ``out_dir``; ``abort`` leaves nothing behind."""

    def __init__(self, out_dir: str | os.PathLike):
        out_dir = os.fspath(out_dir)
        if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
            raise fail("save_dir exists and is not an empty folder", value=out_dir,
                       hint="Give a new folder; the pruned checkpoint is written there")
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        self.out_dir = out_dir
        self.tmp = tempfile.mkdtemp(prefix=".secateur-", dir=parent)
        self.weight_map: dict[str, str] = {}
        self.mask_map: dict[str, str] = {}
        self.n = 0

    def write(self, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.n += 1
        name = f"model-{self.n:05d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(self.tmp, name),
                  metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        if masks:
            mname = f"masks-{self.n:05d}.safetensors"
            save_file({k: v.cpu().contiguous() for k, v in masks.items()}, os.path.join(self.tmp, mname))
            self.mask_map.update(dict.fromkeys(masks, mname))

    def commit(self) -> None:
        index = {"metadata": {"format": "secateur-offload"}, "weight_map": self.weight_map, _MASKS_KEY: self.mask_map}
        with open(os.path.join(self.tmp, INDEX), "w") as f:
            json.dump(index, f, indent=1)
        if os.path.isdir(self.out_dir):
            os.rmdir(self.out_dir)  # checked empty at the start
        os.replace(self.tmp, self.out_dir)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def block_state(block: nn.Module, prefix: str, keys) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(tensors, masks)`` of a block under plain names (those of the input checkpoint, ``keys``):
    masked weights with their zeros baked in."""
    from secateur.io import plain_name
    from secateur.masks import masks_of

    tensors, seen = {}, set()
    for key, t in block.state_dict(keep_vars=True).items():
        name = plain_name(key)
        if name is None or name in seen or prefix + name not in keys:
            continue
        seen.add(name)
        mod, _, leaf = name.rpartition(".")
        tensors[prefix + name] = getattr(block.get_submodule(mod), leaf).detach()  # masked view = baked
    masks = {prefix + k: v for k, v in masks_of(block).items()}
    return tensors, masks


def load_pruned(model: nn.Module, save_dir: str | os.PathLike, *, device="cpu") -> nn.Module:
    """Fill ``model`` (a skeleton from `empty_model` or an ordinary instance of the architecture) with a
    folder written by ``prune_llm(..., save_dir=...)``, masks included, so it is the masked model the
    in-memory ``prune_llm`` gives (with pruned values zero, as after ``finalize`` of that model)."""
    from safetensors import safe_open

    from secateur.masks import set_mask

    save_dir = os.fspath(save_dir)
    path = os.path.join(save_dir, INDEX)
    if not os.path.isfile(path):
        raise fail("not a folder written by prune_llm(save_dir=...): no index", where=save_dir, value=INDEX)
    with open(path) as f:
        index = json.load(f)
    mask_files = index.get(_MASKS_KEY, {})
    # the mask shards hold the same names as the weights: read each kind from its own files
    ckpt = Checkpoint(save_dir, skip=mask_files.values())
    check_checkpoint(model, ckpt)
    for first, names in _aliases(model).items():
        key = next((n for n in names if n in ckpt.meta), None)
        if key is None:  # a non-persistent buffer, real in the skeleton
            continue
        t = _tensor(model, first)
        _set(model, names, ckpt.get(key, device).to(t.dtype), isinstance(t, nn.Parameter),
             getattr(t, "requires_grad", False))
    for name, file in mask_files.items():
        with safe_open(os.path.join(save_dir, file), framework="pt", device=str(device)) as h:
            mask = h.get_tensor(name)
        mod, _, leaf = name.rpartition(".")
        set_mask(model.get_submodule(mod), leaf, mask)
    return model


def refuse_accelerate_offload(model: nn.Module) -> None:
    """accelerate's offloading hooks keep the real weights in a side map and leave meta parameters in
    the modules between calls; a mask on such a parameter would be lost or wrong. Refuse, naming the way out."""
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is None:
            continue
        hooks = getattr(hook, "hooks", [hook])
        if any(getattr(h, "offload", False) or getattr(h, "weights_map", None) is not None for h in hooks):
            raise fail("the model is dispatched by accelerate with offloaded weights (hooks keep the weights "
                       "outside the modules)", where=name or type(model).__name__,
                       hint="Load it without device_map/offload and use prune_llm(device='cuda') (blocks moved "
                       "one at a time), or build it with secateur.llm.empty_model and pass offload_dir=<its "
                       "safetensors> and save_dir=")
