"""The special cases of the operator, measured against the PyTorch modules they recover.

Every case runs on each backend: 'auto' (which may take the exact F.conv2d / SDPA
shortcut) and explicitly 'reference' and 'chunked', which run the real k-NN path.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    BACKENDS,
    F64,
    max_diff,
    natten_mask,
    on_backend,
    qkv_heads,
    randn,
    ranked_attention,
    split_heads,
    topk_attention,
)
from torch import nn

from convnn import ConvNN1d, ConvNN2d, ConvNNAttention
from convnn.functional import convnn_attention

CONV_TOL = 1e-9
ATTN_TOL = 1e-8


# --------------------------------------------------------------------------- convolution


# dim -> (PyTorch module, its ConvNN conversion, an input size: non-square for 2-D)
CONVS = {
    1: (nn.Conv1d, ConvNN1d.from_conv1d, (11,)),
    2: (nn.Conv2d, ConvNN2d.from_conv2d, (9, 13)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depthwise", [False, True])
def test_from_conv_equals_conv(backend, dim, k, stride, bias, depthwise):
    torch.manual_seed(k * 10 + stride)
    conv_cls, from_conv, size = CONVS[dim]
    c_in, c_out = (4, 4) if depthwise else (3, 5)
    groups = c_in if depthwise else 1
    conv = conv_cls(c_in, c_out, k, stride, k // 2, bias=bias, groups=groups).to(F64)
    layer = from_conv(conv)
    assert layer.metric == "spatial" and layer.K == k**dim
    assert layer.kernel == ("depthwise" if depthwise else "standard")
    x = randn(2, c_in, *size, seed=k + stride)
    with on_backend(backend):
        y = layer(x)
    ref = conv(x)
    assert y.shape == ref.shape == (2, c_out, *(-(-n // stride) for n in size))
    assert max_diff(y, ref) < CONV_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(13, 9), (1, 8), (8, 1), (2, 11)])
@pytest.mark.parametrize("stride", [(1, 2), (2, 1), 3])
def test_from_conv2d_thin_maps_and_uneven_strides(backend, hw, stride):
    """Maps narrower than the kernel and per-axis strides, as nn.Conv2d allows them."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride, 1).to(F64)
    layer = ConvNN2d.from_conv2d(conv)
    x = randn(2, 2, *hw, seed=7)
    with on_backend(backend):
        y = layer(x)
    assert max_diff(y, conv(x)) < CONV_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_conv2d_gradients_equal_conv2d(backend):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, 2, 1).to(F64)
    layer = ConvNN2d.from_conv2d(conv)
    x = randn(2, 3, 7, 6, seed=3).requires_grad_()
    g = randn(2, 4, 4, 3, seed=4)
    with on_backend(backend):
        gx, gw, gb = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    rx, rw, rb = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), g)
    assert max_diff(gx, rx) < CONV_TOL
    assert max_diff(gw, rw.reshape(gw.shape)) < CONV_TOL
    assert max_diff(gb, rb) < CONV_TOL


# --------------------------------------------------------------------------- attention


def _mha(dim, heads, bias, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True).to(F64)
    if bias:  # nn.MultiheadAttention initialises biases to zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N", [7, 10])
def test_from_attention_equals_multihead_attention(backend, heads, bias, N):
    mha = _mha(8, heads, bias, seed=heads)
    layer = ConvNNAttention.from_attention(mha).eval()
    x = randn(3, N, 8, seed=N)
    with on_backend(backend):
        y = layer(x)
    ref = mha(x, x, x, need_weights=False)[0]
    assert max_diff(y, ref) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_from_attention_gradients_equal_multihead_attention(backend, bias):
    mha = _mha(8, 2, bias, seed=7)
    layer = ConvNNAttention.from_attention(mha).eval()
    x = randn(2, 6, 8, seed=8).requires_grad_()
    g = randn(2, 6, 8, seed=9)
    with on_backend(backend):
        got = torch.autograd.grad(layer(x), [x, layer.qkv.weight, layer.proj.weight], g)
    want = torch.autograd.grad(
        mha(x, x, x, need_weights=False)[0], [x, mha.in_proj_weight, mha.out_proj.weight], g
    )
    for a, b in zip(got, want):
        assert max_diff(a, b) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 6, 11])
@pytest.mark.parametrize("heads", [1, 3])
def test_functional_topk_attention_equals_kvt(backend, K, heads):
    q, k, v = (randn(2, heads, 11, 4, seed=s) for s in (1, 2, 3))
    with on_backend(backend):
        y = convnn_attention(q, k, v, K)
    assert max_diff(y, topk_attention(q, k, v, K)) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [2, 5, 9])
def test_module_topk_attention_equals_kvt(backend, K):
    torch.manual_seed(K)
    layer = ConvNNAttention(12, 3, K=K, qkv_bias=True, kernel="none").to(F64).eval()
    x = randn(2, 9, 12, seed=K)
    with on_backend(backend):
        y = layer(x)
    q, k, v = qkv_heads(x, layer.qkv.weight, layer.qkv.bias, 3)
    ref = nn.functional.linear(topk_attention(q, k, v, K), layer.proj.weight, layer.proj.bias)
    assert max_diff(y, ref) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(5, 7), (7, 5), (4, 4)])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("top", [None, 4])
