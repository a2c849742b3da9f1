"""The native CPU top-K (convnn.native, _rank.c) picks what the torch path picks.

Each case is checked three ways: against a float64 formula written here from the tie rule
(a stable sort of the negated scores: descending score, equal scores by lower position),
against the torch path of ``topk_low_ties`` (``CONVNN_NATIVE=0``), and, for layers, against
the same layer run on the torch path, bit for bit.
"""

from __future__ import annotations

import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading

import pytest
import torch

import convnn
from convnn import native
from convnn.backends import _common
from convnn.metrics import finite_products

needs_native = pytest.mark.skipif(native._rank is None, reason=native.status())


@pytest.fixture
def torch_path(monkeypatch):
    """topk_low_ties on the torch path, for the duration of a call."""

    def run(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setenv("CONVNN_NATIVE", "0")
            return _common.topk_low_ties(*args, **kwargs)

    return run


def formula(scores: torch.Tensor, K: int, rounding=None) -> torch.Tensor:
    """Positions of the K best scores (as their ``rounding``) in canonical order, in float64."""
    x = (scores if rounding is None else scores.to(rounding)).double()
    return torch.sort(-x, dim=-1, stable=True).indices[..., :K]


def draw(kind: str, rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Scores of one kind: random, tie-heavy integers, signed zeros and tiny values, a fifth
    -inf (excluded candidates) with +inf, ascending (every score beats the kept ones) and
    descending (none does)."""
    if kind == "random":
        return torch.randn(rows, width, generator=gen)
    if kind == "ties":
        return torch.randint(-3, 3, (rows, width), generator=gen).float()
    if kind == "zeros":
        sign = torch.where(torch.rand(rows, width, generator=gen) < 0.5, -1.0, 1.0)
        tiny = torch.randint(0, 3, (rows, width), generator=gen) * 1e-30
        return sign * tiny  # +-0.0 and +-1e-30, +-2e-30: zeros of both signs tie
    if kind == "inf":
        s = torch.randn(rows, width, generator=gen)
        s[torch.rand(rows, width, generator=gen) < 0.2] = -torch.inf
        s[:, ::7] = torch.inf
        return s
    line = torch.arange(width, dtype=torch.float32).expand(rows, width)
    return (line if kind == "ascending" else -line).clone()


# widths and K that take each of the kernel's ways (_rank.c): rounds over eight rows at once,
# a row to a lane (width <= 512 and K * width <= 8192: 65 x 32, 257 x 17), rounds over one
# wider row (600 x 13), rounds over the K best groups of 32 (4096 x 9, 1000 x 9), the heap
# over every score (1000 x 40, 100 x 100) and over the groups reaching the K-th best group
# maximum (5000 x 64); the tests draw 6 rows, so a group of eight lanes is part empty
SHAPES = [(1, 1), (5, 1), (5, 5), (31, 9), (65, 9), (65, 32), (100, 100), (257, 17),
          (600, 13), (1000, 9), (1000, 40), (4096, 9), (4096, 1), (5000, 64)]  # fmt: skip
KINDS = ("random", "ties", "zeros", "inf", "ascending", "descending")
DTYPES = [
    (torch.float32, None),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, None),
    (torch.float16, None),
]


@needs_native
@pytest.mark.parametrize("dtype, rounding", DTYPES, ids=str)
def test_native_topk_is_the_formula_and_the_torch_path(dtype, rounding, torch_path):
    gen = torch.Generator().manual_seed(7)
    for width, K in SHAPES:
        for kind in KINDS:
            scores = draw(kind, 6, width, gen).to(dtype)
            assert native.usable(scores, K, rounding)
            vals, idx = _common.topk_low_ties(scores, K, rounding=rounding)
            case = f"{kind} scores, width {width}, K {K}"
            assert torch.equal(idx, formula(scores, K, rounding)), case
            t_vals, t_idx = torch_path(scores, K, rounding=rounding)
            assert torch.equal(idx, t_idx) and torch.equal(vals, t_vals), case
            assert vals.dtype == (rounding or dtype)


@needs_native
def test_native_topk_reads_strided_rows_and_leading_dims(torch_path):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, 700, generator=gen)
    for scores in (
        base[:, ::3, 50:650],  # rows apart, each contiguous
        base[0].t()[:300],  # scores apart within a row: ranked from a copy
        base[:, :1].expand(3, 5, 700),  # rows that share their memory
        base[:, :0],  # no rows
    ):
        vals, idx = _common.topk_low_ties(scores, 9)
        assert idx.shape == (*scores.shape[:-1], 9)
        assert torch.equal(idx, formula(scores, 9))
        assert torch.equal(vals, scores.gather(-1, idx))


@needs_native
@pytest.mark.parametrize("width", [40, 3000])  # by rounds, and by the heap
def test_native_topk_ranks_negative_nan_keys_by_their_bits(width):
    """The rounds strike keys out with the lowest key, which a negative NaN of all-one bits
    also has: a row holding it is ranked again by the heap. Scores are meant to hold no NaN
    (``rankable``); the kernel still ranks any bits by their ordered key, as written here."""
    scores = torch.randn(4, width, generator=torch.Generator().manual_seed(3))
    bits = scores.view(torch.int32)
    bits[:, width // 2 :] = -1  # 0xFFFFFFFF: the lowest key
    bits[1] = -1
    key = bits.long()
    key = torch.where(key < 0, key ^ 0x7FFFFFFF, key)  # negative magnitudes reversed
    for K in (1, 9, width // 2 + 1, width):
        expected = torch.sort(-key, dim=-1, stable=True).indices[:, :K]
        assert torch.equal(_common.topk_low_ties(scores, K)[1], expected)


@needs_native
def test_native_topk_runs_in_several_threads_at_once():
    """The chunked backend's worker threads rank blocks at the same time (the kernel lets go
    of the interpreter lock and keeps its state per call)."""
    gen = torch.Generator().manual_seed(5)
    blocks = [torch.randn(64, 4096, generator=gen) for _ in range(8)]
    expected = [formula(b, 9) for b in blocks]
    got = [None] * len(blocks)

    def work(i):
        for _ in range(5):
            got[i] = _common.topk_low_ties(blocks[i], 9)[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(blocks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@needs_native
@pytest.mark.parametrize(
    "opts",
    [
        dict(K=9, metric="dot", candidates="all"),
        dict(K=9, metric="dot", candidates="window", window=5),
        dict(K=5, metric="cosine", candidates="all", selection_dtype=torch.bfloat16),
        dict(K=7, metric="euclidean", candidates="all"),
    ],
    ids=["all", "window", "bf16-selection", "euclidean"],
)
def test_layers_are_the_same_with_and_without_the_native_kernels(opts, monkeypatch):
    """The same neighbours, bit for bit, and the same outputs and gradients to float32
    rounding (the native aggregation sums in its own order). Float32 selection takes small
    integer features: their dot products are exact both ways (the native kernels and the
    torch path sum in different orders, which rounds differently on other inputs), and full
    of exact ties."""
    from convnn.backends import chunked

    torch.manual_seed(0)
    layer = convnn.ConvNN2d(8, 8, **opts)
    x = torch.randn(2, 8, 20, 20)
    if "selection_dtype" not in opts:
        x = torch.randint(-2, 3, x.shape).float()
    x.requires_grad_()
    picked = []
    aggregate = chunked.aggregate
    monkeypatch.setattr(
        chunked, "aggregate", lambda v, idx, *a: picked.append(idx) or aggregate(v, idx, *a)
    )

    def run():
        y = layer(x)
        return y, torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])

    y, g = run()
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    y0, g0 = run()
    assert len(picked) == 2 and torch.equal(*picked)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("d", [64, 13])  # whole lanes of eight, and a tail
def test_native_window_scores_are_the_dot_products(d):
    """Each query against its own candidates, read in place: the float64 dot products to
    float32 rounding, for shared (n, W) and per-image (B, n, W) candidates and batch-1
    queries or keys; equal keys score equally bit for bit (the tie rule needs it)."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 20, d, generator=gen), torch.randn(3, 50, d, generator=gen)
    k[:, 40:] = k[:, 10:20]  # keys 40-49 repeat keys 10-19
    shared = torch.randint(0, 50, (20, 9), generator=gen)
    own = torch.randint(0, 50, (3, 20, 9), generator=gen)
    own[..., 0], own[..., 1], own[..., 8] = 12, 42, 42  # equal keys: eight at once, and alone
    for qq, kk, cand in ((q, k, shared), (q, k, own), (q[:1], k, own), (q, k[:1], shared)):
        got = native.window_scores(qq, kk, cand)
        B = max(qq.shape[0], kk.shape[0], cand.shape[0] if cand.dim() == 3 else 1)
        c = cand.expand(B, -1, -1)
        rows = kk.expand(B, -1, -1).double().gather(1, c.reshape(B, -1, 1).expand(-1, -1, d))
        want = (qq.expand(B, -1, -1).double()[:, :, None] * rows.view(B, 20, 9, d)).sum(-1)
        assert got.shape == (B, 20, 9) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert native.window_scores(q[:0], k[:0], shared).shape == (0, 20, 9)  # an empty batch
    same = native.window_scores(q, k, own)
    assert torch.equal(same[..., 0], same[..., 1]) and torch.equal(same[..., 0], same[..., 8])
    with pytest.raises(ValueError, match="outside the keys"):
        native.window_scores(q, k, shared.masked_fill(shared == 7, 50))
    with torch.enable_grad():  # a differentiable call keeps the torch path
        assert native.window_scores(q.requires_grad_(), k, shared) is None


@needs_native
def test_native_window_topk_ranks_the_window_scores():
    """Window scores and their top-K in one pass: the K best candidates of the window scores
    (excluded keys -inf), ties to the lower index, as key indices; small integer features
    (many exact ties), shared and per-image candidates, blocks of queries that end short,
    K = 1 to W, and the errors."""
    gen = torch.Generator().manual_seed(12)
    for B, n, M, d, W in ((2, 70, 90, 16, 9), (1, 130, 40, 5, 49), (3, 9, 30, 64, 25)):
        q = torch.randint(-2, 3, (B, n, d), generator=gen).float()
        k = torch.randint(-2, 3, (B, M, d), generator=gen).float()
        for cand in (torch.randint(0, M, (n, W), generator=gen),
                     torch.randint(0, M, (B, n, W), generator=gen)):  # fmt: skip
            cand = cand.sort(-1).values
            s = native.window_scores(q, k, cand)
            for ex in (None, torch.randint(0, M, (n,), generator=gen)):
                masked = s if ex is None else s.masked_fill(cand == ex[:, None], -torch.inf)
                for K in sorted({1, min(W, 9), W}):
                    got = native.window_topk(q, k, cand, K, ex)
                    want = cand.expand(B, -1, -1).gather(-1, formula(masked, K))
                    assert torch.equal(got, want), (B, n, W, K, ex is None)
    with pytest.raises(ValueError, match="K must lie in"):
        native.window_topk(q, k, cand, W + 1)
    with pytest.raises(ValueError, match="exclude must be"):
        native.window_topk(q, k, cand, 2, torch.zeros(n + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the keys"):
        native.window_topk(q, k, cand.masked_fill(cand == cand[0, 0, 0], M), 2)


def gemm_formula(q, k, K, exclude=None):
    """The K best keys of each query under q . k in float64, excluded keys last (-inf)."""
    s = q.double() @ k.double().transpose(-1, -2)
    if exclude is not None:
        inside = (exclude >= 0) & (exclude < k.shape[-2])
        rows = inside.nonzero()[:, 0]
        s[:, rows, exclude[rows]] = -torch.inf
    return formula(s, K)


needs_gemm_topk = pytest.mark.skipif(
    native._rank is None or not native._tiles(), reason=native.status()
)


@needs_gemm_topk
@pytest.mark.skipif(
    native._rank is None or native._rank.tile_rows() != 12, reason="no AVX-512 tiles here"
)
def test_wide_tiles_give_the_narrow_tiles_numbers():
    """On AVX-512 the tile kernels take 12 x 16 tiles and insert with one-register slots;
    their selections and aggregations equal the 6 x 16 AVX2 tiles' bit for bit, on real-valued
    features, self-similarity and separate keys, with and without excluded keys, odd sizes."""
    gen = torch.Generator().manual_seed(11)
    x = torch.nn.functional.normalize(torch.randn(2, 301, 37, generator=gen), dim=-1)
    k, ex = x[:, :157].clone(), torch.randint(0, 157, (301,), generator=gen)
    v, w = torch.randn(2, 90, 37, generator=gen), torch.randn(21, 37, 5, generator=gen)
    idx = torch.randint(0, 90, (2, 1, 301, 5), generator=gen)
    gy = torch.randn(2, 301, 21, generator=gen)

    def run():
        g_v = torch.zeros_like(v)
        g_w = native.aggregate_grad(gy, v, idx, w, g_v, True)
        return [native.gemm_topk(x, x, 9, True), native.gemm_topk(x, x, 9, True, torch.arange(301)),
                native.gemm_topk(x, k, 16), native.gemm_topk(x, k, 7, False, ex, torch.bfloat16),
                native.aggregate(v, idx, w, None), g_v, g_w]  # fmt: skip

    try:
        native._rank.tile_rows(6)
        narrow = run()
        native._rank.tile_rows(12)
        wide = run()
    finally:
        native._rank.tile_rows(12)
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rows must be 6"):
        native._rank.tile_rows(8)


def exclusions(kind: str | None, n: int, M: int, gen: torch.Generator) -> torch.Tensor | None:
    """Each of n queries' excluded key: none, its own, or any (some outside the M keys)."""
    if kind is None:
        return None
    return torch.arange(n) if kind == "own" else torch.randint(-2, M + 2, (n,), generator=gen)


@needs_gemm_topk
def test_gemm_topk_is_the_formula():
    """Scores and top-K in one pass against the float64 formula, on small integer features
    (exact sums, many exact ties): rows and keys that fill no whole tile (6 x 16), depths of
    1 to 130 (one to several superblock sizes), K = 1 to 16, self-similarity (half the
    scores) and separate keys, excluded keys (its own, any, outside the keys), shared
    (batch-1) operands and strided rows."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 1, 1), (2, 2, 1), (7, 17, 13), (33, 33, 64), (97, 200, 5), (200, 97, 130),
              (257, 257, 64), (16, 40, 3)]  # fmt: skip
    for case, (n, M, D) in enumerate(shapes):
        for K in sorted({1, min(M, 5), min(M, 16)}):
            for symmetric in (False, True) if n == M else (False,):
                for exclude in (None, "own", "any"):
                    if exclude is not None and K >= M:
                        continue
                    B = 1 + case % 3
                    q = torch.randint(-2, 3, (B, n, D), generator=gen).float()
                    k = q if symmetric else torch.randint(-2, 3, (B, M, D), generator=gen).float()
                    if not symmetric and case % 2:
                        k = k[:1]  # shared keys
                    ex = exclusions(exclude, n, M, gen)
                    assert native.gemm_topk_usable(q, k, K, ex)
                    got = native.gemm_topk(q, k, K, symmetric, ex)
                    want = gemm_formula(q, k.expand(B, -1, -1), K, ex)
                    assert torch.equal(got, want), (n, M, D, K, symmetric, exclude)
    wide = torch.randint(-2, 3, (2, 50, 40), generator=gen).float()
    q, k = wide[:, :, :20], wide[:, 10:, 20:]  # rows 40 floats apart
    assert torch.equal(native.gemm_topk(q, k, 6), gemm_formula(q, k, 6))


@needs_gemm_topk
def test_gemm_topk_ranks_the_bfloat16_rounding():
    """rounding=torch.bfloat16 ranks each score's bfloat16 rounding: integer features whose
    exact sums reach 10^3, where bfloat16 keeps 8 bits and rounds neighbours into ties (a
    tenth of the rows tie at the K-th score)."""
    gen = torch.Generator().manual_seed(6)
    for symmetric, n, M in ((True, 130, 130), (False, 61, 200)):
        q = torch.randint(-6, 7, (2, n, 40), generator=gen).float()
        k = q if symmetric else torch.randint(-6, 7, (2, M, 40), generator=gen).float()
        s = q.double() @ k.double().transpose(1, 2)  # exact in float32 too
        for ex in (None, torch.randint(0, M, (n,), generator=gen)):
            got = native.gemm_topk(q, k, 11, symmetric, ex, torch.bfloat16)
            if ex is not None:
                s = s.clone()
                s[:, torch.arange(n), ex] = -torch.inf
            assert torch.equal(got, formula(s.float(), 11, torch.bfloat16))
            ties = s.float().bfloat16().sort(-1, descending=True).values
            assert (ties[..., 10] == ties[..., 11]).any()  # rows that tie at the K-th score


needs_amx = pytest.mark.skipif(
    native._rank is None or not native._AMX[0], reason="no AMX-BF16 tile unit lent here"
)


@needs_amx
def test_gemm_topk_scores_bfloat16_operands_in_the_tile_unit():
    """bfloat16 features scored by the tile unit and ranked as their scores' bfloat16
    rounding: on small integer features (exact sums up to 10^3, rounded into many ties) the
    float64 formula's picks and the float32 kernel's, for depths that fill no whole chunk of
    32, rows and keys that fill no 16 x 16 tile, K = 1 to 16, self-similarity, separate and
    shared keys, excluded keys (its own, any, outside the keys) and strided rows."""
    gen = torch.Generator().manual_seed(8)
    bf16 = torch.bfloat16
    shapes = [(1, 2, 1), (7, 17, 13), (33, 33, 64), (97, 200, 5), (200, 97, 130),
              (257, 257, 40), (300, 300, 64)]  # fmt: skip
    for case, (n, M, D) in enumerate(shapes):
        for K in sorted({1, min(M - 1, 5), min(M - 1, 16)}):
            for symmetric in (False, True) if n == M else (False,):
                for exclude in (None, "own", "any"):
                    B = 1 + case % 3
                    q = torch.randint(-6, 7, (B, n, D), generator=gen).to(bf16)
                    k = q if symmetric else torch.randint(-6, 7, (B, M, D), generator=gen).to(bf16)
                    if not symmetric and case % 2:
                        k = k[:1]  # shared keys
                    ex = exclusions(exclude, n, M, gen)
                    assert native.gemm_topk_usable(q, k, K, ex)
                    got = native.gemm_topk(q, k, K, symmetric, ex, bf16)
                    s = q.double() @ k.expand(B, -1, -1).double().transpose(1, 2)
                    if ex is not None:
                        hit = (ex >= 0) & (ex < M)
                        s[:, torch.arange(n)[hit], ex[hit]] = -torch.inf
                    case_ = (n, M, D, K, symmetric, exclude)
                    assert torch.equal(got, formula(s.float(), K, bf16)), case_
                    wide = q.float()
                    k32 = wide if symmetric else k.float()
                    assert torch.equal(got, native.gemm_topk(wide, k32, K, symmetric, ex, bf16))
    wide = torch.randint(-6, 7, (2, 50, 80), generator=gen).to(bf16)
    q, k = wide[:, :, :40], wide[:, 10:, 40:]  # rows 80 numbers apart
    s = q.double() @ k.double().transpose(1, 2)
    assert torch.equal(native.gemm_topk(q, k, 6, rounding=bf16), formula(s.float(), 6, bf16))


@needs_amx
def test_gemm_topk_tile_unit_on_real_valued_features():
    """Random unit bfloat16 features: the tile unit rounds its sums its own way, so a pick
    may differ from the float32 kernel's only where two scores round to neighbouring
    bfloat16 values: (almost) all picks agree, and every pick is among the float64 K best up
    to a bfloat16 step."""
    gen = torch.Generator().manual_seed(9)
    x = torch.nn.functional.normalize(torch.randn(3, 700, 64, generator=gen), dim=-1)
    x = x.bfloat16()
    s = x.double() @ x.double().transpose(1, 2)
    for symmetric, k in ((True, x), (False, x[:, :300].clone())):
        got = native.gemm_topk(x, k, 9, symmetric, None, torch.bfloat16)
        w = x.float()
        want = native.gemm_topk(
            w, w if symmetric else k.float(), 9, symmetric, None, torch.bfloat16
        )
        assert (got == want).float().mean() > 0.999
        ss = s[:, :, : k.shape[1]]
        best = ss.sort(-1, descending=True).values
        assert (ss.gather(-1, got) >= best[..., 8:9] - 2**-7).all()


@needs_amx
def test_bfloat16_selection_takes_the_tile_unit(monkeypatch):
    """A layer's bfloat16 selection over 256 keys or more runs the one pass on the tile unit
    (bfloat16 operands, not float32 copies) and picks what the float32 kernel picks (integer
    features: exact sums), through the whole layer."""
    torch.manual_seed(0)
    layer = convnn.ConvNN2d(8, 8, K=5, metric="dot", selection_dtype=torch.bfloat16)
    x = torch.randint(-3, 4, (2, 8, 20, 20)).float()  # 400 keys
    dtypes, one_pass = [], native.gemm_topk
    monkeypatch.setattr(
        native, "gemm_topk", lambda q, *a: dtypes.append(q.dtype) or one_pass(q, *a)
    )
    y, idx = layer(x, return_indices=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # a call per run of images
    dtypes.clear()
    monkeypatch.setattr(native, "_AMX", [False])  # the float32 copies, on the float32 kernel
    y0, idx0 = layer(x, return_indices=True)
    assert dtypes and set(dtypes) == {torch.float32}
    assert torch.equal(idx, idx0) and torch.equal(y, y0)


@needs_gemm_topk
def test_gemm_topk_on_real_valued_features():
    """Random unit features, where the kernel's sums round differently from a GEMM's: every
    pick is among the float64 K best up to a rounding's width, and rows whose K-th and
    (K+1)-th float64 scores lie apart pick the formula's keys exactly."""
    gen = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(2, 700, 48, generator=gen), dim=-1)
    s = x.double() @ x.double().transpose(1, 2)
    for symmetric, k in ((True, x), (False, x[:, :300].clone())):
        got = native.gemm_topk(x, k, 9, symmetric)
        ss = s[:, :, : k.shape[1]]
        best = ss.sort(-1, descending=True).values
        assert (ss.gather(-1, got) >= best[..., 8:9] - 1e-6).all()
        clear = (best[..., 8] - best[..., 9]) > 1e-5
        assert clear.float().mean() > 0.9
        assert torch.equal(got[clear], formula(ss, 9)[clear])


@needs_gemm_topk
def test_gemm_topk_serves_the_chunked_backend_in_threads(monkeypatch):
    """chunked.select_scores of GEMM scores takes the one-pass kernel (no score block) and
    picks what the GEMM and top-K path picks: one thread, several images over two threads,
    and one image split into blocks of queries over three (self-similarity then computes
    every score), also under inference mode."""
    from convnn.backends import chunked
    from convnn.metrics import GemmScores

    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for t, B in ((1, 3), (2, 3), (3, 1)):
            torch.set_num_threads(t)
            x = torch.randint(-2, 3, (B, 260, 16), generator=gen).float()  # >= 256 keys
            for ex in (None, torch.arange(260)):
                scores = GemmScores(x, x)
                assert scores.fused(8, ex)
                got = chunked.select_scores(scores, 8, exclude=ex)
                with monkeypatch.context() as m:
                    m.setattr(GemmScores, "fused", lambda self, K, exclude=None: False)
                    want = chunked.select_scores(GemmScores(x, x), 8, exclude=ex)
                assert torch.equal(got, want)
                with torch.inference_mode():  # its tensors are written on the caller's thread
                    assert torch.equal(chunked.select_scores(scores, 8, exclude=ex), want)
    finally:
        torch.set_num_threads(threads)


@needs_gemm_topk
def test_gemm_topk_usable_and_errors():
    q = torch.randn(2, 30, 8)
    assert native.gemm_topk_usable(q, q, 16)
    assert not native.gemm_topk_usable(q, q, 17)  # 16 slots a row
    assert not native.gemm_topk_usable(q.double(), q.double(), 4)
    assert not native.gemm_topk_usable(q, q[:, :4], 4, torch.arange(30))  # K = M - 1 + 1
    assert native.gemm_topk_usable(q, q[:, :5], 4, torch.arange(30))
    from convnn.metrics import GemmScores  # the one pass serves from 256 keys on (it pays)

    few, enough = torch.randn(1, 255, 8), torch.randn(1, 256, 8)
    assert not GemmScores(few, few).fused(4) and GemmScores(enough, enough).fused(4)
    with pytest.raises(ValueError, match="keys to be the queries"):
        native.gemm_topk(q, q.clone(), 4, symmetric=True)
    with pytest.raises(ValueError, match="min\\(16, M\\)"):
        native.gemm_topk(q, q, 17)
    with pytest.raises(ValueError, match="do not broadcast"):
        native.gemm_topk(q, torch.randn(3, 30, 8), 4)
    # bfloat16 operands: only on the tile unit, ranked as their scores' bfloat16 rounding
    h = q.bfloat16()
    assert native.gemm_topk_usable(h, h, 4) == native.amx_here()
    with pytest.raises(ValueError, match="rounding=torch.bfloat16"):
        native.gemm_topk(h, h, 4)
    if not native._AMX[0]:
        with pytest.raises(ValueError, match="tile unit"):
            native.gemm_topk(h, h, 4, rounding=torch.bfloat16)
    for a, b in ((q, h), (h, q), (q.half(), q.half())):  # one dtype of the two kinds
        with pytest.raises(ValueError, match="float32 or both bfloat16"):
            native.gemm_topk(a, b, 4, rounding=torch.bfloat16)
    # a bfloat16 query against float32 keys: both widened, the float32 kernel serves
    mixed = GemmScores(torch.randn(1, 300, 16).bfloat16(), torch.randn(1, 300, 16))
    assert mixed.fused(4)


@needs_gemm_topk
def test_native_aggregation_is_the_formula():
    """Forward and both gradients against float64 autograd of the gathered formula
    out[b, n] = sum_k W[:, :, k] v[b, idx[b, n, k]] + bias: tiles that fill no whole 6 x 16,
    channels and outputs off the vector width, K = 1, repeated neighbours, a row nobody picks,
    with and without a bias, and each gradient alone."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(2, 50, 50, 64, 9, 64), (1, 7, 13, 5, 3, 17), (3, 30, 11, 16, 1, 6),
              (2, 60, 41, 70, 4, 33)]  # fmt: skip
    for B, M, N, C, K, C_out in shapes:
        v = torch.randn(B, M, C, generator=gen)
        idx = torch.randint(1, M, (B, 1, N, K), generator=gen)  # row 0: never a neighbour
        idx[:, :, :, 0] = idx[:, :, :1, 0]  # every query shares its first neighbour
        w, bias = torch.randn(C_out, C, K, generator=gen), torch.randn(C_out, generator=gen)
        gy = torch.randn(B, N, C_out, generator=gen)
        v64, w64 = v.double().requires_grad_(), w.double().requires_grad_()
        rows = v64.gather(1, idx.flatten(1)[..., None].expand(-1, -1, C)).view(B, N, K, C)
        want = torch.einsum("bnkc,ock->bno", rows, w64)
        gv, gw = torch.autograd.grad(want, (v64, w64), gy.double())
        for b in (None, bias):
            assert native.aggregate_usable(v, idx, None, w, "standard")
            got = native.aggregate(v, idx, w, b)
            torch.testing.assert_close(got.double(), want + (0 if b is None else b.double()),
                                       rtol=1e-5, atol=1e-4)  # fmt: skip
        rows_first = None
        for grad in (gy, gy.transpose(1, 2).contiguous().transpose(1, 2)):  # any strides
            # written over whatever the gradient held, in the output gradient's layout:
            # contiguous rows, or a (B, C, M) map where the gradient is laid out as one
            g_v = native.values_grad(v, native.map_layout(grad)).normal_(generator=gen)
            assert native.map_layout(grad) == (not grad.is_contiguous())
            assert g_v.is_contiguous() == grad.is_contiguous()
            assert g_v.transpose(1, 2).is_contiguous() == (not grad.is_contiguous())
            g_w = native.aggregate_grad(grad, v, idx, w, g_v, True)
            torch.testing.assert_close(g_v.double(), gv, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(g_w.double(), gw, rtol=1e-5, atol=1e-3)
            assert (g_v[:, 0] == 0).all()
            assert native.aggregate_grad(grad, v, idx, w, None, False) is None
            assert torch.equal(native.aggregate_grad(grad, v, idx, w, None, True), g_w)
            rows_first = g_v if rows_first is None else rows_first
            assert torch.equal(g_v, rows_first)  # the same sums, whatever the layout


@needs_gemm_topk
def test_native_aggregation_serves_layers_in_threads(monkeypatch):
    """ConvNN2d trains through the native aggregation: outputs and gradients as the torch
    path's at one and two threads (images split over the workers), the input's gradient laid
    out as the input (no copy), the torch path where an image would be split, and a double
    backward (create_graph) on the torch path."""
    from convnn.backends import chunked

    threads = torch.get_num_threads()
    used = []
    decide = chunked._native_aggregation
    monkeypatch.setattr(
        chunked, "_native_aggregation", lambda *a: used.append(decide(*a)) or used[-1]
    )
    try:
        for t, B in ((1, 1), (2, 3), (2, 1)):
            torch.set_num_threads(t)
            torch.manual_seed(t + B)
            layer = convnn.ConvNN2d(8, 12, K=5)
            x = torch.randn(B, 8, 9, 9, requires_grad=True)
            used.clear()
            y = layer(x)
            g = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
            assert used == [B >= t]
            # the map's gradient is a view of the native gradient, laid out as the map
            assert g[0].is_contiguous() == (B >= t)
            with monkeypatch.context() as m:
                m.setattr(chunked, "_native_aggregation", lambda *a: False)
                y0 = layer(x)
                g0 = torch.autograd.grad(y0.square().sum(), [x, *layer.parameters()])
            torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)
        torch.set_num_threads(1)
        x = torch.randn(1, 8, 6, 6, requires_grad=True)
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        (gxx,) = torch.autograd.grad(gx.square().sum(), x)
        with monkeypatch.context() as m:
            m.setattr(chunked, "_native_aggregation", lambda *a: False)
            (hx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
            (hxx,) = torch.autograd.grad(hx.square().sum(), x)
        torch.testing.assert_close(gxx, hxx, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@needs_gemm_topk
def test_native_aggregation_ops_in_compiled_graphs(monkeypatch):
    """The aggregation is one op forward and one backward (convnn::native_aggregate and its
    gradient): their fake and real forms agree (opcheck), and a compiled layer calls it and
    gives the eager outputs and gradients; its self-similarity selection stays symmetric
    (a compiled graph hands the one operand over as two equal tensors)."""
    from convnn.backends import chunked  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(9)
    v, w = torch.randn(2, 10, 4, generator=gen), torch.randn(5, 4, 3, generator=gen)
    idx = torch.randint(0, 10, (2, 1, 6, 3), generator=gen)
    for bias in (None, torch.randn(5, generator=gen)):
        torch.library.opcheck(torch.ops.convnn.native_aggregate.default, (v, idx, w, bias))
    grad = torch.randn(2, 6, 5, generator=gen)
    for need in ((True, True, False), (True, False, True), (False, True, False)):
        torch.library.opcheck(
            torch.ops.convnn.native_aggregate_grad.default, (grad, v, idx, w, *need)
        )
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm

    symmetric = []
    monkeypatch.setattr(native, "GEMM_TOPK_MIN_KEYS", 1)  # the one pass on a 6 x 6 map
    gemm_topk = native.gemm_topk
    monkeypatch.setattr(native, "gemm_topk", lambda *a: symmetric.append(a[3]) or gemm_topk(*a))
    torch.manual_seed(0)
    layer = convnn.ConvNN2d(4, 6, K=5)
    x = torch.randint(-2, 3, (2, 4, 6, 6)).float().requires_grad_()
    y = torch.compile(layer, backend="inductor")(x)
    assert symmetric and all(symmetric)
    y = torch.compile(layer, backend=backend)(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    y0 = layer(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    op = torch.ops.convnn.native_aggregate
    assert op in seen or op.default in seen
    assert torch.equal(y, y0) and torch.equal(g, g0)


@needs_gemm_topk
def test_rows_copy_is_the_contiguous_copy():
    """A map's tokens copied to contiguous rows by the native transpose equal torch's copy
    bit for bit: sizes off the 8 x 8 blocks, runs of tokens and of images of a larger map; the
    copy op (eager and compiled) takes it, and its fake and real forms agree (opcheck)."""
    from convnn.backends import chunked

    gen = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 64, 32, 32, generator=gen), torch.randn(3, 13, 7, 5, generator=gen),
            torch.randn(4, 9, 8, 8, generator=gen), torch.randn(1, 8, 3, 9, generator=gen)]  # fmt: skip
    # (B, M, C) tokens laid out as the map; a run of them, and every other image
    tokens = [x.flatten(2).transpose(1, 2) for x in maps]
    for t in tokens + [tokens[2][:, 5:60], tokens[2][::2]]:
        assert t.stride(1) == 1 and not t.is_contiguous() and native.rows_copy_usable(t)
        got = native.rows_copy(t)
        assert got.is_contiguous() and torch.equal(got, t.contiguous())
        assert torch.equal(chunked.contiguous_rows(t), got)
    assert not native.rows_copy_usable(torch.randn(2, 7, 5, 5).flatten(2).transpose(1, 2))
    tokens = tokens[1]
    assert not native.rows_copy_usable(tokens.double())
    assert not native.rows_copy_usable(tokens.contiguous())
    torch.library.opcheck(torch.ops.convnn.contiguous_copy.default, (tokens,))
    x = maps[1].clone().requires_grad_()
    y = chunked.contiguous_rows(x.flatten(2).transpose(1, 2))  # the gradient passes through
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, torch.ones_like(x))


def test_max_norm_is_the_largest_row_norm():
    """The native bound of finite_products: the largest row norm against float64's, over
    rows off the unrolled width, strided rows and images; nan where an entry is nan (in any
    row), inf where one is infinite; None where it does not serve."""
    if native._rank is None or not native._enabled():
        pytest.skip("native kernels off here")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 37, generator=gen) * torch.rand(3, 40, 1, generator=gen) * 10
    for t in (x, x[:, ::3], x[::2, 5:], x[..., :8], x[..., :1], x[:, :0]):
        want = torch.linalg.vector_norm(t.double(), dim=-1).amax().item() if t.numel() else 0.0
        assert native.max_norm(t) == pytest.approx(want, rel=1e-12)
    for bad, want in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        y = x.clone()
        y[0, 3, 5] = bad
        assert want(native.max_norm(y))
        assert not finite_products(y, x)
    assert finite_products(x, x)
    for other in (x.double(), x.bfloat16(), x.transpose(1, 2), x[0]):
        assert native.max_norm(other) is None


@needs_gemm_topk
def test_native_aggregation_usable_and_errors():
    v, w = torch.randn(2, 10, 4), torch.randn(5, 4, 3)
    idx = torch.randint(0, 10, (2, 1, 6, 3))
    assert native.aggregate_usable(v, idx, None, w, "standard")
    assert not native.aggregate_usable(v, idx, torch.rand(2, 1, 6, 3), w, "standard")  # rho
    assert not native.aggregate_usable(v, idx, None, w, "depthwise")
    assert not native.aggregate_usable(v.double(), idx, None, w.double(), "standard")
    assert not native.aggregate_usable(v, idx.expand(2, 2, 6, 3), None, w, "standard")  # groups
    with pytest.raises(ValueError, match="outside the values"):
        native.aggregate(v, idx.masked_fill(idx == 3, 10), w, None)
    with pytest.raises(ValueError, match="outside the values"):
        native.aggregate_grad(torch.randn(2, 6, 5), v, idx.masked_fill(idx == 3, -1), w, None, True)
    bad = (torch.empty(2, 10, 4, 2)[..., 0], torch.empty(2, 10, 5), torch.empty_like(v).double(),
           torch.zeros(2, 1, 4).expand(2, 10, 4), torch.zeros(1, 10, 4).expand(2, 10, 4),
           torch.empty(2, 10, 8)[..., :4], torch.empty(2, 10, 4, device="meta"))  # fmt: skip
    for g_v in bad:
        with pytest.raises(ValueError, match="g_values must be a float32 CPU"):
            native.aggregate_grad(torch.randn(2, 6, 5), v, idx, w, g_v, False)


def _listed_formula(q, k, v, idx, scale):
    """Softmax attention over listed keys in float64, written from its definition:
    q (B, G, N, d), k, v (B, G, M, d), idx (B or 1, G or 1, N, K) -> (B, N, G * d)."""
    B, G, N, d = q.shape
    idx = idx.expand(B, G, N, idx.shape[3])
    q, k, v = q.double(), k.double(), v.double()
    take = lambda t: torch.stack(  # noqa: E731  t[b, g, idx[b, g, n, j]]
        [torch.stack([t[b, g][idx[b, g]] for g in range(G)]) for b in range(B)]
    )  # (B, G, N, K, d)
    w = torch.softmax((q[..., None, :] * take(k)).sum(-1) * scale, -1)
    return (w[..., None] * take(v)).sum(-2).transpose(1, 2).reshape(B, N, G * d)


@needs_native
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("K", [1, 7, 9, 20])
def test_listed_attention_is_the_formula_forward_and_backward(shared, K):
    """The native attention over listed keys, on the heads as a projection's strided views,
    against float64 attention written from its definition, forward and all three gradients
    (through the projection, as a ViT takes them); lists per head, or one shared."""
    from convnn.backends.chunked import listed_attention

    B, G, N, d = 2, 3, 24, 20  # d: two vectors of eight and a tail of four
    qkv = torch.randn(B, N, 3, G, d, generator=torch.Generator().manual_seed(K)).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    g = torch.Generator().manual_seed(1)
    lists = [torch.randperm(N, generator=g)[:K] for _ in range(N if shared else B * G * N)]
    idx = torch.stack(lists).view(1 if shared else B, 1 if shared else G, N, K)
    assert native.listed_attention_usable(q, k, v, idx)
    y = listed_attention(q, k, v, idx, 0.3)
    want = _listed_formula(q, k, v, idx, 0.3)
    assert y.shape == (B, N, G * d) and y.dtype == torch.float32
    assert (y.double() - want).abs().max() < 1e-5
    w = torch.randn(y.shape, generator=g)
    (got,) = torch.autograd.grad((y * w).sum(), qkv)
    (ref,) = torch.autograd.grad((want * w.double()).sum(), qkv)
    assert (got.double() - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())


@needs_native
def test_listed_attention_in_threads_and_its_errors(monkeypatch):
    """Heads split over worker threads give the one thread's numbers bit for bit; the
    kernels refuse a listed key outside the keys, and a second derivative clearly."""
    from convnn.backends.chunked import listed_attention

    q, k, v = (torch.randn(4, 3, 30, 16, requires_grad=True) for _ in range(3))
    idx = torch.randint(0, 30, (4, 3, 30, 9))
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        y = listed_attention(q, k, v, idx, 0.25)
        runs.append((y, *torch.autograd.grad(y.square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="outside the keys"):
        listed_attention(q, k, v, idx.masked_fill(idx == 3, 30), 0.25)
    assert not native.listed_attention_usable(q, k, v, idx.int())  # int64 lists only
    assert not native.listed_attention_usable(q, k, v, idx[:2])  # 2 lists for 4 images
    for bad in (idx.int(), idx[:2], idx.float()):  # the op refuses what the kernel misreads
        with pytest.raises(ValueError, match="int64 idx"):
            torch.ops.convnn.listed_attention(q, k, v, bad, 0.25)
    assert not native.listed_attention_usable(q.double(), k.double(), v.double(), idx)
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    assert not native.listed_attention_usable(q, k, v, idx)


@needs_native
def test_listed_attention_second_derivative_in_place_output_and_far_keys():
    """A backward that builds a graph recomputes the output in torch operators, so a
    gradient penalty gets the float64 formula's second derivative; the output is the
    caller's to change in place (a residual added into it); a key scored far below its
    row's best gets no weight, as in softmax."""
    from convnn.backends.chunked import listed_attention

    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=gen, requires_grad=True) for _ in range(3))
    idx = torch.randint(0, 10, (2, 2, 10, 4), generator=gen)

    def penalty(f, args):
        (gq,) = torch.autograd.grad(f(*args, idx, 0.5).square().sum(), args[0], create_graph=True)
        return torch.autograd.grad(gq.square().sum(), args)

    got = penalty(listed_attention, (q, k, v))
    want = penalty(_listed_formula, tuple(t.detach().double().requires_grad_() for t in (q, k, v)))
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())
    y = listed_attention(q, k, v, idx, 0.5)
    y += 1.0  # a residual into the output
    (g,) = torch.autograd.grad(y.sum(), v)
    (h,) = torch.autograd.grad(_listed_formula(q, k, v, idx, 0.5).sum(), v)
    assert (g - h).abs().max() < 1e-5
    far = torch.zeros(1, 1, 1, 8)
    keys = torch.stack([torch.zeros(8), torch.full((8,), -20.0)])[None, None]  # scores 0, -160
    values = torch.tensor([[0.0], [1e30]]).expand(2, 8)[None, None].contiguous()
    out = listed_attention(far + 1.0, keys, values, torch.tensor([[[[0, 1]]]]), 1.0)
    assert out.abs().max() == 0  # e^-160 is 0 in float32, not the least normal float


