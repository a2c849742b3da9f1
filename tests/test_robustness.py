"""Nothing crashes and nothing is silently wrong: empty batches, bad neighbour indices, scores
that overflow to -inf, ties between candidates, backend agreement, per-thread backends and
compiled attention on several sequence lengths (each test reproduces a reported failure)."""

from __future__ import annotations

import importlib.util
import threading
import warnings

import pytest
import torch
from _helpers import BACKENDS, F64, natten_mask, on_backend, randn

from convnn import Branching2d, BranchingAttention, ConvNN1d, ConvNN2d, ConvNNAttention, backends
from convnn.backends import chunked
from convnn.functional import convnn2d, convnn_attention, knn_select, neighbor_aggregate

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


# --------------------------------------------------------------------------- indices


@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize(
    ("indices", "fragment"),
    [
        (torch.tensor([[[4]], [[0]]]), "from 0 to 4"),  # read the next batch element's token
        (torch.tensor([[[-1]], [[0]]]), "from -1 to 0"),  # read the previous one's
        (torch.tensor([[[7]], [[0]]]), "from 0 to 7"),  # past the end of every batch element
        (torch.tensor([[[1.0]], [[0.0]]]), "torch.float32"),
        (torch.tensor([[[True]], [[False]]]), "torch.bool"),
    ],
)
def test_neighbor_aggregate_rejects_bad_indices(backend, indices, fragment):
    """Indices must be integers in [0, M) per batch element, on every backend."""
    values = torch.arange(6.0).view(2, 3, 1)
    with pytest.raises(ValueError, match="indices") as err:
        neighbor_aggregate(values, indices, kernel="none", backend=backend)
    assert fragment in str(err.value) and (
        "[0, 3)" in str(err.value) or "integer" in str(err.value)
    )


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_neighbor_aggregate_accepts_int32_indices(backend):
    values = randn(2, 3, 2, dtype=torch.float32)
    idx = torch.tensor([[[2, 0]], [[1, 1]]])
    want = neighbor_aggregate(values, idx, kernel="none", backend="reference")
    got = neighbor_aggregate(values, idx.int(), kernel="none", backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(want, torch.stack([values[0, 2] + values[0, 0], 2 * values[1, 1]])[:, None])


def test_index_check_compiles():
    """In a compiled graph the check is an assert inside the graph, not a graph break."""
    torch._dynamo.reset()
    fn = torch.compile(neighbor_aggregate, backend="aot_eager", fullgraph=True)
    values = randn(2, 3, 2)
    idx = torch.tensor([[[2, 0]], [[1, 1]]])
    assert torch.equal(
        fn(values, idx, kernel="none"), neighbor_aggregate(values, idx, kernel="none")
    )
    with pytest.raises(RuntimeError, match="indices"):
        fn(values, idx + 2, kernel="none")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_knn_select_rejects_bad_candidates(backend):
    q = randn(1, 4, 3, dtype=torch.float32)
    for bad, fragment in [
        (torch.tensor([0, 4]), "from 0 to 4"),
        (torch.tensor([-1, 2]), "from -1 to 2"),
        (torch.tensor([0.0, 1.0]), "float32"),
        (torch.tensor([1, 2, 1]), "1 twice"),
        (torch.tensor([[0, 1], [1, 1], [2, 3], [3, 0]]), "1 twice"),
        (torch.tensor([[0, 1], [1, 2]]), "N = 4"),
    ]:
        with pytest.raises(ValueError, match="candidates") as err:
            knn_select(q, q, 1, candidates=bad, backend=backend)
        assert fragment in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="self_index"):
        knn_select(q, q, 1, include_self=True, self_index=torch.tensor([0, 1, 2, 4]))


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


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_window_ties_are_broken_alike(metric):
    """Scores equal in exact arithmetic must be equal bit for bit on every backend: coords
    with lam = 1 rank by position only, so a 3 x 3 window holds exact ties; the reference's
    dense GEMM gave +-1e-8 where the chunked backend gave 0, and they kept different tokens."""
    x = randn(1, 4, 3, 2, seed=770, dtype=torch.float32)
    options = dict(K=6, metric=metric, candidates="window", window=3, include_self=False)
    options.update(coords="xy", lam=1.0, padding=(0, 1), kernel="none", return_indices=True)
    _, want = convnn2d(x, None, backend="reference", **options)
    for backend in REAL_BACKENDS:
        assert torch.equal(convnn2d(x, None, backend=backend, **options)[1], want), backend


