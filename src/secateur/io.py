"""Keeping pruned models: save / load without pickle, and ONNX export.

One file, safetensors format. The tensors are the model's state under *plain* names (``fc.weight``, not
``fc.parametrizations.weight.original``: the raw stored values of masked tensors, so a masked model
comes back exactly, un-masked values included) plus each mask bit-packed (``numpy.packbits``, 1 bit
per weight) as a uint8 tensor ``__mask__.<name>``. The JSON description of what changed lives in the
safetensors header metadata rather than a sidecar: one file is renamed atomically, the description
cannot get separated from or out of sync with its weights, and it is parsed by the safetensors
header parser and ``json.loads`` only -- reading a file never runs code (no pickle, no ``torch.load``).

Integrity: ``secateur.sha256`` in the metadata is the SHA-256 of the description followed by every
tensor's bytes in key order; a truncated file fails to parse, a tampered description or payload fails
the checksum, and a file from another architecture fails the class and shape checks, each as a
`PruningError` raised before the fresh model is touched."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from secateur.errors import PruningError, fail

FORMAT = "secateur"
FORMAT_VERSION = 1
MASK_PREFIX = "__mask__."
_META_DESC = "secateur"
_META_SUM = "secateur.sha256"


# ----------------------------------------------------------------------------------------- helpers


def _path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise fail("the file path must be a str or os.PathLike", value=path)
    return os.fspath(path)


def _version() -> str:
    try:
        from secateur import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    if cls.__name__.startswith("Parametrized") and cls.__bases__:  # parametrize swaps the class
        cls = cls.__bases__[0]
    return f"{cls.__module__}.{cls.__qualname__}"


def plain_name(key: str) -> str | None:
    """State-dict key without parametrize's wrapping; None for secateur's own mask buffers."""
    parts = key.split(".")
    if "parametrizations" not in parts:
        return key
    i = parts.index("parametrizations")
    rest = parts[i + 1:]
    if len(rest) == 2 and rest[1] == "original":
        return ".".join(parts[:i] + [rest[0]])
    if len(rest) == 3 and rest[2] == "mask":
        return None
    raise fail("cannot save a tensor under a parametrization secateur did not add", where=key,
               hint="remove or finalize other parametrizations before saving")


def _bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _checksum(description: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(description.encode())
    for k in sorted(tensors):
        h.update(k.encode() + b"\0" + str(tensors[k].dtype).encode() + str(tuple(tensors[k].shape)).encode())
        h.update(_bytes_view(tensors[k]))
    return h.hexdigest()


def _pack(mask: torch.Tensor) -> torch.Tensor:
    bits = np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(np.bool_))
    return torch.from_numpy(bits)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    bits = packed.numpy()
    if packed.dtype != torch.uint8 or bits.ndim != 1 or bits.size != (n + 7) // 8:
        raise fail("packed mask has the wrong size", where=where, shape=shape, value=tuple(packed.shape))
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(np.bool_)).reshape(shape)


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain-named tensors of the model, shared tensors stored once: ``(tensors, {alias: stored key})``."""
    from secateur.masks import original

    modules = dict(model.named_modules(remove_duplicate=False))  # a module registered twice has both names
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = plain_name(key)
        if name is None:
            continue
        if key != name:  # raw stored tensor behind a mask
            mod, _, param = name.rpartition(".")
            t = original(modules[mod], param)
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        out[name] = t.cpu().contiguous()
    return out, aliases


