"""Dependency-graph rules: each coupling checked on a tiny model, plus the oracle (zeroing == removal)."""

import pytest
import torch
from torch import nn

from helpers import assert_oracle
from secateur.errors import PruningError
from secateur.graph import build_groups
from secateur.structured import plan_channels

torch.set_num_threads(1)


def _oracle(model, x, **kw):
    """Prune with a plan, compare with the original whose pruned channels are zeroed at their consumers."""
    torch.manual_seed(0)
    return assert_oracle(model, x, **kw)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.normal_(generator=g)
            m.bias.data.normal_(generator=g)
    return model


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        x = self.a(x).relu()
        x = x + self.b(x)  # residual: a and b outputs pruned together
        x = torch.cat([x, self.c(x)], 1)[:, ::1]  # concatenation: index ranges (and a no-op slice)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(x.flatten(1))  # flatten: each channel owns 16 input features


def test_residual_cat_flatten_groups_and_oracle():
    m, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    groups = build_groups(m, x)
    names = {g.name: g for g in groups}
    g = names["a"]
    assert {mem.qualname for mem in g.members} >= {"a.weight", "b.weight", "c.weight", "head.weight"}
    head = next(mem for mem in g.members if mem.qualname == "head.weight")
    assert head.dim == 1 and head.index.numel() == 8 * 16  # flatten mapping: 16 features per channel
    assert torch.equal(torch.bincount(head.channel), torch.full((8,), 16))
    _oracle(m, x, ratio=0.5)
    assert m.a.out_channels == m.b.out_channels == 4 and m.head.in_features == 8 * 16


@pytest.mark.parametrize("grouped", ["channels", "groups"])
def test_depthwise_and_grouped_conv(grouped):
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                      nn.Conv2d(8, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=4), nn.Conv2d(12, 4, 1)).eval()
    _randomize_bn(m)
    x = torch.randn(1, 3, 6, 6)
    _oracle(m, x, ratio=0.5, grouped=grouped)
    assert m[3].groups == m[3].in_channels == m[3].out_channels == 4  # depthwise: whole groups in both modes
    if grouped == "groups":
        assert m[5].groups == 2 and m[5].in_channels == m[5].out_channels == 6  # whole groups of 3 in, 3 out
    else:  # one of the 3 local channels of every group, inputs and outputs apart
        assert m[5].groups == 4 and m[5].in_channels == m[5].out_channels == 8


def test_groupnorm_prunes_whole_groups_layernorm_prunes_with_a_note():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    _oracle(m, x, ratio=0.5)
    assert m[1].num_groups == 2 and m[1].num_channels == 4
    ln = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    plan = _oracle(ln, torch.randn(2, 4), ratio=0.5)  # more: tests/test_norm_reference.py
    assert ln[1].normalized_shape == (3,) and any("LayerNorm" in n and "statistics" in n for n in plan.notes)


def test_model_output_channels_never_pruned():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1))  # SqueezeNet-like
    x = torch.randn(1, 3, 4, 4)
    _oracle(m, x, ratio=0.9)
    assert m(x).shape == (1, 10, 1, 1) and m[2].in_channels < 8


