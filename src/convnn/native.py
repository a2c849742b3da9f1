"""Native CPU kernels (``_rank.c``): the top-K of :func:`convnn.backends._common.topk_low_ties`,
the scores of queries against their own candidates (``GemmScores.window``), scores and top-K
in one pass (:func:`gemm_topk`), and the standard kernel's aggregation with the neighbours
read in place (:func:`aggregate`).

``_rank.c`` (plain C and the CPython API, built with the package when a C compiler is at
hand) ranks each row by rounds of a vectorised maximum (over eight narrow rows at once, a
row to a lane, over the whole row, or over the K best groups of 32 scores of a wide row) or,
for large K, by a heap. It compares the same
ordered keys as the torch path (:func:`~convnn.backends._common._tie_free_keys`), so it picks
the same positions in the same order, ties, signed zeros and infinities included. It serves
every eager top-K of float32, bfloat16 and float16 scores on the CPU (float32 scores ranked by
their bfloat16 or float16 rounding too).

Window scores are dot products of each query with its own candidate keys read in place (no
gathered copy), summed in one fixed order, so equal keys score equally bit for bit. They
serve float32 selection scores outside autograd.

The K best keys under float32 GEMM scores are also found in one pass (:func:`gemm_topk`): a
tile of scores is computed in registers and offered at once to each row's running top-K, so
the scores are never written out; self-similarity computes only the tiles on and above the
diagonal and offers each score to both its rows. Its scores are sums in one fixed order with
fused multiply-adds, the same on every CPU that runs it (x86-64 with AVX2 and FMA: 6 x 16
tiles; with AVX-512, 12 x 16 tiles, whose numbers are the same bit for bit). On a CPU with
a bfloat16 tile unit (AMX-BF16, lent by Linux on request at import) bfloat16 features are
scored there, 16 x 16 scores a tile, each the products' float32 sum as that unit rounds it,
and ranked as their bfloat16 rounding.

The standard kernel's aggregation, out[n] = sum_k W_k v[idx[n, k]] + bias, and its two
gradients run on the same register tiles (12 x 32 on AVX-512) with the neighbours read in
place, every number summed in the same order whatever the tile: the
gathered (N, K*C) matrix of the torch path is never formed, in the forward pass or the
backward. Float32, one group of neighbours, no weighting, on the CPUs that run the one-pass
top-K.

Softmax attention over each query's own list of keys (the K it selected, or its window)
runs fused too (:func:`listed_attention`): the scores, their softmax and the weighted sum of
the listed value rows, reading the heads in place in any strides (a projection's views) and
writing them merged; its backward keeps the weights and adds each query's share into the
rows of the keys and values it listed. Float32, without dropout.

Compiled graphs, float64 and other devices take the torch paths. ``CONVNN_NATIVE=0`` turns
the kernels off (to compare the two paths); :func:`status` says whether they run and why not.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor

try:
    from . import _rank
except ImportError as exc:  # not built: no C compiler at install time
    _rank, _MISSING = None, f"not built ({exc})"
else:
    _MISSING = None

_OP_FILES: set[str] = set()
_TAG = "convnn-ops-"


def key_compile_caches(*files: str) -> None:
    """Put a digest of ``files`` (those that define convnn's custom ops, and the native
    kernels) into ``torch.compiler.config.cache_key_tag``, beside any tag of the user's.

    torch.compile's caches key a graph on the ops it calls, not on how an op differentiates
    or lays out its outputs: after a change to either, a cached graph would call the op as it
    was (a wrong layout, or arguments it no longer takes). With the digest in the key, a
    changed op compiles afresh."""
    _OP_FILES.update(os.path.abspath(f) for f in files)
    digest = hashlib.sha256()
    for name in sorted(_OP_FILES):
        try:
            with open(name, "rb") as f:
                digest.update(f.read())
        except OSError:  # not readable as a file (a frozen install): keyed on its name
            digest.update(name.encode())
    tag = torch.compiler.config.cache_key_tag  # the user's parts kept as they are
    theirs = [t for t in tag.split(";") if not t.startswith(_TAG)] if tag else []
    torch.compiler.config.cache_key_tag = ";".join([*theirs, _TAG + digest.hexdigest()[:16]])


key_compile_caches(__file__, *([] if _rank is None else [_rank.__file__]))

_KIND = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 2}
_HALF = (torch.bfloat16, torch.float16)


def status() -> str:
    """Whether the native kernels run here, and if not, why."""
    if _MISSING:
        return f"native kernels: off, {_MISSING}; torch ops rank and score"
    if not _enabled():
        return "native kernels: off, CONVNN_NATIVE=0; torch ops rank and score"
    rows = _rank.tile_rows()
    fused = (
        f"float32 GEMM scores, and float32 aggregation with the neighbours in place, on {rows} x "
        f"16 tiles ({'AVX-512' if rows == 12 else 'AVX2 and FMA'})"
        if _tiles()
        else "off, this CPU lacks AVX2 and FMA; torch aggregation"
    )
    if _AMX[0]:
        fused += "; bfloat16 features on the CPU's tile unit (AMX-BF16), 16 x 16 tiles"
    return (
        "native kernels: on (eager CPU top-K of float32, bfloat16 and float16 scores; "
        "float32 window scores; float32 softmax attention over listed keys; scores and top-K "
        f"in one pass: {fused})"
    )


def _enabled() -> bool:
    return _rank is not None and os.environ.get("CONVNN_NATIVE", "1") != "0"


# asked once, at import: a traced graph reads the answer without calling the extension
_TILES = [_rank is not None and _rank.gemm_topk_cpu()]


def _tiles() -> bool:
    """Whether this CPU runs the tile kernels (one-pass top-K, aggregation): x86-64 with AVX2
    and FMA."""
    return _TILES[0]


@torch.compiler.assume_constant_result  # a traced graph takes the answer as a constant
def one_pass_here() -> bool:
    """Whether the one-pass top-K (:func:`gemm_topk`) runs here: kernels on, and a CPU that
    runs them."""
    return _enabled() and _tiles()


# also asked once: whether the tile unit (AMX-BF16) is here and lent to this process
_AMX = [_TILES[0] and _rank.amx()]


@torch.compiler.assume_constant_result
def amx_here() -> bool:
    """Whether :func:`gemm_topk` takes bfloat16 operands here: kernels on, and a CPU whose
    tile unit (AMX-BF16) multiplies them."""
    return _enabled() and _AMX[0]


GEMM_TOPK_SLOTS = 16  # the fused kernel keeps at most 16 best keys a row
# Below this many keys the GEMM and the top-K's row ranking beat the one pass: a row's running
# top-K takes a large share of its candidates (K (1 + ln(M / K)) of M on average), one at a
# time. Measured crossing over at 200-256 keys for K = 4, 9 and 16 (1.35x slower at 65 keys,
# 0.65-0.8x at 512-1024).
GEMM_TOPK_MIN_KEYS = 256


def gemm_topk_usable(query: Tensor, key: Tensor, K: int, exclude: Tensor | None = None) -> bool:
    """Whether :func:`gemm_topk` serves the K best of ``key`` (B, M, D) for ``query``
    (B, N, D): float32 CPU operands (or bfloat16 ones where :func:`amx_here`), K <= 16 (and
    below M with an ``exclude`` (N,) of positions), in eager code outside torch modes on a
    CPU that runs the kernel."""
    return (
        one_pass_here()
        and query.dtype == key.dtype
        and (query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and amx_here()))
        and query.device.type == key.device.type == "cpu"
        and query.dim() == key.dim() == 3
        and query.shape[-1] == key.shape[-1] > 0
        and 1 <= K <= min(GEMM_TOPK_SLOTS, key.shape[1] - (exclude is not None))
        and (exclude is None or exclude.shape == query.shape[1:2])
        and key.shape[1] < 1 << 31
        and not torch.compiler.is_compiling()
        # under a torch function or dispatch mode (fake tensors, a FLOP counter) the GEMM
        # and top-K run as torch operators, where the mode sees them
        and torch._C._len_torch_function_stack() == 0
        and torch._C._len_torch_dispatch_stack() == 0
    )


def gemm_topk(
    query: Tensor,
    key: Tensor,
    K: int,
    symmetric: bool = False,
    exclude: Tensor | None = None,
    rounding: torch.dtype | None = None,
) -> Tensor:
    """The K best keys (B, N, K) of each query under ``q . k``, in canonical order
    (descending score, equal scores by lower index), scored and ranked in one pass: query
    (B or 1, N, D), key (B or 1, M, D). ``symmetric``: ``key`` is ``query``, and only half the
    scores are computed. ``exclude`` (N,): a key each query never takes (one outside the keys
    excludes nothing). ``rounding``: None, or ``torch.bfloat16`` to rank each score's bfloat16
    rounding (the threshold tests run on the raw scores: rounding is monotone). bfloat16
    operands (where :func:`amx_here`) are scored by the CPU's tile unit, each score the
    products' float32 sum as that unit rounds it, and ranked as its bfloat16 rounding
    (``rounding`` must say so). Only where :func:`gemm_topk_usable`."""
    if symmetric and (key.data_ptr() != query.data_ptr() or key.shape != query.shape):
        raise ValueError("gemm_topk: symmetric needs the keys to be the queries")
    if rounding not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"gemm_topk: rounding must be None or torch.bfloat16, got {rounding}")
    if query.dtype != key.dtype or query.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"gemm_topk: query and key must both be float32 or both bfloat16, got "
            f"{query.dtype} and {key.dtype}"
        )
    half = query.dtype == torch.bfloat16
    if half and rounding != torch.bfloat16:
        raise ValueError(
            f"gemm_topk: bfloat16 operands rank their scores' bfloat16 rounding (rounding="
            f"torch.bfloat16), got rounding={rounding}"
        )
    B = _batch(query.shape[0], key.shape[0])
    N, M, D = query.shape[1], key.shape[1], query.shape[2]
    if query.stride(-1) != 1:
        query = query.contiguous()
    key = query if symmetric else key if key.stride(-1) == 1 else key.contiguous()
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    out = torch.empty(B, N, K, dtype=torch.int64, device="cpu")
    _rank.gemm_topk(
        query.data_ptr(), _batch_stride(query), query.stride(1),
        key.data_ptr(), _batch_stride(key), key.stride(1), B, N, M, D, K, int(symmetric),
        0 if exclude is None else exclude.data_ptr(), int(rounding == torch.bfloat16),
        out.data_ptr(), int(half),
    )  # fmt: skip
    return out


def aggregate_usable(
    values: Tensor, indices: Tensor, rho: Tensor | None, weight: Tensor | None, kernel: str
) -> bool:
    """Whether :func:`aggregate` and :func:`aggregate_grad` serve the standard kernel's
    aggregation of ``values`` (B, M, C) at ``indices`` (B, 1, N, K): float32 CPU tensors, one
    group of neighbours, no weighting, on a CPU that runs the kernels (the caller wraps them
    in an op for compiled graphs and torch modes)."""
    return (
        kernel == "standard"
        and rho is None
        and weight is not None
        and _enabled()
        and _tiles()
        and values.dtype == weight.dtype == torch.float32
        and values.device.type == weight.device.type == indices.device.type == "cpu"
        and values.dim() == 3
        and indices.dim() == 4
        and indices.shape[1] == 1
        and indices.shape[0] == values.shape[0]
        and weight.shape[1:] == (values.shape[2], indices.shape[3])
        and min(values.shape[1:]) > 0
    )


def _aggregate_operands(
    values: Tensor, indices: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' operands: values (B, M, C), indices (B, N, K) int64 and weight, contiguous."""
    return values.contiguous(), indices[:, 0].to(torch.int64).contiguous(), weight.contiguous()


