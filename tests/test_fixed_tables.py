"""Fixed tables added to the residual stream: sinusoidal position encodings that a model builds from its config and
keeps as a (often non-persistent) buffer, gathered by position (CTRL's ``pos_encoding[position_ids, :]``, XGLM's
``weights.index_select(0, positions)``). Before, such a table was a constant varying along the channels, so the whole
residual stream was all-or-nothing (ctrl 0.50, xglm 0.58 of their MACs at ratio 0.5). Now the gathered rows are
traced back to the table (graph/rules/constants.py ``_track_gather``) and the table is sliced with the stream; a
non-persistent table is not in the saved file, so the structure records which positions of a fresh one to keep and
a checksum that ``load`` verifies (structured/apply.py ``_record_unsaved`` / ``_rebuild_unsaved``)."""
import math

import pytest
import torch
from torch import nn

import secateur
from helpers import assert_oracle, assert_reloads, prune_causal_lm
from secateur.errors import PruningError
from secateur.structured import plan_channels, prune_channels

torch.set_num_threads(1)


def sinusoid(n, d, base=10000.0):
    pos = torch.arange(n).float()[:, None]
    freq = torch.exp(torch.arange(0, d, 2).float() * -(math.log(base) / d))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)


class Stream(nn.Module):
    def __init__(self, d=32, persistent=False, gather="index", base=10000.0):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.register_buffer("table", sinusoid(16, d, base), persistent=persistent)
        self.gather = gather
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 48), nn.GELU(), nn.Linear(48, d))
                                    for _ in range(2))
        self.head = nn.Linear(d, 7)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        if self.gather == "index":
            rows = self.table[pos, :]
        else:
            rows = self.table.index_select(0, pos.reshape(-1)).view(*ids.shape, self.table.shape[-1])
        h = self.embed(ids) + rows
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def _ids():
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("gather", ["index", "index_select"])
def test_gathered_table_is_sliced_with_the_stream_and_reloads(persistent, gather, tmp_path):
    make = lambda: Stream(persistent=persistent, gather=gather)  # noqa: E731
    torch.manual_seed(0)
    model, x = make().eval(), _ids()
    assert_oracle(model, x, ratio=0.5)
    assert model.embed.weight.shape == (50, 16) and model.table.shape == (16, 16)
    assert_reloads(make, model, x, tmp_path)


def test_twice_pruned_table_reloads_from_composed_positions(tmp_path):
    torch.manual_seed(0)
    model, x = Stream().eval(), _ids()
    prune_channels(model, x, ratio=0.5)
    prune_channels(model, x, ratio=0.5)
    assert model.table.shape == (16, 8)
    assert_reloads(Stream, model, x, tmp_path)


def test_a_fresh_model_that_builds_another_table_is_refused(tmp_path):
    torch.manual_seed(0)
    model, x = Stream().eval(), _ids()
    prune_channels(model, x, ratio=0.5)
    secateur.save(model, tmp_path / "m.safetensors")
    with pytest.raises(PruningError, match="differs from the saved one"):
        secateur.load(Stream(base=500.0).eval(), tmp_path / "m.safetensors")


@pytest.mark.parametrize("family", ["ctrl", "xglm"])
def test_transformers_sinusoidal_streams_prune(family, tmp_path):
    T = pytest.importorskip("transformers")
    if family == "ctrl":
        make = lambda: T.CTRLLMHeadModel(T.CTRLConfig(vocab_size=100, n_positions=32, n_embd=32, dff=64,  # noqa
                                                      n_layer=2, n_head=4))
    else:
        make = lambda: T.XGLMForCausalLM(T.XGLMConfig(vocab_size=100, max_position_embeddings=32, d_model=32,  # noqa
                                                      ffn_dim=64, num_layers=2, attention_heads=4))
    prune_causal_lm(make, tmp_path, low=3)


def test_a_table_pruned_on_the_meta_device_records_positions_without_values():
    """Plans of models larger than memory apply on a meta skeleton: the table's kept positions are recorded, its
    checksum is not (there are no values), and nothing fails."""
    torch.manual_seed(0)
    model, x = Stream().eval(), _ids()
    plan = plan_channels(model, x, ratio=0.5)
    from secateur.graph.verify import skeleton
    sk = skeleton(model)
    plan.apply(sk)
    entry = sk._secateur_structure[""]
    assert sk.table.device.type == "meta" and len(entry["kept"]["table"]["1"]) == 16
    assert entry["checks"]["table"] is None
