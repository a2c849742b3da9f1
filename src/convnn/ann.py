"""Approximate, content-based candidates for large maps: a multiprobe grid and LSH.

With ``all`` candidates, exact selection costs O(N * M * D). An index orders the keys so that
similar keys lie close together, and each query compares only against a *budget* of keys near
it in that order (plus itself with ``include_self``). Two families share one engine:

- ``grid`` (multiprobe grid): a seeded random projection of the features to a few dims, or
  (``projection='pca'``) the keys' d principal axes, each table after the first mixing them
  by its own seeded Gaussian d x d matrix (features of a network vary mostly along a few
  directions; a random projection of all D spends its dims on the rest), each dim cut into
  equal-mass bins at the keys' quantiles;
- ``lsh`` (locality-sensitive hashing): random hyperplanes, one sign bit per projection, for
  cosine, dot and scaled_dot; p-stable (Gaussian) projections cut into buckets of one width,
  shifted by a random offset, for euclidean.

A key's *cell* is its tuple of bins; its *code* interleaves the bins' bits (Morton order), so
cells that share their high bits (neighbours in the projected space) are neighbours in the
order. Keys are sorted by code (O(M log M) per table). Queries, placed in the same order by
binary search, are cut into tiles of ``tile`` consecutive queries; a tile probes its own cell
and then the neighbouring cells of the order, the ``budget // tables`` keys centred on it, in
every table. All queries of a tile share those keys, so scoring is one GEMM per tile
(tile x D by D x W) and its top-K one pass; the tables' top-K lists are then merged with
duplicates dropped. A larger budget gives each tile a window that contains the smaller one, so
recall never falls as the budget grows; with ``budget >= M`` every query sees every key and
the selection is exact. Memory is O(N * (K + budget)) at most; nothing is N x M.

Metrics. ``cosine`` hashes directions (x / |x|; zero vectors project to 0). ``dot`` and
``scaled_dot`` (maximum inner product) become cosine by the asymmetric transform of Neyshabur
and Srebro (2015): keys [k / U, sqrt(1 - |k|^2 / U^2)] with U the largest key norm, queries
[q / |q|, 0]. ``euclidean`` hashes x itself.

Determinism. The projections are fixed buffers drawn from a seeded ``torch.Generator`` and
stored as integers (``AnnIndex``). Features are rounded to fixed point (a power-of-two scale,
so rounding is the only change) with few enough bits that every projection sum is an integer
below 2^53: exact in float64 whatever the summation order. Everything after that is integer
arithmetic, a stable sort or a binary search. So the candidate sets depend only on the
features' values: the same on every backend and device, and for float32 features and the same
values in float64.

Shapes: B batch, N queries, M keys, D feature dims, L budget, K neighbours, T tables,
d projected dims per table, W = L // T keys per table and tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backends._common import BlockScores, canonical_order, prepare, rankable, topk_low_ties
from .metrics import finite_products, get_metric
from .options import ANN_METHODS as METHODS
from .options import ANN_METRICS as METRICS
from .options import ANN_PROJECTIONS as PROJECTIONS
from .options import check_bool, check_choice, check_positive_int, check_rank, check_self_index

__all__ = ["METHODS", "METRICS", "AnnSpec", "AnnIndex", "ann_candidates", "ann_select"]


_P_BITS = 20  # fixed-point bits of the projection entries
_P_MAX = 8 * 2**_P_BITS  # bound on their magnitude (Gaussian draws are clamped to +-8)
_MAX_DIMS = {"grid": 8, "lsh": 32}
_DEFAULT_DIMS = {"grid": 8, "lsh": 16}
_DEFAULT_TABLES = {"grid": 8, "lsh": 8}
_CODE_BITS = 62  # bits of a Morton code (int64)
_BLOCK = 1 << 22  # elements of one block of gathered keys or scores (16 MiB of fp32)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class AnnSpec:
    """Options of an approximate candidate index.

    Args:
        method: 'grid' (multiprobe grid) or 'lsh' (hyperplanes for cosine / dot, p-stable
            buckets for euclidean).
        projection: grid only: 'random' (the seeded Gaussian buffer) or 'pca' (the keys'
            principal axes, computed exactly every call, O(M D^2); table 0 uses them as
            they are, table t > 0 mixes them by a seeded Gaussian d x d matrix).
        dims: projected dims per table: grid 1..8 (default 8), lsh 1..32 (default 16).
        tables: independent orders (default 8); the budget is split evenly between them.
        tile: queries that share one window of keys (default 64).
        seed: seed of the projections (and the p-stable offsets).
    """

    method: str = "grid"
    projection: str = "random"
    dims: int | None = None
    tables: int | None = None
    tile: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("projection", self.projection, PROJECTIONS[self.method])
        if self.dims is not None:
            check_positive_int("dims", self.dims)
            if self.dims > _MAX_DIMS[self.method]:
                raise ValueError(
                    f"dims must be <= {_MAX_DIMS[self.method]} for method={self.method!r}, "
                    f"got {self.dims}"
                )
        if self.tables is not None:
            check_positive_int("tables", self.tables)
        check_positive_int("tile", self.tile)
        check_positive_int("seed", self.seed, minimum=0)

    @property
    def num_tables(self) -> int:
        return self.tables if self.tables is not None else _DEFAULT_TABLES[self.method]

    @property
    def num_dims(self) -> int:
        return self.dims or _DEFAULT_DIMS[self.method]


# --------------------------------------------------------------------------- the index


class AnnIndex(nn.Module):
    """An approximate candidate index for ``dim``-dimensional features.

    Its projections are buffers (integers, so ``.half()`` or ``.to(dtype)`` never round
    them): ``projection`` (T, dim + 1, d) and ``offset`` (T, d), drawn from
    ``torch.Generator().manual_seed(spec.seed)`` on the CPU, so an index made with the same
    spec and dim is the same on every device.

    Args:
        dim: feature dims D of the queries and keys it will see.
        spec: an :class:`AnnSpec`, or None to build one from ``options``.
    """

    projection: Tensor
    offset: Tensor

    def __init__(self, dim: int, spec: AnnSpec | None = None, **options) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        if spec is not None and options:
            raise ValueError(f"give spec or options, not both, got spec and {sorted(options)}")
        self.spec = spec if spec is not None else AnnSpec(**options)
        self.dim = dim
        gen = torch.Generator().manual_seed(self.spec.seed)
        T, d = self.spec.num_tables, self.spec.num_dims
        proj = torch.randn(T, dim + 1, d, generator=gen, dtype=torch.float64).clamp(-8, 8)
        offset = torch.rand(T, d, generator=gen, dtype=torch.float64)
        self.register_buffer("projection", torch.round(proj * 2**_P_BITS).long())
        self.register_buffer("offset", torch.round(offset * 2**_P_BITS).long())

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{self.dim}, method={s.method!r}, projection={s.projection!r}, dims={s.num_dims}, "
            f"tables={s.num_tables}, tile={s.tile}, seed={s.seed}"
        )

    def candidates(
        self, query: Tensor, key: Tensor, budget: int, *, metric: str = "cosine"
    ) -> Tensor:
        """Each query's candidate keys: (B, N, L) key indices, L = ``budget`` rounded down
        to a multiple of the tables (``M`` when budget >= M), ascending and distinct, -1 at
        the end of a row where the tables proposed a key more than once. O(N * L) memory;
        :meth:`select` ranks the same sets without forming it."""
        self._check(query, key, metric, budget, 1, False, None)
        with torch.no_grad():
            return _plan(self, query.detach(), key.detach(), budget, metric).per_query()

    def select(
        self,
        query: Tensor,
        key: Tensor,
        K: int,
        budget: int,
        *,
        metric: str = "cosine",
        include_self: bool = False,
        self_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Approximate top-K: candidates, then exact scores over them, then top-K.

        Same contract as ``convnn.functional.knn_select`` (slots in descending similarity,
        ties to the lower key index; ``include_self`` puts the query's own token in slot 0),
        with each query ranking only its candidates. With budget >= M the candidates are all
        keys and the result is the exact selection.

        query (B, N, D), key (B, M, D) -> scores (B, N, K), differentiable in query and key,
        and indices (B, N, K).
        """
        self_index = self._check(query, key, metric, budget, K, include_self, self_index)
        with torch.no_grad():
            plan = _plan(self, query.detach(), key.detach(), budget, metric)
            idx = plan.select(*prepare(metric, query.detach(), key.detach()), K, self_index)
        return _pair_scores(metric, query, key, idx), idx

    def select_indices(
        self,
        query: Tensor,
        key: Tensor,
        scores: BlockScores,
        K: int,
        budget: int,
        *,
        metric: str,
        self_index: Tensor | None = None,
    ) -> Tensor:
        """The operator's selection: indices (B, N, K) of each query's K best candidates as
        ``scores`` rank them (what the backends would rank: the selection dtype, a position
        bias), candidates from the index over ``query`` (B, N, D) and ``key`` (B, M, D).

        With a GEMM form (``scores.operands``) the tiles of :meth:`select` score them, one
        GEMM per tile; otherwise each query's lists are scored through ``scores.window``.
        Both rank the same candidate sets with the same tie rule; ``self_index`` (N,): each
        query's own key, put in slot 0 and never among the others."""
        self._check(query, key, metric, budget, K, self_index is not None, self_index)
        with torch.no_grad():
            plan = _plan(self, query.detach(), key.detach(), budget, metric)
            B, N, M = query.shape[0], query.shape[1], key.shape[1]
            if scores.operands is not None:
                q, k = scores.operands
                return plan.select(q.expand(B, N, -1), k.expand(B, M, -1), K, self_index)
            return plan.rank(scores, K, self_index)

    forward = select

    def _check(self, query, key, metric, budget, K, include_self, self_index):
        check_rank("query", query, 3, "(B, N, D)")
        check_rank("key", key, 3, "(B, M, D)")
        if key.dtype != query.dtype or key.device != query.device:
            raise ValueError(
                f"key must have the dtype and device of query ({query.dtype}, {query.device}), "
                f"got {key.dtype}, {key.device}"
            )
        if key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
            raise ValueError(
                f"query and key must share batch and feature dims, got {tuple(query.shape)} "
                f"and {tuple(key.shape)}"
            )
        if query.shape[2] != self.dim:
            raise ValueError(
                f"query and key must have D = {self.dim} feature dims (the index's dim), got "
                f"{query.shape[2]}"
            )
        for name, t in (("query", query), ("key", key)):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite to be hashed, got NaN or infinite values")
        check_choice("metric", metric, METRICS)
        check_positive_int("budget", budget)
        check_positive_int("K", K)
        check_bool("include_self", include_self)
        N, M = query.shape[1], key.shape[1]
        T = 1 if budget >= M else self.spec.num_tables
        W = min(budget, M) // T
        if K > W:
            raise ValueError(
                f"budget must give each of the {T} tables at least K = {K} keys (budget >= "
                f"{K * T}, or >= M = {M}), got budget={budget}"
            )
        self_index = check_self_index(self_index, include_self, N, M, query.device)
        return self_index.to(query.device) if include_self else None


