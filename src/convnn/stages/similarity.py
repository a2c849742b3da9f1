"""Stage 2, similarity: the scores selection ranks and softmax weighting reads.

The metric's maths lives in :mod:`convnn.metrics`; this stage applies it to one call:
the selection features (with their positional encoding, :mod:`convnn.stages.positional`)
of the queries and of every key, prepared by the metric's learnable parameters, give

- :func:`selection_scores`: what the backends rank (no gradient, in the selection dtype);
- :func:`pair_scores`: the differentiable scores of each query against its K selected keys
  (B', N, K), O(N*K*d) memory, through which softmax weights get their gradient.

Shapes: B' = B * G (G groups: attention heads, each selecting its own neighbours), N
queries, M keys, d selection features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..metrics import BlockScores, GemmScores, Metric, SpatialScores, metric_scores
from ..options import tensors_or_initial
from .candidates import Grid


def metric_parameters(
    metric: Metric, name: str, given: dict | None, dim: int, groups: int, like: Tensor
) -> dict[str, Tensor]:
    """The learnable parameters of ``metric`` for ``groups`` heads of ``dim`` features, each
    (groups, *shape): ``given`` (checked), or their initial values when None."""
    initial = {n: t.expand(groups, *t.shape) for n, t in metric.parameters(dim).items()}
    what = f"metric={name!r} ((heads, *shape) for {dim} selection features)"
    return tensors_or_initial("metric_params", given, initial, like, what)


def prepare(
    metric: Metric, query: Tensor, key: Tensor, params: dict[str, Tensor], groups: int
) -> tuple[Tensor, Tensor]:
    """The features the metric scores: ``metric.prepare`` with its parameters, per head.
    query (B*G, N, d), key (B*G, M, d) -> (B*G, N, d'), (B*G, M, d')."""
    B = query.shape[0] // groups
    q = metric.prepare(query.view(B, groups, *query.shape[1:]), params, "query")
    k = metric.prepare(key.view(B, groups, *key.shape[1:]), params, "key")
    return q.flatten(0, 1), k.flatten(0, 1)


def selection_scores(
    metric: Metric, query: Tensor, key: Tensor, selection_dtype: torch.dtype | None
) -> BlockScores:
    """What the backends rank for ``metric``: query (B', N, d), key (B', M, d) features,
    detached and cast to the selection dtype (default float32 for half inputs, else the
    input's), in the metric's GEMM form when it has one."""
    dtype = selection_dtype or (
        torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    )

    def cast(t: Tensor) -> Tensor:  # a cast copies: in the row layout the scores read
        t = t.detach()
        return t if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)

    if torch.finfo(dtype).bits < torch.finfo(query.dtype).bits:
        # A narrower selection dtype: the metric's GEMM operands are formed in the features'
        # dtype and rounded once, as a compiled graph forms them (it keeps a fused
        # normalisation's steps in float32), so eager and compiled code rank the same numbers
        q = query.detach()
        pair = metric.operands(q, q if key is query else key.detach())  # one: self-similarity
        if pair is not None:
            q = cast(pair[0])
            return GemmScores(q, q if pair[1] is pair[0] else cast(pair[1]))
    q = cast(query)
    return metric_scores(metric, q, q if key is query else cast(key))


def spatial_scores(grid: Grid, self_index: Tensor) -> SpatialScores:
    """The spatial metric's exact ranking keys of the queries ``self_index`` against every
    token of the padded map (batch 1: the same for every image)."""
    pos = grid.positions(self_index.device)
    return SpatialScores(pos[self_index], pos, grid.padded)


def gather_keys(key: Tensor, indices: Tensor) -> Tensor:
    """key (B', M, d), indices (B', N, K) -> (B', N, K, d) (row gathers: index_select, and
    index_add in backward, beat gather with an expanded index)."""
    B, N, K = indices.shape
    M, D = key.shape[1:]
    rows = indices + torch.arange(B, device=indices.device).view(B, 1, 1) * M
    return key.reshape(B * M, D).index_select(0, rows.reshape(-1)).view(B, N, K, D)


def pair_scores(metric: Metric, query: Tensor, key: Tensor, indices: Tensor) -> Tensor:
    """Differentiable similarity of each query to its selected keys.

    query (B', N, d), key (B', M, d), indices (B', N, K) -> (B', N, K).
    """
    return metric.pairs(query, gather_keys(key, indices))


def spatial_pair_scores(grid: Grid, self_index: Tensor, indices: Tensor) -> Tensor:
    """-||p_i - p_j||^2 of each query and its selected tokens: indices (N, K) -> (N, K)."""
    pos = grid.positions(self_index.device)
    d = pos[self_index][:, None, :2] - pos[indices][..., :2]
    return -d.pow(2).sum(-1)
