"""Independent references the operator tests compare against.

Nothing here calls into convnn's selection or aggregation code: every reference is written
from the specification (docs in /DESIGN.md) with plain PyTorch, so a test that passes shows
the library agrees with the maths, not with itself.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from convnn import backends

# 'auto' takes the exact shortcuts (F.conv2d / SDPA); the others run the real k-NN path.
BACKENDS = ("auto", "reference", "chunked")
F64 = torch.float64


def on_backend(name: str):
    """Run the enclosed code on backend ``name`` ('auto' = the library's default dispatch)."""
    return contextlib.nullcontext() if name == "auto" else backends.use(name)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Seeded standard-normal tensor (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def similarity(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs similarity (B, N, D), (B, M, D) -> (B, N, M), higher = closer.

    Zero vectors have cosine similarity 0 (F.cosine_similarity clamps the norm).
    """
    if metric == "cosine":
        return F.cosine_similarity(a[:, :, None, :], b[:, None, :, :], dim=-1, eps=1e-12)
    if metric == "euclidean":
        return -(a[:, :, None, :] - b[:, None, :, :]).pow(2).sum(-1)
    dot = torch.einsum("bnd,bmd->bnm", a, b)
    if metric == "scaled_dot":
        return dot / a.shape[-1] ** 0.5
    assert metric == "dot", metric
    return dot


def natten_mask(H: int, W: int, window: int) -> torch.Tensor:
    """(N, N) bool: query (r, c) may attend the wh x window block starting at
    (clamp(r - wh // 2, 0, H - wh), clamp(c - window // 2, 0, W - window)), where the
    block is one row high on a 1 x W map (a sequence) and wh = window otherwise."""
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    wh = 1 if H == 1 else window
    for r in range(H):
        for c in range(W):
            r0 = min(max(r - wh // 2, 0), H - wh)
            c0 = min(max(c - window // 2, 0), W - window)
            for rr in range(r0, r0 + wh):
                for cc in range(c0, c0 + window):
                    mask[r * W + c, rr * W + cc] = True
    return mask


def ranked_attention(q, k, v, K: int, mask: torch.Tensor | None = None):
    """Top-K attention, slot by slot: q, k, v (B, h, N, d).

    Returns p (B, h, N, K) softmax weights over the K best keys (descending score),
    idx (B, h, N, K) their indices and vk (B, h, N, K, d) their values.
    """
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    top, idx = s.topk(K, dim=-1, sorted=True)
    p = top.softmax(-1)
    B, h, N, d = v.shape
    vk = torch.stack(
        [torch.stack([v[b, g][idx[b, g]] for g in range(h)]) for b in range(B)]
    )  # (B, h, N, K, d)
    return p, idx, vk


def topk_attention(q, k, v, K: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KVT attention written densely: keep each row's K best scores, softmax, @ v.

    q, k, v (B, h, N, d) -> (B, N, h * d). ``mask`` (N, N) restricts the keys first.
    """
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    kth = s.topk(K, dim=-1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    out = s.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h * d) -> (B, h, N, d)."""
    B, N, C = t.shape
    return t.view(B, N, heads, C // heads).transpose(1, 2)


def qkv_heads(x: torch.Tensor, weight, bias, heads: int):
    """timm / nn.MultiheadAttention packed projection: rows q, k, v of ``weight``."""
    q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, M, C), idx (B, N, K) -> (B, N, K, C) with a Python loop over the batch."""
    return torch.stack([tokens[b][idx[b]] for b in range(tokens.shape[0])])


def padded_tokens(x: torch.Tensor, padding: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, Hp * Wp, C): the zero-padded map flattened row-major."""
    return F.pad(x, (padding,) * 4).flatten(2).transpose(1, 2)


def feature_convnn(x, weight, bias, K: int, metric: str = "cosine") -> torch.Tensor:
    """Independent ConvNN2d (padding 0, stride 1, include_self, candidates 'all', kernel
    'standard'): each position aggregates itself and its K - 1 most similar others.

    x (B, C, H, W), weight (C_out, C, K) -> (B, C_out, H, W).
    """
    B, C, H, W = x.shape
    tokens = padded_tokens(x, 0)
    sims = similarity(metric, tokens, tokens)
    sims = sims + torch.diag(torch.full((H * W,), float("inf"), dtype=sims.dtype))
    idx = sims.topk(K, dim=-1).indices  # self first, then descending similarity
    y = torch.einsum("bnkc,ock->bon", gather_tokens(tokens, idx), weight)
    if bias is not None:
        y = y + bias[:, None]
    return y.view(B, -1, H, W)


def mhsa(x, qkv_weight, qkv_bias, heads: int, K: int | None = None) -> torch.Tensor:
    """Multi-head self-attention (top-K when K is given) before the output projection."""
    q, k, v = qkv_heads(x, qkv_weight, qkv_bias, heads)
    return topk_attention(q, k, v, q.shape[2] if K is None else K)
