"""Ops without a rule (NMS, nonzero, masked_select) keep the channels they read instead of refusing the model, and
the dry run stops comparing sizes that follow values (the number of detections). So torchvision's detectors prune:
the oracle holds on the tensors their heads return (compared through forward hooks, since the final detections of
a random-weight model are few or none) and on the detections themselves."""
import copy

import pytest
import torch
from torch import nn

from secateur.graph.capture import _flat_tensors
from secateur.structured import plan_channels

tv = pytest.importorskip("torchvision")


class Scored(nn.Module):
    """A head whose scores go through NMS and a value-dependent mask, as a detector's post-processing does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.boxes = nn.Conv2d(16, 4, 1)
        self.score = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        h = self.body(x)
        b = self.boxes(h).flatten(2).transpose(1, 2)[0]  # [HW, 4]
        b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:].abs() + 1], dim=1)
        s = self.score(h).flatten()
        keep = tv.ops.nms(b, s, 0.5)
        b, s = b[keep], s[keep]
        m = s > 0
        return b[m], s[m]


def _oracle(model, x, run, hooks=()):
    """Pruned vs the original with the chosen channels zeroed at their consumers, on the outputs and on every
    hooked module's output."""
    model.eval()
    plan = plan_channels(model, x, ratio=0.5)
    ref = copy.deepcopy(model)
    plan.zero_consumers(ref)

    def record(m):
        seen = []
        hs = [m.get_submodule(n).register_forward_hook(lambda mod, a, o: seen.append(o)) for n in hooks]
        return seen, hs

    proposals = []
    with torch.no_grad():
        seen_ref, h1 = record(ref)
        if hasattr(ref, "rpn"):  # the second stage gets the reference's proposals: random objectness scores are
            h1.append(ref.rpn.register_forward_hook(lambda m, a, o: proposals.append(o)))  # nearly tied, so 1e-6
        with plan.kept_norms(ref):  # reorders top-k / NMS (the RPN head's outputs are compared as they are)
            want = run(ref, x)
        plan.apply(model)
        seen_got, h2 = record(model)
        if proposals:
            h2.append(model.rpn.register_forward_hook(lambda m, a, o: proposals[0]))
        got = run(model, x)
    for h in h1 + h2:
        h.remove()
    return plan, want, got, seen_ref, seen_got


def _close(a, b, tol=1e-4):
    fa, fb = _flat_tensors(a), _flat_tensors(b)
    assert len(fa) == len(fb)
    for u, v in zip(fa, fb):
        assert u.shape == v.shape
        torch.testing.assert_close(u, v, atol=tol, rtol=tol)


def test_ops_without_rule_keep_their_channels():
    torch.manual_seed(0)
    m = Scored()
    x = torch.randn(1, 3, 12, 12)
    dense = copy.deepcopy(m)
    plan, want, got, _, _ = _oracle(m, x, lambda mod, x: mod(x))
    assert any("torchvision::nms has no rule" in n for n in plan.notes)
    assert m.body[0].out_channels < dense.body[0].out_channels  # the body still prunes
    assert m.boxes.out_channels == 4 and m.score.out_channels == 1
    _close(want, got, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,hooks", [
    ("ssdlite320_mobilenet_v3_large", ["head.classification_head", "head.regression_head"]),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", ["rpn.head", "roi_heads.box_predictor"]),
    ("maskrcnn_resnet50_fpn", ["rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor"]),
])
def test_torchvision_detectors(name, hooks):
    torch.manual_seed(0)
    small = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}  # R-CNNs resize to 800 px
    m = tv.models.get_model(name, weights=None, weights_backbone=None, **small)
    n0 = sum(p.numel() for p in m.parameters())
    x = ([torch.rand(3, 160, 160)],)
    plan, want, got, seen_ref, seen_got = _oracle(m, x, lambda mod, x: mod(*x), hooks)
    assert sum(p.numel() for p in m.parameters()) < 0.6 * n0
    assert seen_ref and len(seen_ref) == len(seen_got)
    for a, b in zip(seen_ref, seen_got):
        _close(a, b)
    _close(want, got)
