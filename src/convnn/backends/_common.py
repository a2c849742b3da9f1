"""Pieces every backend shares: the selection scores and the canonical slot order.

Selection needs only a *rank-equivalent* score, so every feature metric is prepared as a
bilinear form ``score = q' . k'`` (one GEMM per block, the shape fused kernels want):

- cosine:      q' = q / |q|,           k' = k / |k|        (zero vectors score 0)
- dot:         q' = q,                 k' = k
- scaled_dot:  q' = q / sqrt(d),       k' = k
- euclidean:   q' = [2q, -1],          k' = [k, |k|^2]    (= -|q-k|^2 + |q|^2; |q|^2 is constant per query)

``spatial`` ranks by position only: Chebyshev distance, then squared distance, then raster
index, encoded exactly as one float64 key per pair.

Every backend ranks the scores of :func:`rankable`, where -inf is free to mark a candidate a
query may not pick: such a candidate loses to every real one, whatever its score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


def prepare(metric: str, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear operands for a feature metric: (B, N, D), (B, M, D) -> (B, N, D'), (B, M, D')."""
    if metric == "cosine":
        return F.normalize(query, dim=-1, eps=EPS), F.normalize(key, dim=-1, eps=EPS)
    if metric == "dot":
        return query, key
    if metric == "scaled_dot":
        return query * query.shape[-1] ** -0.5, key
    if metric == "euclidean":
        ones = query.new_ones(query.shape[:-1] + (1,))
        sq = key.pow(2).sum(-1, keepdim=True)
        return torch.cat([2 * query, -ones], -1), torch.cat([key, sq], -1)
    raise ValueError(f"metric {metric!r} has no bilinear form")


def spatial_keys(pos_q: Tensor, pos_k: Tensor, grid: tuple[int, int]) -> Tensor:
    """Exact ranking key for the spatial metric, higher = nearer.

    pos_q: (N, 3), pos_k: (M, 3) or per query (N, M, 3); float64 rows (row, col, raster
    index) on a grid of shape ``grid`` (the padded map) -> (N, M).
    Exact in float64 while 2 * extent^3 * grid size < 2^53 (grids up to ~1000 x 1000).
    """
    dy = pos_q[:, None, 0] - pos_k[..., 0]
    dx = pos_q[:, None, 1] - pos_k[..., 1]
    cheb = torch.maximum(dy.abs(), dx.abs())
    sq = dy * dy + dx * dx
    # sq <= 2 * cheb^2 < scale, so cheb dominates, then sq, then the raster index.
    scale = 2.0 * max(grid) ** 2 + 1
    return -((cheb * scale + sq) * float(grid[0] * grid[1]) + pos_k[..., 2])


def rankable(scores: Tensor) -> Tensor:
    """Scores as every backend ranks them, in place: NaN ranks like +inf (first, as
    ``torch.topk`` ranks it) and a real -inf like the lowest finite value.

    So -inf marks excluded candidates only (they lose to every real candidate, even one whose
    similarity overflowed to -inf), and every comparison is a total order in which equal
    scores, NaN ones included, tie and go to the lower index.
    """
    lowest = torch.finfo(scores.dtype).min
    return torch.nan_to_num_(scores, nan=float("inf"), posinf=float("inf"), neginf=lowest)


def window_scores(
    query: Tensor, key: Tensor, window: Tensor, spatial_grid: tuple[int, int] | None
) -> Tensor:
    """Rankable scores of each query against its own candidates: query (B, N, D), key
    (B, M, D), window (N, W) key indices -> (B, N, W).

    Every backend scores per-query candidates with this one function, so equal scores (ties,
    which go to the lower index) are equal bit for bit everywhere: a dense GEMM rounds
    differently (e.g. +-1e-8 where this gives an exact 0).
    """
    if spatial_grid is not None:
        return spatial_keys(query[0], key[0][window], spatial_grid)[None]
    return rankable(torch.einsum("bnd,bnwd->bnw", query, key[:, window]))


