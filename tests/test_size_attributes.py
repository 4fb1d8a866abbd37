"""Sizes a model keeps in its own attributes (graph/size_attrs.py, issue #3): the dry run proves the update, or the
groups stay whole. Hand-written modules reproduce each pattern (timm's ``Scale`` with a stored view shape, a split
by attribute sizes, an attribute that equals a channel count but is not one, a literal size, a partial residual);
timm models that used to stay near dense for this reason are pruned deeply and pass the oracle."""
import pytest
import torch
from torch import nn

from helpers import assert_oracle, assert_reloads
from secateur.metrics import count_macs
from secateur.structured import plan_channels


class Scale(nn.Module):
    """timm's ``Scale``: the view shape is stored at construction."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


class ScaleNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.scale = Scale(c)
        self.conv2 = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.scale(self.conv1(x))))


class SplitGate(nn.Module):
    """``a, b = split(x, [self.width, self.width])``, plus ``self.dim`` (equal to the channel count) used as a
    number, never as a size: updating it would change the values, and the dry run cannot see that, so the search
    must not keep it (it is not needed for any shape)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.width, self.dim = c, c
        self.conv1 = nn.Conv2d(3, 2 * c, 1)
        self.conv2 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        a, b = torch.split(self.conv1(x), [self.width, self.width], dim=1)
        return self.conv2(a * torch.sigmoid(b) / self.dim)


