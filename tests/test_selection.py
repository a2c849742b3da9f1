"""Selection: which neighbours each query picks, checked against brute-force similarities."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    BACKENDS,
    F64,
    gather_tokens,
    max_diff,
    natten_mask,
    on_backend,
    padded_tokens,
    randn,
    similarity,
)
from torch import nn

from convnn import ConvNN2d
from convnn.functional import Grid, candidate_count, convnn2d, knn_select

SLACK = 1e-9  # the library ranks bilinear forms; allow rounding against the direct formula


def assert_valid_topk(scores: torch.Tensor, idx: torch.Tensor, include_self: bool, self_idx):
    """scores (N, M) brute-force similarities, idx (N, K) selected slots of one image.

    Checks: distinct indices, self in slot 0 (when include_self), the other slots descending
    and every selected score >= every unselected (non-self) score.
    """
    N, K = idx.shape
    for n in range(N):
        row = idx[n].tolist()
        assert len(set(row)) == K, f"query {n}: repeated neighbours {row}"
        others = row
        allowed = torch.ones(scores.shape[1], dtype=torch.bool)
        if include_self:
            assert row[0] == self_idx[n], f"query {n}: slot 0 is {row[0]}, not itself"
            others = row[1:]
            allowed[self_idx[n]] = False
        s = scores[n, others]
        assert (s[:-1] >= s[1:] - SLACK).all(), f"query {n}: slots not descending {s.tolist()}"
        unselected = allowed.clone()
        unselected[others] = False
        if unselected.any() and others:
            assert s.min() >= scores[n, unselected].max() - SLACK, f"query {n}: not a top-K"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
@pytest.mark.parametrize("K", [1, 2, 5])
def test_feature_selection_is_topk_with_self_first(backend, metric, K):
    torch.manual_seed(0)
    layer = ConvNN2d(3, 4, K=K, metric=metric, include_self=True).to(F64)
    x = randn(2, 3, 4, 6, seed=K)
    with on_backend(backend):
        y, idx = layer(x, return_indices=True)
    assert idx.shape == (2, 24, K)
    tokens = padded_tokens(x, 0)
    sims = similarity(metric, tokens, tokens)
    for b in range(2):
        assert_valid_topk(sims[b], idx[b], True, list(range(24)))
    # the output aggregates exactly those neighbours: y_n = sum_k W[:, :, k] v_{idx_nk} + b
    gathered = gather_tokens(tokens, idx)  # (B, N, K, C)
    ref = torch.einsum("bnkc,ock->bon", gathered, layer.weight) + layer.bias[:, None]
    assert max_diff(y.flatten(2), ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot", "scaled_dot"])
@pytest.mark.parametrize("stride", [1, 2])
def test_selection_without_self_over_padded_map(backend, metric, stride):
    """include_self=False: the K best of every padded-map token (zero padding included)."""
    x = randn(1, 2, 5, 4, seed=3)
    weight = randn(2, 1, 4, seed=4)
    with on_backend(backend):
        y, idx = convnn2d(
            x,
            weight,
            None,
            4,
            stride,
            1,
            metric=metric,
            include_self=False,
            kernel="depthwise",
            return_indices=True,
        )
    tokens = padded_tokens(x, 1)  # (1, 42, 2)
    queries = [(r + 1) * 6 + (c + 1) for r in range(0, 5, stride) for c in range(0, 4, stride)]
    sims = similarity(metric, tokens[:, queries], tokens)[0]
    assert_valid_topk(sims, idx[0], False, queries)
    gathered = gather_tokens(tokens, idx)  # (1, N, K, C)
    ref = torch.einsum("bnkc,ck->bcn", gathered, weight[:, 0])
    assert max_diff(y.flatten(2), ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_weighting_uses_selected_scores(backend):
    """weighting='softmax': rho = softmax over the K selected similarities."""
    x = randn(2, 3, 4, 4, seed=5)
    with on_backend(backend):
        y, idx = convnn2d(
            x, None, None, 3, metric="cosine", kernel="none", weighting="softmax",
            return_indices=True,
        )  # fmt: skip
    tokens = padded_tokens(x, 0)
    sims = similarity("cosine", tokens, tokens)
    rho = sims.gather(-1, idx).softmax(-1)  # (B, N, K)
    ref = torch.einsum("bnk,bnkc->bcn", rho, gather_tokens(tokens, idx))
    assert max_diff(y.flatten(2), ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [3, 5])
def test_spatial_slots_are_conv_taps_in_raster_order(backend, k):
    """metric='spatial', K = k*k: slot t is tap (t // k, t % k) of a flattened conv kernel."""
    H, W, p = 5, 7, k // 2
    layer = ConvNN2d(2, 2, K=k * k, padding=p, metric="spatial").to(F64)
    with on_backend(backend):
        _, idx = layer(randn(1, 2, H, W), return_indices=True)
    Wp = W + 2 * p
    expected = torch.tensor(
        [
            [(r + dy) * Wp + (c + dx) for dy in range(k) for dx in range(k)]
            for r in range(H)
            for c in range(W)
        ]
    )
    assert torch.equal(idx[0], expected)


# --------------------------------------------------------------------------- knn_select


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot", "scaled_dot"])
def test_knn_select_cross_attention_shapes(backend, metric):
    """N queries against M != N keys: indices and differentiable scores of the top-K."""
    q = randn(2, 5, 3, seed=1).requires_grad_()
    k = randn(2, 9, 3, seed=2).requires_grad_()
    scores, idx = knn_select(q, k, 4, metric=metric, backend=backend)
    sims = similarity(metric, q.detach(), k.detach())
    for b in range(2):
        assert_valid_topk(sims[b], idx[b], False, None)
    assert max_diff(scores.detach(), sims.gather(-1, idx)) < 1e-10
    # gradients flow through the recomputed scores
    (scores * randn(2, 5, 4, seed=3)).sum().backward()
    assert q.grad is not None and k.grad is not None
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_knn_select_shared_and_per_query_candidates(backend):
    q = randn(1, 6, 4, seed=4)
    sims = similarity("cosine", q, q)[0]
    shared = torch.tensor([0, 2, 3, 5])
    _, idx = knn_select(q, q, 3, candidates=shared, backend=backend)
    for n in range(6):
        ranked = shared[sims[n, shared].argsort(descending=True)][:3]
        assert idx[0, n].tolist() == ranked.tolist()
    per_query = torch.tensor([[(n + j) % 6 for j in range(3)] for n in range(6)])
    _, idx = knn_select(q, q, 2, candidates=per_query, backend=backend)
    for n in range(6):
        ranked = per_query[n][sims[n, per_query[n]].argsort(descending=True)][:2]
        assert idx[0, n].tolist() == ranked.tolist()
    _, idx = knn_select(q, q, 3, include_self=True, backend=backend)
    assert idx[0, :, 0].tolist() == list(range(6))
    assert_valid_topk(sims, idx[0], True, list(range(6)))


# --------------------------------------------------------------------------- candidates


def _random_layer(num=8, **kw):
    return ConvNN2d(2, 2, K=num, candidates="random", num_candidates=num, include_self=False, **kw)


def test_random_candidates_redrawn_in_training_seedable():
    layer = _random_layer().to(F64).train()
    x = randn(2, 2, 8, 8, seed=6)

    def draw():
        _, idx = layer(x, return_indices=True)
        sets = {frozenset(row.tolist()) for row in idx.reshape(-1, idx.shape[-1])}
        assert len(sets) == 1, "candidates must be shared by the batch and every query"
        (cand,) = sets
        assert len(cand) == 8 and all(0 <= i < 64 for i in cand)
        return cand

    first, second = draw(), draw()
    assert first != second, "training must redraw the random candidates every forward"
    torch.manual_seed(123)
    a = draw()
    torch.manual_seed(123)
    b = draw()
    assert a == b, "torch.manual_seed must make the draw reproducible"


def test_random_candidates_fixed_in_eval():
    layer = _random_layer().to(F64).eval()
    x = randn(2, 2, 8, 8, seed=7)
    torch.manual_seed(1)
    y1, i1 = layer(x, return_indices=True)
    torch.manual_seed(2)
    y2, i2 = layer(x, return_indices=True)
    y3, i3 = layer(x, return_indices=True)
    assert torch.equal(i1, i2) and torch.equal(i1, i3)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    fresh = _random_layer().to(F64).eval()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y1)


