"""The Triton backend agrees with the reference backend (kernels run under TRITON_INTERPRET=1
on the CPU, so every size here is tiny)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("triton")

from convnn.backends import reference  # noqa: E402
from convnn.backends import triton as tb  # noqa: E402
from convnn.backends._common import prepare  # noqa: E402
from convnn.functional import convnn2d, convnn_attention  # noqa: E402

F32, F64 = torch.float32, torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(params=["split", "stream"])
def small_tiles(request, monkeypatch):
    """16-key tiles, so tiny inputs span several; 'stream' runs every tile of a query block
    through one program's running top-K, 'split' gives each tile its own program and merges."""
    monkeypatch.setattr(tb, "SELECT_BLOCK_M", 16)
    monkeypatch.setattr(tb, "TARGET_PROGRAMS", 1 if request.param == "stream" else 1 << 20)


# --------------------------------------------------------------------------- select

SHAPES = [  # (B_query, B_key, N, M, D): N, M, D not multiples of any block; batch broadcast
    (2, 2, 19, 53, 5),
    (1, 2, 7, 40, 17),
    (3, 1, 5, 21, 3),
]


@pytest.mark.parametrize(
    "dtype, K, shape",
    [(F32, K, shape) for K in (1, 3, 8) for shape in SHAPES] + [(F64, 3, SHAPES[0])],
)
def test_select_matches_reference(small_tiles, dtype, K, shape):
    Bq, Bk, N, M, D = shape
    q, k = randn(Bq, N, D, seed=1, dtype=dtype), randn(Bk, M, D, seed=2, dtype=dtype)
    exclude = torch.randint(-1, M, (N,), generator=torch.Generator().manual_seed(3))
    for ex in (None, exclude):
        got = tb.select(q, k, K, exclude=ex)
        assert got.dtype == torch.long and got.shape == (max(Bq, Bk), N, K)
        assert torch.equal(got, reference.select(q, k, K, exclude=ex))


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "scaled_dot"])
def test_select_prepared_metrics(small_tiles, metric):
    q, k = prepare(metric, randn(2, 11, 6, seed=4, dtype=F32), randn(2, 37, 6, seed=5, dtype=F32))
    ex = torch.arange(11)
    assert torch.equal(tb.select(q, k, 5, exclude=ex), reference.select(q, k, 5, exclude=ex))


def test_select_ties_keep_lower_indices(small_tiles):
    """Identical keys score identically: they come out by lower index, and a tie at the
    K-th score keeps the lower index."""
    k = randn(1, 45, 4, seed=6, dtype=F32)
    k[0, [9, 20, 41]] = k[0, 33].clone()
    q, k = prepare("cosine", k[:, [33, 33, 0]], k)
    assert torch.equal(tb.select(q, k, 5), reference.select(q, k, 5))
    assert tb.select(q, k, 4)[0, 0].tolist() == [9, 20, 33, 41]
    assert tb.select(q, k, 3)[0, 0].tolist() == [9, 20, 33]


def test_select_fallbacks(monkeypatch):
    """Large K, windows and spatial selection run on the chunked backend, same result."""
    q, k = randn(1, 9, 4, seed=7), randn(1, 30, 4, seed=8)
    monkeypatch.setattr(tb, "MAX_K", 4)
    assert torch.equal(tb.select(q, k, 6), reference.select(q, k, 6))
    window = torch.randint(0, 30, (9, 12), generator=torch.Generator().manual_seed(9))
    window = torch.stack([w.unique()[:6] for w in window])
    assert torch.equal(tb.select(q, k, 3, window=window), reference.select(q, k, 3, window=window))


# --------------------------------------------------------------------------- aggregate


def _aggregate_case(kernel, G, with_rho, with_bias, B=2, M=13, N=9, C=6, K=3, C_out=5):
    """float64 tensors {values, rho, weight, bias} (None where absent), indices, grad_out."""
    c_out = C_out if kernel == "standard" else C
    tensors = {
        "values": randn(B, M, C, seed=10),
        "rho": randn(B, G, N, K, seed=12).sigmoid() if with_rho else None,
        "weight": {
            "none": None,
            "depthwise": randn(C, 1, K, seed=13),
            "standard": randn(C_out, C, K, seed=13),
        }[kernel],
        "bias": randn(c_out, seed=14) if with_bias else None,
    }
    idx = torch.randint(0, M, (B, G, N, K), generator=torch.Generator().manual_seed(11))
    return tensors, idx, randn(B, N, c_out, seed=15)


def _run(be, tensors, idx, grad_out, kernel, dtype):
    """Output and gradients of every given tensor, inputs cast to ``dtype``."""
    leaves = {n: t.to(dtype).requires_grad_() for n, t in tensors.items() if t is not None}
    get = leaves.get
    out = be.aggregate(get("values"), idx, get("rho"), get("weight"), get("bias"), kernel)
    return [out, *torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))]


@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("with_rho", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_aggregate_matches_reference(kernel, G, with_rho, with_bias):
    case = _aggregate_case(kernel, G, with_rho, with_bias)
    got = _run(tb, *case, kernel, F32)
    want = _run(reference, *case, kernel, F64)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == F32
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
def test_aggregate_float64(kernel):
    """Several query, channel and output blocks; exact to rounding."""
    case = _aggregate_case(kernel, 2, True, True, N=36, C=20, C_out=18)
    for g, r in zip(_run(tb, *case, kernel, F64), _run(reference, *case, kernel, F64)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["none", "standard"])
def test_aggregate_bfloat16_accumulates_in_fp32(kernel):
    tensors, idx, gy = _aggregate_case(kernel, 1, True, True, K=9, C=16)
    tensors = {n: None if t is None else t.bfloat16().double() for n, t in tensors.items()}
    got = _run(tb, tensors, idx, gy, kernel, torch.bfloat16)
    want = _run(reference, tensors, idx, gy.bfloat16().double(), kernel, F64)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------- end to end


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize(
    "options",
    [
        dict(metric="cosine", weighting="softmax", kernel="standard"),
        dict(metric="euclidean", kernel="depthwise", include_self=False),
        dict(metric="spatial", kernel="standard", padding=1),
    ],
)
def test_convnn2d_matches_reference(options):
    x = randn(2, 4, 5, 6, seed=20, dtype=F32)
    w = randn(3 if options["kernel"] == "standard" else 4, 1, 4, seed=21, dtype=F32)
    if options["kernel"] == "standard":
        w = randn(3, 4, 4, seed=21, dtype=F32)
    b = randn(w.shape[0], seed=22, dtype=F32)
    got, want = (
        _grads(partial(convnn2d, K=4, backend=be, **options), [x, w, b])
        for be in ("triton", "reference")
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["none", "depthwise"])
def test_convnn_attention_matches_reference(kernel):
    q, k, v = (randn(2, 2, 10, 4, seed=s, dtype=F32) for s in (30, 31, 32))
    w = randn(8, 1, 3, seed=33, dtype=F32) if kernel == "depthwise" else None
    got, want = (
        _grads(partial(convnn_attention, K=3, kernel=kernel, weight=w, backend=be), [q, k, v])
        for be in ("triton", "reference")
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_select_keeps_lower_indices_on_ties(small_tiles):
    """Small integer features tie everywhere: the kept keys must be the reference's (lower
    indices first among scores tied at the K-th), across tiles and split key ranges."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-1, 2, (2, 9, 3), generator=gen).to(F32)
    k = torch.randint(-1, 2, (2, 45, 3), generator=gen).to(F32)
    for K in (1, 4, 8):
        assert torch.equal(tb.select(q, k, K), reference.select(q, k, K))
