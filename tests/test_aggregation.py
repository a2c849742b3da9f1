"""Aggregation and backend agreement: y = sum_k W_k (rho_k * v_{idx_k}) + b, with gradients."""

from __future__ import annotations

import random

import pytest
import torch
from _helpers import F64, max_diff, on_backend, randn
from torch.autograd import gradcheck

from convnn import ConvNN1d, ConvNN2d
from convnn.backends import chunked
from convnn.functional import (
    Grid,
    candidate_count,
    convnn2d,
    convnn_attention,
    neighbor_aggregate,
)

TOL = 1e-10


def _aggregate_reference(values, indices, weight, bias, rho, kernel, pointwise=None):
    """Independent y[b, n, o]: channel c = g * d + j of slot k reads token indices[b, g, n, k]."""
    B, M, C = values.shape
    grouped = indices if indices.dim() == 4 else indices[:, None]
    G, N, K = grouped.shape[1:]
    r = torch.ones(grouped.shape, dtype=values.dtype) if rho is None else rho.view(grouped.shape)
    d = C // G
    prime = torch.zeros(B, N, K, C, dtype=values.dtype)
    for b in range(B):
        for g in range(G):
            block = values[b, :, g * d : (g + 1) * d][grouped[b, g]]  # (N, K, d)
            prime[b, :, :, g * d : (g + 1) * d] = block * r[b, g][..., None]
    if kernel == "none":
        y = prime.sum(2)
    elif kernel == "standard":
        y = torch.einsum("bnkc,ock->bno", prime, weight)
    else:
        y = torch.einsum("bnkc,ck->bnc", prime, weight[:, 0])
        if kernel == "separable":
            y = y @ pointwise[:, :, 0].T
    return y if bias is None else y + bias


def _aggregate_inputs(kernel, groups, seed=0, B=1, M=5, C=4, N=3, K=3, C_out=3):
    g = torch.Generator().manual_seed(seed)
    values = randn(B, M, C, seed=seed)
    indices = torch.randint(0, M, (B, groups, N, K), generator=g)
    indices[..., 1] = indices[..., 0]  # repeated neighbours: gradients must accumulate
    rho = randn(B, groups, N, K, seed=seed + 1)
    weight = {
        "standard": randn(C_out, C, K, seed=seed + 2),
        "depthwise": randn(C, 1, K, seed=seed + 2),
        "separable": randn(C, 1, K, seed=seed + 2),
        "none": None,
    }[kernel]
    pointwise = randn(C_out, C, 1, seed=seed + 3) if kernel == "separable" else None
    bias = randn(C_out if kernel in ("standard", "separable") else C, seed=seed + 4)
    return values, indices, rho, weight, bias, pointwise


KERNELS = ["standard", "depthwise", "separable", "none"]


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_rho", [False, True])
def test_neighbor_aggregate_matches_definition(backend, kernel, groups, with_rho):
    values, indices, rho, weight, bias, pw = _aggregate_inputs(kernel, groups, B=2)
    rho = rho if with_rho else None
    idx = indices if groups > 1 else indices[:, 0]
    r = None if rho is None else (rho if groups > 1 else rho[:, 0])
    y = neighbor_aggregate(
        values, idx, weight, bias, r, kernel=kernel, pointwise_weight=pw, backend=backend
    )
    ref = _aggregate_reference(values, indices, weight, bias, rho, kernel, pw)
    assert max_diff(y, ref) < TOL


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups", [1, 2])
def test_neighbor_aggregate_gradcheck(backend, kernel, groups):
    values, indices, rho, weight, bias, pw = _aggregate_inputs(kernel, groups, seed=groups)
    inputs = [t.requires_grad_() for t in (values, rho, weight, bias, pw) if t is not None]

    def fn(values, rho, *params):
        params = list(params)
        w = params.pop(0) if weight is not None else None
        b = params.pop(0)
        p = params.pop(0) if pw is not None else None
        return neighbor_aggregate(
            values, indices, w, b, rho, kernel=kernel, pointwise_weight=p, backend=backend
        )

    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "scaled_dot"])
@pytest.mark.parametrize("kernel", ["standard", "depthwise"])
def test_convnn2d_softmax_gradcheck(backend, metric, kernel):
    """The full operator with softmax weighting: gradients wrt input, weight and bias,
    including the path through the recomputed similarity scores."""
    x = randn(1, 2, 3, 3, seed=5).requires_grad_()
    w_shape = (3, 2, 4) if kernel == "standard" else (2, 1, 4)
    weight = randn(*w_shape, seed=6).requires_grad_()
    bias = randn(w_shape[0], seed=7).requires_grad_()

    def fn(x, weight, bias):
        return convnn2d(
            x,
            weight,
            bias,
            4,
            padding=1,
            metric=metric,
            weighting="softmax",
            kernel=kernel,
            backend=backend,
        )

    assert gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_attention_gradcheck(backend):
    q, k, v = (randn(1, 2, 5, 2, seed=s).requires_grad_() for s in (1, 2, 3))
    w = randn(4, 1, 3, seed=4).requires_grad_()

    def fn(q, k, v, w):
        return convnn_attention(q, k, v, 3, kernel="depthwise", weight=w, backend=backend)

    assert gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- agreement