@needs_native
@pytest.mark.parametrize(
    "options", [dict(), dict(include_self=True, metric="dot"), dict(candidates="window", window=5)]
)
def test_top_k_attention_layers_on_the_native_kernel(options):
    """ConvNN attention with softmax over its K selected keys, kernel 'none' (top-K attention,
    KVT), on the native kernel: the k-NN path's picks and, to float32 rounding, its output
    and gradients; timm's qkv layout read in place."""
    layer = convnn.ConvNNAttention(24, 3, K=9, kernel="none", **options)
    x = torch.randn(2, 64, 24, generator=torch.Generator().manual_seed(2)).requires_grad_()
    hw = (8, 8)
    assert explain_backend(layer, x, hw) == "native"
    runs = []
    for backend in ("auto", "chunked"):
        with convnn.backends.dispatch.use(backend):
            y, idx = layer(x, hw=hw, return_indices=True)
            runs.append((y, idx, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])))
    assert torch.equal(runs[0][1], runs[1][1])
    for a, b in zip(runs[0][:1] + runs[0][2:], runs[1][:1] + runs[1][2:]):
        assert (a - b).abs().max() < 2e-5 * max(1.0, b.abs().max().item())


@needs_native
def test_window_attention_on_the_native_kernel_is_sdpa_with_the_window_mask():
    """Softmax attention over each token's whole 7 x 7 window on a map where the window is
    a small share (14 x 14): the native kernel, against SDPA with the window mask on the
    same float32 heads (timm's qkv views), forward and the projection's gradient."""
    import torch.nn.functional as F

    from convnn.functional import convnn_attention
    from convnn.stages.candidates import Grid, window_mask

    B, G, H, d = 2, 3, 14, 16
    qkv = torch.randn(B, H * H, 3, G, d, generator=torch.Generator().manual_seed(3))
    qkv.requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    layer = convnn.ConvNNAttention(G * d, G, K=49, kernel="none", candidates="window", window=7)
    assert explain_backend(layer, torch.randn(B, H * H, G * d), (H, H)) == "native"
    y = convnn_attention(q, k, v, 49, candidates="window", window=7, hw=(H, H))
    mask = window_mask(Grid(H, H), 7, "cpu")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = want.transpose(1, 2).reshape(B, H * H, G * d)
    assert (y - want).abs().max() < 1e-5
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (got,) = torch.autograd.grad((y * w).sum(), qkv)
    (ref,) = torch.autograd.grad((want * w).sum(), qkv)
    assert (got - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())


