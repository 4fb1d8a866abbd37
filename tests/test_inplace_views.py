"""In-place writes into views (graph/rules/inplace.py) and the triangular solve of linear attention
(graph/rules/matmul.py ``solve_triangular``).

A per-step write ``out[:, t] = y`` changes the base ``out``, so its labels must follow, or readers of ``out`` see
no channels there. Before, every such write kept the channels on both sides (noted), which left recurrent and
linear-attention models at 0.4-0.98 of their MACs at ratio 0.5 (/work/prompts/try_hf.py, MACs after / dense:
qwen3_next 0.811 -> 0.448, olmo_hybrid 0.841 -> 0.449, rwkv 0.414 -> 0.277, kimi_linear 0.906 -> 0.531).
Each pattern is checked with the numeric oracle; the negatives (a write whose region cuts a channel dim at
positions the module does not name, a triangular system over channels) must keep those channels, noted."""
import pytest
import torch
from torch import nn

from helpers import assert_oracle, prune_causal_lm
from secateur.metrics import count_macs
from secateur.structured import plan_channels

torch.set_num_threads(1)

_NOTE = "writes channels into a view of another tensor"


class StepWrite(nn.Module):
    """A recurrence over time whose per-step outputs fill a zeros buffer: ``buf[:, t] = tanh(state)``."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.decay, self.out = nn.Linear(5, d), nn.Parameter(torch.rand(d)), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        buf = torch.zeros_like(h)
        state = torch.zeros_like(h[:, 0])
        for t in range(h.shape[1]):
            state = self.decay * state + h[:, t]
            buf[:, t] = torch.tanh(state)
        return self.out(buf)


class TransposedStepWrite(StepWrite):
    """The buffer is a transposed view made *before* the loop, of a base laid out [B, C, T] (recurrent_gemma's scan
    output is not contiguous either): each write goes through a view of a view, and the buffer read after the loop
    is a view whose labels were set before the writes."""

    def forward(self, x):
        h = self.inp(x)
        buf = torch.zeros(h.shape[0], h.shape[2], h.shape[1]).transpose(1, 2)
        for t in range(h.shape[1]):
            buf[:, t] = torch.sigmoid(h[:, t]) * h[:, t]
        return self.out(buf)


class SliceWrite(nn.Module):
    """Two slice writes along time (``buf[:, :k] = ...``, ``buf[:, k:] = ...``), one of them an ``add_`` on the
    view: the base holds the same channels at every time step."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.out = nn.Linear(5, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        buf = h.new_zeros(h.shape)
        k = h.shape[1] // 2
        buf[:, :k] = torch.relu(h[:, :k])
        buf[:, k:] = h[:, k:] * 2
        buf[:, k:].add_(h[:, :1])
        return self.out(buf)


class StateCopy(nn.Module):
    """``state.copy_(y)`` into one row of a stacked state buffer [2, B, C] (a cache of two layers), read back later
    through another view of the same row."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(5, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        cache = torch.zeros(2, h.shape[0], h.shape[2])
        cache[1].copy_(h.mean(1))
        cache[0].copy_(torch.tanh(self.mix(h[:, -1])))
        return self.out(h + cache[1].unsqueeze(1) * cache[0].unsqueeze(1))


class RootCopyReadThroughView(nn.Module):
    """``state.copy_(y)`` into a whole tensor (not a view) that the model reads through a view it made before the
    write: the view's labels are read again from the state's."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.out = nn.Linear(5, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        state = torch.zeros(h.shape[0], h.shape[2])
        seen = state.unsqueeze(1)
        state.copy_(h.amax(1))
        return self.out(h * seen)


class TriangularSolve(nn.Module):
    """The gated delta net's UT transform: ``X = A^-1 V`` with ``A [B, T, T]`` unit lower triangular over time,
    built from the keys, and V's channels along its last dim (they ride along in the columns)."""

    def __init__(self, d=16):
        super().__init__()
        self.k, self.v, self.out = nn.Linear(5, 6), nn.Linear(5, d), nn.Linear(d, 3)

    def forward(self, x):
        k, v = self.k(x), self.v(x)
        a = torch.tril(k @ k.transpose(1, 2) * 0.1, -1) + torch.eye(x.shape[1])
        return self.out(torch.linalg.solve_triangular(a, v, upper=False, unitriangular=True))