def _random_conv_config(rng: random.Random) -> dict:
    H, W = rng.randint(3, 6), rng.randint(3, 6)
    padding = rng.choice([0, 1])
    candidates = rng.choice(["all", "random", "grid", "window"])
    metric = rng.choice(["cosine", "euclidean", "dot", "scaled_dot", "spatial"])
    kernel = rng.choice(KERNELS)
    cfg = dict(
        H=H,
        W=W,
        stride=rng.choice([1, 2]),
        padding=padding,
        metric=metric,
        candidates=candidates,
        kernel=kernel,
        weighting=rng.choice(["none", "softmax"]),
        include_self=rng.choice([True, False]),
        coords=rng.choice([None, "xy"]),
        lam=rng.choice([0.0, 0.3, 0.7]),  # lam = 1 ranks by position alone: exact ties
        num_candidates=None,
        window=None,
        training=rng.choice([True, False]),
    )
    if candidates in ("random", "grid"):
        cfg["num_candidates"] = rng.randint(3, H * W)
    if candidates == "window":
        cfg["window"] = 3
    grid = Grid(H, W, padding, padding, cfg["stride"], cfg["stride"])
    count = candidate_count(grid, candidates, cfg["num_candidates"], cfg["window"])
    cfg["K"] = rng.randint(1, min(count, 7))
    return cfg


def _run_conv(cfg: dict, backend: str, seed: int):
    cfg = dict(cfg)
    H, W, training = cfg.pop("H"), cfg.pop("W"), cfg.pop("training")
    c_out = 4 if cfg["kernel"] in ("standard", "separable") else 3
    torch.manual_seed(seed)
    layer = ConvNN2d(3, c_out, **cfg).to(F64).train(training)
    x = randn(2, 3, H, W, seed=seed).requires_grad_()
    torch.manual_seed(seed + 1)  # the same random candidates on every backend
    with on_backend(backend):
        y = layer(x)
        params = [x] + [p for p in layer.parameters()]
        grads = torch.autograd.grad(y, params, randn(*y.shape, seed=seed + 2))
    return y, grads


CONV_CONFIGS = [_random_conv_config(random.Random(i)) for i in range(60)]


@pytest.mark.parametrize("backend", ["chunked", "auto"])
@pytest.mark.parametrize("i", range(len(CONV_CONFIGS)))
def test_backends_agree_on_random_conv_configs(backend, i):
    cfg = CONV_CONFIGS[i]
    y_ref, g_ref = _run_conv(cfg, "reference", seed=i)
    y, g = _run_conv(cfg, backend, seed=i)
    assert max_diff(y, y_ref) < TOL, cfg
    for a, b in zip(g, g_ref):
        assert max_diff(a, b) < TOL, cfg


def _random_attention_config(rng: random.Random) -> dict:
    h, w = rng.randint(2, 4), rng.randint(2, 5)
    candidates = rng.choice(["all", "random", "grid", "window"])
    cfg = dict(
        hw=(h, w),
        metric=rng.choice(["cosine", "euclidean", "dot", "scaled_dot", "spatial"]),
        candidates=candidates,
        kernel=rng.choice(["none", "depthwise", "standard"]),
        weighting=rng.choice(["none", "softmax"]),
        include_self=rng.choice([True, False]),
        num_candidates=rng.randint(2, h * w) if candidates in ("random", "grid") else None,
        window=(1 if min(h, w) < 3 else 3) if candidates == "window" else None,
        training=rng.choice([True, False]),
    )
    count = candidate_count(Grid(h, w), candidates, cfg["num_candidates"], cfg["window"])
    cfg["K"] = rng.randint(1, count)
    return cfg


def _run_attention(cfg: dict, backend: str, seed: int):
    cfg = dict(cfg)
    K, N = cfg.pop("K"), cfg["hw"][0] * cfg["hw"][1]
    q, k, v = (randn(2, 2, N, 3, seed=seed + s).requires_grad_() for s in range(3))
    kernel = cfg["kernel"]
    weight = {"none": None, "depthwise": randn(6, 1, K), "standard": randn(5, 6, K)}[kernel]
    inputs = [q, k, v] + ([] if weight is None else [weight.requires_grad_()])
    torch.manual_seed(seed)
    y = convnn_attention(q, k, v, K, weight=weight, backend=backend, **cfg)
    grads = torch.autograd.grad(
        y, inputs, randn(*y.shape, seed=seed + 5), allow_unused=True, materialize_grads=True
    )  # q and k get no gradient without softmax weighting: selection is discrete
    return y, grads


ATTENTION_CONFIGS = [_random_attention_config(random.Random(100 + i)) for i in range(40)]


