"""2:4 conversion: on CPU every layer stays masked dense with a reason; the 2:4 checks are exact; on a
CUDA GPU with sparse support (when present) converted layers compute what the masked dense layers did."""
import copy

import pytest
import torch
from torch import nn

from secateur import prune
from secateur.errors import PruningError
from secateur.masks import get_mask, is_pruned, masks_of
from secateur.semi_structured import SemiStructuredLinear, device_support, is_2_4, to_semi_structured


def test_is_2_4_exact():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert is_2_4(w)
    w[0, 1] = 5.0
    assert not is_2_4(w)
    assert not is_2_4(torch.zeros(2, 6))  # not divisible by 4


def test_cpu_keeps_masked_dense_and_says_why():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 8))
    prune(model, pattern="2:4", targets=["0", "2"])
    before = {k: v.clone() for k, v in masks_of(model).items()}
    x = torch.randn(4, 32)
    y = model(x)
    decisions = to_semi_structured(model)
    assert [d.name for d in decisions] == ["0", "2", "3"]
    assert not any(d.converted for d in decisions)
    assert "CUDA" in decisions[0].reason and "CUDA" in decisions[1].reason
    assert "not 2:4" in decisions[2].reason
    assert is_pruned(model) and all(torch.equal(before[k], v) for k, v in masks_of(model).items())
    assert torch.equal(model(x), y)
    assert device_support(torch.device("cpu")) is not None


def test_bad_arguments():
    with pytest.raises(PruningError):
        to_semi_structured(nn.Linear(4, 4), tokens=0)
    with pytest.raises(PruningError, match="mode"):
        to_semi_structured(nn.Linear(4, 4), mode="graph")


def test_semi_structured_linear_returns_contiguous_output():
    """The CUTLASS-path layer: same result as the Linear, always contiguous (a transposed matmul result
    would push attention off its flash kernel). A dense tensor stands in for the sparse one on CPU."""
    lin = nn.Linear(8, 6)
    transposed = lin.weight.detach().t().contiguous().t()
    new = SemiStructuredLinear(8, 6, lin.bias, sparse_weight=transposed)
    x = torch.randn(2, 5, 8)
    y = new(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, lin(x))
    assert not new.weight.requires_grad and "semi-structured tensor" in repr(new)
    with pytest.raises(PruningError):
        SemiStructuredLinear(8, 6, None)


def test_a_lone_linear_is_not_replaced():
    lin = nn.Linear(8, 8)
    prune(lin, pattern="2:4")
    decisions = to_semi_structured(lin)
    assert not decisions[0].converted and get_mask(lin, "weight") is not None


@pytest.mark.skipif(not torch.cuda.is_available() or device_support(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU with 2:4 sparse support")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_converted_layers_match_masked_dense(dtype):
    """bfloat16 takes the direct cuSPARSELt path (row-major result, searched algorithm), float16 the
    tensor-subclass path; both compute what the masked dense model did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(dtype)
    prune(model, pattern="2:4")
    twin = copy.deepcopy(model)
    want_fn = twin
    x = torch.randn(128, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = model(x)
        decisions = to_semi_structured(model, measure=False)
        got = model(x)
    assert all(d.converted for d in decisions)
    assert isinstance(model[0], SemiStructuredLinear) and isinstance(model[2], SemiStructuredLinear)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    assert got.is_contiguous()
    x3 = torch.randn(2, 64, 256, device="cuda", dtype=dtype)  # leading dims, a non-contiguous input
    with torch.no_grad():
        torch.testing.assert_close(model(x3.transpose(0, 1)), want_fn(x3.transpose(0, 1)), rtol=3e-2, atol=3e-2)
    assert all(d.converted for d in to_semi_structured(model))  # a second call leaves them as they are


@pytest.mark.skipif(not torch.cuda.is_available() or device_support(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU with 2:4 sparse support")
@pytest.mark.parametrize("mode", ["eager", "cuda_graph"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_measured_decisions_keep_outputs(mode, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda().to(dtype)
    prune(model, pattern="2:4")
    x = torch.randn(512, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = model(x)
        decisions = to_semi_structured(model, tokens=512, mode=mode)
        got = model(x)
    assert len(decisions) == 2 and all(d.dense_ms and d.sparse_ms for d in decisions)
    for d, layer in zip(decisions, (model[0], model[2])):
        assert d.converted == isinstance(layer, SemiStructuredLinear) == (d.sparse_ms <= d.dense_ms)
        assert mode in d.reason
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
