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

from .. import native
from ..metrics import (
    BlockScores,
    GemmScores,
    Metric,
    SpatialScores,
    get_metric,
    metric_scores,
)
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


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: a cast copies, into the row layout the scores read."""
    return t if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _rounded_operands(
    metric: Metric, query: Tensor, key: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """The metric's GEMM operands formed in the features' dtype and rounded once to the
    narrower ``dtype`` (contiguous rows), or None where it has no GEMM form. Self-similarity
    (``key is query``) gives one tensor twice."""
    pair = metric.operands(query, key)
    if pair is None:
        return None
    q = _cast(pair[0], dtype)
    return q, q if pair[1] is pair[0] else _cast(pair[1], dtype)


def _named_operands(
    query: Tensor, key: Tensor | None, metric: str, p: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`_rounded_operands` of ``get_metric(metric, p)``; ``key`` None:
    self-similarity. Keys' operands that are the queries' (cosine's, not euclidean's) come
    back empty."""
    q, k = _rounded_operands(get_metric(metric, p), query, query if key is None else key, dtype)
    return q, q.new_empty(0) if k is q else k


# :func:`_named_operands` as one opaque op of a compiled graph: the compiler would fuse the
# rounding into the metric's steps (a normalisation's norm, its quotient) and form them its
# own way, and a narrow dtype's many ties would pick other neighbours than eager code. Its
# fake form is the same code on fake tensors.
_selection_operands = torch.library.custom_op("convnn::selection_operands", mutates_args=())(
    _named_operands
)
_selection_operands.register_fake(_named_operands)
native.key_compile_caches(__file__)  # the op above, for torch.compile's caches


def selection_scores(
    metric: Metric,
    query: Tensor,
    key: Tensor,
    selection_dtype: torch.dtype | None,
    *,
    name: str | None = None,
    p: float = 2.0,
) -> BlockScores:
    """What the backends rank for ``metric``: query (B', N, d), key (B', M, d) features,
    detached, in the metric's GEMM form when it has one, in the selection dtype (default
    float32 for half inputs, else the input's). A half selection dtype rounds the GEMM
    operands once, formed in float32 (or the features' wider dtype; cosine: the
    normalisation, rounded), so eager and compiled code rank the same numbers; in a compiled
    graph they are formed by one opaque op, given the metric's ``name`` and ``p``
    (``get_metric(name, p)`` is ``metric``). Otherwise the features are cast first."""
    dtype = selection_dtype or (
        torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    )
    q, k = query.detach(), key.detach()
    same = key is query  # self-similarity: one operand, the one pass's symmetric form
    wide = torch.promote_types(q.dtype, torch.float32)  # half features: formed in float32
    if torch.finfo(dtype).bits < torch.finfo(wide).bits:
        q = q.to(wide)
        k = q if same else k.to(wide)
        pair = _rounded_operands(metric, q, k, dtype)
        if pair is not None and name is not None and torch.compiler.is_compiling():
            # the same numbers formed eagerly (the traced ones above go unused)
            a, b = torch.ops.convnn.selection_operands(q, None if same else k, name, p, dtype)
            pair = a, a if pair[1] is pair[0] else b
        if pair is not None:
            return GemmScores(*pair)
    q = _cast(q, dtype)
    return metric_scores(metric, q, q if same else _cast(k, dtype))


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
