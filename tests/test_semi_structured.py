"""2:4 conversion: on CPU every layer stays masked dense with a reason; the 2:4 checks are exact; on a
CUDA GPU with sparse support (when present) converted layers compute what the masked dense layers did."""
import pytest
import torch
from torch import nn

from secateur import prune
from secateur.errors import PruningError
from secateur.masks import is_pruned, masks_of
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
    """The layer that replaces a converted Linear: same result as the Linear, always contiguous (a
    transposed matmul result would push attention off its flash kernel)."""
    lin = nn.Linear(8, 6)
    new = SemiStructuredLinear.from_linear(lin, lin.weight.detach().t().contiguous().t())  # a transposed layout
    x = torch.randn(2, 5, 8)
    y = new(x)
    assert y.is_contiguous() and isinstance(new, nn.Linear)
    torch.testing.assert_close(y, lin(x))
    assert not new.weight.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available() or device_support(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU with 2:4 sparse support")
def test_gpu_converted_layers_match_masked_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().half()
    prune(model, pattern="2:4")
    x = torch.randn(128, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        want = model(x)
        decisions = to_semi_structured(model, measure=False)
        got = model(x)
    assert all(d.converted for d in decisions)
    assert isinstance(model[0], SemiStructuredLinear) and isinstance(model[2], SemiStructuredLinear)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert all(d.converted for d in to_semi_structured(model))  # a second call leaves them as they are


@pytest.mark.skipif(not torch.cuda.is_available() or device_support(torch.device("cuda")) is not None,
                    reason="needs a CUDA GPU with 2:4 sparse support")
@pytest.mark.parametrize("mode", ["eager", "cuda_graph"])
def test_gpu_measured_decisions_keep_outputs(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda().half()
    prune(model, pattern="2:4")
    x = torch.randn(512, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        want = model(x)
        decisions = to_semi_structured(model, tokens=512, mode=mode)
        got = model(x)
    assert len(decisions) == 2 and all(d.dense_ms and d.sparse_ms for d in decisions)
    for d, layer in zip(decisions, (model[0], model[2])):
        assert d.converted == isinstance(layer, SemiStructuredLinear) == (d.sparse_ms <= d.dense_ms)
        assert mode in d.reason
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
