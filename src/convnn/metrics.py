"""Similarities: the maths of every metric, in one module every backend and stage uses.

A metric is an object with a small protocol (:class:`Metric`); the built-in ones are
registered by name and :func:`register_metric` adds a user's. Every one is computed block
by block: a backend asks for the scores of a block of queries against a block of keys (or
against each query's own candidates), never for an N x N matrix or an (N, N, d)
difference tensor.

The backends rank :class:`BlockScores`: what to rank, in blocks. A metric with a GEMM form
(``operands``) ranks as one matrix product per block, the shape fused kernels want; any
other ranks through its ``score``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

EPS = 1e-12


# --------------------------------------------------------------------------- the protocol


class Metric:
    """A similarity s(x, y), higher = closer. Subclass it and override what applies.

    Features are rows of their last dim; leading dims broadcast (a batch, heads, queries).

    - :meth:`score` (required): the scores of a block of queries against a block of keys,
      x (..., n, d), y (..., m, d) -> (..., n, m). Selection calls it without gradient;
      through :meth:`pairs` it is also the differentiable score of softmax weighting.
    - :meth:`pairs`: each query against its own K gathered keys, x (..., N, d), y (..., N,
      K, d) -> (..., N, K). Default: :meth:`score` on blocks of one query.
    - :meth:`operands`: a GEMM form (x', y') whose products ``x' @ y'.T`` rank every query's
      keys as :meth:`score` does (they may differ from it by a per-query constant). With
      one, selection is a matrix product per block and runs on the fused kernels too;
      None (the default) ranks through :meth:`score`.
    - :meth:`parameters` / :meth:`prepare`: learnable parameters. ``parameters(d)`` gives the
      initial value of each for features of dimension d (one head); a layer holds them per
      head, shaped (heads, *shape), in its state_dict. ``prepare(x, params, side)`` maps the
      features (B, heads, n, d) of the queries (``side='query'``) or keys (``side='key'``)
      before scoring, with ``params`` {name: (heads, *shape)}; gradients reach the
      parameters through the K selected scores when weighting is 'softmax'.

    ``uses_positions`` is True only for 'spatial', which ranks by position, not features.
    """

    uses_positions = False

    def score(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define score(x, y)")

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        return self.score(x[..., None, :], y)[..., 0, :]

    def operands(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def parameters(self, dim: int) -> dict[str, Tensor]:
        return {}

    def prepare(self, x: Tensor, params: dict[str, Tensor], side: str) -> Tensor:
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Cosine(Metric):
    """cos(x, y); a zero vector (padding) has similarity 0 with everything."""

    def score(self, x, y):
        return F.normalize(x, dim=-1, eps=EPS) @ F.normalize(y, dim=-1, eps=EPS).transpose(-1, -2)

    def pairs(self, x, y):
        return (
            F.normalize(x[..., None, :], dim=-1, eps=EPS) * F.normalize(y, dim=-1, eps=EPS)
        ).sum(-1)

    def operands(self, x, y):
        # self-similarity (y is x) normalises once; contiguous rows normalise faster and
        # are what the score GEMMs read
        nx = F.normalize(x.contiguous(), dim=-1, eps=EPS)
        return nx, nx if y is x else F.normalize(y.contiguous(), dim=-1, eps=EPS)


class Euclidean(Metric):
    """-||x - y||^2 (no square root: no NaN gradient at x = y)."""

    def score(self, x, y):
        return -torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2)

    def pairs(self, x, y):
        return -(x[..., None, :] - y).pow(2).sum(-1)

    def operands(self, x, y):
        # -|x-y|^2 = 2 x.y - |y|^2 - |x|^2, and |x|^2 is the same for all of a query's keys.
        ones = x.new_ones(x.shape[:-1] + (1,))
        return torch.cat([2 * x, -ones], -1), torch.cat([y, y.pow(2).sum(-1, keepdim=True)], -1)


class Dot(Metric):
    """<x, y>, divided by sqrt(d) when ``scaled`` ('scaled_dot')."""

    def __init__(self, scaled: bool = False) -> None:
        self.scaled = scaled

    def _scale(self, x: Tensor) -> float:
        return x.shape[-1] ** -0.5 if self.scaled else 1.0

    def score(self, x, y):
        return (x @ y.transpose(-1, -2)) * self._scale(x)

    def pairs(self, x, y):
        return (x[..., None, :] * y).sum(-1) * self._scale(x)

    def operands(self, x, y):
        return (x * self._scale(x) if self.scaled else x), y

    def __repr__(self) -> str:
        return f"Dot(scaled={self.scaled})"


class Minkowski(Metric):
    """-(sum_c |x_c - y_c|^p)^(1/p) for p >= 1; p = inf is -max_c |x_c - y_c| (Chebyshev)
    and p = 1 the Manhattan distance. No GEMM form: blocks are ``torch.cdist``."""

    def __init__(self, p: float = 2.0) -> None:
        self.p = float(p)

    def score(self, x, y):
        return -torch.cdist(x, y, p=self.p, compute_mode="donot_use_mm_for_euclid_dist")

    def pairs(self, x, y):
        # vector_norm's gradient is 0 (a subgradient) where x = y, never NaN
        return -torch.linalg.vector_norm(x[..., None, :] - y, ord=self.p, dim=-1)

    def __repr__(self) -> str:
        return f"Minkowski(p={self.p})"


class Pearson(Metric):
    """cosine(x - mean_c(x), y - mean_c(y)): 0 where either centred vector is 0."""

    @staticmethod
    def _unit(x: Tensor) -> Tensor:
        return F.normalize(x - x.mean(-1, keepdim=True), dim=-1, eps=EPS)

    def score(self, x, y):
        return self._unit(x) @ self._unit(y).transpose(-1, -2)

    def pairs(self, x, y):
        return (self._unit(x)[..., None, :] * self._unit(y)).sum(-1)

    def operands(self, x, y):
        return self._unit(x), self._unit(y)


def _per_head(x: Tensor, matrix: Tensor) -> Tensor:
    """x (B, G, n, d) times each head's matrix (G, d, d): (B, G, n, d)."""
    return torch.einsum("bgnd,gde->bgne", x, matrix)