@pytest.mark.parametrize("hw", [(6, 20), (20, 6), (7, 7), (3, 17)])
@pytest.mark.parametrize("num", [6, 12, 24])
@pytest.mark.parametrize("padding", [0, 1])
def test_grid_candidates_cover_non_square_maps(hw, num, padding):
    H, W = hw
    n = candidate_count(Grid(H, W, padding, padding), "grid", num, None)
    assert num / 2 <= n <= 2 * num, f"about {num} candidates, got {n}"
    layer = ConvNN2d(
        2, 2, K=n, padding=padding, candidates="grid", num_candidates=num, include_self=False
    ).to(F64)
    _, idx = layer(randn(1, 2, H, W, seed=8), return_indices=True)
    Wp = W + 2 * padding
    cand = torch.tensor(sorted(set(idx[0].flatten().tolist())))
    assert len(cand) == n
    rows, cols = cand // Wp - padding, cand % Wp - padding
    # within the unpadded map
    assert rows.min() >= 0 and rows.max() < H and cols.min() >= 0 and cols.max() < W
    # spread over the whole map in both directions, matching its aspect ratio
    for pos, extent in ((rows, H), (cols, W)):
        lines = pos.unique()
        want = min(extent, max(1, round((n * extent / (H * W / extent)) ** 0.5)))
        assert len(lines) >= max(1, want // 2), f"{len(lines)} lines over an extent {extent}"
        if len(lines) > 1:
            assert lines.min() < extent / 2 <= lines.max() + 1
            gap = extent / len(lines)
            assert lines.min() <= gap and lines.max() >= extent - gap - 1
    # a lattice: every (row, col) pair of its lines
    assert len(cand) == len(rows.unique()) * len(cols.unique())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(5, 7), (3, 3), (6, 4)])
