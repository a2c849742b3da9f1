"""The ConvNN operator: candidates -> selection -> weighting -> aggregation.

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

Shapes: B batch, C channels, N queries, M candidate tokens, K neighbours, G channel groups
(attention heads; each group selects its own neighbours).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends._common import prepare
from .options import (
    CANDIDATES,
    COORDS,
    KERNELS,
    METRICS,
    WEIGHTINGS,
    check_bool,
    check_choice,
    check_fraction,
    check_generator,
    check_indices,
    check_like,
    check_positive_int,
    check_rank,
    check_selection_dtype,
    check_tensor,
    pair,
)

__all__ = [
    "knn_select",
    "neighbor_aggregate",
    "convnn1d",
    "convnn2d",
    "convnn_attention",
    "candidate_count",
]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A (H, W) map zero-padded by (ph, pw), queried at stride (sh, sw).

    Token indices are row-major into the padded (Hp, Wp) map.
    """

    H: int
    W: int
    ph: int = 0
    pw: int = 0
    sh: int = 1
    sw: int = 1

    @property
    def padded(self) -> tuple[int, int]:
        return self.H + 2 * self.ph, self.W + 2 * self.pw

    @property
    def out(self) -> tuple[int, int]:
        return -(-self.H // self.sh), -(-self.W // self.sw)

    def index(self, device, stride: bool = True) -> Tensor:
        """Padded-map indices of the original positions (at the stride): (H_out * W_out,)."""
        sh, sw = (self.sh, self.sw) if stride else (1, 1)
        rows = torch.arange(0, self.H, sh, device=device) + self.ph
        cols = torch.arange(0, self.W, sw, device=device) + self.pw
        return (rows[:, None] * self.padded[1] + cols).reshape(-1)

    def positions(self, device) -> Tensor:
        """(row, col, raster index) of every padded-map token, float64: (Hp * Wp, 3)."""
        Hp, Wp = self.padded
        raster = torch.arange(Hp * Wp, device=device, dtype=torch.float64)
        return torch.stack([raster.div(Wp, rounding_mode="floor"), raster % Wp, raster], -1)

    def coords(self, device, dtype) -> Tensor:
        """Coordinates normalised to [-1, 1] over the original map (padding extends past)."""
        Hp, Wp = self.padded
        rows = (torch.arange(Hp, device=device, dtype=dtype) - self.ph) / max(self.H - 1, 1)
        cols = (torch.arange(Wp, device=device, dtype=dtype) - self.pw) / max(self.W - 1, 1)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1)
        return (grid * 2 - 1).reshape(Hp * Wp, 2)

    def window_size(self, window: int) -> tuple[int, int]:
        return (1 if self.padded[0] == 1 else window), window

    def window(self, window: int, device) -> Tensor:
        """Each query's window x window neighbourhood, shifted inside the padded map at its
        borders so it always holds window^2 tokens (as neighbourhood attention does):
        (N_out, wh * ww)."""
        (Hp, Wp), (wh, ww) = self.padded, self.window_size(window)
        q = self.index(device)
        r0 = (q.div(Wp, rounding_mode="floor") - wh // 2).clamp(0, Hp - wh)
        c0 = (q % Wp - ww // 2).clamp(0, Wp - ww)
        dr = torch.arange(wh, device=device)
        dc = torch.arange(ww, device=device)
        offsets = (dr[:, None] * Wp + dc).reshape(-1)
        return (r0 * Wp + c0)[:, None] + offsets

    def sample(self, num: int, training: bool, generator, device) -> Tensor:
        """``num`` distinct original positions: random in training, a fixed draw in eval."""
        n = self.H * self.W
        if training:
            pick = torch.randperm(n, generator=generator, device=device)[:num]
        else:
            # A fixed pseudo-random subset (Knuth's multiplicative hash), with no RNG state.
            pick = ((torch.arange(n, device=device) * 2654435761) % 4294967296).argsort()[:num]
        return self.index(device, stride=False)[pick.sort().values]

    def lattice(self, num: int, device) -> Tensor:
        """About ``num`` positions on an even lattice matching the map's aspect ratio."""
        gh = min(self.H, max(1, round(math.sqrt(num * self.H / self.W))))
        gw = min(self.W, max(1, round(num / gh)))
        rows = ((torch.arange(gh, device=device) + 0.5) * self.H / gh).long() + self.ph
        cols = ((torch.arange(gw, device=device) + 0.5) * self.W / gw).long() + self.pw
        return (rows[:, None] * self.padded[1] + cols).reshape(-1)


def candidate_count(grid: Grid, candidates: str, num_candidates: int | None, window: int | None):
    """How many candidates each query has under a candidate mode."""
    if candidates == "all":
        return grid.padded[0] * grid.padded[1]
    if candidates == "window":
        wh, ww = grid.window_size(window)
        return wh * ww
    if candidates == "grid":
        gh = min(grid.H, max(1, round(math.sqrt(num_candidates * grid.H / grid.W))))
        return gh * min(grid.W, max(1, round(num_candidates / gh)))
    return num_candidates


def _check_candidates(grid: Grid, candidates, num_candidates, window, K, include_self) -> int:
    check_choice("candidates", candidates, CANDIDATES)
    if candidates in ("random", "grid"):
        if num_candidates is None:
            raise ValueError(f"num_candidates is required for candidates={candidates!r}, got None")
        check_positive_int("num_candidates", num_candidates)
        if num_candidates > grid.H * grid.W:
            raise ValueError(
                f"num_candidates must be <= the number of positions ({grid.H * grid.W} on a "
                f"{grid.H} x {grid.W} map), got {num_candidates}"
            )
    if candidates == "window":
        if window is None:
            raise ValueError(
                "window is required for candidates='window' (an odd int >= 1), got None"
            )
        check_positive_int("window", window)
        if window % 2 == 0:
            raise ValueError(f"window must be odd, got {window}")
        wh, ww = grid.window_size(window)
        if wh > grid.padded[0] or ww > grid.padded[1]:
            raise ValueError(
                f"window must fit in the (padded) map of {grid.padded[0]} x {grid.padded[1]}, "
                f"got window={window}"
            )
    count = candidate_count(grid, candidates, num_candidates, window)
    if K is None:
        return count
    check_positive_int("K", K)
    if K > count:
        raise ValueError(
            f"K must be <= the number of candidates ({count} for candidates={candidates!r} on a "
            f"{grid.padded[0]} x {grid.padded[1]} padded map), got K={K}"
        )
    return K


# --------------------------------------------------------------------------- selection


def _select_indices(
    be,
    q: Tensor,
    k: Tensor,
    K: int,
    *,
    spatial_grid: tuple[int, int] | None,
    cand: Tensor | None,
    window: Tensor | None,
    self_index: Tensor,
    include_self: bool,
) -> Tensor:
    """Indices (B, N, K) into k's tokens. cand: shared subset (Mc,); window: (N, W)."""
    exclude = self_index if include_self else None
    k_sel = K - 1 if include_self else K
    if k_sel == 0:
        idx = self_index.new_empty(q.shape[0], q.shape[1], 0)
    elif cand is not None:
        cand = cand.sort().values  # ascending, so ties between candidates go to the lower index
        lookup = torch.full((k.shape[1],), -1, dtype=torch.long, device=k.device)
        lookup[cand] = torch.arange(cand.numel(), device=k.device)
        ex = None if exclude is None else lookup[exclude]
        idx = cand[be.select(q, k[:, cand], k_sel, spatial_grid=spatial_grid, exclude=ex)]
    else:
        idx = be.select(q, k, k_sel, spatial_grid=spatial_grid, exclude=exclude, window=window)
    if include_self:
        idx = torch.cat([self_index.expand(idx.shape[0], -1)[..., None], idx], -1)
    if spatial_grid is not None:  # raster order, so slot k is the k-th tap of a conv kernel
        idx = idx.sort(-1).values
    return idx


def _gather_scores(metric: str, query: Tensor, key: Tensor, indices: Tensor) -> Tensor:
    """Differentiable similarity of each query to its selected keys.

    query (B, N, D), key (B, M, D), indices (B, N, K) -> (B, N, K). O(N*K*D) memory.
    """
    B, N, K = indices.shape
    M, D = key.shape[1:]
    rows = indices + torch.arange(B, device=indices.device).view(B, 1, 1) * M
    # Row gathers (index_select, index_add in backward) beat gather with an expanded index.
    picked = key.reshape(B * M, D).index_select(0, rows.reshape(-1)).view(B, N, K, D)
    q = query[:, :, None]
    if metric == "cosine":
        return (F.normalize(q, dim=-1, eps=1e-12) * F.normalize(picked, dim=-1, eps=1e-12)).sum(-1)
    if metric == "euclidean":
        return -(q - picked).pow(2).sum(-1)
    scale = query.shape[-1] ** -0.5 if metric == "scaled_dot" else 1.0
    return (q * picked).sum(-1) * scale


def knn_select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    metric: str = "cosine",
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
        metric: 'cosine' | 'euclidean' | 'dot' | 'scaled_dot'.
        candidates: None (all M keys), a shared subset (Mc,) of key indices, or per-query
            candidate lists (N, W).
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
    check_choice("metric", metric, tuple(m for m in METRICS if m != "spatial"))
    if query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"query and key must share batch and feature dims, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    check_bool("include_self", include_self)
    check_selection_dtype(selection_dtype)
    N, M = query.shape[1], key.shape[1]
    if candidates is not None:
        check_tensor("candidates", candidates, "(Mc,) or (N, W)")
        if candidates.dim() not in (1, 2) or candidates.dim() == 2 and candidates.shape[0] != N:
            raise ValueError(
                f"candidates must be (Mc,) or (N, W) with N = {N} queries, got shape "
                f"{tuple(candidates.shape)}"
            )
        candidates = check_indices(
            "candidates", candidates, M, f"(key indices, M = {M})", distinct=True
        )
    count = M if candidates is None else candidates.shape[-1]
    check_positive_int("K", K)
    if K > count:
        raise ValueError(f"K must be <= the number of candidates ({count}), got K={K}")
    if self_index is None:
        if include_self and N != M:
            raise ValueError(
                f"self_index (N,) is required with include_self when N != M ({N} != {M}), got None"
            )
        self_index = torch.arange(N, device=query.device) if N == M else None
    else:
        check_rank("self_index", self_index, 1, f"(N,) = ({N},)", floating=False)
        if self_index.shape[0] != N:
            raise ValueError(f"self_index must be (N,) = ({N},), got {tuple(self_index.shape)}")
        self_index = check_indices("self_index", self_index, M, f"(key indices, M = {M})")
    be = backends.get(backend, query.device.type)
    q, k = _selection_operands(metric, query, key, selection_dtype)
    shared = candidates if candidates is not None and candidates.dim() == 1 else None
    per_query = candidates if candidates is not None and candidates.dim() == 2 else None
    idx = _select_indices(
        be,
        q,
        k,
        K,
        spatial_grid=None,
        cand=shared,
        window=per_query,
        self_index=self_index,
        include_self=include_self,
    )
    return _gather_scores(metric, query, key, idx), idx


def _selection_operands(metric, query, key, selection_dtype):
    dtype = selection_dtype or (
        torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    )
    q, k = prepare(metric, query.detach().to(dtype), key.detach().to(dtype))
    return q, k


# --------------------------------------------------------------------------- aggregation


def _check_kernel_weights(kernel, weight, bias, pointwise_weight, channels, K, source) -> int:
    """Validate weights and bias for ``kernel`` on ``channels`` input channels (those of the
    argument named ``source``); return the output channel count."""
    c_out = _kernel_out_channels(kernel, weight, pointwise_weight, channels, K, source)
    if bias is not None:
        check_tensor("bias", bias, f"({c_out},)")
        if tuple(bias.shape) != (c_out,):
            raise ValueError(
                f"bias must have shape (C_out,) = ({c_out},) for kernel={kernel!r} with the "
                f"{channels} channels of {source}, got {tuple(bias.shape)}"
            )
    return c_out


def _kernel_out_channels(kernel, weight, pointwise_weight, channels, K, source) -> int:
    check_choice("kernel", kernel, KERNELS)
    if kernel != "separable" and pointwise_weight is not None:
        raise ValueError(
            f"pointwise_weight must be None for kernel={kernel!r}, got {_shape(pointwise_weight)}"
        )
    if kernel == "none":
        if weight is not None:
            raise ValueError(f"weight must be None for kernel='none', got {_shape(weight)}")
        return channels
    expected = {"standard": f"(C_out, {channels}, {K})", "depthwise": f"({channels}, 1, {K})"}
    expected["separable"] = expected["depthwise"]
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        raise ValueError(
            f"weight must be a 3-D tensor {expected[kernel]} for kernel={kernel!r}, got "
            f"{_shape(weight)}"
        )
    want_in = 1 if kernel != "standard" else channels
    want_out = weight.shape[0] if kernel == "standard" else channels
    if tuple(weight.shape) != (want_out, want_in, K):
        raise ValueError(
            f"weight must have shape {expected[kernel]} for kernel={kernel!r} with the {channels} "
            f"channels of {source} and K={K}, got {tuple(weight.shape)}"
        )
    if kernel == "separable":
        pw = pointwise_weight
        if not isinstance(pw, Tensor) or pw.dim() != 3 or pw.shape[1:] != (channels, 1):
            raise ValueError(
                f"pointwise_weight must have shape (C_out, {channels}, 1) for kernel='separable' "
                f"with the {channels} channels of {source}, got {_shape(pw)}"
            )
        return pw.shape[0]
    return weight.shape[0]


def _shape(t) -> object:
    """What came, for an error message: a tensor's shape, else the value itself."""
    return tuple(t.shape) if isinstance(t, Tensor) else t


def _aggregate(be, values, indices, rho, weight, bias, kernel, pointwise_weight):
    """The backend's aggregation on tensors of one dtype (cast by the caller as autocast
    casts a convolution's inputs), so every backend returns that dtype."""
    with torch.autocast(values.device.type, enabled=False):
        if kernel == "separable":
            y = be.aggregate(values, indices, rho, weight, None, "depthwise")
            return F.linear(y, pointwise_weight[:, :, 0], bias)
        return be.aggregate(values, indices, rho, weight, bias, kernel)


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
    _check_kernel_weights(kernel, weight, bias, pointwise_weight, C, grouped.shape[-1], "values")
    values, rho, weight, bias, pointwise_weight = _autocast_cast(
        values, rho, weight, bias, pointwise_weight, device_type=values.device.type
    )
    for name, t in (("weights", rho), ("weight", weight), ("bias", bias)):
        check_like(name, t, "values", values)
    check_like("pointwise_weight", pointwise_weight, "values", values)
    be = backends.get(backend, values.device.type)
    return _aggregate(be, values, grouped, rho, weight, bias, kernel, pointwise_weight)


# --------------------------------------------------------------------------- the operator


def _operator(
    values: Tensor,
    q_feat: Tensor,
    k_feat: Tensor,
    grid: Grid,
    *,
    groups: int,
    K: int,
    metric: str,
    candidates: str,
    num_candidates: int | None,
    window: int | None,
    include_self: bool,
    weighting: str,
    kernel: str,
    weight: Tensor | None,
    bias: Tensor | None,
    pointwise_weight: Tensor | None,
    dropout_p: float,
    training: bool,
    generator: torch.Generator | None,
    backend: str | None,
    selection_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """candidates -> selection -> weighting -> aggregation.

    values (B, M, C) tokens of the padded map; q_feat (B*G, N, D) / k_feat (B*G, M, D)
    selection features of the queries / all tokens (ignored for 'spatial'), G = groups.
    Returns y (B, N, C_out) and indices (B, G, N, K) into the padded map.
    """
    device = values.device
    be = backends.get(backend, device.type)
    self_index = grid.index(device)
    cand = win = None
    if candidates == "random":
        cand = grid.sample(num_candidates, training, generator, device)
    elif candidates == "grid":
        cand = grid.lattice(num_candidates, device)
    elif candidates == "window":
        win = grid.window(window, device)

    if metric == "spatial":
        pos = grid.positions(device)
        q, k, spatial_grid = pos[self_index][None], pos[None], grid.padded
    else:
        q, k = _selection_operands(metric, q_feat, k_feat, selection_dtype)
        spatial_grid = None
    with torch.autocast(device.type, enabled=False):
        idx = _select_indices(
            be,
            q,
            k,
            K,
            spatial_grid=spatial_grid,
            cand=cand,
            window=win,
            self_index=self_index,
            include_self=include_self,
        )
    B, G = values.shape[0], groups
    shared, idx = idx, idx.expand(B * G, -1, -1)  # spatial selection is one (1, N, K) for all

    rho = None
    if weighting == "softmax":
        if metric == "spatial":
            pos = grid.positions(device)
            d = pos[self_index][:, None, :2] - pos[shared[0]][..., :2]
            scores = -d.pow(2).sum(-1).to(values.dtype).expand(B * G, -1, -1)
        else:
            scores = _gather_scores(metric, q_feat, k_feat, idx)
        acc = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
        rho = F.dropout(scores.softmax(-1, dtype=acc).to(values.dtype), dropout_p, training)
        rho = rho.view(B, G, *rho.shape[1:])
    idx = idx.reshape(B, G, *idx.shape[1:])
    y = _aggregate(be, values, idx, rho, weight, bias, kernel, pointwise_weight)
    return y, idx


def _autocast_cast(*tensors: Tensor | None, device_type: str):
    """Cast like autocast casts a convolution's inputs (the backends run with it off):
    float32/float16/bfloat16 tensors to the autocast dtype, float64 left alone."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    lower = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if t is not None and t.dtype in lower else t for t in tensors)


def _check_flags(include_self, training, return_indices, generator, selection_dtype) -> None:
    """The options convnn2d and convnn_attention share, beyond the operator's choices."""
    for name, value in (
        ("include_self", include_self),
        ("training", training),
        ("return_indices", return_indices),
    ):
        check_bool(name, value)
    check_generator(generator)
    check_selection_dtype(selection_dtype)


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
    candidates: str = "all",
    num_candidates: int | None = None,
    window: int | None = None,
    include_self: bool = True,
    weighting: str = "none",
    kernel: str = "standard",
    pointwise_weight: Tensor | None = None,
    coords: str | None = None,
    lam: float = 0.5,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
    selection_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN over a feature map: (B, C, H, W) -> (B, C_out, ceil(H/stride), ceil(W/stride)).

    Each output position aggregates the K candidates nearest to it under ``metric``; see
    :class:`convnn.ConvNN2d` for the options. With ``return_indices`` also returns the
    (B, H_out * W_out, K) neighbour indices into the row-major flattened padded map.
    ``coords='xy'`` ranks by ``[(1 - lam) * x, lam * xy]``: lam = 0 is pure feature
    similarity, lam = 1 pure position.
    """
    check_rank("x", x, 4, "(B, C, H, W)")
    check_choice("metric", metric, METRICS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("coords", coords, COORDS)
    check_fraction("lam", lam)
    _check_flags(include_self, training, return_indices, generator, selection_dtype)
    (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
    check_positive_int("K", K)
    B, C, H, W = x.shape
    grid = Grid(H, W, ph, pw, sh, sw)
    K = _check_candidates(grid, candidates, num_candidates, window, K, include_self)
    C_out = _check_kernel_weights(kernel, weight, bias, pointwise_weight, C, K, "x")
    x_select = x  # rank neighbours at the input's precision even under autocast
    x, weight, bias, pointwise_weight = _autocast_cast(
        x, weight, bias, pointwise_weight, device_type=x.device.type
    )
    for name, t in (("weight", weight), ("bias", bias), ("pointwise_weight", pointwise_weight)):
        check_like(name, t, "x", x)

    shortcut = _conv_shortcut(grid, K)
    exact_conv = metric == "spatial" and candidates == "all" and weighting == "none"
    if exact_conv and shortcut and kernel in ("standard", "depthwise") and not return_indices:
        if backends.requested(backend) is None:
            w = weight.view(weight.shape[0], weight.shape[1], *shortcut)
            groups = C if kernel == "depthwise" else 1
            pad = (shortcut[0] // 2, shortcut[1] // 2)
            return F.conv2d(x, w, bias, (sh, sw), pad, groups=groups)

    tokens = lambda t: F.pad(t, (pw, pw, ph, ph)).flatten(2).transpose(1, 2)  # (B, Hp*Wp, C)
    values = tokens(x)
    feats = values if x_select is x else tokens(x_select)
    if coords == "xy":
        xy = grid.coords(x.device, feats.dtype).expand(B, -1, -1)
        feats = torch.cat([(1 - lam) * feats, lam * xy], -1)
    y, idx = _operator(
        values,
        feats[:, grid.index(x.device)],
        feats,
        grid,
        groups=1,
        K=K,
        metric=metric,
        candidates=candidates,
        num_candidates=num_candidates,
        window=window,
        include_self=include_self,
        weighting=weighting,
        kernel=kernel,
        weight=weight,
        bias=bias,
        pointwise_weight=pointwise_weight,
        dropout_p=0.0,
        training=training,
        generator=generator,
        backend=backend,
        selection_dtype=selection_dtype,
    )
    y = y.transpose(1, 2).reshape(B, C_out, *grid.out)
    return (y, idx[:, 0]) if return_indices else y


def convnn1d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    K: int = 3,
    stride: int = 1,
    padding: int = 0,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN over a sequence map: (B, C, L) -> (B, C_out, ceil(L/stride)).

    The same operator as :func:`convnn2d` on a 1 x L map; options as there.
    """
    check_rank("x", x, 3, "(B, C, L)")
    check_positive_int("stride", stride)
    check_positive_int("padding", padding, minimum=0)
    out = convnn2d(x[:, :, None], weight, bias, K, (1, stride), (0, padding), **kwargs)
    if isinstance(out, tuple):
        return out[0][:, :, 0], out[1]
    return out[:, :, 0]


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
    candidates: str = "all",
    num_candidates: int | None = None,
    window: int | None = None,
    hw: tuple[int, int] | None = None,
    include_self: bool = False,
    weighting: str = "softmax",
    kernel: str = "none",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
    backend: str | None = None,
    selection_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """ConvNN attention: each head's queries aggregate their K selected keys' values.

    q, k, v: (B, heads, N, d) -> (B, N, C_out) with C_out = heads * d unless a 'standard'
    kernel maps to another width. K=None takes every candidate (kernel 'none' only).
    ``hw`` lays the N tokens out as an (h, w) map for 'window', 'grid' and 'spatial'
    (default: a 1 x N row; a perfect-square N is still laid out as a square map, with a
    FutureWarning: that guess is deprecated, pass ``hw``).
    With ``return_indices`` also returns indices (B, heads, N, K).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(name, t, 4, "(B, heads, N, d)")
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q, k, v must be (B, heads, N, d) with matching B, heads, N, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    check_choice("metric", metric, METRICS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("candidates", candidates, CANDIDATES)
    check_fraction("dropout_p", dropout_p)
    _check_flags(include_self, training, return_indices, generator, selection_dtype)
    B, G, N, d = q.shape
    grid = Grid(*_token_map(N, hw, candidates in ("window", "grid") or metric == "spatial"))
    if K is None and kernel != "none":
        raise ValueError(
            f"K=None (every candidate) needs kernel='none': per-slot weights need a fixed K, "
            f"got kernel={kernel!r}"
        )
    K = _check_candidates(grid, candidates, num_candidates, window, K, include_self)
    C = G * v.shape[-1]
    _check_kernel_weights(kernel, weight, bias, None, C, K, "v (heads * d)")
    q, k, v, weight, bias = _autocast_cast(q, k, v, weight, bias, device_type=q.device.type)
    for name, t in (("k", k), ("v", v), ("weight", weight), ("bias", bias)):
        check_like(name, t, "q", q)

    full = candidates == "all" and K == N and not include_self and kernel == "none"
    if full and metric == "scaled_dot" and weighting == "softmax" and not return_indices:
        if backends.requested(backend) is None:  # exactly SDPA: use the fused kernel
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0)
            out = out.transpose(1, 2).reshape(B, N, C)
            return out if bias is None else out + bias
    values = v.transpose(1, 2).reshape(B, N, C)
    y, idx = _operator(
        values,
        q.reshape(B * G, N, d),
        k.reshape(B * G, N, d),
        grid,
        groups=G,
        K=K,
        metric=metric,
        candidates=candidates,
        num_candidates=num_candidates,
        window=window,
        include_self=include_self,
        weighting=weighting,
        kernel=kernel,
        weight=weight,
        bias=bias,
        pointwise_weight=None,
        dropout_p=dropout_p,
        training=training,
        generator=generator,
        backend=backend,
        selection_dtype=selection_dtype,
    )
    return (y, idx) if return_indices else y
