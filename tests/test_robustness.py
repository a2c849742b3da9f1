"""Nothing crashes and nothing is silently wrong: empty batches, bad neighbour indices, scores
that overflow to -inf, ties between candidates, backend agreement, per-thread backends and
compiled attention on several sequence lengths (each test reproduces a reported failure)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _helpers import BACKENDS, natten_mask, on_backend, randn

from convnn import Branching2d, BranchingAttention, ConvNN2d, ConvNNAttention
from convnn.backends import chunked
from convnn.functional import knn_select

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Every backend, triton included where it is installed (on the CPU under TRITON_INTERPRET=1).
ALL_BACKENDS = BACKENDS + (("triton",) if HAS_TRITON else ())
REAL_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "auto")


# --------------------------------------------------------------------------- empty batches


def _empty_batch_backward(layer, x):
    """Forward and backward on B = 0: empty outputs, zero parameter gradients."""
    y = layer(x)
    assert y.shape[0] == 0
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.sum(), [x, *params], allow_unused=True, materialize_grads=True)
    assert grads[0].shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])
    return y


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_empty_batch_backward_default_kernel(backend):
    """ConvNNAttention(8, 2, K=4) (depthwise kernel, softmax) on B = 0, forward and backward."""
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=4)
    with on_backend(backend):
        y = _empty_batch_backward(layer, torch.randn(0, 5, 8, requires_grad=True))
    assert y.shape == (0, 5, 8)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_conv_empty_batch_spatial_softmax(backend):
    torch.manual_seed(0)
    layer = ConvNN2d(3, 3, K=4, metric="spatial", weighting="softmax")
    with on_backend(backend):
        y = _empty_batch_backward(layer, torch.randn(0, 3, 4, 4, requires_grad=True))
    assert y.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_branching_empty_batch(backend):
    torch.manual_seed(0)
    with on_backend(backend):
        y = _empty_batch_backward(
            BranchingAttention(8, 2, K=3), torch.randn(0, 5, 8).requires_grad_()
        )
        assert y.shape == (0, 5, 8)
        y = _empty_batch_backward(Branching2d(3, 4, K=4), torch.randn(0, 3, 5, 5).requires_grad_())
        assert y.shape == (0, 4, 5, 5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_select_empty_batch():
    """The Triton selection's host code sizes its launch grid by the batch (it divided by 0)."""
    from convnn.backends import triton as tb

    assert tb.select(torch.randn(0, 5, 4), torch.randn(0, 7, 4), 3).shape == (0, 5, 3)


# --------------------------------------------------------------------------- -inf scores


def _overflowing_map(dtype_case: str):
    """A 6 x 6 map whose similarities overflow the ranking dtype to -inf (and NaN)."""
    x = randn(1, 8, 6, 6, seed=40, dtype=torch.float32)
    if dtype_case == "float16":
        return x * 100, torch.float16
    return x * 1e20, torch.float32


@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize("dtype_case", ["float16", "float32"])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_masked_candidates_never_beat_real_minus_inf(backend, dtype_case, metric):
    """Window candidates, self first: the other neighbours lie inside the window and never
    repeat, even where every real similarity is -inf (the reference picked tokens outside the
    window, the chunked backend repeated the query itself)."""
    x, sel = _overflowing_map(dtype_case)
    torch.manual_seed(0)
    layer = ConvNN2d(8, 8, K=5, candidates="window", window=3, metric=metric, selection_dtype=sel)
    with on_backend(backend):
        _, idx = layer(x, return_indices=True)
    mask = natten_mask(6, 6, 3)
    for n in range(36):
        row = idx[0, n].tolist()
        assert row[0] == n and len(set(row)) == 5, (n, row)
        assert mask[n, row].all(), (n, row)


@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize("metric", ["dot", "euclidean"])
@pytest.mark.parametrize("dtype_case", ["float16", "float32"])
def test_excluded_self_never_repeats(backend, metric, dtype_case):
    """include_self: the query is excluded from the others even when every similarity is -inf
    (the backends picked the excluded query again, a repeated neighbour)."""
    scale, sel = (100.0, torch.float16) if dtype_case == "float16" else (1e20, torch.float32)
    query = torch.full((1, 4, 8), scale)
    key = torch.cat([-query, torch.full((1, 3, 8), -scale)], 1)  # every dot product overflows
    with on_backend(backend):
        _, idx = knn_select(
            query,
            key,
            3,
            metric=metric,
            include_self=True,
            self_index=torch.arange(4),
            selection_dtype=sel,
        )
    for n, row in enumerate(idx[0].tolist()):
        assert row[0] == n and len(set(row)) == 3, (n, row)


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_ties_go_to_the_lower_key_index_with_unsorted_candidates(backend):
    """Two identical keys tie; the lower *key index* wins, whatever the candidates' order."""
    k = randn(1, 5, 3, seed=41, dtype=torch.float32)
    k[0, 1] = k[0, 0]
    q = k[:, :1] + 0.01
    for candidates in (torch.tensor([[1, 0, 2]]), torch.tensor([3, 1, 0])):
        _, idx = knn_select(q, k, 1, candidates=candidates, backend=backend)
        assert idx.tolist() == [[[0]]], (candidates, idx)
        _, idx = knn_select(q, k, 2, candidates=candidates, backend=backend)
        assert idx.tolist() == [[[0, 1]]], (candidates, idx)


@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_nan_ties_are_chosen_alike_on_every_backend(monkeypatch, blocks):
    """Keys with NaN features tie (NaN ranks first): every backend keeps the lowest-index ones,
    whatever its block sizes, so gradients reach the same tokens."""
    if blocks == "tiny":
        monkeypatch.setattr(chunked, "KEY_BLOCK", 3)
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4)
    key = randn(2, 11, 4, seed=42)
    key[:, [2, 5, 6, 9]] = float("nan")

    def run(backend):
        k = key.clone().requires_grad_()
        q = randn(2, 3, 4, seed=43).requires_grad_()
        scores, idx = knn_select(q, k, 3, metric="dot", backend=backend)
        (g,) = torch.autograd.grad(scores.nan_to_num().sum(), [k])
        return idx, g.isnan()

    want = run("reference")
    assert (want[0] == torch.tensor([2, 5, 6])).all()
    for backend in REAL_BACKENDS:
        got = run(backend)
        assert torch.equal(got[0], want[0]), backend
        assert torch.equal(got[1], want[1]), backend
