"""Dense reference backend: the readable oracle every other backend is tested against.

It is the formulation ConvNN was first written in: the full (B, N, M) similarity matrix,
a top-K of every row, then the expanded (B, C, N*K) "prime" tensor of gathered neighbours
convolved by a Conv1d with kernel K and stride K. Memory is O(N*M + N*K*C): use it for
tests, small inputs and as the "dense" baseline in benchmarks, never for large maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    BlockScores,
    group_gather,
    scale_groups,
    tensor_scores,
    topk_low_ties,
)

name = "reference"


def select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    spatial_grid: tuple[int, int] | None = None,
    exclude: Tensor | None = None,
    window: Tensor | None = None,
) -> Tensor:
    """Indices (B, N, K) of the K best keys per query by ``query @ key.T`` (GEMM operands
    (B, N, D), (B, M, D)), or by the spatial keys of positions (1, N, 3), (1, M, 3) on a
    padded map ``spatial_grid``. See :func:`select_scores`."""
    scores = tensor_scores(query, key, spatial_grid)
    return select_scores(scores, K, exclude=exclude, window=window)


def select_scores(
    scores: BlockScores, K: int, *, exclude: Tensor | None = None, window: Tensor | None = None
) -> Tensor:
    """Indices (B, N, K) of the K best keys per query, descending score, ties by lower index
    (also among candidates tied at the K-th score: the lower indices are kept).

    window: (N, W) or (B, N, W) per-query candidate keys (default all M); exclude: (N,) a
    key each query may not pick (-1 for none). Scores rank as
    :func:`~convnn.metrics.rankable` makes them (NaN first); a blocked key is never picked
    over a real one.
    """
    with torch.no_grad():
        N, M = scores.num_queries, scores.num_keys
        if window is None:
            dense = scores.block(slice(None), slice(None))  # (B, N, M): the dense formulation
        else:  # the window's scores, every other key blocked
            own = scores.window(slice(None), window)
            dense = own.new_full((own.shape[0], N, M), float("-inf"))
            dense.scatter_(2, window.expand_as(own), own)
        blocked = torch.zeros(N, M, dtype=torch.bool, device=dense.device)
        if exclude is not None:
            rows = (exclude >= 0).nonzero().squeeze(1)
            blocked[rows, exclude[rows]] = True
        dense = dense.masked_fill(blocked, float("-inf"))
        return topk_low_ties(dense, K)[1]


def aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
) -> Tensor:
    """y_n = sum_k W_k (rho_nk * v_{idx_nk}) + b.

    values (B, M, C), indices (B, G, N, K), rho (B, G, N, K) or None,
    weight (C_out, C, K) | (C, 1, K) | None  ->  (B, N, C_out).
    """
    B, M, C = values.shape
    G, N, K = indices.shape[1:]
    prime = group_gather(values, indices)  # (B, N, K, C)
    if rho is not None:
        prime = scale_groups(prime, rho)
    if kernel == "none":
        out = prime.sum(2)
        return out if bias is None else out + bias
    prime = prime.permute(0, 3, 1, 2).reshape(B, C, N * K)  # the expanded "prime" tensor
    groups = C if kernel == "depthwise" else 1
    return F.conv1d(prime, weight, bias, stride=K, groups=groups).transpose(1, 2)
