"""Selective state-space mixers (Mamba) and the tensor patterns they brought to the engine. Before, every Mamba
mixer kept its whole inner width (transformers' MambaForCausalLM ended at 1.0 of its MACs at ratio 0.5):

* its depthwise conv runs ``F.conv1d(x, conv1d.weight.squeeze(1).unsqueeze(1))``: an exact view of the
  parameter, now given the module's rule (capture.py ``Tracer.param_view``);
* ``A = -exp(A_log)`` [inner, state] meets the channels as ``A[None, :, None, :]``: computed from one parameter by
  elementwise ops and size-1 views, it is sliced like the parameter (graph/rules/constants.py ``track_derived``);
* the scan state starts as ``torch.zeros(batch, inner, state)`` sized from the input: a uniform fill
  (``track_uniform``), not a constant that varies along the channels;
* ``dt[..., None] * B[:, None]`` is an outer product of inner channels and state channels, and the state is then
  contracted with C: one side is kept whole, the other prunes (elementwise.py ``_outer_side``, matmul.py);
* ``split(x_proj(h), [self.time_step_rank, state, state])``: a cut at a named size (graph/splits.py);
* transformers' cache init dispatches a ``detach`` inside ``zeros_like`` under the capture only (verify.py).
Each test compares the pruned model with the oracle's reference, so a wrong slice fails it."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_oracle, assert_reloads, prune_causal_lm
from secateur.metrics import count_macs
from secateur.structured import prune_channels

torch.set_num_threads(1)


class TinyMixer(nn.Module):
    """A Mamba mixer in plain torch, written the way transformers' reference path writes it."""

    def __init__(self, d=16, inner=32, state=8, rank=6, k=4):
        super().__init__()
        self.time_step_rank, self.ssm_state_size = rank, state
        self.in_proj = nn.Linear(d, 2 * inner)
        self.conv1d = nn.Conv1d(inner, inner, k, groups=inner, padding=k - 1)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1).float()).repeat(inner, 1)
                                  + 0.1 * torch.randn(inner, state))
        self.D = nn.Parameter(torch.randn(inner))
        self.out_proj = nn.Linear(inner, d)

    def forward(self, h):
        seq = h.shape[1]
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)
        w = self.conv1d.weight.squeeze(1)
        x = F.silu(F.conv1d(x, w.unsqueeze(1), self.conv1d.bias, padding=w.shape[-1] - 1,
                            groups=x.shape[1])[..., :seq])
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.time_step_rank, self.ssm_state_size,
                                                                 self.ssm_state_size], dim=-1)
        dt = F.softplus(self.dt_proj.weight @ dt.transpose(1, 2) + self.dt_proj.bias[..., None])
        A = -torch.exp(self.A_log.float())
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = (dt[:, :, :, None] * B[:, None, :, :]) * x[:, :, :, None]
        state = torch.zeros(x.shape[0], x.shape[1], self.ssm_state_size)
        ys = []
        for i in range(seq):
            state = dA[:, :, i] * state + dBu[:, :, i]
            ys.append(torch.matmul(state, C[:, i, :].unsqueeze(-1))[:, :, 0])
        y = (torch.stack(ys, dim=-1) + x * self.D[None, :, None]) * F.silu(z)
        return self.out_proj(y.transpose(1, 2))


