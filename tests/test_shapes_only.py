"""Captures and dry runs without values (graph/shapes_only.py): a large CPU model's plan is made without computing
its convolutions and matrix products, and must be the plan a real forward gives; a model whose code reads values
computed there falls back to a real forward."""
import pytest
import torch
from torch import nn

from secateur.graph import shapes_only
from secateur.graph.capture import capture
from secateur.graph.groups import build_graph
from secateur.structured import prune_channels


def _key(graph):
    return ([(g.name, g.size, g.norms, g.unit, [(repr(m), m.index.tolist(), m.channel.tolist(), m.consumer)
                                                 for m in g.members]) for g in graph.groups], list(graph.notes))


@pytest.fixture
def forced(monkeypatch):
    """Every model counts as large (the shapes-only path is tried whatever its size)."""
    monkeypatch.setattr(shapes_only, "usable", lambda model, inputs: True)


def _both(model, x, monkeypatch):
    monkeypatch.setattr(shapes_only, "usable", lambda model, inputs: False)
    real = build_graph(model, x)
    monkeypatch.setattr(shapes_only, "usable", lambda model, inputs: True)
    return real, build_graph(model, x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 24, 3, stride=2)
        self.fc = nn.Linear(24, 10)

    def body(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = y + torch.relu(self.b2(self.c2(y)))  # residual: c1 and c2 outputs are one group
        return self.c3(y).mean((2, 3))

    def forward(self, x):
        return self.fc(self.body(x))


class ReadsItem(Net):
    def forward(self, x):
        h = self.body(x)
        if h.abs().max().item() > 1e9:  # a decision on a computed value: needs the real forward
            h = h * 0
        return self.fc(h)


class SwallowsError(Net):
    def forward(self, x):
        h = self.body(x)
        try:
            k = int(h.argmax())  # the abort is a BaseException, but the model could catch it some other way
        except Exception:  # noqa: BLE001
            k = 0
        return self.fc(h) + k


class IndexFromValues(Net):
    def forward(self, x):
        h = self.body(x)
        top = h.topk(4, dim=1).indices  # positions picked by value
        return self.fc(h) + h.gather(1, top).sum(1, keepdim=True)


def test_same_groups_and_plan_as_a_real_forward(monkeypatch):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    real, fake = _both(model, x, monkeypatch)
    assert not real.tracer.shapes_only and fake.tracer.shapes_only
    assert _key(real) == _key(fake)
    assert [s[:2] for s in real.tracer.trace] == [s[:2] for s in fake.tracer.trace]  # ops and shapes
    twin = Net().eval()
    twin.load_state_dict(model.state_dict())
    monkeypatch.setattr(shapes_only, "usable", lambda model, inputs: False)
    a = prune_channels(model, x, ratio=0.5)
    monkeypatch.setattr(shapes_only, "usable", lambda model, inputs: True)
    b = prune_channels(twin, x, ratio=0.5)
    assert (a.macs_after, a.params_after) == (b.macs_after, b.params_after) and a.macs_after < a.macs_before
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), twin.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))  # and the pruned model runs with its values


@pytest.mark.parametrize("cls", [ReadsItem, SwallowsError, IndexFromValues])
def test_code_that_reads_values_falls_back_to_a_real_forward(cls, forced):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(2, 3, 16, 16)
    tr = capture(model, x)
    assert not tr.shapes_only  # the attempt was thrown away
    with torch.no_grad():
        before = model(x)
    plan = prune_channels(model, x, ratio=0.5)
    assert plan.macs_after < plan.macs_before
    with torch.no_grad():
        assert model(x).shape == before.shape


def test_train_mode_batchnorm_statistics_are_never_written_with_skipped_values(forced):
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(2, 3, 16, 16)
    runner = shapes_only.ShapesOnly(model, x)
    from secateur.graph.capture import _capture
    with pytest.raises(shapes_only.NeedsValues, match="state"):
        _capture(model, x, "heads", "channels", False, runner)
    tr = capture(model, x)
    assert not tr.shapes_only


def test_heavy_ops_are_not_computed(forced, monkeypatch):
    """The point of it: no convolution kernel runs on the CPU in a shapes-only capture."""
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    seen = []
    orig = shapes_only.ShapesOnly.run

    def spy(self, func, args, kwargs):
        out = orig(self, func, args, kwargs)
        if func.overloadpacket in shapes_only.HEAVY:
            seen.append(out.untyped_storage().data_ptr() in self.tainted)
        return out
    monkeypatch.setattr(shapes_only.ShapesOnly, "run", spy)
    tr = capture(model, x)
    assert tr.shapes_only and seen and all(seen)


def test_usable_only_for_large_cpu_models_with_plain_inputs():
    small = Net()
    assert not shapes_only.usable(small, torch.randn(1, 3, 8, 8))
    big = nn.Linear(8192, 8300, device="meta").to_empty(device="cpu")  # 272 MB, never touched
    assert shapes_only.usable(big, torch.randn(1, 8192))
    assert not shapes_only.usable(big, {"x": torch.randn(1, 8192), "cache": object()})
    assert not shapes_only.usable(big.to("meta"), torch.randn(1, 8192, device="meta"))


def test_value_free_ops_and_readers():
    aten = torch.ops.aten
    assert shapes_only._value_free(aten.relu.default) and shapes_only._value_free(aten.convolution.default)
    assert shapes_only._value_free(aten.hardswish_.default)  # untagged pointwise, in place
    for op in (aten._local_scalar_dense.default, aten.nonzero.default, aten.topk.default, aten.gather.default,
               aten.index.Tensor, aten.embedding.default):
        assert not shapes_only._value_free(op), op


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "swin_t", "vit_b_16", "convnext_tiny",
                                  "densenet121", "shufflenet_v2_x0_5", "maxvit_t", "efficientnet_b0",
                                  "regnet_x_400mf", "squeezenet1_0", "inception_v3", "googlenet"])
def test_torchvision_groups_match_a_real_forward(name, monkeypatch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model(name).eval()
    x = torch.randn(1, 3, 299, 299) if name == "inception_v3" else torch.randn(1, 3, 224, 224)
    real, fake = _both(model, x, monkeypatch)
    assert fake.tracer.shapes_only
    assert _key(real) == _key(fake)


@pytest.mark.parametrize("model_type,values_free", [("llama", True), ("qwen2_moe", False)])
def test_hugging_face_decoders(model_type, values_free, monkeypatch):
    """A decoder's masks and positions come from the inputs, so its capture needs no values; an MoE router picks
    experts by value, so its capture falls back to a real forward. Either way: the groups of a real forward."""
    pytest.importorskip("transformers")
    from zoo_models import hf_auto_model
    model, x = hf_auto_model(model_type)
    real, fake = _both(model, x, monkeypatch)
    assert fake.tracer.shapes_only is values_free
    assert _key(real) == _key(fake)