def _hf_config(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    return json.loads(cfg.to_json_string(use_diff=False))


# -------------------------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike, *, source: str | None = None) -> None:
    """Write ``model``'s weights, masks and structural changes to one safetensors file, atomically.

    Reload with `load` into a freshly built, unpruned instance of the same architecture. ``source``
    optionally records how to build that instance (a command-line model spec such as ``resnet18``),
    which lets ``secateur report/export/bench FILE`` rebuild it."""
    if source is not None and not isinstance(source, str):
        raise fail("source must be a model spec string", value=source)
    from safetensors.torch import save_file

    from secateur.masks import iter_masks, refuse_foreign

    if not isinstance(model, nn.Module):
        raise fail("save() needs an nn.Module", value=type(model).__name__)
    path = _path(path)
    refuse_foreign(model, "save")  # its raw stored tensor would load as the weight, silently wrong
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:
            raise fail("cannot save a tensor on the meta device (it holds no values)", where=plain_name(key) or key,
                       shape=t.shape,
                       hint="materialize the model (model.to_empty(device=...), then load its weights) first")
    tensors, aliases = _state(model)
    masks = {}
    for mod, _, param, mask in iter_masks(model):
        name = f"{mod}.{param}" if mod else param
        masks[name] = {"shape": list(mask.shape), "kept": int(mask.sum())}
        tensors[MASK_PREFIX + name] = _pack(mask)
    structure = getattr(model, "_secateur_structure", None)
    desc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "secateur_version": _version(),
        "model_class": _class_name(model), "masks": masks, "aliases": aliases,
        "structure": structure, "config": _hf_config(model), "source": source,
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
    }
    try:
        desc_s = json.dumps(desc, sort_keys=True)
    except TypeError as e:
        raise fail("the structure description is not JSON-serialisable", where="_secateur_structure",
                   value=str(e)) from None
    meta = {_META_DESC: desc_s, _META_SUM: _checksum(desc_s, tensors)}

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[str], None], *, suffix: str = ".tmp") -> None:
    """Write ``path`` so that a crash leaves the previous file intact: write a temp file in the same
    folder (``data`` bytes, or ``data(tmp_path)`` writes it), fsync it, rename it over ``path``, fsync
    the folder. Every file secateur writes (models, JSON, PNG, HTML) goes through here."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise fail("the output path is a folder; give a file name", where=path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".secateur-", suffix=suffix, dir=folder)
    except OSError as e:  # the path's folder cannot be created or written: the user's to fix
        raise fail("cannot write a file there", where=path, value=e.strerror or str(e),
                   hint="check that the folder exists (or can be created) and is writable") from None
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(dir_fd)


# -------------------------------------------------------------------------------------------- load


def _open(path: str | os.PathLike, *, tensors: bool) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(path, header metadata, tensors or {})`` of a safetensors file; any parse failure of an untrusted
    file is a PruningError. Parsing never executes code."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise fail("no such file", where=path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for truncated / garbage files
        raise fail("not a readable secateur file (truncated or corrupted?)", where=path,
                   value=str(e)[:120]) from None
    if meta.get(_META_DESC) is None:
        raise fail("this safetensors file was not written by secateur.save (no description)", where=path)
    return path, meta, found


def _parse(desc_s: str, path: str) -> dict:
    try:
        desc = json.loads(desc_s)
    except ValueError:
        raise fail("the description is not valid JSON", where=path) from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise fail("not a secateur description", where=path)
    return desc


def describe(path: str | os.PathLike) -> dict:
    """The description of a secateur file, from its header only (cheap; not checksum-verified --
    `load` verifies). Raises a PruningError for anything that is not a secateur file."""
    path, meta, _ = _open(path, tensors=False)
    return _parse(meta[_META_DESC], path)


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse and verify a secateur file: ``(description, tensors)``. Never executes code."""
    path, meta, tensors = _open(path, tensors=True)
    desc_s = meta[_META_DESC]
    if _checksum(desc_s, tensors) != meta.get(_META_SUM):
        raise fail("checksum mismatch: the file's description or tensors were modified or damaged", where=path)
    desc = _parse(desc_s, path)
    if desc.get("format_version") != FORMAT_VERSION:
        raise fail("unsupported secateur file version", where=path, value=desc.get("format_version"),
                   hint=f"this secateur reads version {FORMAT_VERSION}")
    return desc, tensors


def _uniform_unsaved(model: nn.Module, mod: str, name: str, shape) -> bool:
    """A pruned non-persistent buffer (not in the file: timm Swin V2's all-zero ``k_bias``, sliced with its heads)
    is rebuilt by truncating the fresh one, which is exact only where it does not vary along a pruned dim; any
    other such buffer is refused, never rebuilt wrong."""
    try:
        m = model.get_submodule(mod)
    except AttributeError:
        return False
    b = m._buffers.get(name)
    if b is None or name not in m._non_persistent_buffers_set:
        return False
    if b.dim() != len(shape) or any(s > h for s, h in zip(shape, b.shape)):
        return False
    for d, (s, h) in enumerate(zip(shape, b.shape)):
        if s < h and not torch.equal(b, b.narrow(d, 0, 1).expand_as(b)):
            raise fail("a pruned non-persistent buffer varies along its pruned dim; its kept values are not in the "
                       "file", where=f"{mod}.{name}" if mod else name, shape=tuple(b.shape), value=list(shape))
    return True


