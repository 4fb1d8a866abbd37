"""Plan.apply_checked: the pruning oracle as a library call (apply + relative error against the zeroed copy)."""
import copy
import math

import torch
from torch import nn

from secateur.structured import plan_channels


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.LayerNorm([32, 8, 8]), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 64, 10))


def test_apply_checked_prunes_and_proves():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    model.train()
    before = sum(p.numel() for p in model.parameters())
    plan = plan_channels(copy.deepcopy(model).eval(), x, ratio=0.5)
    err = plan.apply_checked(model, x)
    assert err < 1e-5
    assert sum(p.numel() for p in model.parameters()) < before
    assert model.training  # the caller's mode comes back
    assert model[0].out_channels == 8 and model(x).shape == (2, 10)


def test_apply_checked_sees_a_wrong_reference():
    """With the zeroing step skipped the reference is the dense model: the error must be large (the check can fail)."""
    model, x = _net().eval(), torch.randn(2, 3, 8, 8)
    plan = plan_channels(model, x, ratio=0.5)
    plan.zero_consumers = lambda m: None
    assert plan.apply_checked(model, x) > 1e-2


def test_apply_checked_is_nan_when_the_output_is_all_zeros():
    model, x = _net().eval(), torch.randn(2, 3, 8, 8)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    plan = plan_channels(model, x, ratio=0.5)
    assert math.isnan(plan.apply_checked(model, x))


def test_apply_checked_takes_keyword_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 4)

        def forward(self, x, scale=1.0):
            return {"out": self.b(torch.relu(self.a(x))) * scale}

    torch.manual_seed(0)
    model, x = Two().eval(), {"x": torch.randn(3, 6), "scale": 2.0}
    plan = plan_channels(model, x, ratio=0.5)
    assert plan.apply_checked(model, x) < 1e-6
    assert model.a.out_features == 6