# --------------------------------------------------------------------------- projection


def _fixed(x: Tensor, exponent: Tensor, bits: int) -> Tensor:
    """round(x * 2^(bits - exponent)) in float64: exact scaling, then one rounding."""
    return torch.round(torch.ldexp(x.double(), (bits - exponent).double()))


def _exponent(x: Tensor, dims) -> Tensor:
    """The least e with max |x| over ``dims`` <= 2^e (0 for zeros)."""
    return torch.frexp(x.detach().double().abs().amax(dim=dims, keepdim=True))[1]


def _hash_space(
    metric: str, query: Tensor, key: Tensor, same: bool = False
) -> tuple[Tensor, Tensor, int]:
    """The vectors the index hashes, in fixed point: (B, N, D + 1), (B, M, D + 1) float64
    holding integers of at most ``bits`` bits, and ``bits``. ``same``: the queries are the
    keys (cosine, euclidean), hashed once.

    cosine: x / |x|; dot / scaled_dot: queries [q / |q|, 0], keys [k / U, sqrt(1 - |k|^2 / U^2)];
    euclidean: x, both scaled by one power of two per batch element. Every step is exact or
    one correctly rounded operation, so the result depends only on the features' values."""
    D = query.shape[-1]
    bits = 52 - math.ceil(math.log2((D + 1) * _P_MAX))  # every projection sum < 2^52
    bits_n = (52 - math.ceil(math.log2(D + 1))) // 2  # every squared norm < 2^52
    if bits < 12:
        raise ValueError(f"query and key have too many feature dims to hash exactly, got D={D}")
    one = torch.ldexp(torch.ones((), dtype=torch.float64, device=query.device), torch.tensor(bits))

    def unit(x: Tensor, e: Tensor, sq_max: bool) -> tuple[Tensor, Tensor]:
        xn = _fixed(x, e, bits_n)
        sq = xn.pow(2).sum(-1, keepdim=True)  # exact
        norm = sq.amax(1, keepdim=True) if sq_max else sq
        h = torch.where(norm > 0, torch.round(xn / norm.sqrt() * one), 0.0)
        return h, (sq / norm.clamp_min(1)).clamp_max(1)

    pad = query.new_zeros(()).double()
    if metric == "euclidean":
        e = torch.maximum(_exponent(query, (1, 2)), _exponent(key, (1, 2)))
        hk = _extend(_fixed(key, e, bits), pad)
        return hk if same else _extend(_fixed(query, e, bits), pad), hk, bits
    hq = _extend(unit(query, _exponent(query, -1), False)[0], pad)
    if metric == "cosine":
        return hq, hq if same else _extend(unit(key, _exponent(key, -1), False)[0], pad), bits
    hk, ratio = unit(key, _exponent(key, (1, 2)), True)  # dot: maximum inner product search
    return hq, torch.cat([hk, torch.round((1 - ratio).sqrt() * one)], -1), bits


