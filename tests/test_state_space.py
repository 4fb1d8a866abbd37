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
Mamba-2 (transformers' Mamba2, Bamba, Zamba2, Falcon-H1, Nemotron-H, GraniteMoeHybrid) kept every head of its
mixers (0.95-0.996 of dense MACs): its scan copies B / C to the heads (``repeat_interleave``), contracts them
(``G = C.B``) and multiplies by per-head decays, so the copies tied every head into one unit. Now:

* a copy to ``num_heads`` gets one atom per head position, the source (B / C state) kept whole
  (rules/movement.py ``_repeat_to_heads``); with ``n_groups > 1`` head ``j`` of every group is one unit;
* the chunk states start as ``torch.zeros_like(states[:, :1])`` concatenated before the states: a uniform fill
  takes their labels (rules/constants.py ``uniform_inputs``);
* the split of ``xBC`` at ``n_groups * ssm_state_size`` (no attribute holds it) is a cut as long as B / C keep every
  channel (graph/splits.py ``settle_unnamed``);
* the gated norm's statistic per group: position ``s`` of every group is one unit (rules/reductions.py
  ``_grouped_norm``), its reference recomputed over the kept channels;
* Falcon-H1's ``mup_vector`` buffer is sliced with the channels it scales (rules/constants.py ``channel_buffer``);
* the mixers' sizes and the config fields follow (graph/mamba2.py).
That left the B / C state whole (an element of the scan holds a head's channel and a state channel: one atom
there), 0.41-0.50 of dense MACs on the registry's tiny configs. transformers' six mixer classes are now one op
(graph/mamba2.py ``mixer_rule``): heads, and the state as a contracted unit (position n of every group's B and C,
zeroed at the conv by the oracle), or dim j of every head with ``heads="head_dim"``; the state size and head size
config fields follow.
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
    """Two residual mixers of one kind (``TinyMixer`` or ``TinyMixer2``) between an embedding and a head."""

    def __init__(self, d=16, mixer=None, **kw):
        super().__init__()
        mixer = mixer or TinyMixer
        self.embed = nn.Linear(5, d)
        self.mixers = nn.ModuleList([mixer(d, **kw), mixer(d, **kw)])
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