@pytest.mark.parametrize("i", range(len(ATTENTION_CONFIGS)))
def test_backends_agree_on_random_attention_configs(i):
    cfg = ATTENTION_CONFIGS[i]
    y_ref, g_ref = _run_attention(cfg, "reference", seed=i)
    y, g = _run_attention(cfg, "chunked", seed=i)
    assert max_diff(y, y_ref) < TOL, cfg
    for a, b in zip(g, g_ref):
        assert max_diff(a, b) < TOL, cfg


@pytest.mark.parametrize("i", range(0, len(CONV_CONFIGS), 3))
def test_chunked_blocks_merge_exactly(monkeypatch, i):
    """Tiny key and query blocks force the streaming top-K merge and blocked aggregation."""
    cfg = CONV_CONFIGS[i]
    y_ref, g_ref = _run_conv(cfg, "reference", seed=i)
    monkeypatch.setattr(chunked, "KEY_BLOCK", 5)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 16)
    y, g = _run_conv(cfg, "chunked", seed=i)
    assert max_diff(y, y_ref) < TOL, cfg
    for a, b in zip(g, g_ref):
        assert max_diff(a, b) < TOL, cfg


@pytest.mark.parametrize("K", [1, 3, 17])
def test_topk_grouped_is_exact(K):
    scores = randn(3, 5, 4 * K * 64 + 37, seed=K)
    vals, idx = chunked.topk_grouped(scores, K)
    ref = scores.topk(K, dim=-1).values
    assert torch.equal(vals.sort(-1, descending=True).values, ref)
    assert torch.equal(scores.gather(-1, idx), vals)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_matches_reference_on_a_large_map(metric):
    """2500 tokens: the streaming selection takes its grouped top-K path at default sizes."""
    x = randn(1, 4, 50, 50, seed=21)
    weight = randn(5, 4, 9, seed=22)
    out = [
        convnn2d(x, weight, None, 9, metric=metric, backend=b, return_indices=True)
        for b in ("reference", "chunked")
    ]
    assert torch.equal(out[0][1], out[1][1])
    assert max_diff(out[0][0], out[1][0]) < TOL


@pytest.mark.parametrize("candidates", ["all", "window", "grid"])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("K", [3, 5])
def test_backends_agree_on_exact_ties(candidates, metric, K):
    """coords='xy' with lam = 1 ranks by position alone, so equidistant neighbours tie
    exactly; every backend must keep the same ones (the lower index, as the reference does)."""
    x = randn(1, 2, 5, 5, seed=23)
    options = dict(
        metric=metric,
        candidates=candidates,
        window=3 if candidates == "window" else None,
        num_candidates=16 if candidates == "grid" else None,
        coords="xy",
        lam=1.0,
        kernel="none",
        include_self=False,
        return_indices=True,
    )
    y_ref, idx_ref = convnn2d(x, None, None, K, backend="reference", **options)
    y, idx = convnn2d(x, None, None, K, backend="chunked", **options)
    assert torch.equal(idx, idx_ref)
    assert max_diff(y, y_ref) < TOL


def _random_conv1d_config(rng: random.Random) -> dict:
    L, padding, stride = rng.randint(3, 12), rng.choice([0, 1, 2]), rng.choice([1, 2, 3])
    candidates = rng.choice(["all", "random", "grid", "window"])
    cfg = dict(
        stride=stride,
        padding=padding,
        metric=rng.choice(["cosine", "euclidean", "dot", "scaled_dot", "spatial"]),
        candidates=candidates,
        kernel=rng.choice(KERNELS),
        weighting=rng.choice(["none", "softmax"]),
        include_self=rng.choice([True, False]),
        num_candidates=rng.randint(2, L) if candidates in ("random", "grid") else None,
        window=rng.choice([1, 3]) if candidates == "window" else None,
    )
    grid = Grid(1, L, 0, padding, 1, stride)
    count = candidate_count(grid, candidates, cfg["num_candidates"], cfg["window"])
    return dict(cfg, K=rng.randint(1, min(count, 5)), L=L)


CONV1D_CONFIGS = [_random_conv1d_config(random.Random(200 + i)) for i in range(24)]


@pytest.mark.parametrize("i", range(len(CONV1D_CONFIGS)))
def test_backends_agree_on_random_conv1d_configs(i):
    """Sequences are 1 x L maps: 1-D windows, lattices and padding on one axis."""
    cfg = dict(CONV1D_CONFIGS[i])
    L = cfg.pop("L")
    c_out = 4 if cfg["kernel"] in ("standard", "separable") else 3
    results = []
    for backend in ("reference", "chunked"):
        torch.manual_seed(i)
        layer = ConvNN1d(3, c_out, **cfg).to(F64).eval()
        x = randn(2, 3, L, seed=i).requires_grad_()
        with on_backend(backend):
            y = layer(x)
            results.append(
                (y, *torch.autograd.grad(y, [x, *layer.parameters()], torch.ones_like(y)))
            )
    for a, b in zip(*results):
        assert max_diff(a, b) < TOL, cfg