def test_unknown_op_keeps_its_channels_with_a_note_naming_op_and_module():
    """An op without a rule (here fft) keeps every channel it reads (never a guess): the conv before it is not
    pruned, the note names the op and the module, and the model still computes the same output."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.conv = nn.Conv2d(8, 4, 1)
            self.post = nn.Identity()

        def forward(self, x):
            return self.post(torch.fft.fft(self.conv(torch.relu(self.stem(x)))).real)

    torch.manual_seed(0)
    m, x = Odd(), torch.randn(1, 3, 4, 4)
    plan = plan_channels(m, x, ratio=0.5)
    assert any("fft" in n and "has no rule" in n for n in plan.notes)
    ref = m(x)
    plan.apply(m)
    assert m.conv.out_channels == 4 and m.stem.out_channels == 4  # what fft reads stays, the rest prunes
    assert m(x).shape == ref.shape


def test_unequal_split_and_fixed_slices_are_kept():
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            p, q = self.a(x).split([2, 4], 1)
            return self.b(p) + self.c(q)

    m, x = S(), torch.randn(1, 3, 4, 4)
    assert all(g.name != "a" or g.size == 1 for g in build_groups(m, x))  # all-or-nothing: never pruned
    _oracle(m, x, ratio=0.5)


def test_chunk_and_channel_shuffle_stay_consistent():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            x1, x2 = self.a(x).chunk(2, dim=1)
            y = torch.cat([x1, self.b(x2)], 1)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.c(y)

    m, x = Shuffle(), torch.randn(1, 3, 4, 4)
    _oracle(m, x, ratio=0.5)


def test_free_parameters_follow_their_channels():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.scale = nn.Parameter(torch.rand(8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x) * self.scale
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
            return self.head(t.mean(1))

    m, x = Tok(), torch.randn(2, 5, 4)
    _oracle(m, x, ratio=0.5)
    assert m.cls.shape == (1, 1, 4) and m.scale.shape == (4,)


def test_weight_tying_kept_consistent():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, i):
            return self.out(self.mid(self.emb(i)).relu() + self.emb(i))

    m, x = Tied(), torch.randint(0, 10, (2, 3))
    _oracle(m, x, ratio=0.5)
    assert m.out.weight is m.emb.weight and m.emb.embedding_dim == 4 and m.out.in_features == 4


def test_lstm_hidden_units_are_pruned():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.rnn, self.b = nn.Linear(3, 6), nn.LSTM(6, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(self.rnn(self.a(x))[0])

    m = R()
    _oracle(m, torch.randn(2, 4, 3), ratio=0.5)  # more cases: tests/test_recurrent.py
    assert m.rnn.hidden_size == 3 and m.rnn.input_size == 3 and m.b.in_features == 3


def test_attention_heads_gqa_whole_groups():
    class Attn(nn.Module):
        def __init__(self, h=4, kv=2, d=3):
            super().__init__()
            self.h, self.kv, self.d = h, kv, d
            self.q, self.k, self.v = nn.Linear(6, h * d), nn.Linear(6, kv * d), nn.Linear(6, kv * d)
            self.o = nn.Linear(h * d, 6)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, -1, self.d).transpose(1, 2)
            k = self.k(x).view(b, t, -1, self.d).transpose(1, 2)
            v = self.v(x).view(b, t, -1, self.d).transpose(1, 2)
            y = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(b, t, -1))

    m, x = Attn(), torch.randn(2, 5, 6)
    groups = [g for g in build_groups(m, x) if g.name == "q"]
    assert len(groups) == 1 and groups[0].size == 2  # two key/value groups of 2 query heads each
    _oracle(m, x, ratio=0.5)
    assert m.q.out_features == 6 and m.k.out_features == 3


def test_meta_device_capture_allocates_nothing():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4096, 11008), nn.SiLU(), nn.Linear(11008, 4096))
    groups = build_groups(m, torch.randn(1, 4, 4096, device="meta"))
    assert groups[0].size == 11008


def test_a_size_kept_by_the_root_forward_drops_only_its_group():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self._width = 8  # private: never updated (a public one is, where proven: graph/size_attrs.py)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 6)
            self.c, self.d = nn.Linear(6, 10), nn.Linear(10, 3)

        def forward(self, x):
            y = self.a(x).reshape(x.size(0), self._width)  # the engine cannot update self._width
            return self.d(torch.relu(self.c(self.b(y))))

    m, x = Root(), torch.randn(2, 4)
    plan = _oracle(m, x, ratio=0.5)
    assert m.a.out_features == 8 and m.c.out_features == 5  # the culprit kept, the rest still pruned
    assert any("pruned forward failed" in n for n in plan.notes)


def test_unfold_and_fold_carry_channels():
    """nn.Unfold lays channel c's kh*kw cells at c*kh*kw + cell; nn.Fold sums them back: both map channels exactly
    (VOLO's outlook attention), so the convs around them prune and the oracle holds."""
    class U(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.unfold = nn.Unfold(3, padding=1)
            self.mix = nn.Conv1d(8 * 9, 8 * 9, 1)
            self.fold = nn.Fold((6, 6), 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = self.fold(self.mix(self.unfold(y)))
            return self.b(y)

    torch.manual_seed(0)
    m, x = U(), torch.randn(2, 3, 6, 6)
    assert_oracle(m, x, ratio=0.5)
    assert m.a.out_channels == 4 and m.mix.in_channels == 36 and m.mix.out_channels == 36 and m.b.in_channels == 4


def test_count_macs_when_a_module_input_is_a_parameter():
    """FlopCounterMode's module tracker hooks the grads of module inputs; a parameter passed as one (PiT's
    cls tokens) has no grad accumulator to hook with grad mode off. count_macs still counts, and exactly."""
    from secateur.metrics import count_macs

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, pair):
            x, tok = pair
            return self.fc(x) + tok

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Parameter(torch.zeros(4))
            self.inner = Inner()

        def forward(self, x):
            return self.inner((x, self.tok))

    assert count_macs(Outer(), torch.randn(3, 4)) == 3 * 4 * 4


class _InputThroughNorm(nn.Module):
    """Four channels from a conv and two straight from the model's input, concatenated, then a norm layer."""

    def __init__(self, norm, channels_last=False):
        super().__init__()
        self.c, self.n, self.h, self.channels_last = nn.Conv2d(1, 4, 1), norm, nn.Conv2d(6, 4, 1), channels_last

    def forward(self, x):
        y = torch.cat([self.c(x[:, :1]), x[:, 1:]], 1)
        y = self.n(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.channels_last else self.n(y)
        return self.h(y)


@pytest.mark.parametrize("norm,channels_last,kept", [
    (lambda: nn.BatchNorm2d(6), False, 2), (lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True), False, 2),
    (lambda: nn.GroupNorm(6, 6), False, 2), (lambda: nn.GroupNorm(3, 6), False, 2),
    (lambda: nn.GroupNorm(2, 6), False, 4),  # its second group holds the input's channels: the conv's 4th too
    (lambda: nn.GroupNorm(1, 6), False, 2), (lambda: nn.LayerNorm(6), True, 2), (lambda: nn.PReLU(6), False, 2),
], ids=["batch", "instance", "group6", "group3", "group2", "group1", "layer", "prelu"])
def test_a_norm_over_channels_of_the_models_input_prunes_the_layers_channels_only(norm, channels_last, kept):
    """Was an internal 'slot size mismatch' error for every norm module (found by tests/test_engine_fuzz.py): the
    input's channels have no producer, so the norm's parameters there get channels of their own, never pruned."""
    torch.manual_seed(0)
    model = _randomize_bn(_InputThroughNorm(norm(), channels_last)).eval()
    x = torch.randn(2, 3, 4, 4)
    _oracle(model, x, ratio=0.5)
    assert model.c.out_channels == kept and model.h.in_channels == kept + 2


def test_multihead_attention_over_channels_of_the_models_input():
    """The same for nn.MultiheadAttention's input projection (an internal error before): the input's columns stay,
    the layer's columns prune with it; with key and value from another layer, a column any of q/k/v reads from the
    input stays in all three (one weight reads them)."""
    class M(nn.Module):
        def __init__(self, kv_from_layer):
            super().__init__()
            self.l, self.kv = nn.Linear(3, 4), nn.Linear(5, 6)
            self.a, self.h, self.kv_from_layer = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 2), kv_from_layer

        def forward(self, x):
            y = torch.cat([self.l(x[..., :3]), x[..., 3:]], -1)
            kv = self.kv(x) if self.kv_from_layer else y
            return self.h(self.a(y, kv, kv)[0])

    for kv_from_layer in (False, True):
        torch.manual_seed(0)
        model = M(kv_from_layer).eval()
        _oracle(model, torch.randn(2, 5, 5), ratio=0.5)
        assert model.l.out_features == 2 and model.a.in_proj_weight.shape[1] == 4
        assert model.kv.out_features == (4 if kv_from_layer else 6)  # its columns 4, 5 meet the input's channels in q: they stay