# ---------------------------------------------------------------- Mamba-2: whole heads
class GatedGroupNorm(nn.Module):
    """transformers' ``MambaRMSNormGated``: an RMSNorm over groups of ``group_size`` channels, after the z gate."""

    def __init__(self, width, group_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.group_size, self.variance_epsilon = group_size, eps

    def forward(self, h, gate):
        h = h * F.silu(gate)
        *pre, last = h.shape
        g = h.view(*pre, last // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * g.view(*pre, last)


class TinyMixer2(nn.Module):
    """A Mamba-2 mixer in plain torch, laid out as transformers' (in_proj rows [z | x | B | C | dt], B / C per group
    copied to the heads with ``repeat_interleave``, a sequential scan, the gated grouped norm). ``head_scale``: a
    per-head factor made from the head's *position* (``torch.arange(num_heads)``), which a pruned forward would
    recompute for the heads it has left: a real join, the heads are kept."""

    def __init__(self, d=16, heads=4, head_dim=4, state=6, groups=1, k=3, head_scale=False):
        super().__init__()
        self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size = heads, head_dim, groups, state
        self.intermediate_size = heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * groups * state
        self.head_scale = head_scale
        self.in_proj = nn.Linear(d, self.intermediate_size + self.conv_dim + heads)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, padding=k - 1)
        self.dt_bias = nn.Parameter(torch.randn(heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, heads + 1).float()))
        self.D = nn.Parameter(torch.randn(heads))
        self.norm = GatedGroupNorm(self.intermediate_size, self.intermediate_size // groups)
        self.out_proj = nn.Linear(self.intermediate_size, d)

    def forward(self, h):
        b, seq, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :seq]).transpose(1, 2)
        x, B, C = torch.split(xbc, [self.intermediate_size, self.n_groups * self.ssm_state_size,
                                    self.n_groups * self.ssm_state_size], dim=-1)
        x = x.view(b, seq, self.num_heads, self.head_dim)
        rep = self.num_heads // self.n_groups
        B = B.view(b, seq, self.n_groups, -1).repeat_interleave(rep, dim=2, output_size=self.num_heads)
        C = C.view(b, seq, self.n_groups, -1).repeat_interleave(rep, dim=2, output_size=self.num_heads)
        dt = F.softplus(dt + self.dt_bias)  # [b, seq, heads]
        if self.head_scale:
            dt = dt * (1 + torch.arange(self.num_heads, dtype=dt.dtype))
        dA = torch.exp(dt * -torch.exp(self.A_log))
        state = torch.zeros(b, self.num_heads, self.head_dim, self.ssm_state_size)
        ys = []
        for t in range(seq):
            state = dA[:, t, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((state @ C[:, t, :, :, None])[..., 0])
        y = torch.stack(ys, dim=1) + x * self.D[:, None]
        return self.out_proj(self.norm(y.reshape(b, seq, -1), z))


def _make2(**kw):
    torch.manual_seed(0)
    return TinyMamba(mixer=TinyMixer2, **kw).eval()


def test_hand_written_mamba2_mixer_prunes_whole_heads(tmp_path):
    model, x = _make2(), torch.randn(2, 7, 5)
    macs0 = count_macs(model, x)
    plan = assert_oracle(model, x, ratio=0.5)
    assert any("mixers.0.norm" in n and "normalises over pruned channels" in n for n in plan.notes), plan.notes
    mixer = model.mixers[0]
    assert mixer.num_heads == 2 and mixer.A_log.shape == (2,) and mixer.D.shape == (2,) and mixer.dt_bias.shape == (2,)
    assert mixer.intermediate_size == 8 and mixer.norm.group_size == 8 and mixer.norm.weight.shape == (8,)
    # B and C (one group, 6 states each) are kept whole: conv = x (2 heads x 4) + 12
    assert mixer.conv_dim == 20 and mixer.conv1d.weight.shape == (20, 1, 3) and mixer.ssm_state_size == 6
    assert mixer.in_proj.weight.shape[0] == 8 + 20 + 2 and mixer.out_proj.weight.shape[1] == 8
    assert count_macs(model, x) < 0.45 * macs0
    assert_reloads(_make2, model, x, tmp_path)


def test_mamba2_heads_removal_is_not_zeroing_in_the_grouped_norm():
    """The gated norm's statistic runs over the pruned heads' channels: zeroing them is not removing them, so the
    oracle's reference recomputes it over the kept ones (Plan.kept_norms); without that the outputs differ."""
    from helpers import zeroed_reference_pruned
    from secateur.structured import plan_channels
    model, x = _make2(), torch.randn(2, 7, 5)
    plan = plan_channels(model, x, ratio=0.5)
    zeroed, want, got = zeroed_reference_pruned(model, x, plan)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (zeroed - got).abs().max() > 1e-3


def test_mamba2_mixer_with_groups_loses_as_many_heads_from_each_group(tmp_path):
    """Two groups of B / C, each copied to its two heads: head j of every group is one unit, so each group keeps
    as many heads, in the same places (the pruned ``repeat_interleave(num_heads // n_groups)`` hands group g's
    copy to the heads it has left); the grouped norm's groups shrink alike."""
    make = lambda: _make2(groups=2)  # noqa: E731
    model, x = make(), torch.randn(2, 7, 5)
    assert_oracle(model, x, ratio=0.5)
    mixer = model.mixers[0]
    assert mixer.num_heads == 2 and mixer.n_groups == 2 and mixer.norm.group_size == 4
    assert mixer.conv1d.weight.shape[0] == 8 + 2 * 2 * 6  # B and C of both groups kept
    kept = (torch.exp(mixer.A_log.detach()).round() - 1).long().tolist()  # A_log was log(1 + head index)
    assert kept[1] - kept[0] == 2, kept  # one head of each group (heads 0, 1 | 2, 3), at the same place
    assert_reloads(make, model, x, tmp_path)


def test_mamba2_heads_stay_where_the_join_is_real():
    """A per-head factor made from the head's position (``torch.arange(num_heads)``) is a constant that varies
    along the heads and is not a parameter: a pruned forward would give the kept heads the first positions'
    factors. The heads are one unit there (kept), and the plan still computes the reference."""
    model, x = _make2(head_scale=True), torch.randn(2, 7, 5)
    assert_oracle(model, x, ratio=0.5)
    mixer = model.mixers[0]
    assert mixer.num_heads == 4 and mixer.A_log.shape == (4,) and mixer.out_proj.weight.shape[1] == 16


def _hf_mamba2(kind, groups=1):
    """A fresh config per build: pruning updates the model's config in place, and a reload starts unpruned."""
    T = pytest.importorskip("transformers")
    if kind == "mamba2":
        return lambda: T.Mamba2ForCausalLM(T.Mamba2Config(
            vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8,
            n_groups=groups, chunk_size=4, conv_kernel=4))
    return lambda: T.BambaForCausalLM(T.BambaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=groups,
        mamba_d_state=8, mamba_expand=2, mamba_chunk_size=4, use_cache=False))