def aggregate_output(B: int, N: int, C_out: int, like: Tensor | None = None) -> Tensor:
    """An empty (B, N, C_out) float32 output of :func:`aggregate`, laid out as (B, C_out, N):
    the layout of a (B, C_out, H, W) map (``like``: a tensor whose device it takes)."""
    make = torch.empty_strided if like is None else like.new_empty_strided
    return make((B, N, C_out), (C_out * N, 1, N), dtype=torch.float32)


def aggregate(
    values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """out (B, N, C_out) = sum over k of ``weight[:, :, k] @ values[b, indices[b, 0, n, k]]``
    (+ ``bias``), the neighbours read in place (the gathered (N, K*C) matrix is never formed),
    summed in one fixed order with fused multiply-adds, into ``out`` (:func:`aggregate_output`,
    made when None). Only where :func:`aggregate_usable`."""
    values, idx, weight = _aggregate_operands(values, indices, weight)
    (B, M, C), (N, K), C_out = values.shape, idx.shape[1:], weight.shape[0]
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    out = aggregate_output(B, N, C_out) if out is None else out
    if out.shape != (B, N, C_out) or out.stride() != (C_out * N, 1, N):
        raise ValueError(
            f"aggregate: out must be a ({B}, {N}, {C_out}) tensor laid out as "
            f"({B}, {C_out}, {N}) (see aggregate_output), got {tuple(out.shape)} with strides "
            f"{out.stride()}"
        )
    _rank.aggregate(
        values.data_ptr(), idx.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), B, M, N, C, K, C_out,
    )  # fmt: skip
    return out


