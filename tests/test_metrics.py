"""Params / MACs counter: hand formulas, a reference counter with the difference explained, pruning invariants."""
import pytest
import torch
from torch import nn

from secateur.metrics import count_macs, count_params, macs_by_layer

torch.set_num_threads(1)


def _extras_counted_by_torch_pruning(model, x):
    """What Torch-Pruning's counter adds on top of conv/linear MACs (its op_counter rules): bias adds of convs and
    linears, BatchNorm (2 per element when affine), activations (1 per element), pooling (1 per input element)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.bias is not None:
            total += out.numel()
        elif isinstance(mod, nn.Linear) and mod.bias is not None:
            total += mod.out_features * (out.numel() // out.shape[-1])
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            total += inp[0].numel() * (2 if mod.affine else 1)
        elif isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.PReLU)):
            total += out.numel()
        elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            total += inp[0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "alexnet"])
def test_agrees_with_torch_pruning_counter_up_to_the_explained_extras(name):
    tv = pytest.importorskip("torchvision")
    tp = pytest.importorskip("torch_pruning")
    model = tv.models.get_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    ref_macs, ref_params = tp.utils.count_ops_and_params(model, x)
    assert count_params(model) == ref_params
    assert int(ref_macs) - count_macs(model, x) == _extras_counted_by_torch_pruning(model, x)


def test_hand_formula_conv_linear_attention():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                      nn.Flatten(), nn.Linear(8 * 5 * 5, 7))
    x = torch.randn(2, 3, 5, 5)
    want = 2 * (8 * 3 * 9 * 25 + 8 * 1 * 9 * 25 + 200 * 7)
    assert count_macs(m, x) == want
    q = torch.randn(1, 2, 6, 4)
    attn = count_macs(lambda q: nn.functional.scaled_dot_product_attention(q, q, q), (q,))
    assert attn == 2 * (2 * 6 * 6 * 4)  # q k^T and attn v


def test_per_layer_breakdown_sums_and_tied_params_count_once():
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(2, 4)
    per = macs_by_layer(m, x)
    assert per["0"] == 2 * 4 * 5 and per["2"] == 2 * 5 * 3 and per[""] == count_macs(m, x)
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 40


def test_counts_on_meta_allocate_nothing():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4096, 11008), nn.Linear(11008, 4096))
    assert count_macs(m, torch.randn(3, 4096, device="meta")) == 3 * 2 * 4096 * 11008


def test_multihead_attention_fast_path_is_counted():
    """The fused inference kernel of nn.MultiheadAttention is invisible to FlopCounterMode: counting switches
    it off, so eval/no-grad MACs equal the formula (projections + q k^T + attn v) and the flag is restored."""
    from secateur.metrics import count_macs
    e, h, t = 64, 4, 10
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval()

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    before = torch.backends.mha.get_fastpath_enabled()
    macs = count_macs(Self(), torch.randn(1, t, e))
    assert macs == t * e * 3 * e + t * e * e + 2 * t * t * e
    assert torch.backends.mha.get_fastpath_enabled() == before
