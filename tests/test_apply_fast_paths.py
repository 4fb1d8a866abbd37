"""The giant-model fast paths (issue #3, speed) equal their slow paths on random shapes, layouts and dtypes:
``apply._take`` (rows and columns gathered block by block into the result) equals ``index_select`` dim by dim;
``importance._norms_both`` (one reused |w| buffer, trailing size-1 dims viewed away) gives the very sums of the
plain chunked pass it replaced, bit for bit, so no plan can change; ``shapes_only._on_meta`` (meta results
remembered by op and metadata) answers as the meta kernel does, and tells apart what changes a result's metadata."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secateur.structured.apply as A
from secateur.graph import shapes_only as SO
from secateur.importance import _norms_both

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last", "offset"]


def _tensor(shape, dtype, layout, g):
    """A tensor of ``shape`` in one of several memory layouts (the values do not depend on the layout)."""
    big = [s * 2 if layout == "strided" else s for s in shape]
    if layout == "offset":
        big[0] += 1
    t = (torch.randn(big, generator=g) * 10).to(dtype)
    if layout == "strided":
        t = t[tuple(slice(None, None, 2) for _ in shape)]
    elif layout == "offset":
        t = t[1:]
    elif layout == "transposed":
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    assert tuple(t.shape) == tuple(shape)
    return t


def _plain(t, keep):
    for d, idx in keep:
        t = t.index_select(d, idx)
    return t.contiguous()


@given(shape=st.lists(st.integers(1, 9), min_size=2, max_size=4), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), which=st.sampled_from([(0, 1), (1,), (0,), (0, 2), (1, 2), (0, 1, 2)]),
       chunk=st.sampled_from([1, 5, 64, 1 << 20]), seed=st.integers(0, 10_000))
@settings(max_examples=300, deadline=None)
def test_take_equals_index_select_dim_by_dim(shape, dtype, layout, which, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    t = _tensor(shape, dtype, layout, g)
    keep = []
    for d in which:
        if d < t.dim():
            n = t.size(d)
            keep.append((d, torch.randperm(n, generator=g)[: int(torch.randint(0, n + 1, (1,), generator=g))]
                         .sort().values))
    old, A._CHUNK = A._CHUNK, chunk  # small blocks: many per tensor, and a last one shorter than the rest
    try:
        got = A._take(t, keep)
    finally:
        A._CHUNK = old
    want = _plain(t, keep)
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(4096, 4096), (1056, 1056, 3, 3), (7392, 1056, 1, 1)])
def test_take_on_giant_model_shapes(shape):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g)
    rows = torch.randperm(shape[0], generator=g)[: shape[0] // 2].sort().values
    cols = torch.randperm(shape[1], generator=g)[: shape[1] // 2].sort().values
    assert torch.equal(A._take(t, [(0, rows), (1, cols)]), t[rows[:, None], cols].contiguous())
    assert torch.equal(A._take(t, [(1, cols)]), t[:, cols].contiguous())


def _norms_both_plain(t, p):
    """The chunked pass before the fast path: a fresh |w|^p per chunk, summed over every dim past 1."""
    step = max(1, (1 << 20) // max(1, t[0].numel()))
    rest = list(range(2, t.dim()))
    rows, cols = [], []
    for i in range(0, t.size(0), step):
        c = t[i:i + step].float()
        c = c.abs() if p == 1 else c.square()
        c = c.sum(rest) if rest else c
        rows.append(c.sum(1))
        cols.append(c.sum(0))
    return torch.cat(rows), torch.stack(cols).sum(0)


@given(shape=st.sampled_from([(3, 5), (40, 7), (9, 4, 3, 3), (20, 6, 1, 1), (5, 3, 1), (7, 2, 1, 1, 1),
                              (11, 13, 2, 1)]),
       rows_mult=st.sampled_from([1, 300, 5000]), dtype=st.sampled_from(DTYPES[:4]),
       layout=st.sampled_from(LAYOUTS), p=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 10_000))
@settings(max_examples=120, deadline=None)
def test_norms_both_are_the_plain_chunked_sums_bit_for_bit(shape, rows_mult, dtype, layout, p, seed):
    shape = (shape[0] * rows_mult, *shape[1:])  # several chunks of rows (a chunk is ~1M elements)
    if shape[0] * torch.Size(shape[1:]).numel() > 8_000_000:
        shape = (8_000_000 // torch.Size(shape[1:]).numel(), *shape[1:])
    t = _tensor(shape, dtype, layout, torch.Generator().manual_seed(seed))
    got, want = _norms_both(t, p), _norms_both_plain(t, p)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b)
    plain = (t.float().abs() if p == 1 else t.float().square())
    torch.testing.assert_close(got[0], plain.flatten(1).sum(1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[1], plain.transpose(0, 1).flatten(1).sum(1), rtol=1e-4, atol=1e-3)


def _meta_facts(out):
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.stride(), out.dtype, out.device.type)
    if isinstance(out, (list, tuple)):
        return tuple(_meta_facts(o) for o in out)
    return out


OPS = {
    "add": lambda a, b: (torch.ops.aten.add.Tensor, (a, b), {}),
    "add_scalar": lambda a, b: (torch.ops.aten.add.Tensor, (a, 1), {}),
    "add_float": lambda a, b: (torch.ops.aten.add.Tensor, (a, 0.5), {}),
    "mul_alpha": lambda a, b: (torch.ops.aten.add.Tensor, (a, b), {"alpha": 2}),
    "sum": lambda a, b: (torch.ops.aten.sum.dim_IntList, (a, [0]), {"keepdim": True}),
    "mean": lambda a, b: (torch.ops.aten.mean.dim, (a.float(), [-1]), {}),
    "softmax": lambda a, b: (torch.ops.aten._softmax.default, (a.float(), -1, False), {}),
    "cat": lambda a, b: (torch.ops.aten.cat.default, ([a, b],), {}),
    "clone_cl": lambda a, b: (torch.ops.aten.clone.default, (a,), {"memory_format": torch.contiguous_format}),
}


@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), dtype=st.sampled_from(DTYPES),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), op=st.sampled_from(sorted(OPS)),
       seed=st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_remembered_meta_results_are_the_meta_kernels(shape, dtype, la, lb, op, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = _tensor(shape, dtype, la, g), _tensor(shape, dtype, lb, g)
    func, args, kwargs = OPS[op](a, b)
    try:
        want = _meta_facts(func(*SO._to_meta(args), **SO._to_meta(kwargs)))
    except Exception:  # noqa: BLE001 - no such op for this dtype: nothing may be remembered either
        with pytest.raises(Exception):
            SO._on_meta(func, args, kwargs)
        return
    assert _meta_facts(SO._on_meta(func, args, kwargs)) == want
    assert _meta_facts(SO._on_meta(func, args, kwargs)) == want  # now from the memo


def test_what_changes_a_meta_result_changes_the_key():
    i = torch.ones(2, 3, dtype=torch.int64)
    add = torch.ops.aten.add.Tensor
    assert SO._on_meta(add, (i, 1), {}).dtype == torch.int64
    assert SO._on_meta(add, (i, 1.0), {}).dtype == torch.float32  # an int and a float are not the same key
    assert SO._on_meta(add, (i, True), {}).dtype == torch.int64
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert SO._on_meta(add, (i, 1.0), {}).dtype == torch.float64  # nor are two default dtypes
    finally:
        torch.set_default_dtype(old)
    t = torch.randn(4, 6)
    assert SO._on_meta(add, (t.t(), t.t()), {}).stride() == t.t().stride()
    assert SO._on_meta(add, (t.t().contiguous(), t.t().contiguous()), {}).stride() == (4, 1)
    assert SO._meta_key(add, (t, [object()]), {}) is None  # an unhashable part: not remembered


def test_map_is_tree_map():
    from collections import OrderedDict, namedtuple

    from torch.utils._pytree import tree_map
    Pair = namedtuple("Pair", "a b")
    t = torch.randn(3, 4)
    x = (t, [t.t(), 2, None, "s", torch.float16], {"k": (t[0], 1.5)}, OrderedDict(z=t), Pair(t, [t]),
         torch.max(t, 0), [])
    for got, want in ((SO._map(SO._meta, x), tree_map(SO._meta, x)),
                      (SO._map(SO._like, SO._to_meta(x)), tree_map(SO._like, tree_map(SO._meta, x)))):
        assert type(got) is type(want) and str(got.__class__) == str(want.__class__)
        assert repr(_meta_facts_deep(got)) == repr(_meta_facts_deep(want))


def _meta_facts_deep(x):
    from torch.utils._pytree import tree_flatten
    leaves, spec = tree_flatten(x)
    return spec, [_meta_facts(v) if isinstance(v, torch.Tensor) else v for v in leaves]


def test_flat_tensors_finds_every_tensor_in_order():
    from secateur.graph.capture import _flat_tensors
    from torch.utils._pytree import tree_flatten
    t = [torch.randn(2) for _ in range(6)]
    x = ((t[0], 1, None, torch.float32, [t[1], (t[2],)]), {"a": t[3], "b": {"c": [t[4], 2.5]}}, "s", t[5])
    got = _flat_tensors(x)
    assert [id(v) for v in got] == [id(v) for v in tree_flatten(x)[0] if isinstance(v, torch.Tensor)]