@needs_native
def test_listed_attention_ops_in_compiled_graphs():
    """The native attention is one op forward and one backward (convnn::listed_attention and
    its gradient): their fake and real forms agree (opcheck, the heads as strided views and
    a shared list), and compiled top-K and window attention call it and give the eager
    outputs and gradients."""
    from convnn.backends import chunked  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 12, 3, 2, 8, generator=gen).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    for idx in (torch.randint(0, 12, (2, 2, 12, 5), generator=gen), torch.arange(12)[:, None]):
        idx = idx.expand(-1, 3) if idx.dim() == 2 else idx  # a shared list: (12, 3)
        idx = idx if idx.dim() == 4 else idx[None, None]
        torch.library.opcheck(torch.ops.convnn.listed_attention.default, (q, k, v, idx, 0.5))
        y, prob = torch.ops.convnn.listed_attention(q, k, v, idx, 0.5)
        grad = torch.randn(y.shape, generator=gen)
        for needs in ([True, True, True], [False, False, True]):
            qd, kd, vd, pd = (t.detach() for t in (q, k, v, prob))
            args = (grad, qd, kd, vd, idx, pd, 0.5, needs)
            torch.library.opcheck(torch.ops.convnn.listed_attention_grad.default, args)
    x = torch.randn(2, 144, 24, generator=gen).requires_grad_()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm

    for options in (dict(K=9), dict(K=25, candidates="window", window=5)):
        torch.manual_seed(0)
        layer = convnn.ConvNNAttention(24, 3, kernel="none", **options)
        seen.clear()
        for compiler in ("inductor", backend):
            torch._dynamo.reset()
            y = torch.compile(layer, backend=compiler)(x, hw=(12, 12))
            (g,) = torch.autograd.grad(y.square().sum(), x)
            y0 = layer(x, hw=(12, 12))
            (g0,) = torch.autograd.grad(y0.square().sum(), x)
            assert torch.equal(y, y0) and torch.equal(g, g0)
        op = torch.ops.convnn.listed_attention
        assert op in seen or op.default in seen
    torch._dynamo.reset()