def aggregate_grad(
    grad_out: Tensor, values: Tensor, indices: Tensor, weight: Tensor, g_values: Tensor | None,
    need_weight: bool,
) -> Tensor | None:  # fmt: skip
    """The gradients of :func:`aggregate` for ``grad_out`` (B, N, C_out), any strides: the
    sum of each neighbour's share of it over its row, written into ``g_values`` (B, M, C)
    (rows contiguous, or laid out as a (B, C, M) map, see :func:`values_grad`; None to
    skip), and the weight's (C_out, C, K) returned when ``need_weight``."""
    values, idx, weight = _aggregate_operands(values, indices, weight)
    (B, M, C), (N, K), C_out = values.shape, idx.shape[1:], weight.shape[0]
    if g_values is not None and (
        g_values.shape != values.shape
        or g_values.dtype != torch.float32
        or g_values.device.type != "cpu"
        or g_values.stride()[1:] not in ((C, 1), (1, M))
        or (B > 1 and g_values.stride(0) < M * C)
    ):
        raise ValueError(
            f"aggregate_grad: g_values must be a float32 CPU {tuple(values.shape)} tensor with "
            f"contiguous rows or laid out as a ({B}, {C}, {M}) map (see values_grad), got "
            f"{g_values.dtype} {tuple(g_values.shape)} on {g_values.device} with strides "
            f"{g_values.stride()}"
        )
    g_weight = weight.new_empty(C_out, C, K) if need_weight else None
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    v_strides = (0, 0, 0) if g_values is None else g_values.stride()
    _rank.aggregate_grad(
        grad_out.data_ptr(), *grad_out.stride(), values.data_ptr(), idx.data_ptr(),
        weight.data_ptr(), ptr(g_values), *v_strides, ptr(g_weight), B, M, N, C, K, C_out,
    )  # fmt: skip
    return g_weight