def test_window_attention_equals_neighbourhood_attention(backend, hw, window, top):
    """candidates='window' is NATTEN: every query attends the window x window block around
    it, shifted inside the map at the borders; with K < window^2 the top-K of that block."""
    K = window * window if top is None else min(top, window * window)
    H, W = hw
    q, k, v = (randn(2, 2, H * W, 3, seed=s) for s in (4, 5, 6))
    with on_backend(backend):
        y = convnn_attention(q, k, v, K, candidates="window", window=window, hw=hw)
    ref = topk_attention(q, k, v, K, mask=natten_mask(H, W, window))
    assert max_diff(y, ref) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 3, 5])
def test_window_attention_on_a_sequence(backend, window):
    """N = 11 is not a square: the tokens form a 1 x N row and the window is 1-D."""
    q, k, v = (randn(2, 2, 11, 3, seed=s) for s in (1, 2, 3))
    with on_backend(backend):
        y = convnn_attention(q, k, v, window, candidates="window", window=window)
    assert max_diff(y, topk_attention(q, k, v, window, mask=natten_mask(1, 11, window))) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_attention_module(backend):
    torch.manual_seed(0)
    layer = ConvNNAttention(6, 2, K=9, kernel="none", candidates="window", window=3)
    layer = layer.to(F64).eval()
    x = randn(2, 20, 6, seed=9)
    with on_backend(backend):
        y = layer(x, hw=(4, 5))
    q, k, v = qkv_heads(x, layer.qkv.weight, None, 2)
    ref = topk_attention(q, k, v, 9, mask=natten_mask(4, 5, 3))
    ref = nn.functional.linear(ref, layer.proj.weight, layer.proj.bias)
    assert max_diff(y, ref) < ATTN_TOL


def _depthwise_reference(q, k, v, K, weight):
    """y[n, c] = sum_k W[c, k] * p_nk * v[n_k, c], slots in descending score; c in head h
    uses head h's ranking."""
    p, _, vk = ranked_attention(q, k, v, K)  # (B, h, N, K), (B, h, N, K, d)
    B, h, N, d = v.shape
    w = weight[:, 0, :].view(h, d, K)  # channel h*d + j
    out = torch.einsum("bgnk,bgnkj,gjk->bgnj", p, vk, w)
    return out.transpose(1, 2).reshape(B, N, h * d)


def _standard_reference(q, k, v, K, weight):
    """y[n, o] = sum_{c, k} W[o, c, k] * p_{h(c), nk} * v[n_k(h(c)), c]."""
    p, _, vk = ranked_attention(q, k, v, K)
    B, h, N, d = v.shape
    prime = (p[..., None] * vk).permute(0, 2, 3, 1, 4).reshape(B, N, K, h * d)
    return torch.einsum("bnkc,ock->bno", prime, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("K", [1, 4])
def test_depthwise_attention_kernel(backend, heads, K):
    q, k, v = (randn(2, heads, 10, 3, seed=s) for s in (7, 8, 9))
    weight = randn(heads * 3, 1, K, seed=10)
    with on_backend(backend):
        y = convnn_attention(q, k, v, K, kernel="depthwise", weight=weight)
    assert max_diff(y, _depthwise_reference(q, k, v, K, weight)) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_attention_module(backend):
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=5, qkv_bias=True, kernel="depthwise").to(F64).eval()
    with torch.no_grad():
        layer.weight.normal_()
    x = randn(2, 12, 8, seed=11)
    with on_backend(backend):
        y = layer(x)
    q, k, v = qkv_heads(x, layer.qkv.weight, layer.qkv.bias, 2)
    ref = _depthwise_reference(q, k, v, 5, layer.weight)
    ref = nn.functional.linear(ref, layer.proj.weight, layer.proj.bias)
    assert max_diff(y, ref) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_standard_attention_kernel(backend):
    q, k, v = (randn(2, 2, 9, 3, seed=s) for s in (12, 13, 14))
    weight, bias = randn(5, 6, 4, seed=15), randn(5, seed=16)
    with on_backend(backend):
        y = convnn_attention(q, k, v, 4, kernel="standard", weight=weight, bias=bias)
    assert y.shape == (2, 9, 5)
    assert max_diff(y, _standard_reference(q, k, v, 4, weight) + bias) < ATTN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_attention_depthwise_override_starts_as_topk(backend):
    """Copying an MHA into a depthwise ConvNN attention: ones-initialised slot weights make
    it exactly top-K attention with the MHA's projections."""
    mha = _mha(8, 2, True, seed=5)
    layer = ConvNNAttention.from_attention(mha, K=4, kernel="depthwise").eval()
    assert torch.equal(layer.weight, torch.ones(8, 1, 4, dtype=F64))
    x = randn(2, 10, 8, seed=12)
    with on_backend(backend):
        y = layer(x)
    q, k, v = qkv_heads(x, mha.in_proj_weight, mha.in_proj_bias, 2)
    ref = nn.functional.linear(topk_attention(q, k, v, 4), mha.out_proj.weight, mha.out_proj.bias)
    assert max_diff(y, ref) < ATTN_TOL


def test_split_heads_matches_multihead_attention_layout():
    """Sanity check of the test helper itself against nn.MultiheadAttention."""
    mha = _mha(6, 3, True, seed=2)
    x = randn(2, 5, 6, seed=1)
    q, k, v = qkv_heads(x, mha.in_proj_weight, mha.in_proj_bias, 3)
    out = topk_attention(q, k, v, 5)
    ref = mha(x, x, x, need_weights=False)[0]
    got = nn.functional.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    assert max_diff(got, ref) < ATTN_TOL
    assert split_heads(x, 3).shape == (2, 3, 5, 2)