@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_nan_ties_are_chosen_alike_on_every_backend(monkeypatch, blocks):
    """Keys with NaN features tie (NaN ranks first): every backend keeps the lowest-index ones,
    whatever its block sizes, so gradients reach the same tokens."""
    if blocks == "tiny":
        monkeypatch.setattr(chunked, "KEY_BLOCK", 3)
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4)
    key = randn(2, 11, 4, seed=42, dtype=torch.float32)  # a dtype every backend runs
    key[:, [2, 5, 6, 9]] = float("nan")

    def run(backend):
        k = key.clone().requires_grad_()
        q = randn(2, 3, 4, seed=43, dtype=torch.float32).requires_grad_()
        scores, idx = knn_select(q, k, 3, metric="dot", backend=backend)
        (g,) = torch.autograd.grad(scores.nan_to_num().sum(), [k])
        return idx, g.isnan()

    want = run("reference")
    assert (want[0] == torch.tensor([2, 5, 6])).all()
    for backend in REAL_BACKENDS:
        got = run(backend)
        assert torch.equal(got[0], want[0]), backend
        assert torch.equal(got[1], want[1]), backend


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("kernel", ["standard", "depthwise", "separable", "none"])
def test_aggregate_dtype_under_autocast_is_the_same_on_every_backend(kernel):
    """Like F.conv1d / F.linear under autocast: bf16 output (fp32 accumulation) everywhere."""
    C, K = 4, 3
    values = randn(2, 5, C, dtype=torch.float32)
    idx = torch.randint(0, 5, (2, 3, K), generator=torch.Generator().manual_seed(0))
    weight = {
        "standard": randn(6, C, K, dtype=torch.float32),
        "none": None,
    }.get(kernel, randn(C, 1, K, dtype=torch.float32))
    pointwise = randn(6, C, 1, dtype=torch.float32) if kernel == "separable" else None
    bias = randn(C if kernel in ("none", "depthwise") else 6, dtype=torch.float32)
    outs = {}
    for backend in REAL_BACKENDS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = neighbor_aggregate(
                values,
                idx,
                weight,
                bias,
                kernel=kernel,
                pointwise_weight=pointwise,
                backend=backend,
            )
    assert {b: y.dtype for b, y in outs.items()} == {b: torch.bfloat16 for b in outs}
    for y in outs.values():
        torch.testing.assert_close(y.float(), outs["reference"].float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_wrong_length_bias_is_rejected(backend):
    values, idx = randn(1, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long)
    for kernel, weight, bias in [
        ("none", None, randn(1)),
        ("depthwise", randn(4, 1, 2), randn(3)),
        ("standard", randn(6, 4, 2), randn(4)),
        ("standard", randn(6, 4, 2), randn(6, 1)),
    ]:
        with pytest.raises(ValueError, match="bias") as err:
            neighbor_aggregate(values, idx, weight, bias, kernel=kernel, backend=backend)
        assert str(tuple(bias.shape)) in str(err.value)
    with pytest.raises(ValueError, match="bias"):
        convnn2d(randn(1, 4, 3, 3), randn(6, 4, 2), randn(1), K=2, backend=backend)
    q = randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="bias"):
        convnn_attention(q, q, q, 2, bias=randn(1), backend=backend)


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize(
    "options",
    [dict(K=3), dict(K=None, kernel="none"), dict(K=4, candidates="random", num_candidates=5)],
)
def test_compiled_attention_on_two_sequence_lengths(options):
    """fullgraph compile with no map shape: the second length traces (math.isqrt did not)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, **options).to(F64).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for i, N in enumerate([9, 12, 7]):
        x = randn(2, N, 8, seed=i)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_compiled_window_attention_on_two_map_shapes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=4, candidates="window", window=3).to(F64).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for i, hw in enumerate([(3, 4), (4, 5), (5, 3)]):
        x = randn(2, hw[0] * hw[1], 8, seed=i)
        torch.testing.assert_close(compiled(x, hw=hw), layer(x, hw=hw), rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_square_guess_is_deprecated_where_it_matters():
    """Only a layout-reading option (window, grid, spatial) guesses a square map, and warns."""
    q = randn(1, 2, 9, 4)
    with pytest.warns(FutureWarning, match="hw=None"):
        convnn_attention(q, q, q, 3, candidates="window", window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convnn_attention(q, q, q, 3)  # candidates 'all': the layout is never read
        convnn_attention(q, q, q, 3, candidates="window", window=3, hw=(3, 3))
        q8 = randn(1, 2, 8, 4)
        convnn_attention(q8, q8, q8, 3, candidates="window", window=3)  # a 1 x 8 row


# --------------------------------------------------------------------------- threads


def test_use_is_per_thread():
    """While one thread sits inside use('reference'), another thread's calls keep the default."""
    inside, done = threading.Event(), threading.Event()
    seen, before, default = [], backends.requested(), backends.get(None, "cpu").name

    def holder():
        with backends.use("reference"):
            seen.append(backends.requested())
            inside.set()
            done.wait(30)
        seen.append(backends.requested())

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(30)
    try:
        names = {backends.get(None, "cpu").name for _ in range(300)}
        assert backends.requested() == before and names == {default}
    finally:
        done.set()
        thread.join()
    assert seen == ["reference", before]