def explain_backend(layer, x, hw) -> str:
    from convnn import explain

    return explain(layer, x, hw=hw)[-1].backend


def test_native_topk_status_and_switch(monkeypatch):
    scores = torch.randn(4, 10)
    if native._rank is None:
        assert "off" in native.status() and not native.usable(scores, 3, None)
        return
    assert native.status().startswith("native kernels: on")
    assert native.usable(scores, 3, None)
    assert not native.usable(scores.double(), 3, None)  # float64: the torch path
    assert not native.usable(scores, 0, None) and not native.usable(scores, 11, None)
    assert not native.usable(scores.bfloat16(), 3, torch.float16)  # a rounding it cannot do
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    assert "CONVNN_NATIVE=0" in native.status() and not native.usable(scores, 3, None)


def test_kernels_build_without_the_tile_instructions(tmp_path):
    """Where the assembler lacks the AMX instructions (binutils before 2.36), the kernels
    still build with CONVNN_NO_AMX, which setup.py adds when the first build fails: an
    assembler told to know only AVX-512 rejects the AMX build and takes the other."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None or sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86-64 Linux")
    source = pathlib.Path(native.__file__).with_name("_rank.c")
    isa = "generic64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+bmi+bmi2+lzcnt+popcnt+f16c"
    base = [compiler, "-O0", "-std=c99", "-shared", "-fPIC", f"-Wa,-march={isa}"]
    base += [f"-I{sysconfig.get_paths()['include']}", str(source)]
    built = [
        subprocess.run([*base, *flag, "-o", str(tmp_path / f"r{i}.so")], capture_output=True)
        for i, flag in enumerate(([], ["-DCONVNN_NO_AMX"]))
    ]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    major = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True).stdout
    if "clang" not in version and int(major.split(".")[0] or 0) >= 11:  # it emits them
        assert built[0].returncode != 0 and b"tile" in built[0].stderr
    assert built[1].returncode == 0, built[1].stderr.decode()[-2000:]


def test_native_topk_is_built_where_a_c_compiler_is():
    """The install builds the kernel whenever it can: a missing build step shows here, not
    as a silently slower library."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: {native.status()}")
    assert native._rank is not None, native.status()