def map_layout(t: Tensor) -> bool:
    """Whether ``t`` (B, N, C) is laid out as a (B, C, N) map (a layer's output, see
    :func:`aggregate_output`, and the gradient it is handed)."""
    return t.stride(1) == 1 and t.stride(2) != 1


def values_grad(values: Tensor, map_laid_out: bool) -> Tensor:
    """An empty gradient for ``values`` (B, M, C) for :func:`aggregate_grad`: laid out as a
    (B, C, M) map where ``map_laid_out`` (the map's gradient is then a view of it, with no
    copy to make), else with contiguous rows."""
    B, M, C = values.shape
    if map_laid_out:
        return values.new_empty_strided((B, M, C), (C * M, 1, M))
    return values.new_empty((B, M, C))


def max_norm(x: Tensor) -> float | None:
    """The largest Euclidean norm of the rows of float32 CPU ``x`` (B, N, D) (nan where an
    entry is nan), summed in double in one pass; None where the kernels do not run here or
    ``x`` is not such a tensor with contiguous rows."""
    if not (
        _enabled()
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == 3
        and (x.stride(2) == 1 or x.shape[2] <= 1)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    ):
        return None
    B, N, D = x.shape
    return _rank.max_norm(x.data_ptr(), x.stride(0), x.stride(1), B, N, D)


