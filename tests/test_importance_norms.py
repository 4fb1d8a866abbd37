"""Magnitude importance reduces each slice in chunks of the weight's first dim (importance._slice_norms, for
speed on large weights): it must equal the plain per-slice sum of |w| or w^2, for every dim, partial index sets,
several chunks and low-precision weights."""

import pytest
import torch
from torch import nn

from secateur.graph.groups import Member
from secateur.importance import _slice_norms


class Holder(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.w = nn.Parameter(t)


@pytest.mark.parametrize("shape", [(7,), (6, 5), (300, 5000), (9, 4, 3, 3), (2100, 512, 1, 1)])
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slice_norms_equal_the_plain_sums(shape, p, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype)
    model = Holder(t)
    for dim in range(len(shape)):
        n = shape[dim]
        for index in (torch.arange(n), torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values):
            m = Member("", "w", dim, "out", index, torch.arange(index.numel()))
            rows = t.float().index_select(dim, index).movedim(dim, 0).reshape(index.numel(), -1)
            want = (rows.abs() if p == 1 else rows.square()).sum(1)
            torch.testing.assert_close(_slice_norms(model, m, p), want, rtol=1e-5, atol=1e-5)