def _check_compatible(model: nn.Module, desc: dict, tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Everything that can be checked before touching the model: class, names and (new) shapes."""
    if desc.get("model_class") != _class_name(model):
        raise fail("the file holds a different model class", where=path, value=desc.get("model_class"),
                   hint=f"load it into a fresh {desc.get('model_class')}, not {_class_name(model)}")
    current = {}
    shared: dict[int, list[str]] = {}  # one tensor under several names (a module shared by several parents)
    for key, t in model.state_dict(keep_vars=True).items():
        name = plain_name(key)
        if name is not None:
            current[name] = tuple(t.shape)
            shared.setdefault(id(t), []).append(name)
    same = {n: names for names in shared.values() if len(names) > 1 for n in names}
    skipped = [m for m, spec in (desc.get("structure") or {}).items() if isinstance(spec, dict) and "skipped" in spec]
    names = {n for n, _ in model.named_modules()} if skipped else set()
    for mod in skipped:  # a dropped block (structured/depth.py): its tensors are gone from the file
        gone = [n for n in current if n.startswith(mod + ".")]
        if not gone and mod not in names:
            raise fail("a dropped block of the structure is not in this model", where=mod)
        for n in gone:
            current.pop(n)
    for mod, spec in (desc.get("structure") or {}).items():
        if not isinstance(spec, dict):
            raise fail("malformed structure entry", where=mod, value=spec)
        if "skipped" in spec:
            continue
        for kind in ("params", "buffers"):
            for pname, shape in (spec.get(kind) or {}).items():
                name = f"{mod}.{pname}" if mod else pname
                have = current.get(name)
                if have is None and kind == "buffers" and (pname in (spec.get("kept") or {})
                                                           or _uniform_unsaved(model, mod, pname, shape)):
                    continue  # rebuilt from the fresh model (structured.apply_structure)
                if have is None or len(have) != len(shape) or any(s > h for s, h in zip(shape, have)):
                    raise fail("the structure does not fit this architecture (a pruned tensor must be a slice "
                               "of the fresh model's)", where=name, shape=have, value=shape)
                for n in same.get(name, [name]):  # every name of a shared module's tensor (CoaT's crpe)
                    current[n] = tuple(shape)
    stored = {k: tuple(t.shape) for k, t in tensors.items() if not k.startswith(MASK_PREFIX)}
    stored.update({a: stored.get(k) for a, k in desc.get("aliases", {}).items()})
    missing = sorted(set(current) - set(stored))
    extra = sorted(set(stored) - set(current))
    if missing or extra:
        raise fail("the file does not match this architecture", where=path,
                   value={"missing": missing[:5], "unexpected": extra[:5]})
    for name, shape in stored.items():
        if current[name] != shape:
            raise fail("tensor shape differs from this architecture", where=name, shape=current[name], value=shape)
    for name, spec in desc.get("masks", {}).items():
        if name not in current or tuple(spec.get("shape", ())) != current[name]:
            raise fail("mask does not match a tensor of this architecture", where=name,
                       shape=current.get(name), value=spec.get("shape"))
        if MASK_PREFIX + name not in tensors:
            raise fail("mask listed in the description is missing from the file", where=name)


def _apply_config(model: nn.Module, recorded: dict | None) -> None:
    cfg = getattr(model, "config", None)
    if not recorded or cfg is None:
        return
    fresh = _hf_config(model) or {}
    for k, v in recorded.items():
        if k.startswith("_") or k in ("transformers_version", "architectures") or fresh.get(k) == v:
            continue
        if k in fresh:
            setattr(cfg, k, v)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Re-apply a saved file to ``model`` (a freshly built, unpruned instance of the same
    architecture): structural changes, config fields, masks, then the exact weights. Returns it."""
    from secateur.masks import apply_masks, iter_masks, original, refuse_foreign, remove_mask

    if not isinstance(model, nn.Module):
        raise fail("load() needs an nn.Module (a freshly built instance of the saved architecture)",
                   value=type(model).__name__)
    path = _path(path)
    refuse_foreign(model, "load into")  # the file's weight would be fed through it, silently wrong
    desc, tensors = read(path)
    try:
        _check_compatible(model, desc, tensors, path)
        masks = {name: _unpack(tensors[MASK_PREFIX + name], tuple(spec["shape"]), name)
                 for name, spec in desc.get("masks", {}).items()}
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        if isinstance(e, PruningError):
            raise
        raise fail("malformed secateur description", where=path, value=repr(e)[:120]) from None

    structure = desc.get("structure")
    if structure:
        try:
            from secateur.structured import apply_structure
        except ImportError:
            raise fail("the file holds structural changes but secateur.structured is unavailable",
                       where=path) from None
        model = apply_structure(model, structure) or model
        model._secateur_structure = structure
    _apply_config(model, desc.get("config"))
    for mod, module, param, _ in list(iter_masks(model)):  # masks the file does not have are not the saved model's
        if (f"{mod}.{param}" if mod else param) not in masks:
            remove_mask(module, param, bake=False)
    if masks:  # attached in the model's own order: parameters() then lists them as the saved model did
        order = {plain_name(k): i for i, k in enumerate(model.state_dict(keep_vars=True))}
        apply_masks(model, dict(sorted(masks.items(), key=lambda kv: order.get(kv[0], len(order)))))

    modules = dict(model.named_modules(remove_duplicate=False))
    values = {k: t for k, t in tensors.items() if not k.startswith(MASK_PREFIX)}
    for alias, key in desc.get("aliases", {}).items():
        values[alias] = values[key]
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            name = plain_name(key)
            if name is None:
                continue
            if key != name:
                mod, _, param = name.rpartition(".")
                t = original(modules[mod], param)
            t.copy_(values[name])
    return model


# ------------------------------------------------------------------------------------------- ONNX


def _check_export_options(opset, inputs, input_names, output_names, dynamic_axes) -> None:
    """The exporter would take a bad opset or a name list of the wrong length and write a file that onnxruntime
    cannot run, or that names only some inputs."""
    try:
        from torch.onnx import _constants
        lo, hi = _constants.ONNX_MIN_OPSET, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                                                     _constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - older or newer torch
        lo, hi = 7, 20
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi):
        raise fail(f"opset must be an int in [{lo}, {hi}] (what this torch's TorchScript exporter writes)",
                   where="export_onnx", value=opset)
    for what, names in (("input_names", input_names), ("output_names", output_names)):
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise fail(f"{what} is a list of strings", where="export_onnx", value=names)
    if input_names is not None and len(input_names) > len(inputs):
        raise fail("input_names has more names than the model has example inputs", where="export_onnx",
                   value={"input_names": list(input_names), "inputs": len(inputs)})
    if dynamic_axes is not None and not isinstance(dynamic_axes, Mapping):
        raise fail("dynamic_axes maps input / output names to their dynamic axes", where="export_onnx",
                   value=type(dynamic_axes).__name__)


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None,
                input_names=None, output_names=None, dynamic_axes=None) -> None:
    """Export a pruned model to ONNX with the TorchScript exporter. A masked tensor is traced as
    ``weight * mask`` of two constants, which the exporter's constant folding turns into one
    initializer holding the zeros: the graph is the finalized model's, and the user's model (masks,
    raw values, train/eval flags) is left exactly as it was."""
    from secateur.errors import check_model_inputs
    check_model_inputs(model, example_inputs, "export_onnx")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise fail("ONNX export needs onnx", hint="pip install secateur[onnx]") from None
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else None
    if kwargs is not None:
        args = ()
    _check_export_options(opset, args or tuple(kwargs or ()), input_names, output_names, dynamic_axes)
    opts: dict[str, Any] = {"dynamo": False}
    if opset is not None:
        opts["opset_version"] = opset
    for k, v in (("input_names", input_names), ("output_names", output_names), ("dynamic_axes", dynamic_axes)):
        if v is not None:
            opts[k] = v
    if kwargs is not None:
        opts["kwargs"] = kwargs

    def write(tmp: str) -> None:
        # The TorchScript exporter is chosen on purpose (its constant folding bakes the masks; the dynamo
        # exporter needs onnxscript): silence its deprecation notice rather than show it to every user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(model, args, tmp, **opts)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        atomic_write(path, write, suffix=".onnx")
    except RuntimeError as e:  # the model rejects the inputs, or an op has no ONNX form
        from secateur.errors import shape_of
        raise fail("the model could not be exported on these example inputs", where=type(model).__name__,
                   shape=shape_of(example_inputs), value=str(e).splitlines()[0][:200] if str(e) else None,
                   hint="check that the model runs on the example inputs; an unsupported op is named above") from e
    finally:
        for m, t in flags:
            m.training = t
