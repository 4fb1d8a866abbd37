"""``capture(..., macs=True)`` counts MACs while it captures (``prune_channels`` saves one forward that way): the
count must be what ``count_macs`` says, and the capture must record the same trace, slots and atoms as without the
counter (the counter sits below the capture's dispatch mode and must change nothing it sees)."""
import pytest
import torch
from torch import nn

from secateur.graph.capture import capture
from secateur.metrics import count_macs
from secateur.structured import prune_channels

torch.set_num_threads(1)


def _same_label(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _models():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    mha = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    return [(tv.models.mobilenet_v3_small().eval(), torch.randn(1, 3, 64, 64)),
            (tv.models.shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 64, 64)),
            (tv.models.swin_t().eval(), torch.randn(1, 3, 64, 64)),
            (mha, torch.randn(2, 5, 32))]


@pytest.mark.parametrize("i", range(4))
def test_counting_capture_counts_what_count_macs_counts_and_records_the_same(i):
    model, x = _models()[i]
    plain, counted = capture(model, x), capture(model, x, macs=True)
    assert plain.macs is None
    assert counted.macs == count_macs(model, x) > 0
    assert len(plain.trace) == len(counted.trace)
    for (op0, s0, l0), (op1, s1, l1) in zip(plain.trace, counted.trace):
        assert op0 == op1 and s0 == s1 and all(_same_label(a, b) for a, b in zip(l0, l1))
    assert plain.slots.keys() == counted.slots.keys()
    assert all(torch.equal(plain.slots[k]["atoms"], counted.slots[k]["atoms"]) for k in plain.slots)
    assert plain.atoms.count == counted.atoms.count and plain.calls == counted.calls


def test_prune_channels_reports_the_dense_macs_of_count_macs():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = tv.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    dense = count_macs(model, x)
    res = prune_channels(model, x, ratio=0.5, steps=2)
    assert res.macs_before == dense and res.macs_after == count_macs(model, x) < dense