def _extend(h: Tensor, value: Tensor) -> Tensor:
    return torch.cat([h, value.expand(*h.shape[:-1], 1)], -1)


def _principal_axes(hk: Tensor, d: int, bits: int, mix: Tensor) -> Tensor:
    """Projections onto the keys' d principal axes: (B, M, D') fixed-point vectors and ``mix``
    (T, D', d), the index's integer Gaussian draws (2^20 = 1; its leading d x d blocks mix the
    axes) -> (B, T, D', d) projections in fixed point. Table 0 is the axes themselves
    (largest variance first, each signed so that its largest entry is positive); table t > 0
    is the axes times mix[t] / 8, so that every entry stays within the bound of a projection
    (|axes| <= 1, |mix| <= 8, d <= 8 terms).

    The covariance is computed exactly in integers (vectors cut to fewer bits); the
    eigenvectors come from float64 ``eigh`` on the CPU and the mixing is exact integer
    arithmetic there (every sum < 2^53), so the projections depend on the keys only."""
    B, M, Dp = hk.shape
    c = max(1, min(bits, 31 - math.ceil(math.log2(M + 1))))  # M * sums < 2^62: exact in int64
    hc = torch.floor(torch.ldexp(hk, torch.tensor(float(c - bits), device=hk.device)))
    second = (hc.transpose(1, 2) @ hc).cpu().long()  # entries < 2^53: exact in float64
    total = hc.sum(1).cpu().long()
    cov = M * second - total[:, :, None] * total[:, None, :]  # M^2 x covariance, exact
    _, vec = torch.linalg.eigh(cov.double())
    axes = vec[..., -d:].flip(-1)  # (B, D', d)
    biggest = axes.abs().argmax(-2, keepdim=True)
    axes = torch.round(axes * torch.where(axes.gather(-2, biggest) < 0, -1.0, 1.0) * 2**_P_BITS)
    e = axes.shape[-1]  # d, or D' when the features have fewer dims
    mix = mix[1:, :e, :e].cpu().double()
    mixed = torch.round(torch.ldexp(axes[:, None] @ mix, torch.tensor(-23.0)))
    return torch.cat([axes[:, None], mixed], 1).to(hk.device)  # (B, T, D', d)