class Mahalanobis(Euclidean):
    """-|L^T (x - y)|^2 with L lower-triangular (d x d), learnable, starting at the identity
    (where it is 'euclidean'): the euclidean metric of the features x L."""

    def parameters(self, dim):
        return {"L": torch.eye(dim)}

    def prepare(self, x, params, side):
        return _per_head(x, params["L"].tril())


class Bilinear(Dot):
    """x^T W y / sqrt(d) with W (d x d), learnable, starting at the identity (where it is
    'scaled_dot'): the scaled dot product of the queries x W with the keys."""

    def __init__(self) -> None:
        super().__init__(scaled=True)

    def parameters(self, dim):
        return {"W": torch.eye(dim)}

    def prepare(self, x, params, side):
        return _per_head(x, params["W"]) if side == "query" else x

    def __repr__(self) -> str:
        return "Bilinear()"


class Spatial(Metric):
    """Proximity of positions only: Chebyshev distance, then squared distance, then raster
    index (:func:`spatial_keys`); softmax weights use -||p_i - p_j||^2."""

    uses_positions = True

    def score(self, x, y):  # x, y: positions (..., 2) in grid steps
        return -(x[..., :, None, :2] - y[..., None, :, :2]).pow(2).sum(-1)

    def pairs(self, x, y):
        return -(x[..., None, :2] - y[..., :2]).pow(2).sum(-1)


# --------------------------------------------------------------------------- the registry

_BUILTIN: dict[str, Metric] = {
    "cosine": Cosine(),
    "euclidean": Euclidean(),
    "dot": Dot(),
    "scaled_dot": Dot(scaled=True),
    "spatial": Spatial(),
    "manhattan": Minkowski(1.0),
    "minkowski": Minkowski(2.0),  # its exponent is the ``p`` option (get_metric)
    "chebyshev": Minkowski(float("inf")),
    "pearson": Pearson(),
    "mahalanobis": Mahalanobis(),
    "bilinear": Bilinear(),
}
_REGISTRY: dict[str, Metric] = dict(_BUILTIN)
_LOCK = threading.Lock()


