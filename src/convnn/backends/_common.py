"""Pieces every backend shares: the top-K with the tie rule, the canonical slot order and
the grouped gathers. What backends rank (:class:`~convnn.metrics.BlockScores`) and every
metric's maths live in :mod:`convnn.metrics`.

Every backend ranks scores as :func:`~convnn.metrics.rankable` makes them, where -inf is free
to mark a candidate a query may not pick: such a candidate loses to every real one,
whatever its score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native
from ..metrics import BlockScores, get_metric, rankable, spatial_keys, tensor_scores

__all__ = ["BlockScores", "rankable", "spatial_keys", "tensor_scores", "prepare"]


def prepare(metric: str, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """GEMM operands of a built-in feature metric: (B, N, D), (B, M, D) -> (B, N, D'),
    (B, M, D') (see :meth:`convnn.metrics.Metric.operands`)."""
    pair = get_metric(metric).operands(query, key)
    if pair is None:
        raise ValueError(f"metric {metric!r} has no bilinear form")
    return pair


def topk_low_ties(
    scores: Tensor, K: int, topk=None, rounding: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Top-K of the last dim where a tie at the K-th score keeps the lower index, in
    canonical order: descending score, equal scores by lower index.

    In eager CPU code, float32, bfloat16 and float16 scores are ranked by the native top-K
    when it is built (:mod:`convnn.native`: the same keys, the same result). Otherwise
    (``CONVNN_NATIVE=0``, or no C compiler at install), float64 scores excepted, rows are
    ranked by rounds of a row maximum
    of distinct keys that fold the tie rule into the score (:func:`_topk_by_rounds`): the
    canonical order comes out directly, ties included, and ``topk`` is not used. Rows too
    wide for whole rounds with K too large for their groups, float64 scores and compiled
    graphs take ``topk(scores, k)``, an unsorted top-k with arbitrary ties (default
    ``torch.topk``), asked for K + 1: a row cut a tie
    exactly when its (K+1)-th score equals its K-th (a comparison of two scores, not a pass
    over the row). Only those rows are repaired in eager code (:func:`_lowest_ties_sparse`,
    which lists their ties). A compiled graph (no data-dependent shapes) ranks the distinct
    keys (:func:`_tie_free_keys`), so nothing needs repair; float64 scores, which do not fit
    such a key, get every row repaired without a branch (:func:`_lowest_ties`), kept where
    the row was cut.

    ``rounding``: rank ``scores.to(rounding)`` (fp32 scores standing for their bf16
    rounding, say) without rounding the whole block. Rounding is monotone, so rounds over
    groups round only the group maxima and their candidates (narrow rows are rounded
    whole); the K + 1 best wide scores hold the K best rounded ones unless rounding makes
    the (K+1)-th tie the K-th: only such a row is rounded in full, to be repaired.

    scores (..., M), without NaN (see :func:`rankable`), K <= M -> values (..., K) (in
    ``rounding`` when given), positions (..., K).
    """
    if K > scores.shape[-1]:
        raise ValueError(f"K must be at most the {scores.shape[-1]} scores per row, got {K}")
    if torch.compiler.is_compiling():
        return _compiled_topk(scores if rounding is None else scores.to(rounding), K, topk)
    lead, M = scores.shape[:-1], scores.shape[-1]
    if native.usable(scores, K, rounding):
        idx = native.topk(scores.reshape(-1, M), K, rounding).view(*lead, K)
        vals = scores.gather(-1, idx)
        return (vals if rounding is None else vals.to(rounding)), idx
    group = _rounds_group(scores, K)
    if group is not None:
        vals, idx = _topk_by_rounds(scores.reshape(-1, M), K, group, rounding)
        return vals.view(*lead, K), idx.view(*lead, K)
    rows_of = scores.reshape(-1, M)  # (R, M): one index per row below
    vals, idx = _topk_cut(rows_of, K, topk, rounding)
    vals, idx, cut = vals[:, :K], idx[:, :K], _cut(vals, K)
    if cut.any():
        rows = cut.nonzero().squeeze(1)
        tied = rows_of.index_select(0, rows)
        tied = tied if rounding is None else tied.to(rounding)
        idx[rows] = _lowest_ties_sparse(tied, vals[rows], idx[rows])
    return vals.view(*lead, K), idx.view(*lead, K)


# Ranking by rounds of a row maximum (_topk_by_rounds), on one CPU thread against torch.topk
# (about 1 us a row below a few hundred scores) and its tie repair: whole rows of at most
# ROUNDS_MAX_WIDTH scores with K * width <= ROUNDS_MAX_WORK take 0.3-0.8x its time (0.5-0.65x
# on 256 x 324, K = 8: a 16 x 16 map's padded 18 x 18; break-even near K * width = 8192);
# wider rows, over their K best groups of ROUNDS_GROUP scores where those hold at most
# ROUNDS_GROUP_SHARE of the row: 0.8-0.95x at 512 x 4096, K = 8, about equal at 1024 x 1156
# (a share of 0.22), while at shares of 0.33-0.44 topk took 0.6-0.9x the groups' time.
# 16-bit scores (or rounding) rank faster than fp32 ones: their keys are half as wide
# (0.8-0.85x the fp32 time of 4 x 1024 rows of 1024, K = 8).
ROUNDS_MAX_WIDTH = 512
ROUNDS_MAX_WORK = 8192
ROUNDS_GROUP = 32  # narrower groups make the group maxima (an inner reduction) slow
ROUNDS_GROUP_SHARE = 0.25
# Bytes of keys ranked at a time. Each round is a few ops over the block, so per-op overhead
# favours large blocks: 2 MiB ranks 512 x 4096 fp32 scores (K = 9) in 0.79x the time of 1 MiB
# (the ConvNN2d forward on 2 x 64 x 64 x 64: 0.93x); 4 and 8 MiB gain nothing more.
ROUNDS_BLOCK = 1 << 21
# 16-bit scores of rows of at most 2^16 get int32 keys (16 bits of score above 16 of reversed
# position): half the bytes of int64 keys, and AVX2 has an int32 maximum but no int64 one
_HALF = (torch.bfloat16, torch.float16)
_NARROW_WIDTH = 1 << 16


def _rounds_group(scores: Tensor, K: int) -> int | None:
    """How :func:`topk_low_ties` ranks ``scores`` by rounds: 0 (whole rows), a group size
    (the rows' best groups), or None (not by rounds)."""
    M = scores.shape[-1]
    if scores.dtype == torch.float64 or scores.device.type != "cpu":
        return None  # float64 scores do not fit a key; elsewhere nonzero would sync
    if M <= ROUNDS_MAX_WIDTH and K * M <= ROUNDS_MAX_WORK:
        return 0
    if K * ROUNDS_GROUP <= ROUNDS_GROUP_SHARE * M:
        return ROUNDS_GROUP
    return None


def _topk_by_rounds(
    scores: Tensor, K: int, group: int, rounding: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """:func:`topk_low_ties` by K rounds of a row maximum of tie-free keys, each round
    taking a row's best key and striking it out (:func:`_strike`). The keys are distinct
    and hold the tie rule, so the rounds find the canonical order itself: no K + 1, no
    repair, no sort. ``group`` > 0 ranks only the K best groups of ``group`` consecutive
    scores (:func:`_best_groups`). Rows are taken in equal blocks of at most about
    :data:`ROUNDS_BLOCK` bytes of keys.

    scores (R, M) -> values (R, K) (in ``rounding`` when given), positions (R, K)."""
    R, M = scores.shape
    idx = torch.empty(R, K, dtype=torch.int64, device=scores.device)
    width = K * group + M % group if group else M
    narrow = _narrow_keys(rounding or scores.dtype, width)
    rows = max(1, ROUNDS_BLOCK // (max(width, 1) * (4 if narrow else 8)))
    blocks = max(1, -(-R // rows))
    rows = max(1, -(-R // blocks))  # equal blocks: no small last one of a whole one's cost
    for r0 in range(0, R, rows):
        block, out = scores[r0 : r0 + rows], idx[r0 : r0 + rows]
        if group:
            chosen, block = _best_groups(block, K, group, rounding)
        elif rounding is not None:
            block = block.to(rounding)
        _strike(_tie_free_keys(block, scratch=group > 0), K, out)
        if group:
            out.copy_(_group_positions(out, chosen, group, M))
    vals = scores.gather(-1, idx)
    return (vals if rounding is None else vals.to(rounding)), idx


def _best_groups(
    scores: Tensor, K: int, group: int, rounding: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """The K best groups of ``group`` consecutive scores of each row, and their scores with
    the tail that fills no group: (r, M) -> groups (r, K) ascending, candidates
    (r, K * group + M % group) in ascending position (:func:`_group_positions` maps a
    candidate's column back to its position).

    Groups rank by their best score, equal ones by lower position (a group's best key):
    a group is beaten only by one holding a better score, so the K best scores lie in the K
    best groups. Rounding is monotone: a group's best rounded score is its best, rounded.
    """
    r, M = scores.shape
    ng, device = M // group, scores.device
    body = ng * group
    scores = scores.contiguous()  # rows of contiguous scores already are: no copy
    best = scores[:, :body].view(r, ng, group).amax(-1)  # a view even when M % group
    keys = _tie_free_keys(best if rounding is None else best.to(rounding), scratch=True)
    _strike(keys, K)
    chosen = (keys == _struck(keys)).nonzero()[:, 1].view(r, K)  # row-major: ascending groups
    # every run of `group` scores as a row of one view, so a group is one row (at the group's
    # start: row i * M + g * group) and index_select takes whole rows, which beats a gather
    runs = scores.view(-1).unfold(0, group, 1)
    rows = (torch.arange(0, r * M, M, device=device)[:, None] + chosen * group).view(-1)
    cand = runs.index_select(0, rows).view(r, K * group)
    if body < M:
        cand = torch.cat([cand, scores[:, body:]], -1)
    return chosen, cand if rounding is None else cand.to(rounding)


def _group_positions(cols: Tensor, chosen: Tensor, group: int, M: int) -> Tensor:
    """Positions in rows of M of candidate columns ``cols`` (r, k) of :func:`_best_groups`'
    candidates, given its groups ``chosen`` (r, K): column c is offset c % group of chosen
    group c // group, or past the K groups, in the tail."""
    K = chosen.shape[1]
    slot = torch.div(cols, group, rounding_mode="floor")
    pos = chosen.gather(1, slot.clamp(max=K - 1))
    pos *= group
    pos += cols - slot * group
    tail = cols + (M - M % group - K * group)  # the tail's columns follow the K groups
    return torch.where(slot < K, pos, tail)


def _struck(keys: Tensor) -> int:
    """The mark of a struck key, below every key of :func:`_tie_free_keys`: only a negative
    NaN's key at the last position would equal it."""
    return torch.iinfo(keys.dtype).min


def _strike(keys: Tensor, K: int, out: Tensor | None = None) -> None:
    """K rounds over distinct keys (R, M) of columns 0..M-1 (:func:`_tie_free_keys`): each
    takes each row's best key and strikes it out (in place). The columns taken, best
    first, go to ``out`` (R, K)."""
    narrow = keys.dtype == torch.int32
    low = 0xFFFF if narrow else 0x7FFFFFFF  # the reversed column's bits
    if out is None:
        out = torch.empty(keys.shape[0], K, dtype=torch.int64, device=keys.device)
    # scattered from a tensor: 0.65x the time of scattering a scalar
    struck = keys.new_full((1, 1), _struck(keys)).expand(keys.shape[0], 1)
    for k in range(K):  # few ops a round: each costs microseconds whatever its size
        best = keys.amax(-1, keepdim=True)
        best &= low
        col = out[:, k : k + 1]
        # scatter takes int64 columns (a mixed-dtype sub would convert through a temporary)
        torch.sub(low, best.long() if narrow else best, out=col)
        keys.scatter_(-1, col, struck)


def _topk_cut(scores: Tensor, K: int, topk, rounding=None) -> tuple[Tensor, Tensor]:
    """The K + 1 best (K when the row is no longer), in canonical order: (..., K + 1)."""
    vals, idx = (topk or _topk)(scores, min(K + 1, scores.shape[-1]))
    if rounding is not None:
        vals = vals.to(rounding)
    return canonical_order(vals, idx)


def _cut(vals: Tensor, K: int) -> Tensor:
    """Rows whose (K+1)-th score ties the K-th, of vals (..., K or K + 1) sorted: (...)."""
    if vals.shape[-1] == K:
        return vals.new_zeros(vals.shape[:-1], dtype=torch.bool)
    return vals[..., K] == vals[..., K - 1]


def _compiled_topk(scores: Tensor, K: int, topk) -> tuple[Tensor, Tensor]:
    """:func:`topk_low_ties` without data-dependent shapes, for a compiled graph."""
    if scores.dtype != torch.float64:
        keys, idx = (topk or _topk)(_tie_free_keys(scores), K)  # distinct: nothing to repair
        idx = idx.gather(-1, keys.sort(dim=-1, descending=True).indices)
        return scores.gather(-1, idx), idx
    vals, idx = _topk_cut(scores, K, topk)
    cut = _cut(vals, K)
    vals, idx = vals[..., :K], idx[..., :K]
    idx = torch.where(cut[..., None], _lowest_ties(scores, vals, idx), idx)
    return canonical_order(vals, idx)


def _tie_free_keys(scores: Tensor, index: Tensor | None = None, scratch: bool = False) -> Tensor:
    """int64 keys (..., M) of float32-exact scores at positions ``index`` (the scores' shape,
    < 2^31; default 0..M-1), distinct where the positions are, in the order of the tie
    rule: the score's bits made monotone (an ordered integer) above the reversed position.
    In eager code, 16-bit scores at the default positions of rows of at most 2^16 get int32
    keys of the same form (their 16 bits above 16 of position).
    ``scratch``: the scores are the caller's temporary, free to overwrite (eager code)."""
    M = scores.shape[-1]
    if torch.compiler.is_compiling():
        return _pure_keys(scores, index)
    # in place on fresh tensors: each new temporary of a large block costs page faults
    if index is None and _narrow_keys(scores.dtype, M):
        keys = _plus_zero(scores, scratch).view(torch.int16).to(torch.int32)
        _order(keys, 15)
        keys <<= 16
        keys |= 0xFFFF - torch.arange(M, dtype=torch.int32, device=scores.device)
        return keys
    if index is None:
        index = torch.arange(M, device=scores.device)
    wide = scores if scores.dtype == torch.float32 else scores.float()
    bits = _plus_zero(wide, scratch or wide is not scores).view(torch.int32)
    keys = _order(bits, 31).to(torch.int64)
    keys <<= 32
    keys |= 0x7FFFFFFF - index
    return keys


def _narrow_keys(dtype: torch.dtype, width: int) -> bool:
    """Whether :func:`_tie_free_keys` of ``dtype`` scores in rows of ``width`` are int32."""
    return dtype in _HALF and width <= _NARROW_WIDTH


def _order(bits: Tensor, sign: int) -> Tensor:
    """Float bits (sign bit ``sign``, sign-extended in an integer tensor) made an ordered
    integer, in place: negative scores' magnitude bits reversed."""
    flip = bits >> sign
    flip &= (1 << sign) - 1
    bits ^= flip
    return bits


def _plus_zero(scores: Tensor, scratch: bool) -> Tensor:
    """scores + 0.0: -0.0 + 0.0 = +0.0, so signed zeros tie as the scores compare. In place
    on the caller's temporary (``scratch``), else the sum is the copy the keys are built in."""
    if not scratch:
        return scores + 0.0
    scores += 0.0
    return scores


def _pure_keys(scores: Tensor, index: Tensor | None = None) -> Tensor:
    """:func:`_tie_free_keys` (int64) in pure ops, for a compiled graph (where a compiler
    may also take x + 0.0 for x)."""
    if index is None:
        index = torch.arange(scores.shape[-1], device=scores.device)
    bits = scores.float().view(torch.int32)
    bits = bits & -(bits != -(2**31)).int()  # -0.0 ties +0.0, as the scores compare
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    return (ordered << 32) | (0x7FFFFFFF - index)


def _lowest_ties(scores: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
    """Positions of the top K with the K-th score's ties given to the lowest indices.

    scores (R, M); vals (R, K) the top-K scores in descending order with positions idx
    (R, K), right except which of the tied K-th scores they hold. The slots from the first
    tied one on get the tied positions in ascending order: one mask, one cumsum and one
    scatter over the row, no sort.
    """
    K = vals.shape[-1]
    kth = vals[..., K - 1 :]
    above = (vals > kth).sum(-1, keepdim=True)  # slots [above, K) hold ties
    tied = scores == kth
    slot = above + tied.cumsum(-1) - 1  # the slot of each tied position, in index order
    slot = torch.where(tied & (slot < K), slot, K)  # slot K: a discarded overflow column
    pos = torch.arange(scores.shape[-1], device=idx.device).expand_as(slot)
    out = torch.cat([idx, idx[..., :1]], -1).scatter_(-1, slot, pos)
    return out[..., :K]


def _lowest_ties_sparse(scores: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
    """:func:`_lowest_ties` for eager code: the tied positions are listed (``nonzero``, in
    index order within each row) rather than counted over every position of the row.
    scores (R, M), vals (R, K) sorted descending, idx (R, K) -> positions (R, K)."""
    R, K = vals.shape
    kth = vals[:, K - 1 :]
    above = (vals > kth).sum(-1)  # slots [above, K) hold ties
    row, pos = (scores == kth).nonzero(as_tuple=True)  # row-major: ascending pos per row
    count = torch.bincount(row, minlength=R)
    rank = torch.arange(row.numel(), device=row.device) - (count.cumsum(0) - count)[row]
    slot = above[row] + rank
    keep = slot < K
    idx[row[keep], slot[keep]] = pos[keep]
    return idx


def _topk(scores: Tensor, K: int) -> tuple[Tensor, Tensor]:
    return scores.topk(K, dim=-1, sorted=False)


def canonical_order(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort the last dim by descending score, ties by lower index: (..., K) -> (..., K)."""
    big = scores.numel() >= 1 << 15  # below, the keys' ten small ops cost more than a sort
    if big and scores.dtype != torch.float64 and not torch.compiler.is_compiling():
        # one sort of keys that fold the index into the score (faster than two sorts)
        perm = _tie_free_keys(scores, indices).sort(dim=-1, descending=True).indices
        return scores.gather(-1, perm), indices.gather(-1, perm)
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


def graph_grads(out: Tensor, inputs, needs, grad: Tensor) -> list[Tensor | None]:
    """The gradients of ``out`` for ``grad`` with respect to the ``inputs`` whose ``needs``
    hold (None for the others), as a graph: what a backward that builds one (a second
    derivative) returns, its forward recomputed in differentiable torch operators."""
    wrt = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(out, wrt, grad, create_graph=True) if wrt else ())
    return [next(got) if need else None for need in needs]
