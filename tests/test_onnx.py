"""Deploy: ONNX export of pruned models checked with onnxruntime; torch.compile on pruned models."""
import numpy as np
import pytest
import torch
from torch import nn

import secateur
from secateur.io import export_onnx
from secateur.masks import masks_of, original

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


X = torch.randn(3, 3, 8, 8)


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def initializer_zeros(path):
    g = onnx.load(str(path))
    return sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in g.graph.initializer
               if len(t.dims) >= 2)


@pytest.mark.parametrize("pattern", ["element", "2:4", "rows"])
def test_masked_export_matches_pytorch_and_bakes_zeros(tmp_path, pattern):
    m = cnn().train()
    secateur.prune(m, None if pattern == "2:4" else 0.6, pattern=pattern, targets=["3", "6", "8"])
    secateur.prune(m, 0.5, targets=["0"])  # 3 input channels: no 2:4 groups there
    masks_before = {k: v.clone() for k, v in masks_of(m).items()}
    raw_before = original(m[6], "weight").clone()
    export_onnx(m, X, tmp_path / "m.onnx")
    # the user's model is untouched: still masked, same masks, same raw values, still training
    assert m.training and secateur.is_pruned(m)
    assert all(torch.equal(masks_before[k], v) for k, v in masks_of(m).items())
    assert torch.equal(original(m[6], "weight"), raw_before)
    m.eval()
    with torch.no_grad():
        ref = m(X).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", X), ref, rtol=1e-4, atol=1e-5)
    # the masks were folded into the initializers: the graph holds the pruned zeros, not masks + Mul
    pruned = sum(int((~mk).sum()) for mk in masks_before.values())
    g = onnx.load(str(tmp_path / "m.onnx"))
    assert "Mul" not in {n.op_type for n in g.graph.node}
    assert initializer_zeros(tmp_path / "m.onnx") >= pruned


def test_finalized_export(tmp_path):
    m = cnn().eval()
    secateur.prune(m, 0.7, scope="global")
    secateur.finalize(m)
    export_onnx(m, (X,), tmp_path / "f.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "f.onnx", X), m(X).numpy(), rtol=1e-4, atol=1e-5)


def test_compile_aot_eager_on_masked_model():
    """Dynamo traces through the mask parametrizations (fast backend; inductor in the slow test)."""
    m = cnn().eval()
    secateur.prune(m, 0.5)
    c = torch.compile(m, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(c(X), m(X))


@pytest.mark.slow
def test_compile_inductor_on_masked_and_finalized():
    m = cnn().eval()
    secateur.prune(m, 0.5)
    with torch.no_grad():
        ref = m(X)
        torch.testing.assert_close(torch.compile(m)(X), ref)
        secateur.finalize(m)  # in place: finalize(deepcopy(masked)) would share parametrize's class
        torch.testing.assert_close(torch.compile(m)(X), ref)


def test_structurally_pruned_export(tmp_path):
    structured = pytest.importorskip("secateur.structured")
    m = cnn().eval()
    structured.prune_channels(m, X, ratio=0.5)
    secateur.prune(m, 0.5)  # masks on top of the smaller model
    export_onnx(m, X, tmp_path / "s.onnx")
    g = onnx.load(str(tmp_path / "s.onnx"))
    shapes = {tuple(t.dims) for t in g.graph.initializer}
    assert tuple(m[0].weight.shape) in shapes and m[0].weight.shape[0] < 8
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "s.onnx", X), m(X).numpy(), rtol=1e-4, atol=1e-5)