def metric_names() -> tuple[str, ...]:
    """The names a ``metric=`` option accepts: the built-in metrics, then registered ones."""
    return tuple(_REGISTRY)


def get_metric(name: str, p: float = 2.0) -> Metric:
    """The metric registered as ``name`` ('minkowski' with exponent ``p``)."""
    if name == "minkowski":
        return _minkowski(float(p))
    return _REGISTRY[name]


_MINKOWSKI: dict[float, Minkowski] = {}


def _minkowski(p: float) -> Minkowski:
    metric = _MINKOWSKI.get(p)
    if metric is None:
        metric = _MINKOWSKI.setdefault(p, Minkowski(p))
    return metric


def register_metric(name: str, metric: Metric, *, overwrite: bool = False) -> Metric:
    """Make ``metric`` available as ``metric=name`` in every layer and function.

    ``metric`` follows the :class:`Metric` protocol (at least ``score``). Built-in names
    cannot be replaced; registering a taken name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier string, got {name!r}")
    if not callable(getattr(metric, "score", None)):
        raise ValueError(
            f"metric must have a score(x, y) method (see convnn.metrics.Metric), got {metric!r}"
        )
    with _LOCK:
        if name in _BUILTIN:
            raise ValueError(
                f"name must not be a built-in metric ({', '.join(_BUILTIN)}), got {name!r}"
            )
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"name {name!r} is already registered (pass overwrite=True to replace it), got it again"
            )
        _REGISTRY[name] = _complete(metric)
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric added by :func:`register_metric`."""
    with _LOCK:
        if name in _BUILTIN or name not in _REGISTRY:
            raise ValueError(f"name must be a registered user metric, got {name!r}")
        del _REGISTRY[name]


def _complete(metric) -> Metric:
    """``metric`` with the protocol's defaults for what it does not define."""
    if isinstance(metric, Metric):
        return metric
    return _Adapter(metric)


