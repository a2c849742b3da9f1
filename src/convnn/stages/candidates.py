"""Stage 1, candidates: which keys each query may select.

The geometry of a map (:class:`Grid`: size, padding, stride, token indices) and the
candidate modes of DESIGN.md section 2 as a :class:`Candidates` set:

- ``all``: every key (``Candidates()``);
- ``random`` / ``grid``: one subset shared by every query and batch element (``shared``);
- ``window``: a list per query (``per_query`` (N, W)).

- ``ann``: content-based sets from an approximate-nearest-neighbour index over the
  selection features (:mod:`convnn.ann`), one per batch element and query. They exist only
  once the features do, and a tile of queries shares its keys, so :func:`ann_select` builds
  and ranks them in one step (one GEMM per tile, the same on every backend).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ann import AnnIndex, AnnSpec
from ..metrics import BlockScores
from ..options import CANDIDATES, check_choice, check_positive_int
from ..spec import ConvNNSpec


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


def window_indices(grid: Grid, window: int, device) -> Tensor:
    """:meth:`Grid.window`, built once per map, window and device (every call of a layer
    reads it), never written to."""
    if torch.compiler.is_compiling():
        return grid.window(window, device)
    return _window_indices_cached(grid, window, torch.device(device))


_window_indices_cached = functools.lru_cache(maxsize=32)(Grid.window)


def window_mask(grid: Grid, window: int, device) -> Tensor:
    """True where key j lies in query i's window (:meth:`Grid.window`): (N_out, Hp * Wp)
    bool, SDPA's mask for attention over whole windows. Built once per map, window and
    device (every call of a layer reads it), never written to."""
    if torch.compiler.is_compiling():
        return _window_mask(grid, window, device)
    return _window_mask_cached(grid, window, torch.device(device))


def _window_mask(grid: Grid, window: int, device) -> Tensor:
    win = grid.window(window, device)
    mask = torch.zeros(
        win.shape[0], grid.padded[0] * grid.padded[1], dtype=torch.bool, device=device
    )
    return mask.scatter_(1, win, True)


_window_mask_cached = functools.lru_cache(maxsize=32)(_window_mask)

# Queries per block of window_blocks (whole rows of the map, about this many): fewer make
# more, smaller SDPA calls. At 14 x 14 with a 7 x 7 window, blocks of 5 rows score 0.63 of
# the pairs, and forward + backward take 0.89-0.93 of one SDPA over the whole mask.
WINDOW_QUERY_BLOCK = 64
WINDOW_BLOCK_SAVING = 0.75  # cut only where the blocks score at most this share of the pairs


def window_blocks(grid: Grid, window: int, device) -> tuple[tuple[slice, slice, Tensor], ...]:
    """:func:`window_mask` cut into blocks of about :data:`WINDOW_QUERY_BLOCK` consecutive
    queries, each with the span of keys its windows reach: ((queries, keys, mask (n, m)),
    ...), so attention over whole windows scores each block's span, not every key. One
    block, the whole mask, where the spans would not skip a quarter of the pairs, in a
    traced graph (the spans are data) and off the CPU (where the blocks were measured; on a
    GPU one larger kernel is the better bet). Built once per map, window and device from
    the windows themselves (no N x N mask on the way): the masks are shared, never to be
    written to."""
    if _whole_mask(device) or _window_spans(grid, window, torch.device(device)) is None:
        return ((slice(None), slice(None), window_mask(grid, window, device)),)
    return _window_blocks(grid, window, torch.device(device))


def window_pairs(grid: Grid, window: int, device) -> int:
    """How many (query, key) pairs SDPA over whole windows scores: its blocks'
    (:func:`window_blocks`), without building their masks."""
    spans = None if _whole_mask(device) else _window_spans(grid, window, torch.device(device))
    if spans is None:
        return grid.out[0] * grid.out[1] * grid.padded[0] * grid.padded[1]
    return sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, ks in spans)


def _whole_mask(device) -> bool:
    """Whether whole-window attention takes one (N, M) mask, not blocks: in a traced graph
    (the spans are data) and off the CPU."""
    return torch.compiler.is_compiling() or torch.device(device).type != "cpu"


@functools.lru_cache(maxsize=32)
def _window_spans(grid: Grid, window: int, device: torch.device):
    """The blocks' (queries, keys) slices, None where they would not pay."""
    win = window_indices(grid, window, device)  # (N, wh * ww) each query's keys
    first, last = win.min(1).values, win.max(1).values
    N, M = win.shape[0], grid.padded[0] * grid.padded[1]
    # whole rows of queries (their windows span the fewest rows), else runs of a long row
    wo = grid.out[1]
    step = wo * max(1, round(WINDOW_QUERY_BLOCK / wo)) if wo < N else WINDOW_QUERY_BLOCK
    bounds = list(range(0, N, step)) + [N]
    spans = [
        (slice(a, b), slice(int(first[a:b].min()), int(last[a:b].max()) + 1))
        for a, b in zip(bounds, bounds[1:])
    ]
    pairs = sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, ks in spans)
    return tuple(spans) if len(spans) > 1 and pairs <= WINDOW_BLOCK_SAVING * N * M else None