class Literal(nn.Module):
    """A size written in the code: ``reshape(B, 16, -1)`` would silently absorb a smaller count in the ``-1``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv1(x)
        return self.fc(y.reshape(y.shape[0], 16, -1).mean(-1))


def _x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8)


def _reloads(make, model, x, tmp_path):
    assert_reloads(make, model, x, tmp_path)


def test_stored_view_shape_is_updated_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, x = ScaleNet().eval(), _x()
    plan = assert_oracle(model, x, ratio=0.5)
    assert plan.attrs == {"scale": {"shape": (8, 1, 1)}}
    assert model.scale.shape == (8, 1, 1) and model.conv1.out_channels == 8
    assert any("scale.shape: (16, 1, 1) -> (8, 1, 1)" in n for n in plan.notes)  # never silent
    _reloads(ScaleNet, model, x, tmp_path)


def test_split_sizes_from_an_attribute_and_a_number_left_alone(tmp_path):
    torch.manual_seed(0)
    model, x = SplitGate().eval(), _x()
    plan = assert_oracle(model, x, ratio=0.5)
    assert plan.attrs == {"": {"width": 8}}  # ``dim`` equals the old size too, but no shape needs it: kept
    assert model.dim == 16 and model.conv1.out_channels == 16
    _reloads(SplitGate, model, x, tmp_path)


def test_a_literal_size_keeps_its_groups_whole():
    torch.manual_seed(0)
    model, x = Literal().eval(), _x()
    plan = assert_oracle(model, x, ratio=0.5)
    assert not plan.choices and not plan.attrs
    assert any("pruned shapes differ" in n for n in plan.notes)
    assert model.conv1.out_channels == 16


def test_an_attribute_update_the_dry_run_cannot_prove_is_not_made():
    """Without the dry run nothing is proven: ``verify=False`` leaves every attribute as it was."""
    torch.manual_seed(0)
    model, x = ScaleNet().eval(), _x()
    plan = plan_channels(model, x, ratio=0.5, verify=False)
    assert plan.attrs == {}


# model -> (input size, what the model keeps, MACs after / dense at ratio 0.5 before graph/size_attrs.py)
# (input size, what it keeps (MACs after / dense before), found by the attribute search: False where a per-class
# updater now sets it: timm's RelPosMlp, graph/timm_sizes.py)
SLOW = {
    "visformer_tiny": (224, "Attention.num_heads on a conv qkv (0.535)", True),
    "efficientvim_m1": (64, "d_inner: split_with_sizes [128, 128] (0.735)", True),
    "vit_relpos_small_patch16_224": (224, "RelPosMlp.num_heads, bias_shape (0.697)", False),
}


def _timm_case(name, size, searched=True):
    from test_zoo import oracle
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    dense = count_macs(model, x)
    plan = oracle(model, x)
    if searched:
        assert plan.attrs, "no attribute was updated"
    return model, x, count_macs(model, x) / dense


@pytest.mark.zoo
def test_caformer_scale_shapes_and_attention_dim_then_reload(tmp_path):
    """Scale.shape and Attention.attention_dim (0.561 of dense MACs before, at 64 px): pruned, exact, reloaded."""
    model, x, frac = _timm_case("caformer_s18", 64)
    assert frac < 0.35
    import timm
    _reloads(lambda: timm.create_model("caformer_s18", pretrained=False), model, x, tmp_path)


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_timm_sizes_kept_in_attributes(name):
    size, what, searched = SLOW[name]
    _, _, frac = _timm_case(name, size, searched)
    assert frac < 0.55, what


def test_a_public_head_count_behind_view_minus_one_is_updated():
    """tests/test_verify_shapes.py's stale-heads attention (``view(b, t, 3, self._n_h, -1)``: the ``-1`` hides a
    stale count, a silently wrong model), with the count public: the heads are pruned and the count follows."""
    from test_verify_shapes import StaleHeads, _net
    model, x = _net()
    for m in model.modules():
        if isinstance(m, StaleHeads):
            m.n_h = m._n_h
            m.forward = _public_heads.__get__(m)
    plan = assert_oracle(model, x, ratio=0.5)
    assert "blocks.0.attn.qkv" in {g.name for g, _ in plan.choices}
    assert plan.attrs == {"blocks.0.attn": {"n_h": 2}} and model.blocks[0].attn.n_h == 2


def _public_heads(self, x):
    b, t, _ = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.n_h, -1).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, t, -1))


def test_control_flow_on_a_public_size_follows_it():
    """test_verify_shapes.py's ``Branchy`` with its width public: updated, the branch is taken as before pruning
    (the same op sequence, every shape the plan's), and the oracle holds."""
    from test_verify_shapes import Branchy
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(3, 8)
    model.width = model._width
    model.forward = _public_branch.__get__(model)
    plan = assert_oracle(model, x, ratio=0.5)
    assert plan.choices and plan.attrs == {"": {"width": 8}}


def _public_branch(self, x):
    h = torch.relu(self.fc1(x))
    if h.shape[-1] == self.width:
        h = h * 2.0 + 1.0
    return self.fc2(h)


class Streams(nn.Module):
    """Several copies of one stream side by side, as in Qwen4-exp's hyper connections: the module checks its input
    width against ``self.count * self.width`` and then splits it ``(self.count, self.width)``. Halving the stream
    halves the input, so both ``count`` (4 -> 2: another group of 4 channels halves too, a size the plan moves)
    and ``width`` (8 -> 4) pass the check and get the dry run equally far; only ``width`` then splits it as the
    plan does. ``count`` comes first in the search's order, so a greedy search takes it and never gets back."""

    def __init__(self, count: int = 4, width: int = 8, private: bool = False) -> None:
        super().__init__()
        self.count = count
        if private:
            self._width = width  # never updated (leading ``_``): no update can prove this module's split
        else:
            self.width = width
        self.scale = nn.Parameter(torch.rand(count, 1) + 0.5)

    def forward(self, s):
        width = self._width if hasattr(self, "_width") else self.width
        if s.shape[-1] != self.count * width:
            raise ValueError(f"expected {self.count * width} features, got {s.shape[-1]}")
        s = torch.relu(s)
        return (s.view(-1, self.count, width) * self.scale.view(4, 1)).mean(1)


class StreamsNet(nn.Module):
    def __init__(self, private: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = Streams(private=private)
        self.out = nn.Linear(8, 3)
        self.gate = nn.Linear(6, 4)  # 4 channels halved by the plan: the (wrong) option count 4 -> 2
        self.gate_out = nn.Linear(4, 3)

    def forward(self, x):
        s = self.inp(x).repeat(1, 4)
        return self.out(self.block(s)) + self.gate_out(torch.relu(self.gate(x)))


def test_the_search_backtracks_to_the_size_that_splits_as_the_plan_does(tmp_path):
    """Greedy, the search took ``count`` (first, and as far as ``width``), then failed at the split and kept the
    stream whole; it now tries the other first steps (size_attrs.BACKTRACK_TRIALS) and proves ``width``."""
    torch.manual_seed(0)
    model, x = StreamsNet().eval(), torch.randn(5, 6)
    dense = count_macs(model, x)
    plan = assert_oracle(model, x, ratio=0.5)
    assert plan.attrs == {"block": {"width": 4}}
    assert model.block.width == 4 and model.block.count == 4 and model.inp.out_features == 4
    assert any("block.width: 8 -> 4" in n for n in plan.notes)
    assert count_macs(model, x) < 0.6 * dense
    _reloads(StreamsNet, model, x, tmp_path)


def test_no_update_that_splits_as_the_plan_does_keeps_the_stream_whole():
    """The same module with its width private: ``count`` still passes the check but no update proves the split;
    the stream stays whole (noted), nothing is updated, the other group is pruned, and the oracle holds."""
    torch.manual_seed(0)
    model, x = StreamsNet(private=True).eval(), torch.randn(5, 6)
    plan = assert_oracle(model, x, ratio=0.5)
    assert plan.attrs == {} and model.block.count == 4 and model.block._width == 8
    assert model.inp.out_features == 8 and model.gate.out_features == 2
    assert any(n.startswith("block") and "kept" in n for n in plan.notes)