def _rebuilt_from_config(model):
    """A fresh model from the pruned config, resized by the structure record, takes the pruned weights strictly and
    computes the same (what from_pretrained of a saved pruned model does)."""
    from secateur.structured import apply_structure
    from secateur.structured.plan import STRUCTURE_ATTR
    torch.manual_seed(0)
    fresh = apply_structure(type(model)(model.config).eval(), getattr(model, STRUCTURE_ATTR))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind,groups", [("mamba2", 1), ("mamba2", 2), ("bamba", 1)])
def test_transformers_mamba2_family_prunes_heads_and_state(kind, groups, tmp_path):
    """transformers' mixers are one op (graph/mamba2.py ``mixer_rule``): whole heads (head j of every group) and the
    B / C state (position n of every group) are units of their own; traced op by op the state was kept whole and
    the chunk scan's ``C.B`` products stayed at full width (0.43-0.50 of dense MACs here)."""
    model, plan = prune_causal_lm(_hf_mamba2(kind, groups), tmp_path, below=0.32)
    mixer = model.backbone.layers[0].mixer if kind == "mamba2" else model.model.layers[0].mamba
    assert mixer.num_heads == 4 and mixer.A_log.shape == (4,) and mixer.intermediate_size == 32
    assert mixer.ssm_state_size == 4 and mixer.head_dim == 8  # 8 states per group -> 4, in every group
    assert mixer.conv1d.weight.shape[0] == 32 + 8 * groups and mixer.norm.group_size == 32 // groups
    if kind == "bamba":  # its MLP (``feed_forward``) width is not a config field apply.py states: the record's
        # hidden_size stays: its attention derives head_dim (and its scaling) from hidden_size / heads, and the heads
        # stay whole here, so a rebuild from hidden_size 16 scaled by another head size with q_proj too small
        assert (model.config.mamba_n_heads, model.config.mamba_expand, model.config.hidden_size,
                model.config.mamba_d_state) == (4, 2, 32, 4)
        _rebuilt_from_config(model)
        return
    assert model.config.state_size == 4
    # the config rebuilds the pruned model: same tensors, same logits
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    x = {"input_ids": torch.randint(0, 100, (1, 6))}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_transformers_mamba2_head_dims_mode_keeps_the_heads(groups, tmp_path):
    """``heads="head_dim"``: dim j of every head leaves (each channel is its own recurrence given the head's dt, A,
    B and C), the head count and the per-head parameters stay; the config's head size follows."""
    make = _hf_mamba2("mamba2", groups)
    torch.manual_seed(0)
    from secateur.structured import plan_channels
    from helpers import pruned_vs_reference
    model, x = make().eval(), {"input_ids": torch.randint(0, 100, (1, 6))}
    run = lambda m, x: m(**x).logits  # noqa: E731
    plan = plan_channels(model, x, ratio=0.5, heads="head_dim")
    _, want, got = pruned_vs_reference(model, x, plan, run)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    mixer = model.backbone.layers[0].mixer
    assert (mixer.num_heads, mixer.head_dim, mixer.A_log.shape, mixer.ssm_state_size) == (8, 4, (8,), 4)
    assert (model.config.num_heads, model.config.head_dim) == (8, 4)
    assert_reloads(make, model, x, tmp_path, run)