@functools.lru_cache(maxsize=32)
def _window_blocks(grid: Grid, window: int, device: torch.device):
    win = window_indices(grid, window, device)
    blocks = []
    for qs, ks in _window_spans(grid, window, device):
        mask = torch.zeros(qs.stop - qs.start, ks.stop - ks.start, dtype=torch.bool, device=device)
        blocks.append((qs, ks, mask.scatter_(1, win[qs] - ks.start, True)))
    return tuple(blocks)


def candidate_count(grid: Grid, candidates: str, num_candidates: int | None, window: int | None):
    """How many candidates each query has under a candidate mode."""
    if candidates == "all":
        return grid.padded[0] * grid.padded[1]
    if candidates == "window":
        wh, ww = grid.window_size(window)
        return wh * ww
    if candidates == "ann":
        return min(num_candidates, grid.padded[0] * grid.padded[1])
    if candidates == "grid":
        gh = min(grid.H, max(1, round(math.sqrt(num_candidates * grid.H / grid.W))))
        return gh * min(grid.W, max(1, round(num_candidates / gh)))
    return num_candidates


def check_candidates(grid: Grid, candidates, num_candidates, window, K) -> int:
    """Check a candidate mode against the map; return K (the candidate count when K is None)."""
    check_choice("candidates", candidates, CANDIDATES)
    if candidates in ("random", "grid", "ann"):
        if num_candidates is None:
            raise ValueError(f"num_candidates is required for candidates={candidates!r}, got None")
        check_positive_int("num_candidates", num_candidates)
        if candidates != "ann" and num_candidates > grid.H * grid.W:
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


@dataclass(frozen=True)
class Candidates:
    """The keys each query may select: every key (both None), a subset ``shared`` (Mc,) by
    all queries, or ``per_query`` lists (N, W) or (B', N, W) of key indices."""

    shared: Tensor | None = None
    per_query: Tensor | None = None


def build(spec: ConvNNSpec, grid: Grid, training: bool, generator, device) -> Candidates:
    """The candidate set of ``spec.candidates`` on ``grid`` (checked by
    :func:`check_candidates`)."""
    if spec.candidates == "random":
        return Candidates(shared=grid.sample(spec.num_candidates, training, generator, device))
    if spec.candidates == "grid":
        return Candidates(shared=grid.lattice(spec.num_candidates, device))
    if spec.candidates == "window":
        return Candidates(per_query=window_indices(grid, spec.window, device))
    return Candidates()


def ann_select(
    spec: ConvNNSpec,
    scores: BlockScores,
    q_feat: Tensor,
    k_feat: Tensor,
    K: int,
    self_index: Tensor | None,
) -> Tensor:
    """Candidates and selection in one for 'ann': indices (B', N, K) of each query's K best
    among the ``num_candidates`` keys (all M when it is >= M) that an index over the selection
    features q_feat (B', N, d), k_feat (B', M, d) proposes, ranked by ``scores`` with the
    selection stage's tie rule; ``self_index`` (N,) with include_self (slot 0). A tile of
    queries shares its window of keys, so it is scored with one GEMM
    (:meth:`convnn.ann.AnnIndex.select_indices`); the result is the same on every backend and
    deterministic (the sets depend only on the features' values)."""
    index = AnnIndex(
        q_feat.shape[-1],
        AnnSpec(
            method=spec.ann_method,
            projection=spec.ann_projection,
            tables=spec.ann_tables,
            seed=spec.ann_seed,
        ),
    )
    budget, M = spec.num_candidates, k_feat.shape[1]
    tables = 1 if budget >= M else index.spec.num_tables
    if K > min(budget, M) // tables:
        raise ValueError(
            f"num_candidates must give each of the {tables} ann tables at least K = {K} keys "
            f"(num_candidates >= {K * tables}, or >= the {M} tokens), got {budget}"
        )
    return index.select_indices(
        q_feat, k_feat, scores, K, budget, metric=spec.metric, self_index=self_index
    )