def rows_copy_usable(values: Tensor) -> bool:
    """Whether :func:`rows_copy` copies ``values`` (B, M, C): float32 on a CPU that runs the
    tile kernels, laid out as a (B, C, M) map (the tokens of a (B, C, H, W) map) of at least
    8 channels (fewer, and torch's copy is as fast: 101 against 122 us for 32 x 3 x 32 x 32;
    at 64 channels 1.1 against 2.0 ms for 32 images)."""
    return (
        _enabled()
        and _tiles()
        and values.dtype == torch.float32
        and values.device.type == "cpu"
        and values.dim() == 3
        and values.shape[2] >= 8
        and values.stride(1) == 1
        and values.stride(2) >= values.shape[1]
        and not values.is_contiguous()
    )


def rows_copy(values: Tensor) -> Tensor:
    """A contiguous copy of ``values`` (B, M, C) laid out as a (B, C, M) map, each image's
    (C, M) matrix transposed 8 x 8 numbers at a time in registers (torch's copy moves them
    one at a time). Only where :func:`rows_copy_usable`."""
    if not rows_copy_usable(values):
        raise ValueError(
            f"rows_copy: values must be a float32 CPU (B, M, C) tensor laid out as a (B, C, M) "
            f"map, got {values.dtype} {tuple(values.shape)} on {values.device} with strides "
            f"{values.stride()}"
        )
    B, M, C = values.shape
    out = values.new_empty((B, M, C))
    _rank.transpose(
        out.data_ptr(), M * C, C, values.data_ptr(), values.stride(0), values.stride(2), B, C, M
    )
    return out


