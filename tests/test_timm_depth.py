"""timm models the engine used to keep nearly whole (issue #3, benchmarks/bench_zoo_depth.py): pruned at ratio 0.5,
each passes the oracle and lands under 0.4 of its dense MACs. Small instances at 64 px."""
import pytest
import torch

from secateur.metrics import count_macs
from test_zoo import oracle

timm = pytest.importorskip("timm")

# model -> the stored size that broke the pruned forward (MACs after / dense at ratio 0.5 before the fix, 64 px)
CASES = {
    "mixnet_s": "MixedConv2d.splits (0.918)",
    "res2net50d": "Bottle2neck.width (0.954)",
    "skresnet18": "SelectiveKernel.in_channels (1.000)",
    "cs3darknet_s": "CrossStage.expand_chs (0.943)",
    "inception_next_atto": "InceptionDWConv2d.split_indexes (0.539)",
}


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_split_sizes_follow_the_pruned_convs(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = count_macs(model, x)
    plan = oracle(model, x)
    assert not [n for n in plan.notes if "pruned forward failed" in n or "pruned shapes differ" in n]
    assert count_macs(model, x) < 0.4 * dense, CASES[name]


@pytest.mark.zoo
def test_mixnet_reloads_from_its_structure(tmp_path):
    import secateur
    torch.manual_seed(0)
    model = timm.create_model("mixnet_s", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    secateur.prune_channels(model, x, ratio=0.5)
    secateur.save(model, tmp_path / "m.safetensors")
    fresh = secateur.load(timm.create_model("mixnet_s", pretrained=False).eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