@pytest.mark.parametrize("window", [1, 3])
def test_window_candidates_stay_inside_the_map(backend, hw, window):
    H, W = hw
    K = window * window
    layer = ConvNN2d(2, 2, K=K, candidates="window", window=window, include_self=False)
    with on_backend(backend):
        _, idx = layer.to(F64)(randn(1, 2, H, W, seed=9), return_indices=True)
    mask = natten_mask(H, W, window)
    for n in range(H * W):
        assert sorted(idx[0, n].tolist()) == mask[n].nonzero().flatten().tolist()


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_input_does_not_crash_selection(backend, bad):
    """A NaN (or inf, which normalises to NaN) token has NaN similarity to every query.

    Documented (knn_select): NaN similarities rank first, so every query whose candidates
    include the bad token selects it and its output is NaN; queries whose candidates avoid
    it stay finite. Affected outputs are NaN (or +-inf where the input held inf).
    """
    x = randn(1, 3, 5, 5, seed=10)
    x[0, :, 2, 1] = bad
    bad_index = 2 * 5 + 1
    with on_backend(backend):
        y_all, idx_all = ConvNN2d(3, 3, K=3).to(F64)(x, return_indices=True)
        y_win, idx_win = ConvNN2d(3, 3, K=3, candidates="window", window=3).to(F64)(
            x, return_indices=True
        )
    assert y_all.shape == y_win.shape == (1, 3, 5, 5)
    # candidates 'all': the bad token is everyone's first pick after themselves
    others = [n for n in range(25) if n != bad_index]
    assert (idx_all[0, others, 0] == torch.tensor(others)).all()
    assert (idx_all[0, others, 1] == bad_index).all()
    assert not y_all.isfinite().any()  # NaN, or +-inf for an inf input
    # window: NaN exactly where the 3x3 window holds the bad token
    reach = natten_mask(5, 5, 3)[:, bad_index].view(5, 5)
    assert torch.equal(~y_win[0].isfinite().all(0), reach)
    assert y_win[0][:, ~reach].isfinite().all()
    assert (idx_win[0, reach.flatten() & (torch.arange(25) != bad_index), 1] == bad_index).all()


