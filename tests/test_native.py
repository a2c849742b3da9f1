"""The native CPU top-K (convnn.native, _rank.c) picks what the torch path picks.

Each case is checked three ways: against a float64 formula written here from the tie rule
(a stable sort of the negated scores: descending score, equal scores by lower position),
against the torch path of ``topk_low_ties`` (``CONVNN_NATIVE=0``), and, for layers, against
the same layer run on the torch path, bit for bit.
"""

from __future__ import annotations

import shutil
import sysconfig
import threading

import pytest
import torch

import convnn
from convnn import native
from convnn.backends import _common

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
        dict(K=9, metric="cosine", candidates="all"),
        dict(K=9, metric="dot", candidates="window", window=5),
        dict(K=5, metric="cosine", candidates="all", selection_dtype=torch.bfloat16),
    ],
    ids=["all", "window", "bf16-selection"],
)
def test_layers_are_the_same_with_and_without_the_native_kernels(opts, monkeypatch):
    """Outputs and gradients bit for bit. The window case takes small integer features: its
    dot products are exact both ways (the native kernel and the torch path sum in different
    orders, which rounds differently on other inputs), and full of exact ties."""
    torch.manual_seed(0)
    layer = convnn.ConvNN2d(8, 8, **opts)
    x = torch.randn(2, 8, 20, 20)
    if opts["candidates"] == "window":
        x = torch.randint(-2, 3, x.shape).float()
    x.requires_grad_()
    y = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    y0 = layer(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    assert torch.equal(y, y0) and torch.equal(g, g0)


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
    own[..., 0], own[..., 1] = 12, 42  # equal keys in every row
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
    assert torch.equal(same[..., 0], same[..., 1])
    with pytest.raises(ValueError, match="outside the keys"):
        native.window_scores(q, k, shared.masked_fill(shared == 7, 50))
    with torch.enable_grad():  # a differentiable call keeps the torch path
        assert native.window_scores(q.requires_grad_(), k, shared) is None


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


def test_native_topk_is_built_where_a_c_compiler_is():
    """The install builds the kernel whenever it can: a missing build step shows here, not
    as a silently slower library."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: {native.status()}")
    assert native._rank is not None, native.status()