class TinyMamba(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.mixers = nn.ModuleList([TinyMixer(d), TinyMixer(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        for m in self.mixers:
            h = h + m(h)
        return self.head(h)


def _make():
    torch.manual_seed(0)
    return TinyMamba().eval()


def test_hand_written_mixer_prunes_its_inner_width_exactly(tmp_path):
    model, x = _make(), torch.randn(2, 7, 5)
    macs0 = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    mixer = model.mixers[0]
    assert mixer.conv1d.weight.shape == (16, 1, 4) and mixer.conv1d.groups == 16  # inner 32 -> 16
    assert mixer.A_log.shape == (16, 8) and mixer.D.shape == (16,) and mixer.dt_proj.weight.shape[0] == 16
    assert mixer.x_proj.weight.shape == (3 + 16, 16) and mixer.time_step_rank == 3  # the state (B, C) is kept
    assert count_macs(model, x) < 0.45 * macs0
    assert_reloads(_make, model, x, tmp_path)


def test_pruned_mixer_still_trains():
    model, x = _make(), torch.randn(4, 7, 5)
    prune_channels(model, x, ratio=0.5)
    assert model.mixers[0].D.shape == (16,)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(4, 7, 3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- the patterns one by one, with negatives
class FilledGate(nn.Module):
    """``h * torch.ones(...)`` sized from the input (uniform), or the same fill after a write (not uniform)."""

    def __init__(self, written: bool):
        super().__init__()
        self.up, self.down, self.written = nn.Linear(4, 12), nn.Linear(12, 2), written

    def forward(self, x):
        h = self.up(x)
        fill = torch.ones(h.shape[0], h.shape[1])
        if self.written:
            fill[:, 0] = 3.0  # no longer one value: channel 0 differs from the rest
        return self.down(h * fill)


@pytest.mark.parametrize("written", [False, True])
def test_uniform_fill_leaves_channels_free_and_a_written_one_does_not(written):
    torch.manual_seed(0)
    model, x = FilledGate(written).eval(), torch.randn(3, 4)
    assert_oracle(model, x, ratio=0.5)
    assert model.up.out_features == (12 if written else 6)


class DerivedScale(nn.Module):
    """``h * (-exp(p))[None, :, 0]``-style scales computed from a 2-D parameter, along its rows (sliceable) or
    after a transpose (the chain ends: kept)."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.up, self.down, self.transposed = nn.Linear(4, 10), nn.Linear(10, 2), transposed
        self.p = nn.Parameter(torch.randn(10, 10) if transposed else torch.randn(10, 3))

    def forward(self, x):
        h = self.up(x)
        s = -torch.exp(self.p.t() if self.transposed else self.p)
        return self.down(h * s[None, :, 0])


@pytest.mark.parametrize("transposed", [False, True])
def test_parameter_derived_scale_is_sliced_with_its_channels(transposed):
    torch.manual_seed(0)
    model, x = DerivedScale(transposed).eval(), torch.randn(3, 4)
    assert_oracle(model, x, ratio=0.5)
    if transposed:
        assert model.up.out_features == 10 and model.p.shape == (10, 10)
    else:
        assert model.up.out_features == 5 and model.p.shape == (5, 3)


class Outer(nn.Module):
    """An outer product of two channel sets, summed over the smaller one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.down = nn.Linear(4, 12), nn.Linear(4, 3), nn.Linear(12, 2)

    def forward(self, x):
        prod = self.a(x)[:, :, None] * self.b(x)[:, None, :]  # [n, 12, 3]
        return self.down(prod.sum(-1))


def test_outer_product_keeps_the_smaller_side_and_prunes_the_other():
    torch.manual_seed(0)
    model, x = Outer().eval(), torch.randn(3, 4)
    assert_oracle(model, x, ratio=0.5)
    assert model.a.out_features == 6 and model.b.out_features == 3


class HiddenStateMixer(nn.Module):
    """EfficientViM's mixer in small: the stream ``x [B, C, N]`` times the state weights ``ab [B, S, N]``
    transposed is a matmul whose rows carry stream channels and whose columns carry state channels."""

    def __init__(self, c=12, s=4, swap=False):
        super().__init__()
        self.swap = swap
        self.stem, self.bc = nn.Conv1d(3, c, 1), nn.Conv1d(c, 2 * s, 1)
        self.mix, self.head = nn.Conv1d(c, c, 1), nn.Linear(c, 2)

    def forward(self, x):
        x = self.stem(x)  # [B, C, N]
        b, c = self.bc(x).chunk(2, dim=1)  # [B, S, N] each
        ab = b.softmax(-1)
        h = (ab @ x.transpose(1, 2)).transpose(1, 2) if self.swap else x @ ab.transpose(1, 2)  # [B, C, S]
        h = self.mix(h)
        y = h @ c  # [B, C, N]
        return self.head(y.mean(-1))


@pytest.mark.parametrize("swap", [False, True])
def test_matmul_outer_product_keeps_the_state_whole_and_prunes_the_stream(swap):
    """Without the rule the stream and state channels were one unit (efficientvim_m1 kept its whole stream)."""
    torch.manual_seed(0)
    model, x = HiddenStateMixer(swap=swap).eval(), torch.randn(2, 3, 7)
    m0 = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert model.stem.out_channels == 6 and model.mix.out_channels == 6 and model.bc.out_channels == 8
    assert count_macs(model, x) < 0.6 * m0


def test_timm_efficientvim_prunes_its_stream():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("efficientvim_m1").eval(), torch.randn(1, 3, 224, 224)
    m0 = count_macs(model, x)
    assert_oracle(model, x, ratio=0.5)
    assert count_macs(model, x) < 0.35 * m0  # 0.51 when the stream was tied to the state channels


# ---------------------------------------------------------------- transformers' Mamba family
def _hf_mamba(kind):
    T = pytest.importorskip("transformers")
    cfg = dict(vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, time_step_rank=8,
               conv_kernel=4)
    if kind == "mamba":
        return lambda: T.MambaForCausalLM(T.MambaConfig(**cfg))
    return lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(**cfg))


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba"])
def test_transformers_mamba_prunes_inner_width_and_stream(kind, tmp_path):
    model, plan = prune_causal_lm(_hf_mamba(kind), tmp_path, below=0.4)
    assert not [n for n in plan.notes if "kept" in n and "group" in n], plan.notes
    mixer = model.backbone.layers[0].mixer
    assert mixer.conv1d.weight.shape[0] == 32 and mixer.A_log.shape == (32, 8)  # inner 64 -> 32
    assert model.backbone.embeddings.weight.shape == (100, 16)  # the residual stream halves too