def test_mamba2_state_unit_needs_its_zeroing(monkeypatch):
    """The state is a contracted unit: the oracle zeroes its conv channels (weight and bias), so B_n = C_n = 0 and
    term n leaves every ``C.B`` sum. Without that zeroing the reference keeps term n and the pruned model does
    not: the comparison fails, so the test above can fail (weights scaled up so the scan's share is visible)."""
    from secateur.graph import mamba2
    from secateur.structured import plan_channels
    from helpers import pruned_vs_reference
    torch.manual_seed(0)
    model, x = _hf_mamba2("mamba2")().eval(), {"input_ids": torch.randint(0, 100, (1, 6))}
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight.mul_(4)
    rule = mamba2._mixer

    class Dropped(list):
        def append(self, v):
            pass

    def without_zeroing(tr, *args):
        kept, tr.contracted = tr.contracted, Dropped(tr.contracted)
        try:
            rule(tr, *args)
        finally:
            tr.contracted = kept
    monkeypatch.setattr(mamba2, "_mixer", without_zeroing)
    plan = plan_channels(model, x, ratio=0.5)
    _, want, got = pruned_vs_reference(model, x, plan, lambda m, x: m(**x).logits)
    assert model.backbone.layers[0].mixer.ssm_state_size == 4
    assert (want - got).abs().max() > 1e-3


