"""The ConvNN operator as its stages: candidates -> similarity -> selection -> weighting ->
aggregation (one module each, in :mod:`convnn.stages`), and the functional API.

Every layer of the library is a configuration of :func:`_operator`:

============================  ==========  ==========  =========  ===========
recovered op                  metric      candidates  weighting  kernel
============================  ==========  ==========  =========  ===========
``nn.Conv2d`` (k x k)         spatial     all         none       standard
depthwise ``nn.Conv2d``       spatial     all         none       depthwise
multi-head attention          scaled_dot  all (K=N)   softmax    none
top-k (KVT) attention         scaled_dot  all (K<N)   softmax    none
local attention               scaled_dot  window      softmax    none
============================  ==========  ==========  =========  ===========

The options are a :class:`~convnn.spec.ConvNNSpec`; the dispatcher
(:mod:`convnn.backends.dispatch`) decides what runs each stage, the exact shortcuts to
``F.conv2d`` and SDPA included.

Shapes: B batch, C channels, N queries, M candidate tokens, K neighbours, G channel groups
(attention heads; each group selects its own neighbours).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .backends import dispatch
from .backends.chunked import contiguous_rows, listed_attention
from .metrics import get_metric, metric_names
from .options import (
    check_bool,
    check_choice,
    check_fraction,
    check_generator,
    check_indices,
    check_like,
    check_positive_int,
    check_rank,
    check_selection_dtype,
    check_self_index,
    check_tensor,
    pair,
)
from .spec import ConvNNSpec, legacy_coords
from .stages import aggregation, selection, similarity, weighting
from .stages import positional as encoding
from .stages.aggregation import autocast_cast, check_kernel_weights
from .stages.candidates import (
    Candidates,
    Grid,
    candidate_count,
    check_candidates,
    window_blocks,
    window_indices,
    window_pairs,
)
from .stages.candidates import ann_select as ann_select_stage
from .stages.candidates import build as build_candidates

__all__ = [
    "knn_select",
    "neighbor_aggregate",
    "convnn1d",
    "convnn2d",
    "convnn_attention",
    "candidate_count",
    "Grid",
]


# --------------------------------------------------------------------------- the operator


def _operator(
    values: Tensor,
    q_feat: Tensor,
    k_feat: Tensor,
    grid: Grid,
    spec: ConvNNSpec,
    *,
    groups: int,
    K: int,
    weight: Tensor | None,
    bias: Tensor | None,
    pointwise_weight: Tensor | None,
    dropout_p: float,
    training: bool,
    generator: torch.Generator | None,
    backend: str | None,
    metric_params: dict[str, Tensor] | None = None,
    pos_params: dict[str, Tensor] | None = None,
    ndim: int = 2,
    heads: tuple[Tensor, Tensor] | None = None,
    prefix: int = 0,
    queries: Tensor | None = None,
    cands: Candidates | None = None,
) -> tuple[Tensor, Tensor]:
    """candidates -> similarity -> selection -> weighting -> aggregation.

    values (B, M, C) tokens of the padded map; q_feat (B*G, N, d) / k_feat (B*G, M, d)
    selection features of the queries / all tokens (ignored for 'spatial'), G = groups;
    metric_params: the metric's learnable tensors, each (G, *shape) (None: initial values);
    pos_params: the positional encoding's tensors (checked); ndim: 1 for a sequence;
    heads: the (B, G, N, d) / (B, G, M, d) tensors q_feat / k_feat were reshaped from, if
    any (attention), which the SDPA shortcut reads as they are.
    prefix: tokens with no position (attention's class / register tokens) before the padded
    map of ``grid``; token indices count them first. queries (N,): the token of each query
    and cands: their candidates (default: the grid's queries and ``spec.candidates`` on it;
    with a prefix, the caller's).
    Returns y (B, N, C_out) and indices (B, G, N, K) into the tokens.
    """
    device = values.device
    B, G = values.shape[0], groups
    features = q_feat, k_feat  # as given, before any encoding
    queries_here = queries is None and cands is None  # the map's queries and candidates
    if queries is None:
        queries = grid.index(device)  # each query's own token

    # 1. candidates: which tokens each query may select
    if cands is None:
        cands = build_candidates(spec, grid, training, generator, device)

    # 2. similarity (with its positional encoding): what selection ranks
    metric = get_metric(spec.metric, spec.p)
    if metric.uses_positions:
        if metric_params:
            raise ValueError(f"metric_params must be None for metric={spec.metric!r}, got some")
    else:
        q_feat, k_feat = encoding.encode_features(
            spec, grid, q_feat, k_feat, queries, pos_params, ndim, prefix
        )
        params = similarity.metric_parameters(
            metric, spec.metric, metric_params, q_feat.shape[-1], G, q_feat
        )
        if params:  # learnable metrics map the features they score, per head
            q_feat, k_feat = similarity.prepare(metric, q_feat, k_feat, params, G)
    if metric.uses_positions:
        scores = similarity.spatial_scores(grid, queries)
    else:
        scores = similarity.selection_scores(
            metric, q_feat, k_feat, spec.selection_dtype, name=spec.metric, p=spec.p
        )
        if spec.positional == "relative_bias":
            scores = encoding.bias_scores(scores, grid, queries, pos_params["table"], prefix)

    # 3. selection: the K best candidates (no gradient)
    with torch.autocast(device.type, enabled=False):
        if spec.candidates == "ann":  # an index over the selection features, tile by tile
            self_index = queries if spec.include_self else None
            idx = ann_select_stage(spec, scores, q_feat, k_feat, K, self_index)
            dispatch.ann_index()
        else:
            idx = selection.select(
                scores,
                K,
                cands,
                queries,
                include_self=spec.include_self,
                raster=metric.uses_positions,
                backend=backend,
            )
    shared, idx = idx, idx.expand(B * G, -1, -1)  # spatial selection is one (1, N, K) for all

    # 4-5 at once: softmax attention over the selected keys runs fused, each query's K keys
    # read in place (the native kernels: float32 on a CPU, no dropout), else as SDPA masked
    # to them, which beats gathering them on a few tokens; the map's windows (no prefix
    # tokens): by blocks of queries, each masked over the span of keys its windows reach
    what = _selected_attention(spec, values, q_feat, k_feat, G, K, metric_params)
    if what is not None:
        M, N = values.shape[1], idx.shape[1]
        v = values.view(B, M, G, -1).transpose(1, 2)
        if heads is not None and all(a is b for a, b in zip(features, (q_feat, k_feat))):
            # SDPA and the kernels read any strides: the heads as they are spare the reshaped
            # copies a copy back of their gradients (the gradients come in the heads' layout)
            q, k = heads
        else:
            q, k = q_feat.view(B, G, N, -1), k_feat.view(B, G, M, -1)
        p = dropout_p if training else 0.0
        windows = spec.candidates == "window" and not prefix and queries_here
        pairs, blocks = _keys_scored(grid if windows else None, spec.window, N, M, device)
        listed = idx.view(B, G, N, K)
        fused = _native_rule(
            *autocast_cast(q, k, v, device_type=device.type), listed, pairs, blocks, p
        )
        if fused is not None:
            if dispatch.shortcut("native", f"{what} {fused}", backend):
                scale = q.shape[-1] ** -0.5 if spec.metric == "scaled_dot" else 1.0
                y = listed_attention(q, k, v, listed, scale)
                return (y if bias is None else y + bias), idx.reshape(B, G, N, K)
        else:
            rule = _sdpa_rule(pairs, blocks, K)
            exact = None if rule is None else f"{what} is SDPA masked to them {rule}"
            if dispatch.shortcut("SDPA", exact, backend):
                y = _sdpa_selected(q, k, v, idx, grid if blocks else None, spec, p)
                return (y if bias is None else y + bias), idx.reshape(B, G, N, K)

    # 4. weighting: rho over the K selected scores
    rho = None
    if spec.weighting == "softmax":
        if metric.uses_positions:
            s = similarity.spatial_pair_scores(grid, queries, shared[0]).to(values.dtype)
            s = s.expand(B * G, -1, -1)
        else:
            s = similarity.pair_scores(metric, q_feat, k_feat, idx)
            if spec.positional == "relative_bias":
                table = pos_params["table"]
                s = s + encoding.pair_bias(grid, queries, idx, table, prefix).to(s.dtype)
        rho = weighting.softmax(s, values.dtype, dropout_p, training)
        rho = rho.view(B, G, *rho.shape[1:])

    # 5. aggregation: y_i = sum_k W_k (rho_ik v_idx(i, k)) + b
    idx = idx.reshape(B, G, *idx.shape[1:])
    y = aggregation.aggregate(
        values, idx, rho, weight, bias, spec.kernel, pointwise_weight, backend=backend
    )
    return y, idx


def _selected_attention(spec, values, q_feat, k_feat, G, K, metric_params) -> str | None:
    """Why weighting and aggregation are exactly softmax attention over the K selected keys,
    in words (None: they are not): softmax over plain (scaled) dot products, kernel 'none',
    no positional term."""
    B, M, C = values.shape
    N = q_feat.shape[1]
    if not (
        spec.weighting == "softmax"
        and spec.kernel == "none"
        and spec.metric in ("scaled_dot", "dot")
        and spec.positional == "none"
        and not metric_params
        and B * N > 0
        and C % G == 0
        and q_feat.shape[-1] == k_feat.shape[-1]
    ):
        return None
    return f"softmax attention over the K = {K} selected keys ({spec.metric}, kernel 'none')"


def _sdpa_selected(q, k, v, idx, grid: Grid | None, spec, dropout_p: float) -> Tensor:
    """SDPA of q (B, G, N, d) masked to the selected keys ``idx`` (B * G, N, K) of k, v
    (B, G, M, d) -> (B, N, G * d): by blocks of queries over the span of keys their windows
    reach where ``grid`` is given (:func:`window_blocks`), else with one (N, M) mask."""
    B, G, N, _ = q.shape
    M = k.shape[2]
    scale = None if spec.metric == "scaled_dot" else 1.0
    if grid is not None:
        # the flash kernels are called directly: cast as SDPA would be under autocast
        q, k, v = autocast_cast(q, k, v, device_type=q.device.type)
        masks = []  # (B, G, n, m) each: the block's selected keys in its span of keys
        for qs, ks, _ in window_blocks(grid, spec.window, q.device):
            m = _selection_mask(idx[:, qs] - ks.start, ks.stop - ks.start, q.dtype)
            masks.append((qs, ks, m.unflatten(0, (B, G))))
        y = _BlockSDPA.apply(q, k, v, tuple(masks), dropout_p, torch.is_grad_enabled(), scale)
    else:
        mask = _selection_mask(idx, M, q.dtype).view(B, G, N, M)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    return y.transpose(1, 2).reshape(B, N, -1)


def _keys_scored(
    grid: Grid | None, window: int | None, N: int, M: int, device
) -> tuple[float, bool]:
    """The keys per query SDPA would score for softmax attention over a window or a top-K
    among the M keys, and whether by blocks of queries over the keys their windows reach
    (``grid``: the map's windows, :func:`window_pairs`) rather than one (N, M) mask."""
    pairs = M if grid is None else window_pairs(grid, window, device) / N
    return pairs, pairs < M


def _sdpa_rule(pairs: float, blocks: bool, K: int) -> str | None:
    """Why SDPA scoring ``pairs`` keys per query (:func:`_keys_scored`) pays against the k-NN
    path (:func:`dispatch.masked_sdpa_pays`), in words; None: it does not."""
    if not dispatch.masked_sdpa_pays(pairs, K, blocks):
        return None
    ratio = dispatch.BLOCK_SDPA_RATIO if blocks else dispatch.MASKED_SDPA_RATIO
    how = "by blocks of queries, over the keys their windows reach" if blocks else "one mask"
    return f"({how}): {pairs:.0f} keys scored per query <= {ratio} K"


def _native_rule(
    q, k, v, lists: Tensor, pairs: float, blocks: bool, dropout_p: float
) -> str | None:
    """Why the native kernel (:func:`listed_attention`) runs attention over each query's K
    ``lists`` (B or 1, G or 1, N, K) of keys, in words (None: it does not): float32 on a
    CPU without dropout (:func:`native.listed_attention_usable`), where it beats SDPA
    scoring ``pairs`` keys per query (:func:`dispatch.listed_attention_pays`)."""
    K = lists.shape[-1]
    if dropout_p or not (
        native.listed_attention_usable(q, k, v, lists)
        and dispatch.listed_attention_pays(pairs, K, blocks)
    ):
        return None
    return (
        f"on the native kernel, each query's K keys read in place, where SDPA would score "
        f"{pairs:.0f} per query (> {dispatch.LISTED_RATIO} K, or more than pays)"
    )


def _selection_mask(idx: Tensor, num_keys: int, dtype: torch.dtype) -> Tensor:
    """(B', n, num_keys) additive mask, 0 on the selected keys ``idx`` (B', n, K), -inf
    elsewhere: SDPA's CPU kernel takes it as it is, where a boolean one is converted on every
    call."""
    mask = torch.full((*idx.shape[:2], num_keys), -torch.inf, dtype=dtype, device=idx.device)
    return mask.scatter_(-1, idx, mask.new_zeros(()).expand(idx.shape))  # 0.55x a scalar's time


# --------------------------------------------------------------------------- selection


def knn_select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    metric: str = "cosine",
    p: float = 2.0,
    candidates: Tensor | None = None,
    include_self: bool = False,
    self_index: Tensor | None = None,
    backend: str | None = None,
    selection_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Streaming top-K neighbour selection by feature similarity.

    Args:
        query: (B, N, D) query features.  key: (B, M, D) candidate features.
        K: neighbours per query.
        metric: any metric but 'spatial' (``convnn.metrics.metric_names()``: built-in and
            registered ones; learnable ones at their initial parameters).
        p: the exponent of metric 'minkowski' (>= 1; math.inf is Chebyshev).
        candidates: None (all M keys), a shared subset (Mc,) of key indices, or candidate
            lists per query (N, W) or per batch element and query (B, N, W).
        include_self: put each query's own token in slot 0 and select K-1 others.
        self_index: (N,) each query's own index among the keys (default ``arange(N)``).
        selection_dtype: dtype the similarities are ranked in (e.g. ``torch.bfloat16`` for
            faster, approximate selection); default float32 for half inputs, else the input's.

    Returns:
        scores (B, N, K): differentiable similarities of the selected pairs;
        indices (B, N, K): key indices, slots in descending similarity (ties: lower index).
        No gradient flows through the choice itself. NaN similarities rank first.
    """
    check_rank("query", query, 3, "(B, N, D)")
    check_rank("key", key, 3, "(B, M, D)")
    check_like("key", key, "query", query)
    check_choice("metric", metric, tuple(m for m in metric_names() if m != "spatial"))
    if query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"query and key must share batch and feature dims, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    check_bool("include_self", include_self)
    check_selection_dtype(selection_dtype)
    dispatch.check(backend, query.device.type)
    B, N, M = query.shape[0], query.shape[1], key.shape[1]
    if candidates is not None:
        layout = "(Mc,), (N, W) or (B, N, W)"
        check_tensor("candidates", candidates, layout)
        per_batch = candidates.dim() == 3 and candidates.shape[0] == B
        if not (candidates.dim() in (1, 2) or per_batch) or (
            candidates.dim() > 1 and candidates.shape[-2] != N
        ):
            raise ValueError(
                f"candidates must be {layout} with B = {B}, N = {N} queries, got shape "
                f"{tuple(candidates.shape)}"
            )
        candidates = check_indices(
            "candidates", candidates, M, f"(key indices, M = {M})", distinct=True
        )
    count = M if candidates is None else candidates.shape[-1]
    check_positive_int("K", K)
    if K > count:
        raise ValueError(f"K must be <= the number of candidates ({count}), got K={K}")
    self_index = check_self_index(self_index, include_self, N, M, query.device)
    ConvNNSpec(p=p)  # checks p
    m = get_metric(metric, p)
    scores = similarity.selection_scores(m, query, key, selection_dtype, name=metric, p=p)
    shared = candidates is not None and candidates.dim() == 1
    cands = Candidates(
        shared=candidates if shared else None,
        per_query=None if shared else candidates,
    )
    idx = selection.select(scores, K, cands, self_index, include_self=include_self, backend=backend)
    return similarity.pair_scores(m, query, key, idx), idx


# --------------------------------------------------------------------------- aggregation


def neighbor_aggregate(
    values: Tensor,
    indices: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    kernel: str = "standard",
    pointwise_weight: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """y_n = sum_k W_k (rho_nk * v_{idx_nk}) + b, with autograd.

    Args:
        values: (B, M, C) tokens to aggregate.
        indices: (B, N, K), or (B, G, N, K) when C splits into G groups (heads) that each
            pick their own neighbours.
        weight: (C_out, C, K) for 'standard', (C, 1, K) for 'depthwise'/'separable', None
            for 'none'.  bias: (C_out,).  weights: rho, shaped like ``indices``.
        pointwise_weight: (C_out, C, 1) for 'separable'.

    Returns:
        (B, N, C_out). Under autocast the floating inputs are cast as for ``F.conv1d`` and
        the output has the autocast dtype, on every backend.

    Raises:
        ValueError: indices that are not integers in [0, M) (checked with one min/max
            reduction; in a compiled graph an asynchronous assert, a RuntimeError, instead).
    """
    check_rank("values", values, 3, "(B, M, C)")
    check_tensor("indices", indices, "(B, N, K) or (B, G, N, K)")
    if indices.dim() not in (3, 4):
        raise ValueError(
            f"indices must be (B, N, K) or (B, G, N, K), got shape {tuple(indices.shape)}"
        )
    B, M, C = values.shape
    indices = check_indices("indices", indices, M, f"(token indices of values, M = {M})")
    grouped = indices if indices.dim() == 4 else indices[:, None]
    if weights is not None:
        check_tensor("weights", weights, f"shaped like indices {tuple(indices.shape)}")
    rho = None if weights is None else (weights if weights.dim() == 4 else weights[:, None])
    if rho is not None and rho.shape != grouped.shape:
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, got "
            f"{tuple(weights.shape)}"
        )
    if grouped.shape[0] != B or C % grouped.shape[1]:
        raise ValueError(
            f"indices must have the batch of values {tuple(values.shape)} and a number of "
            f"groups that divides its channels, got indices of shape {tuple(indices.shape)}"
        )
    check_kernel_weights(kernel, weight, bias, pointwise_weight, C, grouped.shape[-1], "values")
    values, rho, weight, bias, pointwise_weight = autocast_cast(
        values, rho, weight, bias, pointwise_weight, device_type=values.device.type
    )
    for name, t in (("weights", rho), ("weight", weight), ("bias", bias)):
        check_like(name, t, "values", values)
    check_like("pointwise_weight", pointwise_weight, "values", values)
    dispatch.check(backend, values.device.type)
    return aggregation.aggregate(
        values, grouped, rho, weight, bias, kernel, pointwise_weight, backend=backend
    )


# --------------------------------------------------------------------------- maps


def _conv_shortcut(grid: Grid, K: int) -> tuple[int, int] | None:
    """Kernel (kh, kw) of the convolution that spatial selection equals exactly, if any."""
    Hp, Wp = grid.padded
    if Hp == 1:
        k = K if K % 2 else 0
        return (1, k) if k and grid.pw >= k // 2 else None
    k = math.isqrt(K)
    if k * k == K and k % 2 and min(grid.ph, grid.pw) >= k // 2:
        return (k, k)
    return None


def convnn2d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    K: int = 9,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    *,
    metric: str = "cosine",
    p: float = 2.0,
    candidates: str = "all",
    num_candidates: int | None = None,
    ann_method: str = "grid",
    ann_tables: int | None = None,
    ann_projection: str = "random",
    ann_seed: int = 0,
    window: int | None = None,
    include_self: bool = True,
    weighting: str = "none",
    kernel: str = "standard",
    positional: str = "none",
    lam: float = 0.5,
    num_frequencies: int = 8,
    sigma: float = 1.0,
    max_offset: int = 8,
    cpe_kernel: int = 3,
    selection_dtype: torch.dtype | None = None,
    coords: str | None = None,
    pointwise_weight: Tensor | None = None,
    metric_params: dict[str, Tensor] | None = None,
    positional_params: dict[str, Tensor] | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN over a feature map: (B, C, H, W) -> (B, C_out, ceil(H/stride), ceil(W/stride)).

    Each output position aggregates the K candidates nearest to it under ``metric``; the
    options are :class:`convnn.ConvNN2d`'s (:class:`convnn.ConvNNSpec`), in the same order.
    With ``return_indices`` also returns the (B, H_out * W_out, K) neighbour indices into
    the row-major flattened padded map. ``coords='xy'`` is the deprecated name of
    ``positional='coords'``.
    """
    check_rank("x", x, 4, "(B, C, H, W)")
    check_positive_int("K", K)
    positional = legacy_coords(coords, positional)
    return convnn_map(
        x,
        weight,
        bias,
        ConvNNSpec.take(locals()),
        stride=stride,
        padding=padding,
        pointwise_weight=pointwise_weight,
        metric_params=metric_params,
        positional_params=positional_params,
        training=training,
        generator=generator,
        return_indices=return_indices,
        backend=backend,
    )


def convnn_map(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: ConvNNSpec,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    ndim: int = 2,
    pointwise_weight: Tensor | None = None,
    metric_params: dict[str, Tensor] | None = None,
    positional_params: dict[str, Tensor] | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`convnn2d` (``ndim=2``, x (B, C, H, W)) or :func:`convnn1d` (``ndim=1``, x
    (B, C, L)) with the options given as a :class:`~convnn.spec.ConvNNSpec` (what the
    layers call)."""
    check_rank("x", x, ndim + 2, "(B, C, H, W)" if ndim == 2 else "(B, C, L)")
    x = x[:, :, None] if ndim == 1 else x
    for name, value in (("training", training), ("return_indices", return_indices)):
        check_bool(name, value)
    check_generator(generator)
    dispatch.check(backend, x.device.type)
    (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
    if spec.K is None:
        raise ValueError("K must be an integer >= 1 for a map, got None")
    B, C, H, W = x.shape
    grid = Grid(H, W, ph, pw, sh, sw)
    K = check_candidates(grid, spec.candidates, spec.num_candidates, spec.window, spec.K)
    C_out = check_kernel_weights(spec.kernel, weight, bias, pointwise_weight, C, K, "x")
    pos_params = encoding.parameters(spec, positional_params, ndim, 1, C, x)
    if spec.positional == "cpe":  # the features themselves change: selection and values
        x = encoding.conditional(x, pos_params)
    x_select = x  # rank neighbours at the input's precision even under autocast
    x, weight, bias, pointwise_weight = autocast_cast(
        x, weight, bias, pointwise_weight, device_type=x.device.type
    )
    for name, t in (("weight", weight), ("bias", bias), ("pointwise_weight", pointwise_weight)):
        check_like(name, t, "x", x)

    conv = _conv_shortcut(grid, K)
    exact = None
    if (
        spec.metric == "spatial"
        and spec.candidates == "all"
        and spec.weighting == "none"
        and spec.positional == "none"
        and spec.kernel in ("standard", "depthwise")
        and conv is not None
        and not return_indices
    ):
        exact = f"a {conv[0]} x {conv[1]} {spec.kernel} convolution (spatial metric, K={K})"
    if dispatch.shortcut("F.conv2d", exact, backend):
        w = weight.view(weight.shape[0], weight.shape[1], *conv)
        groups = C if spec.kernel == "depthwise" else 1
        y = F.conv2d(x, w, bias, (sh, sw), (conv[0] // 2, conv[1] // 2), groups=groups)
        return y[:, :, 0] if ndim == 1 else y

    # (B, Hp*Wp, C); F.pad copies the map even with no padding (and its backward copies the
    # gradient back)
    padded = lambda t: F.pad(t, (pw, pw, ph, ph)) if ph or pw else t
    tokens = lambda t: padded(t).flatten(2).transpose(1, 2)
    values = tokens(x)
    if x_select is x:
        # one copy in the row layout serves the selection's features and the aggregation's
        # values, which would each copy the transposed map
        values = contiguous_rows(values)
    feats = values if x_select is x else tokens(x_select)
    every = (ph, pw, sh, sw) == (0, 0, 1, 1)  # every token is a query: self-similarity
    y, idx = _operator(
        values,
        feats if every else feats[:, grid.index(x.device)],
        feats,
        grid,
        spec,
        groups=1,
        K=K,
        weight=weight,
        bias=bias,
        pointwise_weight=pointwise_weight,
        dropout_p=0.0,
        training=training,
        generator=generator,
        backend=backend,
        metric_params=metric_params,
        pos_params=pos_params,
        ndim=ndim,
    )
    y = y.transpose(1, 2).reshape(B, C_out, *grid.out)
    y = y[:, :, 0] if ndim == 1 else y
    return (y, idx[:, 0]) if return_indices else y


def convnn1d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    K: int = 3,
    stride: int = 1,
    padding: int = 0,
    *,
    metric: str = "cosine",
    p: float = 2.0,
    candidates: str = "all",
    num_candidates: int | None = None,
    ann_method: str = "grid",
    ann_tables: int | None = None,
    ann_projection: str = "random",
    ann_seed: int = 0,
    window: int | None = None,
    include_self: bool = True,
    weighting: str = "none",
    kernel: str = "standard",
    positional: str = "none",
    lam: float = 0.5,
    num_frequencies: int = 8,
    sigma: float = 1.0,
    max_offset: int = 8,
    cpe_kernel: int = 3,
    selection_dtype: torch.dtype | None = None,
    coords: str | None = None,
    pointwise_weight: Tensor | None = None,
    metric_params: dict[str, Tensor] | None = None,
    positional_params: dict[str, Tensor] | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN over a sequence map: (B, C, L) -> (B, C_out, ceil(L/stride)).

    The same operator as :func:`convnn2d` on a 1 x L map (1-D positional encodings); the
    options are :class:`convnn.ConvNN1d`'s, in the same order.
    """
    check_rank("x", x, 3, "(B, C, L)")
    check_positive_int("K", K)
    check_positive_int("stride", stride)
    check_positive_int("padding", padding, minimum=0)
    positional = legacy_coords(coords, positional)
    return convnn_map(
        x,
        weight,
        bias,
        ConvNNSpec.take(locals()),
        stride=(1, stride),
        padding=(0, padding),
        ndim=1,
        pointwise_weight=pointwise_weight,
        metric_params=metric_params,
        positional_params=positional_params,
        training=training,
        generator=generator,
        return_indices=return_indices,
        backend=backend,
    )


# --------------------------------------------------------------------------- attention


def _token_map(N, hw, needs_map: bool) -> tuple[int, int]:
    """The (h, w) map of N tokens: ``hw`` when given (checked), else a 1 x N row.

    Only 'window', 'grid' and 'spatial' read the layout. For them, hw=None still lays a
    perfect-square N out as a square map, with a FutureWarning: guessing the map from N
    is deprecated (a class token or a non-square map makes the guess wrong). The layout is
    never computed when nothing reads it, so any sequence length traces.
    """
    if hw is not None:
        hw = pair("hw", hw, minimum=1)
        if hw[0] * hw[1] != N:
            raise ValueError(f"hw must multiply to the number of tokens {N}, got {hw}")
        return hw
    if not needs_map:
        return 1, N
    side = round(N**0.5)  # exact for squares; math.isqrt cannot take a traced (symbolic) N
    if side * side != N or side == 1:
        return 1, N
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"convnn_attention: hw=None lays the {N} tokens out as a {side} x {side} map "
            f"because {N} is a perfect square; this guess is deprecated and will become a "
            f"1 x {N} row. Pass hw=(h, w) (hw=(1, {N}) for a sequence).",
            FutureWarning,
            stacklevel=3,
        )
    return side, side


def convnn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    K: int | None = None,
    *,
    metric: str = "scaled_dot",
    p: float = 2.0,
    candidates: str = "all",
    num_candidates: int | None = None,
    ann_method: str = "grid",
    ann_tables: int | None = None,
    ann_projection: str = "random",
    ann_seed: int = 0,
    window: int | None = None,
    include_self: bool = False,
    weighting: str = "softmax",
    kernel: str = "none",
    positional: str = "none",
    lam: float = 0.5,
    num_frequencies: int = 8,
    sigma: float = 1.0,
    max_offset: int = 8,
    cpe_kernel: int = 3,
    selection_dtype: torch.dtype | None = None,
    hw: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    metric_params: dict[str, Tensor] | None = None,
    positional_params: dict[str, Tensor] | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN attention: each head's queries aggregate their K selected keys' values.

    q, k, v: (B, heads, N, d) -> (B, N, C_out) with C_out = heads * d unless a 'standard'
    kernel maps to another width. K=None takes every candidate (kernel 'none' only); the
    options are :class:`convnn.ConvNNAttention`'s (:class:`convnn.ConvNNSpec`), in the same
    order. ``hw`` lays the N tokens out as an (h, w) map for 'window', 'grid' and 'spatial'
    (default: a 1 x N row; a perfect-square N is still laid out as a square map, with a
    FutureWarning: that guess is deprecated, pass ``hw``).

    ``num_prefix_tokens`` P: the first P tokens (class / register tokens) have no position
    and ``hw`` lays out the other N - P (default: a 1 x (N - P) row). Positional encodings
    leave them alone (no rotation, no bias, zero coordinates); with 'window' / 'grid' they
    are candidates of every query and take every token (with 'grid', the lattice and the
    prefix tokens) as their own candidates; the 'spatial' metric refuses them.
    With ``return_indices`` also returns indices (B, heads, N, K).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(name, t, 4, "(B, heads, N, d)")
    spec = ConvNNSpec.take(locals())
    if spec.positional == "cpe":
        raise ValueError(
            "positional='cpe' changes the tokens before q, k and v are projected: use the "
            "ConvNNAttention layer, got it in convnn_attention (which takes q, k, v)"
        )
    return attention_call(
        q,
        k,
        v,
        spec,
        hw=hw,
        num_prefix_tokens=num_prefix_tokens,
        weight=weight,
        bias=bias,
        metric_params=metric_params,
        positional_params=positional_params,
        dropout_p=dropout_p,
        training=training,
        generator=generator,
        return_indices=return_indices,
        backend=backend,
    )


def _empty_as(t: Tensor, shape) -> Tensor:
    """An empty tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s."""
    return _empty_ordered(shape, t.stride(), t)


def _empty_ordered(shape, strides, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty dense tensor of ``shape`` (on ``like``'s device, in ``dtype``, default
    ``like``'s) whose dimensions lie in memory in the order of ``strides``."""
    order = sorted(range(len(shape)), key=lambda i: -strides[i])
    dims = sorted(range(len(shape)), key=order.index)
    return like.new_empty([shape[i] for i in order], dtype=dtype).permute(*dims)


def _flash_blocks(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether :class:`_BlockSDPA` calls the CPU flash-attention kernels itself, forward and
    backward, block by block: what SDPA would run for each block (no dropout, one dtype, q's
    head size for v, flash attention not switched off), without an autograd graph per block
    (the nested graphs cost a tenth of a ViT-Tiny window-attention step)."""
    return (
        dropout_p == 0.0
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] == v.shape[-1]
        and torch.backends.cuda.flash_sdp_enabled()  # also SDPA's switch on the CPU
    )


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: attend) as the additive one the flash kernel takes (0 / -inf);
    an additive mask in ``dtype``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


class _BlockSDPA(torch.autograd.Function):
    """SDPA of blocks of queries (B, G, N, d), each against its span of keys with its mask
    (``blocks``: ((queries, keys, mask), ...), the queries covering every row once; a mask
    is boolean (n, m), True where a query attends, or additive, broadcasting to (B, G, n,
    m)), scores scaled by ``scale`` (None: 1 / sqrt(d)). Without dropout each block runs on
    the CPU flash-attention kernels directly (:func:`_flash_blocks`), its output, log-sum-exp
    and mask saved for the backward kernel; with dropout each block keeps its own SDPA
    graph. Backward adds the blocks' gradients straight into one gradient per input: slicing
    and concatenating would fill a whole zero gradient per block and input and add them up
    (a third of the step)."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, dropout_p, differentiable, scale=None):
        # differentiable: grad mode outside (inside forward it is off, and needs_input_grad
        # says what the inputs require even under no_grad)
        out = _empty_as(q, (*q.shape[:-1], v.shape[-1]))  # laid out as SDPA lays out its output
        # the gradients' shapes and layouts: each laid out like its input, as autograd would
        ctx.layouts = [(t.shape, t.stride(), t.dtype) for t in (q, k, v)]
        ctx.spans = [(qs, ks) for qs, ks, _ in blocks]
        ctx.flash, ctx.scale = _flash_blocks(q, k, v, dropout_p), scale
        if ctx.flash:
            # the kernel reads rows with unit stride (SDPA copies other layouts too)
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            saved = []
            for qs, ks, m in blocks:
                bias = _additive_mask(m, q.dtype)
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[:, :, qs], k[:, :, ks], v[:, :, ks], 0.0, False, attn_mask=bias, scale=scale
                )
                out[:, :, qs] = o
                saved += [bias, o, lse]
            # saved tensors (hooks such as save_on_cpu see them; a retained graph keeps them)
            ctx.save_for_backward(q, k, v, *saved)
            return out
        graphs, needs = [], ctx.needs_input_grad[:3]
        for qs, ks, m in blocks:
            parts = (q[:, :, qs], k[:, :, ks], v[:, :, ks])
            leaves = [t.detach().requires_grad_(n and differentiable) for t, n in zip(parts, needs)]
            with torch.enable_grad():
                o = F.scaled_dot_product_attention(
                    *leaves, attn_mask=m, dropout_p=dropout_p, scale=scale
                )
            out[:, :, qs] = o.detach()
            graphs.append((o, leaves))
        ctx.graphs = graphs
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: a second derivative is asked for
            raise RuntimeError(
                "window attention by blocks of queries has no second derivative (nor has "
                "scaled_dot_product_attention's CPU kernel); backend='chunked' runs the k-NN "
                "path, which has one"
            )
        needs = ctx.needs_input_grad[:3]
        grads = [
            _empty_ordered(shape, stride, grad, dtype) if n else None
            for (shape, stride, dtype), n in zip(ctx.layouts, needs)
        ]
        _add_block_gradients(grads, ctx.layouts[1][0][2], _block_gradients(ctx, grad))
        return *grads, None, None, None, None


def _block_gradients(ctx, grad: Tensor):
    """Yield (queries, keys, (dq, dk, dv)) block by block, None for an input not needing one."""
    needs = ctx.needs_input_grad[:3]
    if ctx.flash:
        q, k, v, *saved = ctx.saved_tensors
        for (qs, ks), bias, o, lse in zip(ctx.spans, saved[::3], saved[1::3], saved[2::3]):
            parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad[:, :, qs],
                q[:, :, qs],
                k[:, :, ks],
                v[:, :, ks],
                o,
                lse,
                0.0,
                False,
                attn_mask=bias,
                scale=ctx.scale,
            )
            yield qs, ks, [t if n else None for t, n in zip(parts, needs)]
        return
    if ctx.graphs is None:
        raise RuntimeError(
            "window attention by blocks with dropout: its blocks' graphs were freed by the "
            "first backward (retain_graph does not keep them)"
        )
    graphs, ctx.graphs = ctx.graphs, None  # the blocks' outputs are freed once used
    parts = list(  # one pass of the engine over every block's graph
        torch.autograd.grad(
            [o for o, _ in graphs],
            [t for _, leaves in graphs for t in leaves if t.requires_grad],
            [grad[:, :, qs] for qs, _ in ctx.spans],
        )
    )
    del graphs
    parts.reverse()  # taken in order, each freed once written
    for qs, ks in ctx.spans:
        yield qs, ks, [parts.pop() if n else None for n in needs]


def _add_block_gradients(grads: list, num_keys: int, blocks) -> None:
    """Write the blocks' gradients into ``grads`` [dq, dk, dv] (None: not needed): the
    blocks' queries cover every row once; keys in several spans add up, keys in none get 0."""
    dq, dk, dv = grads
    covered = 0  # keys [0, covered) hold their gradient so far: the rest is written, not added
    for qs, ks, (gq, gk, gv) in blocks:
        if dq is not None:
            dq[:, :, qs] = gq
        lo, hi, _ = ks.indices(num_keys)
        for g, part in ((dk, gk), (dv, gv)):
            if g is not None:
                cut = min(max(covered, lo), hi) - lo
                g[:, :, covered:lo].zero_()  # keys no span reached (none, for windows)
                g[:, :, lo : lo + cut] += part[:, :, :cut]
                g[:, :, lo + cut : hi] = part[:, :, cut:]
        covered = max(covered, hi)
    for g in (dk, dv):
        if g is not None:
            g[:, :, covered:].zero_()


def attention_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: ConvNNSpec,
    *,
    hw: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    metric_params: dict[str, Tensor] | None = None,
    positional_params: dict[str, Tensor] | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
    ndim: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`convnn_attention` with the options given as a
    :class:`~convnn.spec.ConvNNSpec` (what the layers call). ``ndim``: the positional
    encodings' form (default 1 on a 1 x N row, else 2); 'cpe' is the caller's."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(name, t, 4, "(B, heads, N, d)")
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q, k, v must be (B, heads, N, d) with matching B, heads, N, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    check_fraction("dropout_p", dropout_p)
    for name, value in (("training", training), ("return_indices", return_indices)):
        check_bool(name, value)
    check_generator(generator)
    dispatch.check(backend, q.device.type)
    B, G, N, d = q.shape
    P = check_positive_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    if P > N:
        raise ValueError(f"num_prefix_tokens must be at most the {N} tokens of q, got {P}")
    needs_map = spec.candidates in ("window", "grid") or spec.metric == "spatial"
    if P and not needs_map and spec.positional in ("none", "cpe"):
        _prefixed_map(N, hw, P, spec.metric)  # hw is checked even where nothing reads it
        P, hw = 0, (1, N)  # nothing reads a position: every layout is the same
    if P:
        grid = _prefixed_map(N, hw, P, spec.metric)  # where the map tokens lie
        groups = _prefixed_groups(spec, grid, P, training, generator, q.device)
    else:
        grid = Grid(*_token_map(N, hw, needs_map))
        K = check_candidates(grid, spec.candidates, spec.num_candidates, spec.window, spec.K)
        groups = ((slice(None), None, None, K),)
    C = G * v.shape[-1]
    for *_, K in groups:
        check_kernel_weights(spec.kernel, weight, bias, None, C, K, "v (heads * d)")
    ndim = ndim or (2 if grid.H > 1 else 1)
    q, k, v, weight, bias = autocast_cast(q, k, v, weight, bias, device_type=q.device.type)
    if isinstance(positional_params, dict):  # cast like the features (a layer's are float32)
        positional_params = {
            n: autocast_cast(t, device_type=q.device.type)[0] if isinstance(t, Tensor) else t
            for n, t in positional_params.items()
        }
    pos_params = encoding.parameters(spec, positional_params, ndim, G, C, q)
    for name, t in (("k", k), ("v", v), ("weight", weight), ("bias", bias)):
        check_like(name, t, "q", q)

    exact = fused = None
    p = dropout_p if training else 0.0
    plain = (
        not P
        and not spec.include_self
        and spec.kernel == "none"
        and spec.metric == "scaled_dot"
        and spec.weighting == "softmax"
        and spec.positional == "none"
        and not return_indices
    )
    if plain and spec.candidates == "all" and K == N:
        exact = "softmax attention over every token (scaled_dot, K = N, kernel 'none')"
    elif (
        plain
        and spec.candidates == "window"
        and K == candidate_count(grid, "window", None, spec.window)
    ):
        M = grid.padded[0] * grid.padded[1]
        pairs, blocks = _keys_scored(grid, spec.window, N, M, q.device)
        lists = window_indices(grid, spec.window, q.device).view(1, 1, N, K)
        what = (
            f"softmax attention over each token's whole window (scaled_dot, K = {K}, kernel 'none')"
        )
        fused = _native_rule(q, k, v, lists, pairs, blocks, p)
        rule = None if fused else _sdpa_rule(pairs, blocks, K)
        exact = None if rule is None else f"{what}: SDPA with a window mask {rule}"
    if dispatch.shortcut("native", fused and f"{what} {fused}", backend):
        out = listed_attention(q, k, v, lists, d**-0.5)
        return out if bias is None else out + bias
    if dispatch.shortcut("SDPA", exact, backend):
        if spec.candidates != "window":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # each block of queries against the span of keys its windows reach
            blocks = window_blocks(grid, spec.window, q.device)
            if len(blocks) > 1:
                out = _BlockSDPA.apply(q, k, v, blocks, p, torch.is_grad_enabled())
            else:  # the whole mask (a traced graph, or spans that would not pay)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=blocks[0][2], dropout_p=p)
        out = out.transpose(1, 2).reshape(B, N, C)
        return out if bias is None else out + bias
    values = v.transpose(1, 2).reshape(B, N, C)
    ys, idxs = [], []
    keys = k.reshape(B * G, N, d)  # every group's queries select among all tokens
    for rows, queries, cands, K in groups:
        part = q[:, :, rows]
        y, idx = _operator(
            values,
            part.reshape(B * G, part.shape[2], d),
            keys,
            grid,
            spec,
            groups=G,
            K=K,
            weight=weight,
            bias=bias,
            pointwise_weight=None,
            dropout_p=dropout_p,
            training=training,
            generator=generator,
            backend=backend,
            metric_params=metric_params,
            pos_params=pos_params,
            ndim=ndim,
            heads=(part, k),
            prefix=P,
            queries=queries,
            cands=cands,
        )
        ys.append(y)
        idxs.append(idx)
    if len(ys) == 1:
        return (ys[0], idxs[0]) if return_indices else ys[0]
    y = torch.cat(ys, 1)
    if not return_indices:
        return y
    if len({i.shape[-1] for i in idxs}) != 1:
        raise ValueError(
            "return_indices with prefix tokens and K=None: prefix and map queries have "
            "different candidate counts; pass K"
        )
    return y, torch.cat(idxs, 2)


def _prefixed_map(N: int, hw, P: int, metric: str) -> Grid:
    """The map of the N - P tokens after P prefix tokens: ``hw`` (checked), else a row."""
    if metric == "spatial":
        raise ValueError(
            "metric='spatial' ranks by position and prefix tokens have none: use "
            "num_prefix_tokens=0 or another metric"
        )
    h, w = (1, N - P) if hw is None else pair("hw", hw, minimum=1)
    if P + h * w != N:
        raise ValueError(
            f"hw must lay out the {N} tokens as num_prefix_tokens + h * w = {N}, got "
            f"{P} + {h} * {w} = {P + h * w}"
        )
    return Grid(h, w)


def _prefixed_groups(spec: ConvNNSpec, grid: Grid, P: int, training, generator, device):
    """The queries of P prefix tokens and the map of ``grid`` after them, in groups of equal
    candidate count: ((rows, queries (n,), Candidates, K), ...), token indices counting the
    prefix tokens first.

    'all', 'random', 'ann': one group, every token (prefix ones included) as for tokens
    without a map. 'window' / 'grid': a prefix token is a candidate of every query, and its
    own candidates are every token (with 'grid', the lattice and the prefix tokens), so that a
    window covering the whole map is exactly multi-head attention.
    """
    N = P + grid.H * grid.W
    tokens = torch.arange(N, device=device)
    if spec.candidates not in ("window", "grid"):
        row = Grid(1, N)  # candidates that do not read the layout: every token alike
        try:
            K = check_candidates(row, spec.candidates, spec.num_candidates, spec.window, spec.K)
        except ValueError as e:  # say which tokens the row holds
            raise ValueError(
                f"{e} (the {P} prefix tokens and the {grid.H} x {grid.W} map)"
            ) from None
        cands = build_candidates(spec, row, training, generator, device)
        return ((slice(None), tokens, cands, K),)
    count = check_candidates(grid, spec.candidates, spec.num_candidates, spec.window, None)
    prefix = tokens[:P]
    if spec.candidates == "window":
        window = torch.cat([prefix.expand(N - P, P), P + grid.window(spec.window, device)], 1)
        groups = [
            (slice(0, P), prefix, Candidates(), N),
            (slice(P, N), tokens[P:], Candidates(per_query=window), P + count),
        ]
    else:  # 'grid': one shared lattice, with the prefix tokens
        lattice = torch.cat([prefix, P + grid.lattice(spec.num_candidates, device)])
        groups = [(slice(None), tokens, Candidates(shared=lattice), P + count)]
    if spec.K is not None:
        for *_, count in groups:
            if spec.K > count:
                raise ValueError(
                    f"K must be <= the number of candidates ({count} with {P} prefix tokens), "
                    f"got K={spec.K}"
                )
    return tuple((rows, q, c, count if spec.K is None else spec.K) for rows, q, c, count in groups)
