"""Weights used outside their module (``F.linear(x, self.qkv.weight, bias)``, timm BEiT / EVA) and relative
position bias tables gathered by rows: pruned with their channels, not kept whole (issue #3), oracle exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_oracle
from secateur.metrics import count_macs


class BiasCatAttention(nn.Module):
    """BEiT-style: q/k/v bias concatenated (k's a zero buffer), qkv weight read by F.linear, a per-head
    relative bias gathered from a [distances, heads] table."""

    def __init__(self, dim=32, heads=4, tokens=5):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class Net(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.attn = BiasCatAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attn(x)
        return self.fc2(F.gelu(self.fc1(x)))


def test_functional_linear_weight_and_gathered_table_are_pruned_exactly():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 16)
    dense = count_macs(model, x)
    plan = assert_oracle(model, x, ratio=0.5)
    att = model.attn
    assert att.qkv.weight.shape == (48, 16)  # 2 of 4 heads (q, k, v rows) and half the stream
    assert att.num_heads == 2 and att.table.shape == (9, 2) and att.k_bias.shape == (16,)
    assert att.q_bias.shape == att.v_bias.shape == (16,)
    assert count_macs(model, x) < 0.5 * dense
    assert not [n for n in plan.notes if "kept" in n]


def test_matrix_of_a_non_linear_module_keeps_its_rows_and_follows_the_stream():
    """A 2-d parameter that is not an nn.Linear's weight, read by F.linear: no size attribute records its rows, so
    they stay whole; its columns read the stream and are sliced with it (zeroing a column is removing that input)."""
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(12, 16))
            self.out = nn.Linear(12, 3)

        def forward(self, x):
            return self.out(F.linear(self.inp(x), self.w))

    torch.manual_seed(0)
    model = Raw().eval()
    x = torch.randn(4, 8)
    assert_oracle(model, x, ratio=0.5)
    assert model.w.shape == (12, 8) and model.inp.out_features == 8 and model.out.in_features == 12


def test_weight_shared_by_module_and_functional_call_is_one_slice():
    """The same Linear called as a module and read by F.linear: one set of rows and columns, pruned once."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.lin = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.lin(h) + F.linear(h, self.lin.weight) * 0.5)

    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(4, 8)
    assert_oracle(model, x, ratio=0.5)
    assert model.lin.weight.shape == (8, 8)


@pytest.mark.zoo
def test_timm_beit_prunes_the_stream_and_heads():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=4).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert count_macs(model, x) < 0.45 * dense  # was 0.79: F.linear's weight made the stream all-or-nothing
    assert model.blocks[0].attn.num_heads == 2
    assert model.blocks[0].attn.relative_position_bias_table.shape[1] == 2


class HeadDimTable(nn.Module):
    """SAM-style decomposed relative position: a table over head dims, shared by every head."""

    def __init__(self, dim=32, heads=4, tokens=5):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_pos = nn.Parameter(torch.randn(2 * tokens - 1, dim // heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", pos[:, None] - pos[None, :] + tokens - 1, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel = torch.einsum("bhqc,qkc->bhqk", q, self.rel_pos[self.index])
        attn = ((q @ k.transpose(-2, -1)) * 0.25 + rel).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_table_over_head_dims_stays_constant_and_heads_still_prune():
    """Labelling that table's columns would tie every head into one unit (samvit kept whole): heads must go."""
    class Net2(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(16, 32), HeadDimTable(), nn.Linear(32, 10)

        def forward(self, x):
            return self.out(self.attn(self.inp(x)))

    torch.manual_seed(0)
    model = Net2().eval()
    x = torch.randn(2, 5, 16)
    assert_oracle(model, x, ratio=0.5)
    assert model.attn.num_heads == 2 and model.attn.rel_pos.shape == (9, 8)


class HyperConnection(nn.Module):
    """DeepSeek-V4 / HY-V4 style: ``streams`` copies of the residual stream, mixed by gates that a free matrix
    ``fn [2 * streams, streams * dim]`` computes from all of them (F.linear after an unweighted RMS statistic);
    ``pre`` collapses the copies into the block's input, ``post`` spreads the block's output back."""

    def __init__(self, dim, streams):
        super().__init__()
        self.streams = streams
        self.fn = nn.Parameter(torch.randn(2 * streams, streams * dim) * 0.1)
        self.base = nn.Parameter(torch.randn(2 * streams))

    def forward(self, h):
        flat = h.flatten(2)
        mixes = F.linear(flat, self.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
        pre, post = (torch.sigmoid(mixes + self.base)).split(self.streams, dim=-1)
        return post, (pre.unsqueeze(-1) * h).sum(dim=2)


class HyperNet(nn.Module):
    def __init__(self, dim=16, streams=3):
        super().__init__()
        self.streams = streams
        self.inp = nn.Linear(8, dim)
        self.hc = HyperConnection(dim, streams)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.inp(x).unsqueeze(2).expand(-1, -1, self.streams, -1)
        post, y = self.hc(h)
        h = post.unsqueeze(-1) * self.down(F.gelu(self.up(y))).unsqueeze(-2) + h
        return self.head(h.sum(2))


def test_hyper_connection_streams_prune_with_their_gate_matrix():
    """Before, ``F.linear(flat, fn)`` read ``fn`` as a constant: every stream channel collapsed into one unit
    there, so the residual stream was kept whole (hy_v4 0.60 of dense MACs at ratio 0.5, 0.33 with this)."""
    torch.manual_seed(0)
    model = HyperNet().eval()
    x = torch.randn(2, 5, 8)
    dense = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert model.inp.out_features == 8 and model.hc.fn.shape == (6, 3 * 8)  # rows (the gates) whole
    assert model.up.out_features == 16 and model.head.in_features == 8
    assert count_macs(model, x) < 0.5 * dense


class _Sizes:
    """Sizes held by a plain object the module shares (a config): not a module attribute the search may update."""
    width = 8


class SplitsBySharedSize(nn.Module):
    """Reads the stream (a gate of one channel: it writes none), and splits its inner width by a size it shares
    with no module: the inner group cannot be pruned (its dry run fails), the stream it reads can."""

    def __init__(self, dim=16):
        super().__init__()
        self.cfg = _Sizes()
        self.a, self.b = nn.Linear(dim, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        h = h.reshape(*h.shape[:-1], 2, self.cfg.width // 2).flip(-2).flatten(-2)
        return self.b(h)


class SharedSizeNet(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.blk = SplitsBySharedSize(dim)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.inp(x)
        h = h * torch.sigmoid(self.blk(h))
        return self.head(h + self.down(F.relu(self.up(h))))


def test_failing_module_keeps_its_own_groups_not_the_stream_it_reads():
    """A module whose pruned forward fails loses the groups it makes; the residual stream it only reads stays
    pruned (before, every group with a member there was kept, the stream of the whole model with it)."""
    torch.manual_seed(0)
    model = SharedSizeNet().eval()
    x = torch.randn(2, 5, 8)
    plan = assert_oracle(model, x, ratio=0.5)
    assert model.blk.a.out_features == 8 and model.inp.out_features == 8 and model.up.out_features == 16
    assert any(n.startswith("blk:") and "kept" in n for n in plan.notes), plan.notes