def test_compile_caches_are_keyed_on_the_ops_sources(tmp_path, monkeypatch):
    """torch.compile's cache key tag carries a digest of the files that define convnn's ops
    and the native kernels, beside the user's own tag: a changed op (its backward, its fake
    layout) compiles afresh where its cached graph would call it as it was."""
    from convnn.backends import chunked  # noqa: F401  (registers the ops)
    from convnn.stages import similarity  # noqa: F401  (registers one more)

    config = torch.compiler.config
    ours = [t for t in config.cache_key_tag.split(";") if t.startswith("convnn-ops-")]
    assert len(ours) == 1
    kernels = [] if native._rank is None else [os.path.basename(native._rank.__file__)]
    assert {os.path.basename(f) for f in native._OP_FILES} == {
        "chunked.py", "native.py", "similarity.py", *kernels
    }  # fmt: skip
    monkeypatch.setattr(native, "_OP_FILES", set(native._OP_FILES))
    before = config.cache_key_tag
    # config.patch, not monkeypatch: undoing a monkeypatch of a config module deletes the
    # entry, which hides it from every later compile of the session
    with config.patch(cache_key_tag=f"mine;;yours;{ours[0]}"):
        extra = tmp_path / "ops.py"
        extra.write_text("one")
        native.key_compile_caches(str(extra))
        *theirs, first = config.cache_key_tag.split(";")
        assert theirs == ["mine", "", "yours"]  # kept as they are
        assert first.startswith("convnn-ops-") and first != ours[0]
        extra.write_text("two")
        native.key_compile_caches(str(extra))
        *theirs, second = config.cache_key_tag.split(";")
        assert theirs == ["mine", "", "yours"] and second not in (first, ours[0])
        native.key_compile_caches(str(tmp_path / "missing.py"))  # unreadable: keyed on its name
        assert config.cache_key_tag.split(";")[-1] not in (first, second)
    assert config.cache_key_tag == before