def topk_low_ties(scores: Tensor, K: int, topk=None) -> tuple[Tensor, Tensor]:
    """Top-K of the last dim where a tie at the K-th score keeps the lower index.

    ``topk(scores, k)`` finds an unsorted top-k with arbitrary ties (default ``torch.topk``);
    it is asked for K + 1, so a row cut a tie exactly when its (K+1)-th score equals its K-th
    (a comparison of two scores, not a pass over the row). Eager code redoes just those
    rows; a compiled graph (no data-dependent branches) redoes every row without sorting.
    scores (..., M), without NaN (see :func:`rankable`) -> values (..., K), positions
    (..., K), not necessarily sorted.
    """
    M = scores.shape[-1]
    vals, idx = (topk or _topk)(scores, min(K + 1, M))
    vals, order = vals.sort(dim=-1, descending=True)
    idx = idx.gather(-1, order)
    cut = vals[..., K] == vals[..., K - 1] if K < M else vals.new_zeros(vals.shape[:-1], dtype=bool)
    vals, idx = vals[..., :K], idx[..., :K]
    if torch.compiler.is_compiling():
        kth = vals[..., K - 1 :]
        above = scores > kth
        ties = (scores == kth).cumsum(-1) <= K - above.sum(-1, keepdim=True)
        keep = above | ((scores == kth) & ties)  # exactly K per row
        fixed = keep.to(torch.uint8).topk(K, dim=-1).indices
        idx = torch.where(cut[..., None], fixed, idx)
        return scores.gather(-1, idx), idx
    if cut.any():
        rows = cut.nonzero(as_tuple=True)
        v, i = scores[rows].sort(dim=-1, descending=True, stable=True)
        vals[rows], idx[rows] = v[..., :K], i[..., :K]
    return vals, idx


def _topk(scores: Tensor, K: int) -> tuple[Tensor, Tensor]:
    return scores.topk(K, dim=-1, sorted=False)


def canonical_order(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort the last dim by descending score, ties by lower index: (..., K) -> (..., K)."""
    indices, perm = indices.sort(-1)
    scores = scores.gather(-1, perm)
    scores, perm = scores.sort(dim=-1, descending=True, stable=True)
    return scores, indices.gather(-1, perm)


def group_rows(indices: Tensor, num_tokens: int) -> Tensor:
    """Rows of ``values.reshape(B * M * G, C // G)`` that ``indices`` (B, G, N, K) select,
    in (B, N, K, G) order, so the gathered rows are already laid out as (B, N, K, C)."""
    B, G = indices.shape[:2]
    base = torch.arange(B, device=indices.device).view(B, 1, 1, 1) * num_tokens
    group = torch.arange(G, device=indices.device).view(1, G, 1, 1)
    return ((indices + base) * G + group).permute(0, 2, 3, 1).reshape(-1)


def group_gather(values: Tensor, indices: Tensor) -> Tensor:
    """Gather neighbours per channel group.

    values: (B, M, C), indices: (B, G, N, K) with C = G * d  ->  (B, N, K, C),
    where channel g*d + j of slot k comes from token indices[b, g, n, k].
    """
    B, M, C = values.shape
    G, N, K = indices.shape[1:]
    out = values.reshape(B * M * G, C // G).index_select(0, group_rows(indices, M))
    return out.view(B, N, K, C)


def group_scatter(grad: Tensor, indices: Tensor, out: Tensor) -> None:
    """Adjoint of :func:`group_gather`: add grad (B, N, K, C) into out (B, M, C) in place."""
    B, M, C = out.shape
    G = indices.shape[1]
    out.view(B * M * G, C // G).index_add_(0, group_rows(indices, M), grad.reshape(-1, C // G))


def scale_groups(prime: Tensor, rho: Tensor) -> Tensor:
    """Gathered neighbours (B, N, K, C) times their group's weight rho (B, G, N, K), broadcast
    over the group's C // G channels (never expanded to (B, N, K, C))."""
    G = rho.shape[1]
    rho = rho.permute(0, 2, 3, 1)[..., None]  # (B, N, K, G, 1)
    return (prime.unflatten(-1, (G, prime.shape[-1] // G)) * rho).flatten(-2)