def test_narrower_selection_rounds_the_metric_operands_once():
    """A half selection dtype: the metric's GEMM operands are formed in float32 (of half
    features too) and rounded once (cosine: the float32 normalisation, rounded), and
    self-similarity stays one operand (the one-pass kernel's symmetric form); float32
    selection of half features casts the features first."""
    from convnn.metrics import get_metric
    from convnn.stages.similarity import selection_scores

    x = randn(2, 30, 8, seed=4).float()
    cos = get_metric("cosine")
    s = selection_scores(cos, x, x, torch.bfloat16)
    assert s.key is s.query and s.query.dtype == torch.bfloat16
    assert torch.equal(s.query, torch.nn.functional.normalize(x, dim=-1).bfloat16())
    k = randn(2, 20, 8, seed=5).float()
    s = selection_scores(get_metric("euclidean"), x, k, torch.bfloat16)
    assert torch.equal(s.key[..., -1], k.pow(2).sum(-1).bfloat16())
    wide = selection_scores(cos, x.bfloat16(), x.bfloat16(), None)  # float32 selection
    assert torch.equal(wide.query, torch.nn.functional.normalize(x.bfloat16().float(), dim=-1))
    h = x.half()  # half features, half selection: formed in float32 all the same
    s = selection_scores(cos, h, h, torch.float16)
    assert torch.equal(s.query, torch.nn.functional.normalize(h.float(), dim=-1).half())


def test_half_scores_are_judged_finite_in_their_own_dtype():
    """Whether every score is finite is judged against the scores' dtype, also from float32
    copies of half features (what the GEMM multiplies where half GEMMs are emulated): fp16
    products past 65504 / 4 are not; a NaN feature never is. GemmScores asks it so."""
    from convnn.metrics import GemmScores, finite_products

    q, k = randn(2, 30, 8, seed=1) * 80, randn(2, 20, 8, seed=2) * 80  # |q| |k| ~ 8 * 80^2
    wide_q, wide_k = q.half().float(), k.half().float()
    assert finite_products(wide_q, wide_k)  # in float32
    assert not finite_products(wide_q, wide_k, torch.float16)
    assert finite_products(wide_q, wide_k, torch.bfloat16)
    assert not finite_products(q.half(), k.half())
    for dtype, finite in ((torch.float16, False), (torch.bfloat16, True)):
        assert GemmScores(q.to(dtype), k.to(dtype))._finite is finite
        assert GemmScores(q.to(dtype) / 80, k.to(dtype) / 80)._finite is True
    wide_q[1, 3, 2] = float("nan")
    assert not finite_products(wide_q, wide_k, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_under_spatial_metric_matches_conv(backend):
    """Spatial selection ignores values: NaN spreads exactly as nn.Conv2d spreads it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, 1, 1).to(F64)
    layer = ConvNN2d.from_conv2d(conv)
    x = randn(1, 2, 6, 7, seed=11)
    x[0, 0, 1, 5] = float("nan")
    x[0, 1, 4, 0] = float("inf")
    with on_backend(backend):
        y = layer(x)
    ref = conv(x)
    assert torch.equal(y.isnan(), ref.isnan())
    finite = ref.isfinite()
    assert max_diff(y[finite], ref[finite]) < 1e-9


@pytest.mark.parametrize("training", [True, False])
def test_random_candidates_are_original_positions(training):
    """With padding, random candidates are drawn from the unpadded map only."""
    layer = _random_layer(num=10, padding=2).to(F64).train(training)
    for seed in range(5):
        torch.manual_seed(seed)
        _, idx = layer(randn(1, 2, 4, 5, seed=seed), return_indices=True)
        rows, cols = idx.div(5 + 4, rounding_mode="floor") - 2, idx % (5 + 4) - 2
        assert rows.min() >= 0 and rows.max() < 4 and cols.min() >= 0 and cols.max() < 5
        assert len(set(idx[0].flatten().tolist())) == 10


@pytest.mark.parametrize("compiled", [False, True])
def test_topk_low_ties_keeps_lower_indices(compiled):
    """Scores drawn from four values tie everywhere: the K kept are the K first of a stable
    descending sort, in eager mode and in a compiled graph (which takes a branch-free path)."""
    from convnn.backends._common import topk_low_ties

    torch._dynamo.reset()
    scores = torch.randint(0, 4, (3, 5, 40), generator=torch.Generator().manual_seed(0)).double()
    fn = torch.compile(topk_low_ties, backend="aot_eager", fullgraph=True) if compiled else None
    vals, idx = (fn or topk_low_ties)(scores, 7)
    want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :7]
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert torch.equal(vals, scores.gather(-1, idx))
    torch._dynamo.reset()