def _project(h: Tensor, P: Tensor, bits: int) -> Tensor:
    """Exact projections of hashed vectors: (B, R, D'), P (T, D', d) or (B, T, D', d)
    integer-valued -> (B, T, d, R) int64 (one row per projected dim), 2^20 = a unit-scale
    projection. Every sum is an integer below 2^53, so exact in any summation order."""
    shift = torch.tensor(float(-bits), device=h.device)
    z = torch.matmul(P.double().transpose(-1, -2), h.transpose(-1, -2)[:, None])
    return torch.round(torch.ldexp(z, shift)).long()


# --------------------------------------------------------------------------- codes


def _bins(spec: AnnSpec, metric: str, zk: Tensor, offset: Tensor):
    """The cells: a function of (B, T, d, R) projections -> (B, T, d, R) int64 bins in
    [0, 2^r), and r.

    grid: 2^r equal-mass bins per dim, cut at the keys' quantiles; lsh: the side of each
    random hyperplane (cosine, dot), shifted to the keys' median so that it halves them (ReLU
    features fill one orthant, where hyperplanes through 0 rarely split them), or p-stable
    buckets of one width shifted by a random offset (euclidean). Integer arithmetic only."""
    B, T, d, M = zk.shape
    hyperplanes = spec.method == "lsh" and metric != "euclidean"
    r = 1 if hyperplanes else max(1, min(_CODE_BITS // d, math.ceil(math.log2(max(M, 2)))))
    nb = 2**r  # grid: many bins per dim, so that the order is local within a cell too
    ordered = zk.sort(dim=-1).values  # (B, T, d, M)
    if spec.method == "grid" or hyperplanes:  # equal-mass bins: the keys' quantiles
        at = torch.tensor([i * M // nb for i in range(1, nb)], device=zk.device)
        edges = ordered[..., at]  # (B, T, d, nb - 1)
    else:  # p-stable: equal widths over the central 98% of the keys, offset in [0, 1) widths
        lo = ordered[..., (M - 1) // 100]
        hi = ordered[..., (M - 1) - (M - 1) // 100]
        width = ((hi - lo) // nb).clamp_min(1)  # (B, T, d)
        frac = (offset[:, :d] * width) >> _P_BITS  # (B, T, d), offset < 2^20 is the fraction
        steps = torch.arange(1, nb, device=zk.device)
        edges = lo[..., None] - frac[..., None] + steps * width[..., None]
    edges = edges.contiguous()
    return (lambda z: torch.searchsorted(edges, z, right=True)), r


def _morton(bins: Tensor, r: int) -> Tensor:
    """Interleave the bits of the bins, highest first: (..., d, R) -> (..., R) int64 codes
    (bit by bit: never a tensor of d * r bits per vector)."""
    d = bins.shape[-2]
    code = torch.zeros_like(bins[..., 0, :])
    for j in range(r - 1, -1, -1):
        for i in range(d):
            code = (code << 1) | ((bins[..., i, :] >> j) & 1)
    return code


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """Where each tile of queries looks: per (batch, table) row ``bt``, the keys in code order
    and the tiles' queries and window starts.

    key_order (B * T, M): key index at each position of the code order;
    tile_query (B * T, G, tile): query index of each tile slot (-1: padding);
    tile_start (B * T, G): first position of the tile's window of W keys.
    """

    key_order: Tensor
    tile_query: Tensor
    tile_start: Tensor
    shape: tuple[int, int, int, int]  # B, N, M, T
    window: int

    def windows(self, t0: int, t1: int) -> Tensor:
        """Key indices of the windows of flat tiles t0:t1, in code order: (t1 - t0, W)."""
        G = self.tile_start.shape[1]
        W = self.window
        flat = torch.arange(t0, t1, device=self.key_order.device)
        bt, start = flat // G, self.tile_start.view(-1)[t0:t1]
        pos = (bt * self.key_order.shape[1] + start)[:, None] + torch.arange(W, device=flat.device)
        return self.key_order.view(-1).index_select(0, pos.view(-1)).view(-1, W)

    def per_query(self) -> Tensor:
        """(B, N, T * W) candidate lists: the union of the query's windows in every table,
        ascending and distinct, -1 at the end of the row where the tables proposed a key
        twice."""
        B, N, M, T = self.shape
        W = self.window
        G, tile = self.tile_query.shape[1:]
        dev = self.key_order.device
        q = self.tile_query.view(B, T, G, tile)
        valid = q >= 0
        bb, tt, gg, _ = torch.meshgrid(
            *(torch.arange(n, device=dev) for n in q.shape), indexing="ij"
        )
        out = torch.full((B, T, N, W), -1, dtype=torch.long, device=dev)
        win = self.windows(0, B * T * G).view(B, T, G, W)
        out[bb[valid], tt[valid], q[valid]] = win[bb[valid], tt[valid], gg[valid]]
        ids = out.permute(0, 2, 1, 3).reshape(B, N, T * W).sort(-1).values
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
        ids = torch.where(dup, M, ids).sort(-1).values  # duplicates to the end
        return torch.where(ids == M, -1, ids)

    def rank(self, scores: BlockScores, K: int, self_index) -> Tensor:
        """Indices (B, N, K) of each query's K best candidates by ``scores`` (any
        :class:`~convnn.metrics.BlockScores`, e.g. with a position bias), query by query over
        the lists of :meth:`per_query`: the selection of :meth:`select` for scores without a
        GEMM form. O(n * L * D) memory per block of n queries."""
        B, N, M, T = self.shape
        k_sel = K - 1 if self_index is not None else K
        lists = self.per_query()
        out = lists.new_empty(B, N, k_sel)
        step = max(1, _BLOCK // max(1, lists.shape[-1] * scores.width * B))
        for n0 in range(0 if k_sel else N, N, step):
            qs = slice(n0, min(N, n0 + step))
            cand = lists[:, qs]  # ascending ids: a tie goes to the lower id
            blocked = cand < 0
            if self_index is not None:
                blocked |= cand == self_index[qs, None]
            s = scores.window(qs, cand.clamp_min(0)).masked_fill(blocked, -torch.inf)
            v, pos = topk_low_ties(s, k_sel)
            out[:, qs] = canonical_order(v, cand.gather(-1, pos))[1]
        return _with_self(out, self_index)

    def select(self, q: Tensor, k: Tensor, K: int, self_index) -> Tensor:
        """Indices (B, N, K) of each query's K best candidates by rankable(q . k) (slot 0:
        itself with ``self_index``): GEMM operands q (B, N, D'), k (B, M, D'), one GEMM per
        tile and table, then the tables' top-K merged."""
        B, N, M, T = self.shape
        W = self.window
        G, tile = self.tile_query.shape[1:]
        k_sel = K - 1 if self_index is not None else K
        if k_sel == 0 or N == 0:
            idx = torch.empty(B, N, 0, dtype=torch.long, device=q.device)
            return _with_self(idx, self_index)
        Dp = q.shape[-1]
        q_rows, k_rows = q.reshape(B * N, Dp), k.reshape(B * M, Dp)
        # each table's top K per query, (B * N, T, K) flat; padding slots write the last row
        k_tab = K  # K - 1 others, and one more in case the query itself is among them
        best_s = q.new_empty(B * N * T + 1, k_tab)
        best_i = torch.empty(B * N * T + 1, k_tab, dtype=torch.long, device=q.device)
        step = max(1, _BLOCK // (W * (Dp + tile)))  # tiles per block
        dev = q.device
        finite = finite_products(q, k)  # no score can be NaN or infinite: no rankable pass
        for t0 in range(0, B * T * G, step):
            t1 = min(B * T * G, t0 + step)
            flat = torch.arange(t0, t1, device=dev)
            b, t = flat // (T * G), flat // G % T
            ids = self.windows(t0, t1)  # (n, W)
            qs = self.tile_query.view(-1, tile)[t0:t1]  # (n, tile)
            rows = (b[:, None] * N + qs.clamp_min(0)).view(-1)
            qt = q_rows.index_select(0, rows).view(-1, tile, Dp)
            kt = k_rows.index_select(0, (b[:, None] * M + ids).view(-1)).view(-1, W, Dp)
            s = qt @ kt.transpose(1, 2)  # (n, tile, W): one GEMM per tile
            s = s if finite else rankable(s)
            v, got = _topk_low_ids(s, ids, k_tab)  # (n, tile, K)
            out = torch.where(qs >= 0, rows.view_as(qs) * T + t[:, None], B * N * T).view(-1)
            best_s.index_copy_(0, out, v.reshape(-1, k_tab))
            best_i.index_copy_(0, out, got.reshape(-1, k_tab))
        s = best_s[:-1].view(B * N, T * k_tab)
        i = best_i[:-1].view(B * N, T * k_tab)
        i, p = i.sort(dim=-1, stable=True)  # by key id, so a tie keeps the lower id first
        s = s.gather(-1, p)
        dup = torch.zeros_like(i, dtype=torch.bool)
        dup[:, 1:] = i[:, 1:] == i[:, :-1]  # a key two tables found: keep one
        if self_index is not None:  # the query itself is never one of the K - 1 others
            dup |= i == self_index.repeat(B)[:, None]
        s = s.masked_fill(dup, -torch.inf)
        s, p = s.sort(dim=-1, descending=True, stable=True)
        idx = i.gather(-1, p[:, :k_sel]).view(B, N, k_sel)
        return _with_self(idx, self_index)


def _topk_low_ids(scores: Tensor, ids: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Top-K of each row of ``scores`` (n, t, W) whose columns are the keys ``ids`` (n, W), in
    any order, a tie going to the lower key id: values and key ids (n, t, K), unsorted.

    One unsorted top-(K + 1) per row; only a row whose (K + 1)-th score equals its K-th (a
    tie at the cut: frequent, fp32 similarities of near neighbours collide) is fixed: its
    slots holding the K-th score get the lowest ids among all keys with that score."""
    W = scores.shape[-1]
    vals, pos = scores.topk(min(K + 1, W), dim=-1, sorted=False)
    got = ids.gather(-1, pos.flatten(1)).view_as(pos)
    if K >= W:
        return vals, got
    vals, order = vals.sort(dim=-1, descending=True)
    got = got.gather(-1, order)
    cut = vals[..., K] == vals[..., K - 1]
    vals, got = vals[..., :K].contiguous(), got[..., :K].contiguous()
    if cut.any():
        n, t = cut.nonzero(as_tuple=True)
        kth = vals[n, t, K - 1 :]  # (R, 1)
        tied = ids[n].masked_fill(scores[n, t] != kth, torch.iinfo(ids.dtype).max)
        lowest = tied.topk(K, dim=-1, largest=False).values  # ascending
        slot = vals[n, t] == kth  # (R, K): the last slots, vals being sorted
        rank = (slot.cumsum(-1) - 1).clamp_min(0)
        got[n, t] = torch.where(slot, lowest.gather(-1, rank), got[n, t])
    return vals, got


def _with_self(idx: Tensor, self_index: Tensor | None) -> Tensor:
    if self_index is None:
        return idx
    B, N = idx.shape[:2]
    return torch.cat([self_index.expand(B, N)[..., None], idx], -1)


def _plan(index: AnnIndex, query: Tensor, key: Tensor, budget: int, metric: str) -> _Plan:
    """Hash, order the keys and cut the queries into tiles: O((N + M) log M) per table."""
    spec = index.spec
    B, N, _ = query.shape
    M = key.shape[1]
    dev = query.device
    tile = min(spec.tile, max(N, 1))
    G = -(-N // tile)
    if budget >= M:  # every key: one window over all of them
        T, W = 1, M
        key_order = torch.arange(M, device=dev).expand(B, M).contiguous()
        qpos = torch.zeros(B, 1, N, dtype=torch.long, device=dev)
    else:
        T, W = spec.num_tables, budget // spec.num_tables
        # self-similarity (queries = keys) hashes once, but for dot (asymmetric transform)
        same = metric in ("cosine", "euclidean") and query.shape == key.shape
        same = same and bool(torch.equal(query, key))
        hq, hk, bits = _hash_space(metric, query, key, same)
        d = spec.num_dims
        if spec.projection == "pca":
            P = _principal_axes(hk, d, bits, index.projection)
        else:
            P = index.projection[..., :d].to(dev)
        zk = _project(hk, P, bits)  # (B, T, d, M)
        cut, r = _bins(spec, metric, zk, index.offset.to(dev))
        code_k = _morton(cut(zk), r)  # (B, T, M)
        code_q = code_k if same else _morton(cut(_project(hq, P, bits)), r)  # (B, T, N)
        code_k, key_order = code_k.sort(dim=-1, stable=True)  # a cell's keys by index
        qpos = torch.searchsorted(code_k, code_q)  # each query's place in the order
        key_order = key_order.view(B * T, M)
    # tiles: consecutive queries in the order; padding slots repeat nothing (-1)
    qpos = qpos.view(B * T, N)
    qpos, qorder = qpos.sort(dim=-1, stable=True)
    pad = G * tile - N
    tile_query = torch.cat([qorder, qorder.new_full((B * T, pad), -1)], -1).view(B * T, G, tile)
    centre = qpos[:, (torch.arange(G, device=dev) * tile + tile // 2).clamp_max(N - 1)]
    tile_start = (centre - W // 2).clamp(0, M - W)
    return _Plan(key_order, tile_query, tile_start, (B, N, M, T), W)


# --------------------------------------------------------------------------- scores


def _pair_scores(metric: str, query: Tensor, key: Tensor, indices: Tensor) -> Tensor:
    """Differentiable similarity of each query to its selected keys: (B, N, K)."""
    from .stages.similarity import pair_scores  # the operator's own (stages import this module)

    return pair_scores(get_metric(metric), query, key, indices)


# --------------------------------------------------------------------------- functions


def _index(query, options: dict) -> AnnIndex:
    """An index for ``query``'s feature dims from :class:`AnnSpec` options (checked there)."""
    D = query.shape[-1] if isinstance(query, Tensor) and query.dim() == 3 else 1
    return AnnIndex(D, AnnSpec(**options))


def ann_candidates(query: Tensor, key: Tensor, budget: int, *, metric: str = "cosine", **options):
    """Approximate candidates: (B, N, min(budget, M)) key indices per query, ascending and
    distinct, -1 at the end of a row for keys the tables proposed twice.

    options: :class:`AnnSpec`'s fields (method, projection, dims, tables, tile, seed)."""
    return _index(query, options).candidates(query, key, budget, metric=metric)


def ann_select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    metric: str = "cosine",
    budget: int = 256,
    include_self: bool = False,
    self_index: Tensor | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """Approximate top-K selection: ``convnn.functional.knn_select``'s contract, each query
    ranking only its ``budget`` candidates (exact selection when budget >= M).

    query (B, N, D), key (B, M, D) -> scores (B, N, K), indices (B, N, K).
    options: :class:`AnnSpec`'s fields (method, projection, dims, tables, tile, seed).
    """
    return _index(query, options).select(
        query, key, K, budget, metric=metric, include_self=include_self, self_index=self_index
    )
