"""The compiled Triton kernels on a real GPU: they agree with the reference and chunked
backends forward and backward, the auto backend uses them after its first-use check, and what
the JIT compiled is exactly the AOT table, with no spills in the loaded binaries.

Skipped without CUDA, and under ``TRITON_INTERPRET=1`` (the test suite's default, which would
interpret instead of compile). ``python benchmarks/gpu_validate.py`` runs it with
``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0 (benchmarks/gpu_validate.py runs it)",
)

from convnn import backends  # noqa: E402
from convnn.backends import chunked, reference, triton_aot  # noqa: E402
from convnn.backends import triton as tb  # noqa: E402
from convnn.backends._common import prepare  # noqa: E402
from convnn.functional import convnn2d, convnn_attention  # noqa: E402

DEV = torch.device("cuda")
F64 = torch.float64
# Tolerances relative to the result's scale: fp32 products run as tf32x3 (about fp32), the
# half types round their inputs and outputs.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def randn(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEV, dtype=dtype)


def small_ints(*shape, seed=0, dtype=torch.float32):
    """Features in {-2..2}: scores are exact small integers in every dtype, and many tie."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=gen, device=DEV).to(dtype)


@pytest.fixture(params=["split", "stream"])
def key_ranges(request, monkeypatch):
    monkeypatch.setattr(tb, "TARGET_PROGRAMS", 1 if request.param == "stream" else 1 << 20)


def assert_close_scaled(got, want, tol, what=""):
    scale = want.double().abs().max().item() + 1
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


# --------------------------------------------------------------------------- select


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("K", [1, 9, 16, 17, 32, 33, 64, 100, 128])
def test_select_exact_with_ties(key_ranges, dtype, K):
    """Integer features: every score is exact, so the indices are the reference's, ties
    (lower index first) included, for every running top-K width."""
    q, k = small_ints(2, 300, 24, seed=1, dtype=dtype), small_ints(2, 1000, 24, seed=2, dtype=dtype)
    ex = torch.arange(300, device=DEV)
    want = reference.select(q.double(), k.double(), K, exclude=ex)
    assert torch.equal(tb.select(q, k, K, exclude=ex), want)
    assert torch.equal(tb.select(q[:1], k, K), reference.select(q[:1].double(), k.double(), K))


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "scaled_dot"])
@pytest.mark.parametrize("K", [9, 64])
def test_select_float32_ranks_like_float64(metric, K):
    """Random features: the selected scores are the exact top-K scores (float64) within
    tf32x3's error, in order; the indices equal the chunked backend's but at near-ties."""
    q, k = prepare(metric, randn(4, 1024, 64, seed=3), randn(4, 4096, 64, seed=4))
    ex = torch.arange(1024, device=DEV)
    got = tb.select(q, k, K, exclude=ex)
    scores = q.double() @ k.double().transpose(1, 2)
    scores[:, ex, ex] = float("-inf")
    want = scores.topk(K, dim=-1).values
    assert_close_scaled(scores.gather(-1, got), want, 1e-5, "selected scores")
    # Two float32 computations (tf32x3 against the chunked backend's fp32 GEMM) may order
    # keys whose exact scores lie within their rounding of each other: an index may differ
    # only there, never elsewhere.
    other = chunked.select(q, k, K, exclude=ex)
    differ = got != other
    gap = (scores.gather(-1, got) - scores.gather(-1, other))[differ].abs()
    scale = want.abs().max().item()
    assert gap.numel() == 0 or gap.max().item() <= 1e-5 * scale, (
        f"{int(differ.sum())} indices differ from the chunked backend's, exact scores up to "
        f"{gap.max().item():.3g} apart (scale {scale:.3g}): not near-ties"
    )


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_select_ties_of_identical_real_keys(key_ranges, dtype):
    """Identical real-valued keys (cosine of random features) score identically on tensor
    cores wherever they lie in the tiles: they come out by lower index, and a tie at the
    K-th score keeps the lower index."""
    k = randn(1, 1000, 24, seed=6)
    k[0, [9, 20, 513, 999]] = k[0, 33].clone()
    q, k = prepare("cosine", k[:, [33, 33, 0]].to(dtype), k.to(dtype))
    got = tb.select(q, k, 5)
    assert got[0, :2].tolist() == [[9, 20, 33, 513, 999]] * 2
    assert tb.select(q, k, 3)[0, :2].tolist() == [[9, 20, 33]] * 2
    if dtype == torch.float32:  # the third query's too, as float64 ranks them
        assert torch.equal(got, reference.select(q.double(), k.double(), 5))