def test_use_called_bare_sets_the_backend_for_the_thread():
    """A bare use('reference') takes effect (it did nothing) for its own thread only."""
    seen, before = [], backends.requested()

    def worker():
        backends.use("reference")
        seen.append(backends.requested())
        with backends.use("chunked"):
            seen.append(backends.requested())
        seen.append(backends.requested())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == ["reference", "chunked", "reference"]
    assert backends.requested() == before


# --------------------------------------------------------------------------- shortcuts


def test_attention_shortcut_keeps_the_bias():
    """Full softmax attention takes the SDPA shortcut by default: it must add the bias too."""
    q, k, v = (randn(2, 2, 5, 3, seed=s) for s in (50, 51, 52))
    bias = randn(6, seed=53)
    want = convnn_attention(q, k, v, None, bias=bias, backend="reference")
    got = convnn_attention(q, k, v, None, bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: ConvNN1d(2, 2, K=1, candidates="random", num_candidates=n),
        lambda n: ConvNN2d(2, 2, K=1, candidates="grid", num_candidates=n),
        lambda n: ConvNNAttention(8, 2, K=2, candidates="random", num_candidates=n),
    ],
)
@pytest.mark.parametrize("value", [2.5, 0, True])
def test_num_candidates_is_checked_when_the_layer_is_built(make, value):
    # a map smaller than num_candidates runs 'all', so only the constructor sees the value
    with pytest.raises(ValueError, match="num_candidates must be an integer"):
        make(value)


def _select_in_child(queue):
    x = torch.nn.functional.normalize(
        torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    queue.put(chunked.select_scores(chunked.GemmScores(x, x), 4).tolist())


def test_a_forked_child_selects_with_its_own_workers(monkeypatch):
    """A process forked after the selection's worker threads started (a DataLoader worker,
    say) has none of them: its selection starts its own instead of waiting forever."""
    import multiprocessing

    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.nn.functional.normalize(
            torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(1)), dim=-1
        )
        want = chunked.select_scores(chunked.GemmScores(x, x), 4)  # the parent's pool starts
        assert chunked._POOL
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_select_in_child, args=(queue,))
        child.start()
        try:
            got = queue.get(timeout=120)
            child.join(timeout=60)
        finally:
            if child.is_alive():  # hung: do not leave it behind
                child.kill()
        assert child.exitcode == 0
        assert got == want.tolist()
    finally:
        torch.set_num_threads(before)