def test_mamba2_state_stays_where_the_activation_does_not_map_zero_to_zero():
    """``sigmoid(0) = 0.5``: a zeroed conv channel is not a removed one, so the state is kept whole (noted)."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.Mamba2ForCausalLM(T.Mamba2Config(
        vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8,
        n_groups=1, chunk_size=4, conv_kernel=4, hidden_act="sigmoid")).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 6))}
    from secateur.structured import plan_channels
    from helpers import pruned_vs_reference
    plan = plan_channels(model, x, ratio=0.5)
    _, want, got = pruned_vs_reference(model, x, plan, lambda m, x: m(**x).logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    mixer = model.backbone.layers[0].mixer
    assert mixer.ssm_state_size == 8 and mixer.num_heads == 4
    assert any("state of Mamba2Mixer is kept" in n for n in plan.notes)


class BufferScale(nn.Module):
    """``h * self.scale`` with ``scale`` a buffer: one per channel [1, C] (Falcon-H1's ``mup_vector``: sliced with
    the channels), or a table [C, C] read along its diagonal's rows (not a per-channel vector: the channels it
    meets stay together)."""

    def __init__(self, table: bool, persistent: bool = True):
        super().__init__()
        self.up, self.down, self.table = nn.Linear(4, 10), nn.Linear(10, 2), table
        self.register_buffer("scale", torch.randn(10, 10) if table else torch.randn(1, 10), persistent=persistent)

    def forward(self, x):
        h = self.up(x)
        return self.down(h @ self.scale if self.table else h * self.scale)


@pytest.mark.parametrize("table,persistent", [(False, True), (False, False), (True, True)])
def test_per_channel_buffer_is_sliced_with_its_channels(table, persistent, tmp_path):
    def make():
        torch.manual_seed(0)
        return BufferScale(table, persistent).eval()
    model, x = make(), torch.randn(3, 4)
    assert_oracle(model, x, ratio=0.5)
    assert model.scale.shape == ((10, 10) if table else (1, 5))
    assert_reloads(make, model, x, tmp_path)  # a non-persistent one is rebuilt by the fresh model and checked


def test_transformers_falcon_h1_prunes_heads_through_its_multipliers(tmp_path):
    """Falcon-H1 scales ``in_proj``'s outputs by a non-persistent ``mup_vector`` (one multiplier per section, here all
    different, so a wrong slice changes the logits)."""
    T = pytest.importorskip("transformers")

    def make():
        return T.FalconH1ForCausalLM(T.FalconH1Config(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8, mamba_d_ssm=64, mamba_n_groups=1,
            mamba_d_state=8, mamba_expand=2, mamba_chunk_size=4, ssm_multipliers=[0.5, 2.0, 3.0, 4.0, 0.7],
            use_cache=False))
    model, _ = prune_causal_lm(make, tmp_path, below=0.6)
    mixer = model.model.layers[0].mamba
    assert mixer.num_heads == 4 and mixer.mup_vector.shape == (1, 1, 32 + 40 + 4)  # z, x + B + C (4 states), dt
    assert (model.config.mamba_n_heads, model.config.mamba_d_ssm, model.config.mamba_d_state) == (4, 32, 4)


def _hf_zamba():
    T = pytest.importorskip("transformers")
    return lambda: T.ZambaForCausalLM(T.ZambaConfig(
        vocab_size=100, hidden_size=32, attention_hidden_size=64, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, attention_head_dim=16, num_key_value_heads=2, n_mamba_heads=4, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, layers_block_type=["mamba", "hybrid", "hybrid"], use_cache=False))


@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_transformers_zamba_prunes_its_per_head_mixers(heads, tmp_path):
    """Zamba's mixer loops over its heads in Python with per-head 3-d parameters (graph/zamba.py): one op, whose
    units are whole heads (or dim j of every head), the time-step rank and the state. Traced op by op, the
    ``select`` at the loop index made every head one unit and the inner width stayed whole."""
    from secateur.structured import plan_channels
    from helpers import pruned_vs_reference
    make = _hf_zamba()
    torch.manual_seed(0)
    model, x = make().eval(), {"input_ids": torch.randint(0, 100, (1, 6))}
    with torch.no_grad():  # Zamba initialises x_proj_weight to zeros: B and C would be 0 and the scan a no-op
        for m in model.modules():
            if hasattr(m, "x_proj_weight"):
                m.x_proj_weight.normal_(0, 0.5)
    run = lambda m, x: m(**x).logits  # noqa: E731
    macs0 = count_macs(model, x)
    plan = plan_channels(model, x, ratio=0.5, heads=heads)
    _, want, got = pruned_vs_reference(model, x, plan, run)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert count_macs(model, x) < 0.32 * macs0
    mixer = model.model.layers[0].mamba
    want_heads, want_dim = (2, 16) if heads == "heads" else (4, 8)
    assert (mixer.n_mamba_heads, mixer.mamba_head_dim, mixer.time_step_rank, mixer.ssm_state_size) == (
        want_heads, want_dim, 2, 4)
    assert mixer.x_proj_weight.shape == (want_heads, 2 + 8, want_dim) and mixer.A_log.shape == (want_heads, want_dim, 4)
    assert (model.config.mamba_dt_rank, model.config.mamba_d_state) == (2, 4)
    if heads == "heads":
        assert model.config.n_mamba_heads == 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = make().eval()
    import secateur
    secateur.save(model, tmp_path / "m.safetensors")
    fresh = secateur.load(fresh, tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), run(model, x), rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("kind,fields", [("qwen3_5", ("linear_num_key_heads", "linear_num_value_heads")),
                                         ("kimi_linear", ("linear_num_heads",))])
def test_linear_attention_head_counts_reach_the_config(kind, fields):
    """The pruned gated delta net's (Kimi's delta attention's) head counts are written to the config fields that
    size it (graph/delta_net.py ``config_sizes``): a model built from the pruned config has every linear-attention
    tensor of the pruned one. Before, those fields kept the unpruned counts."""
    from zoo_models import hf_auto_model
    model, x = hf_auto_model(kind)
    if model is None:
        pytest.skip(f"{kind} does not build here")
    before = {k: getattr(model.config, k) for k in fields}
    prune_channels(model, x, ratio=0.5)
    assert all(getattr(model.config, k) == before[k] // 2 for k in fields)
    with torch.device("meta"):
        fresh = type(model)(model.config)
    want = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    linear = [(n, tuple(p.shape)) for n, p in model.named_parameters()
              if ".linear_attn." in n or (".self_attn." in n and "proj" in n and "forget_gate" not in n
                                          and "g_" not in n and model.config.layer_types[int(n.split(".")[2])]
                                          == "linear_attention")]
    assert linear and all(want[n] == s for n, s in linear)


@pytest.mark.parametrize("kind", ["mamba2", "zamba"])
def test_mixers_as_one_op_plan_on_meta_like_on_the_cpu(kind):
    """The leaf rules read sizes and slots only, never values: a plan on the meta device (no weights) has the CPU's
    groups, choices and notes."""
    from test_meta_plans import _ids, _same_on_meta
    from zoo_models import _causal_lm_class, hf_small_config
    cfg = hf_small_config(kind)
    _same_on_meta(lambda: _causal_lm_class(kind)(cfg), _ids())