def test_select_refuses_uncovered_calls():
    q = randn(1, 8, 16)
    with pytest.raises(ValueError, match="K must be <="):
        tb.select(q, randn(1, 300, 16), tb.MAX_K + 1)
    with pytest.raises(ValueError, match="float64"):
        tb.select(q.double(), q.double(), 3)


# --------------------------------------------------------------------------- aggregate


def _aggregate_inputs(kernel, G, C, dtype, B=3, M=700, N=650, K=9, C_out=80):
    c_out = C_out if kernel == "standard" else C
    tensors = [
        randn(B, M, C, seed=10, dtype=dtype),
        randn(B, G, N, K, seed=11, dtype=dtype).sigmoid(),
        {"none": None, "depthwise": randn(C, 1, K, seed=12, dtype=dtype)}.get(kernel),
        randn(c_out, seed=13, dtype=dtype),
    ]
    if kernel == "standard":
        tensors[2] = randn(C_out, C, K, seed=12, dtype=dtype) / C**0.5
    gen = torch.Generator(device=DEV).manual_seed(14)
    idx = torch.randint(0, M, (B, G, N, K), generator=gen, device=DEV)
    return tensors, idx, randn(B, N, c_out, seed=15, dtype=dtype)


def _fwd_bwd(aggregate, tensors, idx, gy, kernel, dtype):
    leaves = [None if t is None else t.to(dtype).detach().requires_grad_() for t in tensors]
    out = aggregate(leaves[0], idx, leaves[1], leaves[2], leaves[3], kernel)
    present = [t for t in leaves if t is not None]
    return [out, *torch.autograd.grad(out, present, gy.to(dtype))]


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
@pytest.mark.parametrize("G, C", [(1, 64), (8, 512), (2, 6)])  # 6: padded to 2 x 16
def test_aggregate_matches_reference(dtype, kernel, G, C):
    tensors, idx, gy = _aggregate_inputs(kernel, G, C, dtype)
    got = _fwd_bwd(tb.aggregate, tensors, idx, gy, kernel, dtype)
    want = _fwd_bwd(reference.aggregate, tensors, idx, gy, kernel, F64)
    for name, g, w in zip(["output", "values", "rho", "weight", "bias"], got, want):
        assert g.dtype == dtype
        assert_close_scaled(g, w, TOL[dtype], name)