@pytest.mark.parametrize("cls", [StepWrite, TransposedStepWrite, SliceWrite, StateCopy, RootCopyReadThroughView])
def test_writes_through_views_prune_exactly(cls):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(2, 7, 5)
    macs0 = count_macs(model, x)
    plan = assert_oracle(model, x, ratio=0.5)
    assert not any(_NOTE in n for n in plan.notes)
    assert model.inp.out_features == 8 and model.out.in_features == 8
    assert count_macs(model, x) < 0.75 * macs0


def test_triangular_solve_carries_the_right_hand_sides_channels():
    torch.manual_seed(0)
    model, x = TriangularSolve().eval(), torch.randn(2, 7, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert not any("has no rule" in n for n in plan.notes)
    assert model.v.out_features == 8 and model.out.in_features == 8


class TriangularOverChannels(nn.Module):
    """Negative: the system matrix is built over channels (``A [B, C, C]``), so the solve mixes them."""

    def __init__(self, d=8):
        super().__init__()
        self.v, self.out = nn.Linear(5, d), nn.Linear(d, 3)

    def forward(self, x):
        v = self.v(x)  # [B, T, C]
        a = v.transpose(1, 2) @ v * 0.01  # only its lower triangle is read
        a.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return self.out(torch.linalg.solve_triangular(a, v.transpose(1, 2), upper=False).transpose(1, 2))


def test_triangular_solve_over_channels_keeps_them():
    torch.manual_seed(0)
    model, x = TriangularOverChannels().eval(), torch.randn(2, 7, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert any("linalg_solve_triangular has no rule" in n for n in plan.notes)
    assert model.v.out_features == 8  # kept whole


class ChannelSliceWrite(nn.Module):
    """Negative: ``buf[..., :8] = a; buf[..., 8:] = b`` writes channels at positions fixed in the code (8), so the
    regions cut the channel dim: not exact after pruning (a and b shrink, 8 does not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(16, 3)

    def forward(self, x):
        buf = torch.zeros(x.shape[0], x.shape[1], 16)
        buf[..., :8] = self.a(x)
        buf[..., 8:] = self.b(x)
        return self.out(buf)


def test_write_cutting_a_channel_dim_keeps_its_channels():
    torch.manual_seed(0)
    model, x = ChannelSliceWrite().eval(), torch.randn(2, 7, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert any(_NOTE in n for n in plan.notes)
    assert model.a.out_features == 8 and model.b.out_features == 8 and model.out.in_features == 16


class NamedSliceWrite(nn.Module):
    """A concatenation written in two parts at a position the module names (Hunyuan-V4's key states:
    ``key_states[..., :self.qk_nope_head_dim].copy_(k_nope)``), into memory sized from its attributes: a cut
    (graph/splits.py) whose bounds and size follow the pruning, proven by the dry run."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(14, 3)
        self.a_dim, self.width = 8, 14

    def forward(self, x):
        buf = x.new_empty(x.shape[0], x.shape[1], self.width)
        buf[..., :self.a_dim].copy_(self.a(x))
        buf[..., self.a_dim:].copy_(torch.relu(self.b(x)))
        return self.out(buf)


def test_write_at_named_channel_positions_prunes_within_each_part():
    torch.manual_seed(0)
    model, x = NamedSliceWrite().eval(), torch.randn(2, 7, 5)
    plan = assert_oracle(model, x, ratio=0.5)
    assert not any(_NOTE in n for n in plan.notes)
    assert (model.a.out_features, model.b.out_features, model.out.in_features) == (4, 3, 7)
    assert (model.a_dim, model.width) == (4, 7)


def _hf(model_type):
    pytest.importorskip("transformers")
    from zoo_models import _causal_lm_class, hf_small_config
    return lambda: _causal_lm_class(model_type)(hf_small_config(model_type))


@pytest.mark.parametrize("model_type", ["qwen3_next", "olmo_hybrid"])
def test_transformers_gated_delta_net_prunes_its_heads(model_type, tmp_path):
    """The chunked gated delta rule: per-chunk writes ``core_attn_out[:, :, i] = ...`` and two triangular solves
    per layer; before, both kept every linear-attention head (0.811 / 0.841 of the MACs)."""
    model, plan = prune_causal_lm(_hf(model_type), tmp_path, below=0.5)
    assert not any(_NOTE in n or "solve_triangular" in n for n in plan.notes)
    mixer = next(m for n, m in model.named_modules() if n.endswith("layers.0.linear_attn"))
    assert mixer.A_log.numel() < 4  # value heads removed, the head counts followed (proven by the dry run)


def test_transformers_rwkv_writes_its_outputs_per_step(tmp_path):
    model, plan = prune_causal_lm(_hf("rwkv"), tmp_path, below=0.5)
    assert not any(_NOTE in n for n in plan.notes)