def _batch_stride(t: Tensor) -> int:
    """The kernels' batch stride of ``t``: 0 for a batch of 1, shared by every image."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _batch(*sizes: int) -> int:
    """The batch that batches of these sizes broadcast to (0 where one is empty), without
    ``torch.broadcast_shapes`` (its first call imports for ~0.4 s)."""
    wide = {n for n in sizes if n != 1}
    if len(wide) > 1:
        raise ValueError(f"batches of {sizes} do not broadcast")
    return wide.pop() if wide else 1


def usable(scores: Tensor, K: int, rounding: torch.dtype | None) -> bool:
    """Whether :func:`topk` ranks the K best of ``scores`` (..., M) (ranked as their
    ``rounding`` when given)."""
    return (
        _enabled()
        and 1 <= K <= scores.shape[-1]
        and scores.device.type == "cpu"
        and scores.dtype in _KIND
        and (
            rounding in (None, scores.dtype)
            or (scores.dtype == torch.float32 and rounding in _HALF)
        )
        and scores.shape[-1] < 1 << 31
        and not torch.compiler.is_compiling()
    )


def topk(rows: Tensor, K: int, rounding: torch.dtype | None = None) -> Tensor:
    """Positions (R, K) of the K best of each row of ``rows`` (R, M), ranked as their
    ``rounding`` when given, in canonical order: descending score, equal scores by lower
    position. Only where :func:`usable`."""
    R, M = rows.shape
    if rounding == rows.dtype:
        rounding = None
    if rounding == torch.float16 and rows.dtype == torch.float32:
        rows = rows.to(rounding)  # float16's rounding (subnormals, range) is torch's to do
    kind = _KIND[rows.dtype]
    if rows.dtype == torch.float32 and rounding == torch.bfloat16:
        kind = 1  # rounded as each score is read
    if M > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(R, K, dtype=torch.int64, device="cpu")
    if R:
        _rank.topk(rows.data_ptr(), kind, R, M, rows.stride(0), K, out.data_ptr(), K)
    return out


def window_scores_usable(query: Tensor, key: Tensor) -> bool:
    """Whether :func:`window_scores` scores ``query`` against its candidates among ``key``
    (reading the keys in place): float32 CPU tensors outside autograd, in eager code."""
    return (
        _enabled()
        and query.dtype == key.dtype == torch.float32
        and query.device.type == key.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
    )


def window_topk(
    query: Tensor, key: Tensor, cand: Tensor, K: int, exclude: Tensor | None = None
) -> Tensor | None:
    """The K best (B, n, K) of each query's candidates ``cand`` as :func:`window_scores`
    scores them, as key indices in canonical order (descending score, equal scores by the
    lower index: ``cand``'s rows ascend), the scores never written out; ``exclude`` (n,): a
    key each query scores -inf. None where the kernel does not serve the call. The caller
    vouches that every score is finite."""
    if not (window_scores_usable(query, key) and cand.device.type == "cpu"):
        return None
    query, key, cand, B = _window_operands(query, key, cand)
    n, W = cand.shape[-2:]
    if not 1 <= K <= W:
        raise ValueError(f"window_topk: K must lie in [1, {W}] (the candidates), got {K}")
    if exclude is not None:
        if exclude.shape != (n,):
            raise ValueError(f"window_topk: exclude must be ({n},), got {tuple(exclude.shape)}")
        exclude = exclude.to(torch.int64).contiguous()
    out = torch.empty(B, n, K, dtype=torch.int64, device="cpu")
    if out.numel() == 0:
        return out
    _rank.window_topk(
        query.data_ptr(), key.data_ptr(), cand.data_ptr(),
        0 if exclude is None else exclude.data_ptr(), out.data_ptr(), B, n, W,
        query.shape[-1], key.shape[1], _batch_stride(query), query.stride(1),
        _batch_stride(key), key.stride(1), _batch_stride(cand) if cand.dim() == 3 else 0, K,
    )  # fmt: skip
    return out


def _window_operands(query: Tensor, key: Tensor, cand: Tensor):
    """The window kernels' operands (rows contiguous, int64 candidates) and their batch."""
    n, W = cand.shape[-2:]
    d = query.shape[-1]
    if query.dim() != 3 or key.dim() != 3 or query.shape[1] != n or key.shape[2] != d:
        raise ValueError(
            f"window_scores takes query (B, n, d), key (B, M, d) and cand (n, W) or "
            f"(B, n, W), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(cand.shape)}"
        )
    B = _batch(query.shape[0], key.shape[0], cand.shape[0] if cand.dim() == 3 else 1)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    return query, key, cand.to(torch.int64).contiguous(), B


def window_scores(query: Tensor, key: Tensor, cand: Tensor) -> Tensor | None:
    """Scores (B, n, W) of queries (Bq, n, d) against their own candidate keys ``cand`` (n, W)
    or (B', n, W) among ``key`` (Bk, M, d) (batches 1 or B), or None where the kernel does
    not serve the call (then the caller's torch path scores it): float32 CPU tensors outside
    autograd, in eager code."""
    if not (window_scores_usable(query, key) and cand.device.type == "cpu"):
        return None
    query, key, cand, B = _window_operands(query, key, cand)
    n, W = cand.shape[-2:]
    d = query.shape[-1]
    out = torch.empty(B, n, W, dtype=torch.float32, device="cpu")
    if out.numel() == 0:
        return out
    _rank.window(
        query.data_ptr(), key.data_ptr(), cand.data_ptr(), out.data_ptr(),
        B, n, W, d, key.shape[1], _batch_stride(query), query.stride(1),
        _batch_stride(key), key.stride(1), _batch_stride(cand) if cand.dim() == 3 else 0,
    )  # fmt: skip
    return out


def listed_attention_usable(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> bool:
    """Whether :func:`listed_attention` serves softmax attention of ``q`` (B, G, N, d) over
    the keys ``idx`` (B or 1, G or 1, N, K) lists of ``k``, ``v`` (B, G, M, d): float32 CPU
    tensors (:func:`_listed_operands`), none of them empty, in eager code outside torch
    modes (where SDPA or the torch path runs, which the mode sees) or in a compiled graph
    (which calls the kernels as one op)."""
    return (
        _enabled()
        and _listed_operands(q, k, v, idx)
        and min(q.shape[3], idx.shape[3], k.shape[2]) > 0
        and (
            torch.compiler.is_compiling()
            or torch._C._len_torch_function_stack() == torch._C._len_torch_dispatch_stack() == 0
        )
    )


def _listed_operands(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> bool:
    """Whether the kernels can read these operands: float32 CPU q (B, G, N, d), k and v
    (B, G, M, d), and int64 CPU key lists idx (B or 1, G or 1, N, K)."""
    return (
        q.dtype == k.dtype == v.dtype == torch.float32
        and idx.dtype == torch.int64
        and q.device.type == k.device.type == v.device.type == idx.device.type == "cpu"
        and q.dim() == k.dim() == v.dim() == idx.dim() == 4
        and k.shape == v.shape
        and q.shape[:2] == k.shape[:2]
        and q.shape[3] == k.shape[3]
        and idx.shape[0] in (1, q.shape[0])
        and idx.shape[1] in (1, q.shape[1])
        and idx.shape[2] == q.shape[2]
    )


def _rows(t: Tensor) -> tuple[int, int, int, int]:
    """A 4-D tensor's data pointer and its strides for the two batch dims and the row (0
    where a batch dim is 1: shared); its rows must be contiguous."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"listed attention: rows must be contiguous, got strides {t.stride()}")
    s = [0 if t.shape[i] == 1 else t.stride(i) for i in (0, 1)]
    return t.data_ptr(), s[0], s[1], t.stride(2)


def _heads_out(B: int, G: int, N: int, d: int, zero: bool = False) -> Tensor:
    """A (B, G, N, d) float32 tensor laid out as (B, N, G, d): heads side by side in a row,
    as SDPA lays out its outputs and gradients (merging the heads is then a view)."""
    make = torch.zeros if zero else torch.empty
    return make(B, N, G, d, dtype=torch.float32).transpose(1, 2)


def listed_attention_output(q: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Empty outputs of :func:`listed_attention`: (B, N, G * d), the heads merged (the kernel
    writes its (B, G, N, d) view, :func:`heads_of`), and the weights (B, G, N, K)."""
    B, G, N, d = q.shape
    out = torch.empty(B, N, G * d, dtype=torch.float32, device="cpu")
    return out, torch.empty(B, G, N, idx.shape[3], dtype=torch.float32, device="cpu")


def heads_of(merged: Tensor, G: int) -> Tensor:
    """The (B, G, N, d) view of heads merged as (B, N, G * d)."""
    return merged.unflatten(-1, (G, merged.shape[-1] // G)).transpose(1, 2)


def _check_listed(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, prob: Tensor, *made) -> None:
    """The kernels read raw pointers: refuse operands :func:`_listed_operands` does not pass,
    weights ``prob`` that are not a contiguous (B, G, N, K) tensor, and outputs ``made``
    that are not float32 CPU tensors."""
    if not _listed_operands(q, k, v, idx):
        raise ValueError(
            "listed attention: need float32 CPU q (B, G, N, d), k and v (B, G, M, d) and int64 "
            f"idx (B or 1, G or 1, N, K), got {q.dtype} {tuple(q.shape)}, {k.dtype} "
            f"{tuple(k.shape)}, {v.dtype} {tuple(v.shape)}, {idx.dtype} {tuple(idx.shape)}"
        )
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (prob, *made)):
        raise ValueError("listed attention: the weights and outputs must be float32 CPU tensors")
    if prob.shape != (*q.shape[:3], idx.shape[3]) or not prob.is_contiguous():
        raise ValueError(
            f"listed attention: prob must be a contiguous (B, G, N, K) tensor, got {tuple(prob.shape)}"
        )


def _slices(part: slice, B: int, G: int) -> tuple[int, int]:
    s0, s1, _ = part.indices(B * G)
    return s0, max(s0, s1)


def listed_attention(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, out: Tensor, prob: Tensor,
    part: slice = slice(None),
) -> None:  # fmt: skip
    """Softmax attention of each query over its own listed keys: ``prob`` (B, G, N, K) =
    softmax(scale * q . k[idx]) and ``out`` (B, G, N, d) = prob @ v[idx], for the heads
    b * G + g in ``part`` (``out``: the :func:`heads_of` view of the merged output of
    :func:`listed_attention_output`, which makes ``prob`` too). The
    keys are read in place, every dot product summed in one fixed order. Every tensor's rows
    are contiguous, ``idx`` int64. Only where :func:`listed_attention_usable`."""
    _check_listed(q, k, v, idx, prob, out)
    B, G, N, d = q.shape
    M, K = k.shape[2], idx.shape[3]
    if out.shape != q.shape:
        raise ValueError("listed attention: out must be (B, G, N, d), shaped as q")
    args = [x for t in (q, k, v, idx, out) for x in _rows(t)]
    _rank.listed(*args, prob.data_ptr(), G, N, M, d, K, *_slices(part, B, G), float(scale))


def listed_attention_grad(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, prob: Tensor, grad: Tensor,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None], part: slice = slice(None),
) -> None:  # fmt: skip
    """The gradients of :func:`listed_attention` for ``grad`` (B, G, N, d) of its output and
    its weights ``prob``, into ``grads`` (dq, dk, dv; None to skip) for the heads in
    ``part``: dq written, dk and dv added into (zeros from :func:`listed_attention_grads`)."""
    _check_listed(q, k, v, idx, prob, grad, *(g for g in grads if g is not None))
    B, G, N, d = q.shape
    M, K = k.shape[2], idx.shape[3]
    shapes = (q.shape, k.shape, v.shape)
    if grad.shape != q.shape or any(g is not None and g.shape != s for g, s in zip(grads, shapes)):
        raise ValueError("listed attention: grad and dq must be shaped as q, dk and dv as k")
    args = [x for t in (q, k, v, idx) for x in _rows(t)]
    args += [prob.data_ptr(), *_rows(grad)]
    for g in grads:
        args += [0, 0, 0, 0] if g is None else _rows(g)
    _rank.listed_grad(*args, G, N, M, d, K, *_slices(part, B, G), float(scale))


def listed_attention_grads(q: Tensor, k: Tensor, needs) -> list[Tensor | None]:
    """The gradients :func:`listed_attention_grad` fills (dq, dk, dv; None where not in
    ``needs``), laid out as SDPA lays out its own."""
    B, G, N, d = q.shape
    M = k.shape[2]
    shapes = ((N, False), (M, True), (M, True))
    return [
        _heads_out(B, G, n, d, zero) if need else None for need, (n, zero) in zip(needs, shapes)
    ]