def test_aggregate_tf32_when_torch_allows_it():
    tensors, idx, gy = _aggregate_inputs("standard", 1, 64, torch.float32)
    want = _fwd_bwd(reference.aggregate, tensors, idx, gy, "standard", F64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = _fwd_bwd(tb.aggregate, tensors, idx, gy, "standard", torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    for g, w in zip(got, want):
        assert_close_scaled(g, w, 1e-2)


# --------------------------------------------------------------------------- end to end


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, idx = fn(*inputs)
    return idx, [out, *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize("kernel", ["standard", "depthwise"])
def test_convnn2d_auto_matches_chunked(kernel):
    """Integer features and the dot metric: exact scores, so auto (the kernels) and chunked
    pick the same neighbours; outputs and gradients agree."""
    x = small_ints(2, 32, 24, 24, seed=20)
    w = randn(48, 32, 9, seed=21) / 16 if kernel == "standard" else randn(32, 1, 9, seed=21)
    b = randn(w.shape[0], seed=22)
    run = {
        be: _grads(
            lambda x, w, b, be=be: convnn2d(
                x,
                w,
                b,
                K=9,
                metric="dot",
                weighting="softmax",
                kernel=kernel,
                padding=1,
                return_indices=True,
                backend=be,
            ),
            [x, w, b],
        )
        for be in (None, "chunked")
    }
    assert torch.equal(run[None][0], run["chunked"][0])
    for g, c in zip(run[None][1], run["chunked"][1]):
        assert_close_scaled(g, c, 1e-4)


def test_convnn_attention_auto_matches_chunked():
    q, k = (small_ints(2, 4, 500, 16, seed=s) for s in (30, 31))  # scale 1/4: exact
    v = randn(2, 4, 500, 16, seed=32)
    run = {
        be: _grads(
            lambda q, k, v, be=be: convnn_attention(q, k, v, 16, return_indices=True, backend=be),
            [q, k, v],
        )
        for be in (None, "chunked")
    }
    assert torch.equal(run[None][0], run["chunked"][0])
    for g, c in zip(run[None][1], run["chunked"][1]):
        assert_close_scaled(g, c, 1e-4)


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_first_use_check_passes(dtype):
    assert tb.first_use_check(DEV, dtype) is None


def test_auto_uses_the_kernels_on_this_device(monkeypatch):
    assert backends.get(None, "cuda") is tb.auto
    monkeypatch.setattr(tb, "_ready", {})
    calls = []
    real = tb._select
    monkeypatch.setattr(tb, "_select", lambda *a: calls.append(1) or real(*a))
    q, k = small_ints(1, 40, 16), small_ints(1, 90, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a covered device: no fallback warning
        tb.auto.select(q, k, 5)
    device = q.device
    # the device, and the selection kernel of width 16: the check's call and this one
    assert tb._ready == {
        (device, torch.float32, None): True,
        (device, torch.float32, ("select", 16)): True,
    }
    assert len(calls) == 2


def test_compiled_model_runs_the_checked_kernels(monkeypatch):
    """torch.compile of a layer on the automatic choice: after an eager step (the first-use
    checks), each compiled step launches the table's kernels, agreeing with eager code."""
    from convnn import ConvNN2d

    torch.manual_seed(0)
    layer = ConvNN2d(32, 32, K=9).to(DEV)
    x = randn(2, 32, 16, 16, seed=4)
    launched, launch = [], tb._launch
    monkeypatch.setattr(tb, "_launch", lambda lc, *a: launched.append(lc) or launch(lc, *a))
    results = []
    for run in (layer, torch.compile(layer)):
        for _ in range(2):
            launched.clear()
            xi = x.clone().requires_grad_()
            y, idx = run(xi, return_indices=True)
            (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
            kernels = {lc.kernel for lc in launched}
            assert {"select_topk", "standard_fwd", "aggregate_bwd"} <= kernels
            assert all(lc in tb.table() for lc in launched)
            results.append((y, gx, idx))
    # compiled code fuses the normalisation, so a near-tie may order otherwise: the picks
    # agree but at a few, and the outputs at every position whose picks agree
    tokens = lambda y: y.flatten(2).transpose(1, 2)  # noqa: E731  (B, N, C)
    for y, _, idx in results[1:]:
        same = (idx == results[0][2]).all(-1)  # (B, N): every pick of the position agrees
        assert same.float().mean() > 0.99
        assert_close_scaled(tokens(y)[same], tokens(results[0][0])[same], 1e-4)
    y, gx, idx = results[1]  # eager twice: the same everywhere
    assert torch.equal(idx, results[0][2])
    assert_close_scaled(gx, results[0][1], 1e-4)


def test_jit_compiled_exactly_the_table_without_spills():
    """Every kernel variant the JIT compiled in this session (all tests above) is an entry of
    the table, specialised as the AOT test compiled it, and its loaded binary spills nothing."""
    compiled = triton_aot.jit_compiled()
    assert compiled, "nothing compiled: run the whole file"
    unmatched = [c["describe"] for c in compiled if c["launch"] is None]
    assert unmatched == []
    spilling = [(c["describe"], c["n_spills"]) for c in compiled if c["n_spills"]]
    assert spilling == []
