"""Plans made on the meta device (no weights) are the CPU's: the same groups, the same choices with a deterministic
importance, the same notes (graph/meta_values.py, graph/meta_sdpa.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateur
from secateur.graph import build_graph
from secateur.graph.meta_values import KnownValues
from secateur.structured import plan_channels
from secateur.structured.proof import LOCAL_NOTE

transformers = pytest.importorskip("transformers")
import zoo_models as Z  # noqa: E402


def _by_position(group):
    """Deterministic on both devices (meta has no weights): channel i scores i, so the last ones stay."""
    return torch.arange(group.size, dtype=torch.float)


def _record(model, x, heads="heads"):
    graph = build_graph(model, x, heads=heads)
    groups = sorted((g.name, g.size, tuple(sorted((m.module, m.name, m.dim) for m in g.members)))
                    for g in graph.groups)
    plan = plan_channels(model, x, ratio=0.5, importance=_by_position, heads=heads, graph=graph)
    choices = sorted((g.name, tuple(c.tolist())) for g, c in plan.choices)
    return groups, choices, plan.notes


def _same_on_meta(make, x, heads="heads"):
    torch.manual_seed(0)
    cpu = make().eval()
    with torch.device("meta"):
        meta = make().eval()
    want = _record(cpu, x, heads)
    xm = {k: v.to("meta") for k, v in x.items()} if isinstance(x, dict) else x.to("meta")
    got = _record(meta, xm, heads)
    assert got[0] == want[0]  # groups
    assert got[1] == want[1]  # chosen channels
    assert [n for n in got[2] if n != LOCAL_NOTE] == want[2]  # notes (meta's say where size updates were proven)
    assert (LOCAL_NOTE in got[2]) == bool(any("a size the model keeps itself" in n for n in want[2]))
    assert want[1], "nothing pruned: the comparison would be vacuous"
    assert not any(p.device.type != "meta" for p in meta.parameters())
    return want


def _ids():
    return {"input_ids": torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))}


_SLOW = pytest.mark.slow  # the same paths as the fast ones, on more families (a few seconds each)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", pytest.param("mistral", marks=_SLOW),
                                        pytest.param("qwen2", marks=_SLOW)])
def test_decoders_called_the_default_way_plan_on_meta_like_on_the_cpu(model_type):
    """``model(input_ids=...)`` with the config's ``use_cache=False`` (the registry recipe's): with no cache and no
    mask, transformers asks ``find_packed_sequence_indices`` whether the position ids pack several sequences
    (``.item()`` of a tensor made from the model's own ``arange``), and GPT-2 whether the ids hold padding (a
    warning only). On meta both failed with "Tensor.item() cannot be called on meta tensors"."""
    cfg, cls = Z.hf_small_config(model_type), Z._causal_lm_class(model_type)
    assert not cfg.use_cache
    _same_on_meta(lambda: cls(cfg), _ids())


@pytest.mark.parametrize("model_type", ["falcon", pytest.param("gpt_bigcode", marks=_SLOW),
                                        pytest.param("llama_one_kv_head", marks=_SLOW)])
def test_one_kv_head_attention_plans_on_meta_like_on_the_cpu(model_type):
    """Multi-query attention: the CPU runs SDPA's flash kernel (k and v with one head), meta ran the math
    decomposition, whose labels grouped the heads otherwise (other groups and notes). Falcon also splits its fused
    q/k/v with a Python list index (``fused_qkv[..., [-2], :]``), which needs the index's value on meta. Falcon's and
    GPT-BigCode's query heads need their ``num_heads`` updated (the size-attribute search): on the CPU the whole
    model proves it numerically, on meta a CPU copy of one attention module (graph/local_proof.py)."""
    kv1 = model_type == "llama_one_kv_head"
    cfg = Z.hf_small_config("llama" if kv1 else model_type)
    cls = Z._causal_lm_class("llama" if kv1 else model_type)
    if kv1:
        cfg.num_key_value_heads = 1
    _same_on_meta(lambda: cls(cfg), _ids())


class _MQA(nn.Module):
    """Four query heads, one key/value head, through SDPA (broadcast or ``enable_gqa``), with a boolean mask or not."""

    def __init__(self, gqa=True, mask=False):
        super().__init__()
        self.gqa, self.mask = gqa, mask
        self.q, self.kv, self.o = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 1, 8).transpose(1, 2).chunk(2, dim=-1)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if self.mask else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, 16))
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("gqa,mask", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("heads", ["heads", "head_dim"])
def test_hand_written_multi_query_attention_plans_on_meta_like_on_the_cpu(gqa, mask, heads):
    _same_on_meta(lambda: _MQA(gqa, mask), torch.randn(2, 5, 16), heads)


def test_meta_runs_take_the_cpu_attention_kernel_only_where_the_cpu_does():
    """Dropout sends the CPU to the math path: meta takes it too (the same ops as the CPU's)."""
    from secateur.graph.meta_sdpa import CpuAttention
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def ops(device, **kw):
        q, k = torch.randn(1, 4, 6, 8, device=device), torch.randn(1, 1, 6, 8, device=device)
        with Ops() as rec, (CpuAttention() if device == "meta" else torch.no_grad()), \
                torch.random.fork_rng(devices=[]):
            F.scaled_dot_product_attention(q, k, k, enable_gqa=True, **kw)
        return rec.ops
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    for kw in ({}, {"attn_mask": mask}, {"is_causal": True, "scale": 0.3}):
        assert ops("cpu", **kw) == ops("meta", **{k: v.to("meta") if isinstance(v, torch.Tensor) else v
                                                  for k, v in kw.items()})
    assert "_scaled_dot_product_flash_attention_for_cpu" not in ops("meta", dropout_p=0.5)


# ---------------------------------------------------------------- values on meta
def test_values_computed_from_constants_are_read_on_meta_as_on_the_cpu():
    with KnownValues():
        pos = torch.arange(6, device="meta")[None]
        diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        assert bool(((diff != 1).cumsum(-1)[:, -1] == 0).all())  # transformers' packed-sequence question
        gaps = pos.clone()
        gaps[:, 3:] += 5  # an in-place write of a known value keeps it known
        assert ((torch.diff(gaps) != 1).sum()).item() == 1
        assert torch.full((2,), 3, device="meta").tolist() == [3, 3]


def test_a_value_of_the_inputs_or_weights_on_meta_is_a_pruning_error():
    """A meta tensor has no value: code that reads one from the inputs (or a known tensor overwritten with them)
    gets a PruningError naming the module and the op, not a guess."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # control flow on a value of the inputs
                h = torch.relu(h)
            return self.b(h)

    with torch.device("meta"):
        m = Gate()
    with pytest.raises(secateur.PruningError, match=r"<root>.*reads the value of a tensor on the meta device.*"
                                                    r"_local_scalar_dense"):
        build_graph(m, torch.randn(2, 8, device="meta"))
    with KnownValues():
        pos = torch.arange(4, device="meta")
        pos[1:] = torch.empty(3, device="meta", dtype=torch.long)  # unknown values written in
        with pytest.raises(secateur.PruningError, match="meta device"):
            pos.sum().item()
        with pytest.raises(secateur.PruningError, match="meta device"):
            torch.randint(0, 5, (2,), device="meta").tolist()  # random: no value