class _Adapter(Metric):
    """A duck-typed metric (any object with ``score``) with the protocol's defaults."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.uses_positions = False
        for name in ("score", "pairs", "operands", "parameters", "prepare"):
            if callable(getattr(inner, name, None)):
                setattr(self, name, getattr(inner, name))

    def __repr__(self) -> str:
        return repr(self.inner)


# --------------------------------------------------------------------------- what backends rank


def rankable(scores: Tensor) -> Tensor:
    """Scores as every backend ranks them, in place: NaN ranks like +inf (first, as
    ``torch.topk`` ranks it) and a real -inf like the lowest finite value.

    So -inf marks excluded candidates only (they lose to every real candidate, even one whose
    similarity overflowed to -inf), and every comparison is a total order in which equal
    scores, NaN ones included, tie and go to the lower index.
    """
    lowest = torch.finfo(scores.dtype).min
    return torch.nan_to_num_(scores, nan=float("inf"), posinf=float("inf"), neginf=lowest)


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


def gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """Rows of t (B, M, D) per query: index (n, W) shared by the batch, or (B' , n, W) per
    batch element (B' = B or 1) -> (B, n, W, D)."""
    if index.dim() == 2:  # whole rows: index_select reads a contiguous t fast
        return t.index_select(1, index.reshape(-1)).view(t.shape[0], *index.shape, t.shape[2])
    B, M, D = t.shape
    index = index.expand(B, -1, -1) if index.shape[0] != B else index
    rows = index + torch.arange(B, device=index.device).view(B, 1, 1) * M
    return t.reshape(B * M, D).index_select(0, rows.reshape(-1)).view(*index.shape, D)


class BlockScores:
    """What a backend ranks: the scores of N queries against M keys, asked for in blocks.

    ``batch`` is the batch the result has (queries or keys may have batch 1); every score
    comes as :func:`rankable` makes it. Subclasses give :meth:`block` and :meth:`window`.
    """

    batch: int
    num_queries: int
    num_keys: int
    width: int  # numbers per key a per-query block gathers (sizes the backends' blocks)
    device: torch.device
    #: (q', k') when the scores are exactly rankable(q' @ k'.T), for GEMM kernels; else None
    operands: tuple[Tensor, Tensor] | None = None
    #: why there is no GEMM form (None when there is one)
    why_not_gemm: str | None = None

    #: when set, :meth:`wide_block` gives wider scores that rank as their rounding to this
    #: dtype (pass it to the backends' top-K)
    rounding: torch.dtype | None = None

    def block(self, qs: slice, ks: slice) -> Tensor:
        """Scores of queries ``qs`` against keys ``ks``: (batch, n, m)."""
        raise NotImplementedError

    def wide_block(self, qs: slice, ks: slice) -> Tensor:
        """:meth:`block`, or with :attr:`rounding` set, scores that rank as their rounding to
        it (which a top-K then rounds only where it ties): (batch, n, m)."""
        return self.block(qs, ks)

    def window(self, qs: slice, cand: Tensor) -> Tensor:
        """Scores of queries ``qs`` against their own candidates ``cand`` (n, W) or (B', n,
        W) key indices: (batch, n, W)."""
        raise NotImplementedError

    def keys(self, index: Tensor) -> BlockScores:
        """The same scores against the keys ``index`` (Mc,) only (a shared candidate set)."""
        raise NotImplementedError

    def image(self, b: int) -> BlockScores | None:
        """The scores of batch element ``b`` alone (batch 1), or None where they do not
        split by batch element."""
        return None


def finite_products(query: Tensor, key: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether every q . k is finite for sure in ``dtype`` (default the operands'): |q . k|
    <= |q| |k| far below its largest value; False for NaN or infinite entries. Then ranking
    needs no rankable pass. Checked on the CPU and in eager code only: elsewhere the answer
    would cost a device sync or a data-dependent guard."""
    if query.device.type != "cpu" or query.numel() == 0 or key.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False
    wide = None if query.dtype in (torch.float32, torch.float64) else torch.float32

    def norm(t: Tensor) -> float:  # the native pass where it serves (float32 rows)
        n = native.max_norm(t)
        return float(torch.linalg.vector_norm(t, dim=-1, dtype=wide).amax()) if n is None else n

    q_norm = norm(query)
    k_norm = q_norm if key is query else norm(key)
    return bool(q_norm * k_norm < torch.finfo(dtype or query.dtype).max / 4)


_HALF_GEMM: dict[torch.dtype, bool] = {}


@torch.compiler.assume_constant_result  # a traced graph takes the answer as a constant
def _native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (oneDNN's own check,
    asked once per dtype)."""
    if dtype not in _HALF_GEMM:
        check = {
            torch.bfloat16: "_is_mkldnn_bf16_supported",
            torch.float16: "_is_mkldnn_fp16_supported",
        }[dtype]
        try:
            _HALF_GEMM[dtype] = bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):  # an older or a CPU-less build: assume not
            _HALF_GEMM[dtype] = False
    return _HALF_GEMM[dtype]


def _widen_half(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor] | None:
    """fp32 copies of half GEMM operands on a CPU without half matrix instructions, or of
    bfloat16 ones where the one-pass kernel runs (it ranks fp32 scores as their bfloat16
    rounding without writing them out, where a bfloat16 GEMM writes every score for a top-K
    pass over many ties), else None (the GEMM runs in the operands' dtype)."""
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    if _native_half_gemm(query.dtype) and not (
        query.dtype == torch.bfloat16 and native.one_pass_here()
    ):
        return None
    # contiguous rows (what the score kernels and the per-query windows read), in one copy
    wide = query.to(torch.float32, memory_format=torch.contiguous_format)
    same = key is query  # self-similarity: converted once
    return wide, wide if same else key.to(torch.float32, memory_format=torch.contiguous_format)


class GemmScores(BlockScores):
    """score = q' . k' (a metric's GEMM operands): query (Bq, N, D), key (Bk, M, D)."""

    def __init__(self, query: Tensor, key: Tensor) -> None:
        # Products of two bf16 (or fp16) values are exact in fp32, so an fp32 GEMM of the
        # half operands, rounded to half, is what a half GEMM with fp32 accumulation gives
        # (up to the order of the sums): on a CPU without half matrix instructions it runs
        # an order of magnitude faster than the emulated half GEMM.
        self._wide = _widen_half(query, key)
        if self._wide is None:
            # once: per-query windows gather the key's rows (gather_rows); keys that are the
            # queries stay one tensor (self-similarity: the symmetric one-pass kernel)
            same, key = key is query, key.contiguous()
            query = key if same else query
        self.query, self.key = query, key
        self.operands = (query, key)
        self.batch = max(query.shape[0], key.shape[0])
        self.num_queries, self.num_keys, self.width = query.shape[1], key.shape[1], key.shape[2]
        self.device = query.device
        # the norms of the float32 copies where there are some (the same values, read faster)
        self._finite = finite_products(*self._gemm_operands, query.dtype)
        # Finite wide scores rank as their rounding without rounding every one of them
        # (rankable's order on non-finite ones is the rounded scores').
        self.rounding = query.dtype if self._wide is not None and self._finite else None

    @property
    def _gemm_operands(self) -> tuple[Tensor, Tensor]:
        """What the score GEMM multiplies: the operands, or their float32 copies."""
        return self._wide if self._wide is not None else (self.query, self.key)

    def _gemm(self, qs, ks):
        q, k = self._gemm_operands
        return q[:, qs] @ k[:, ks].transpose(-1, -2)

    def block(self, qs, ks):
        s = self._gemm(qs, ks).to(self.query.dtype)
        return s if self._finite else rankable(s)

    def wide_block(self, qs, ks):
        return self._gemm(qs, ks) if self.rounding is not None else self.block(qs, ks)

    def window_in_place(self) -> bool:
        """Whether :meth:`window` reads the candidate keys in place (the native kernel), so
        a block of queries holds only their scores, not a gathered copy of the keys."""
        q, k = self._gemm_operands
        return native.window_scores_usable(q, k)

    def window(self, qs, cand):
        # Every backend scores per-query candidates here, so equal scores (ties, which go to
        # the lower index) are equal bit for bit everywhere: a dense GEMM rounds differently
        # (e.g. +-1e-8 where this gives an exact 0). The native kernel reads the candidate
        # keys in place; else one einsum over their gathered copies.
        q, k = self._gemm_operands
        s = native.window_scores(q[:, qs], k, cand)
        if s is None:
            s = torch.einsum("bnd,bnwd->bnw", q[:, qs], gather_rows(k, cand))
        s = s.to(self.query.dtype)
        return s if self._finite else rankable(s)

    def window_topk(self, qs, cand: Tensor, K: int, exclude: Tensor | None = None) -> Tensor | None:
        """The K best (B, n, K) of queries ``qs`` among their candidates ``cand`` (n, W) or
        (B', n, W), rows ascending, as key indices in canonical order, scored as
        :meth:`window` scores them and ranked in the same native pass (the scores never
        written out), ``exclude`` (n,) scoring -inf; None where that kernel does not serve
        (non-finite or rounded scores, or no native kernel), and the caller ranks
        :meth:`window`'s scores."""
        if not self._finite or self.rounding is not None or self.query.dtype != torch.float32:
            return None
        q, k = self._gemm_operands
        return native.window_topk(q[:, qs], k, cand, K, exclude)

    @property
    def _fused_operands(self) -> tuple[Tensor, Tensor]:
        """What the one-pass kernel multiplies: bfloat16 features as they are where the CPU's
        tile unit multiplies them (:func:`convnn.native.amx_here`), else the GEMM operands."""
        # rounding bf16: widened bf16 queries (the keys may be float32)
        if (
            self.rounding == torch.bfloat16
            and self.key.dtype == torch.bfloat16
            and native.amx_here()
        ):
            return self.query, self.key
        return self._gemm_operands

    def fused(self, K: int, exclude: Tensor | None = None) -> bool:
        """Whether :meth:`fused_topk` serves this selection: finite float32 scores, or
        bfloat16 ones (from the float32 GEMM, or the tile unit's), where the native kernel
        runs (:func:`convnn.native.gemm_topk_usable`) and pays (at least
        :data:`convnn.native.GEMM_TOPK_MIN_KEYS` keys)."""
        q, k = self._fused_operands
        return (
            self._finite
            and self.num_keys >= native.GEMM_TOPK_MIN_KEYS
            and self.rounding in (None, torch.bfloat16)
            and native.gemm_topk_usable(q, k, K, exclude)
        )

    def fused_topk(
        self,
        K: int,
        exclude: Tensor | None = None,
        images: slice = slice(None),
        qs: slice = slice(None),
    ) -> Tensor:
        """The K best keys (B', n, K) of queries ``qs`` in ``images``, canonical order,
        scored and ranked in one native pass (the scores are never written out), never a
        query's ``exclude`` (N,) key. Self-similarity over every query computes half the
        scores. Only where :meth:`fused`."""
        one = lambda t: t if t.shape[0] == 1 else t[images]  # noqa: E731  (1: shared)
        q, k = self._fused_operands
        whole = qs == slice(None)
        symmetric = whole and k is q
        query, key = one(q), one(k)
        ex = None if exclude is None else exclude[qs]
        query = query if whole else query[:, qs]
        return native.gemm_topk(query, key, K, symmetric, ex, self.rounding)

    def keys(self, index):
        return GemmScores(self.query, self.key[:, index])

    def image(self, b):
        one = lambda t: t if t.shape[0] == 1 else t[b : b + 1]  # noqa: E731
        query = one(self.query)
        return GemmScores(query, query if self.key is self.query else one(self.key))


class MetricScores(BlockScores):
    """score = metric.score(q, k), block by block (metrics without a GEMM form)."""

    def __init__(self, metric: Metric, query: Tensor, key: Tensor, why: str) -> None:
        key = key.contiguous()  # once: per-query windows gather its rows (gather_rows)
        self.metric, self.query, self.key = metric, query, key
        self.batch = max(query.shape[0], key.shape[0])
        self.num_queries, self.num_keys, self.width = query.shape[1], key.shape[1], key.shape[2]
        self.device = query.device
        self.why_not_gemm = why

    def block(self, qs, ks):
        q, k = self.query[:, qs], self.key[:, ks]
        shape = (self.batch,)
        return rankable(
            self.metric.score(q.expand(*shape, *q.shape[1:]), k.expand(*shape, *k.shape[1:]))
        )

    def window(self, qs, cand):
        return rankable(self.metric.pairs(self.query[:, qs], gather_rows(self.key, cand)))

    def keys(self, index):
        return MetricScores(self.metric, self.query, self.key[:, index], self.why_not_gemm)


class SpatialScores(BlockScores):
    """The spatial metric's exact keys: positions (N, 3) of the queries, (M, 3) of the keys
    (float64 row, col, raster index) on a padded map of shape ``grid``; batch 1."""

    why_not_gemm = "the spatial metric ranks positions, not features"

    def __init__(self, pos_q: Tensor, pos_k: Tensor, grid: tuple[int, int]) -> None:
        self.pos_q, self.pos_k, self.grid = pos_q, pos_k, grid
        self.batch, self.num_queries, self.num_keys = 1, pos_q.shape[0], pos_k.shape[0]
        self.width, self.device = 3, pos_q.device

    def block(self, qs, ks):
        return spatial_keys(self.pos_q[qs], self.pos_k[ks], self.grid)[None]

    def window(self, qs, cand):
        cand = cand[0] if cand.dim() == 3 else cand
        return spatial_keys(self.pos_q[qs], self.pos_k[cand], self.grid)[None]

    def keys(self, index):
        return SpatialScores(self.pos_q, self.pos_k[index], self.grid)


def tensor_scores(query: Tensor, key: Tensor, spatial_grid: tuple[int, int] | None) -> BlockScores:
    """The scores of the backends' tensor interface: GEMM operands (B, N, D), (B, M, D), or
    spatial positions (1, N, 3), (1, M, 3) on a padded map ``spatial_grid``."""
    if spatial_grid is not None:
        return SpatialScores(query[0], key[0], spatial_grid)
    return GemmScores(query, key)


def metric_scores(metric: Metric, query: Tensor, key: Tensor) -> BlockScores:
    """What a backend ranks for ``metric`` on prepared features (B, N, d), (B, M, d): its
    GEMM form when it has one, else its score block by block."""
    pair = metric.operands(query, key)
    if pair is not None:
        return GemmScores(*pair)
    return MetricScores(metric, query, key, f"{metric!r} has no GEMM form (operands)")