@needs_gemm_topk
def test_native_paths_keep_float32_under_a_float64_default():
    """The kernels' buffers take their operands' dtype, not torch's default: a float32 layer
    gives the same output and gradients under ``torch.set_default_dtype(torch.float64)``."""
    torch.manual_seed(0)
    layer = convnn.ConvNN2d(5, 6, 3, padding=1)
    x = torch.randn(2, 5, 6, 7, requires_grad=True)

    def run():
        y = layer(x)
        return [y, *torch.autograd.grad(y.square().sum(), [x, layer.weight])]

    want = run()
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = run()
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_forward_mode_ad_through_the_token_copy():
    """Forward-mode AD carries the tangent through a map's token copy (the native copy op
    has no forward rule, so it steps aside): the reference backend's tangent against the
    float64 one."""
    import torch.autograd.forward_ad as fwAD

    import convnn.functional as Fn

    torch.manual_seed(0)
    x, dx = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    w, b = torch.randn(6, 5, 9), torch.randn(6)

    def tangent(dtype):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.to(dtype), dx.to(dtype))
            y = Fn.convnn2d(dual, w.to(dtype), b.to(dtype), K=9, padding=1, backend="reference")
            return fwAD.unpack_dual(y).tangent

    got, want = tangent(torch.float32), tangent(torch.float64)
    assert got is not None
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
