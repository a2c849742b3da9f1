"""The fast paths of the backends and the dispatcher give the k-NN path's answer exactly:
the window-attention shortcut to masked SDPA, and the tie repair without a sort."""

from __future__ import annotations

import pytest
import torch
from _helpers import max_diff, randn
from torch.utils._python_dispatch import TorchDispatchMode

from convnn import ConvNNAttention
from convnn.backends import dispatch, explain
from convnn.backends._common import topk_low_ties
from convnn.functional import convnn_attention


@pytest.mark.parametrize(("hw", "window"), [((5, 6), 3), ((1, 11), 5), ((7, 7), 7)])
def test_whole_window_attention_is_masked_sdpa(hw, window):
    """K = every window candidate, softmax, kernel 'none': the automatic choice runs SDPA
    with the window mask and agrees with the k-NN path, forward and backward."""
    N = hw[0] * hw[1]
    K = window if hw[0] == 1 else window * window
    out, grads = [], []
    for backend in (None, "chunked"):
        q, k, v = (randn(2, 3, N, 4, seed=s).requires_grad_() for s in range(3))
        y = convnn_attention(q, k, v, K, candidates="window", window=window, hw=hw, backend=backend)
        (y * randn(*y.shape, seed=9)).sum().backward()
        out.append(y)
        grads.append([q.grad, k.grad, v.grad])
    assert max_diff(out[0], out[1]) < 1e-12
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-12


def test_explain_names_the_window_shortcut_and_its_limits(monkeypatch):
    from convnn.stages.candidates import Grid, window_pairs

    x = torch.randn(1, 36, 8)
    whole = ConvNNAttention(8, 2, K=9, kernel="none", candidates="window", window=3)
    top = ConvNNAttention(8, 2, K=4, kernel="none", candidates="window", window=3)
    # float32 on a CPU: the native kernel over each query's keys, where SDPA would score
    # more than 2.1 K keys per query (36 of a 6 x 6 map for a 3 x 3 window) or not pay
    (native,) = explain(whole, x, hw=(6, 6))
    assert native.backend == "native" and "window" in native.reason and "36 per" in native.reason
    # K < the window: a top-K, selected first, then attention over the selection
    assert [(d.stage, d.backend) for d in explain(top, x, hw=(6, 6))] == [
        ("selection", "chunked"),
        ("shortcut", "native"),
    ]
    # a window that is most of its map: SDPA (4 x 4, 16 keys per query <= 2.1 * 9)
    assert [(d.stage, d.backend) for d in explain(whole, x[:, :16], hw=(4, 4))] == [
        ("shortcut", "SDPA")
    ]
    assert not dispatch.listed_attention_pays(16, 9) and dispatch.listed_attention_pays(19, 9)
    # where SDPA would not pay (20 x 100, below), the kernel
    big = explain(whole, torch.randn(1, 2000, 8), hw=(20, 100))
    assert [d.backend for d in big] == ["native"]
    with dispatch.use("chunked"):  # a forced backend runs the k-NN path
        assert "shortcut" not in [d.stage for d in explain(whole, x, hw=(6, 6))]
    # without the native kernels, SDPA within its limits
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    decisions = explain(whole, x, hw=(6, 6))
    assert [(d.stage, d.backend) for d in decisions] == [("shortcut", "SDPA")]
    assert "window" in decisions[0].reason
    assert [(d.stage, d.backend) for d in explain(top, x, hw=(6, 6))] == [
        ("selection", "chunked"),
        ("shortcut", "SDPA"),
    ]
    # 13 x 13: the whole mask would score 169 keys per query > 16 * 9; blocks of 5, 5 and 3
    # rows of queries reach rows 0-5, 4-10 and 9-12 of keys: 77 per query <= 32 * 9
    assert not dispatch.masked_sdpa_pays(169, 9) and dispatch.masked_sdpa_pays(77, 9, True)
    assert window_pairs(Grid(13, 13), 3, "cpu") == 65 * 6 * 13 + 65 * 7 * 13 + 39 * 4 * 13
    (mid,) = explain(whole, torch.randn(1, 169, 8), hw=(13, 13))
    assert mid.backend == "SDPA" and "by blocks" in mid.reason and "77 keys" in mid.reason
    # 20 x 100: each row's windows reach 3 rows, 300 keys per query > 32 * 9: the k-NN path
    assert window_pairs(Grid(20, 100), 3, "cpu") > 32 * 9 * 2000
    big = explain(whole, torch.randn(1, 2000, 8), hw=(20, 100))
    assert "shortcut" not in [d.stage for d in big]


@pytest.mark.parametrize("compiled", [False, True])
def test_tie_repair_matches_a_stable_sort(compiled):
    """Rows with few distinct scores (and -inf, the mark of a forbidden candidate) tie at
    the K-th score: the K kept are those of a stable descending sort, for every K."""
    torch._dynamo.reset()
    fn = torch.compile(topk_low_ties, backend="aot_eager", fullgraph=True) if compiled else None
    g = torch.Generator().manual_seed(3)
    cases = [(2, 1, 2), (9, 4, 3), (40, 7, 4), (40, 39, 2), (64, 9, 5), (33, 33, 3), (300, 9, 6)]
    for M, K, levels in cases:  # narrow rows ranked by rounds, the widest by topk + repair
        scores = torch.randint(0, levels, (3, 4, M), generator=g).float()
        scores[scores == 0] = -torch.inf
        vals, idx = (fn or topk_low_ties)(scores, K)
        want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
        assert torch.equal(idx, want), (M, K)  # canonical order: the stable sort's
        assert torch.equal(vals, scores.gather(-1, idx))
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounds_of_row_maxima_rank_as_topk_with_its_repair(monkeypatch, dtype):
    """Rows ranked by rounds of a row maximum (narrow rows whole, wide ones over their best
    groups, a tail past the last group included, and holding the best; in blocks of rows,
    here tiny ones) select exactly what torch.topk and the tie repair do, in the same order:
    ties (whole groups of them), signed zeros, -inf, a strided view, bf16 rounding of fp32
    scores; the input is left as it was."""
    from convnn.backends import _common

    g = torch.Generator().manual_seed(8)
    table = torch.tensor([-0.0, 0.0, 0.25, 0.5, -1.5, -torch.inf, 2.0, 0.5 + 2**-12])
    for M, K, group in [(1, 1, 0), (7, 7, 0), (49, 9, 0), (65, 10, 0), (200, 16, 0),
                        (324, 8, 0), (1500, 9, 32), (2048, 16, 32),
                        (4 * 10 * 64 + 37, 9, 32)]:  # fmt: skip
        scores = table[torch.randint(0, len(table), (3, M + 5, 37), generator=g)]
        scores = scores.to(dtype).transpose(1, 2)[..., :M]  # (3, 37, M), strided
        scores[0, :3] = 0.5  # a whole row ties
        scores[1, :3, -2:] = 3.0  # the best scores in the last places (past the last group)
        assert _common._rounds_group(scores, K) == group
        before = scores.clone()
        for rounding in (None, torch.bfloat16) if dtype == torch.float32 else (None,):
            monkeypatch.setattr(_common, "ROUNDS_BLOCK", 5 * M * 8)  # blocks of a few rows
            vals, idx = topk_low_ties(scores, K, rounding=rounding)
            monkeypatch.setattr(_common, "_rounds_group", lambda *a: None)  # topk, repair
            want_vals, want = topk_low_ties(scores, K, rounding=rounding)
            monkeypatch.undo()
            ranked = scores if rounding is None else scores.to(rounding)
            assert torch.equal(idx, want), (M, K, rounding)
            assert torch.equal(idx, ranked.sort(dim=-1, descending=True, stable=True)[1][..., :K])
            assert vals.dtype == want_vals.dtype and torch.equal(vals, want_vals)
        assert torch.equal(scores, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_keys_of_16_bit_scores_order_as_the_wide_ones(dtype):
    """16-bit scores get int32 keys (16 bits of score above 16 of reversed position) in the
    order of the int64 keys of the same scores, up to rows of 2^16 (ties at the last
    position included); wider rows, and given positions, keep int64 keys. Rounds over them
    rank as a stable sort does, the input left as it was."""
    from convnn.backends._common import _strike, _tie_free_keys

    g = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    table = torch.tensor([-0.0, 0.0, info.tiny / 4, -info.tiny / 4, info.max, -info.max,
                          torch.inf, -torch.inf, 1.0, -1.0, 0.5, 0.5 + info.eps])  # fmt: skip
    for M in (1, 37, 1 << 16):
        scores = table[torch.randint(0, len(table), (2, M), generator=g)].to(dtype)
        before = scores.clone()
        narrow, wide = _tie_free_keys(scores), _tie_free_keys(scores.float())
        assert narrow.dtype == torch.int32 and torch.equal(scores, before)
        assert torch.equal(narrow.argsort(-1), wide.argsort(-1)), M
        assert all(row.unique().numel() == M for row in narrow)  # distinct
        K = min(M, 12)
        idx = torch.empty(2, K, dtype=torch.int64)
        _strike(narrow, K, idx)
        want = scores.float().sort(dim=-1, descending=True, stable=True).indices[:, :K]
        assert torch.equal(idx, want), M
    wider = torch.zeros(1, (1 << 16) + 1, dtype=dtype)
    assert _tie_free_keys(wider).dtype == torch.int64
    assert _tie_free_keys(scores[:, :5], torch.arange(5)).dtype == torch.int64


@pytest.mark.parametrize("rounding", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [False, True])
def test_wide_scores_rank_as_their_rounding(rounding, compiled):
    """fp32 scores ranked with ``rounding`` select what ranking the rounded scores does, in
    the same order, although only the rows whose rounding ties at the K-th are rounded in
    full: many rows tie (scores near 0.5, a half ulp apart), some far beyond K + 1, signed
    zeros tie, and -inf (a forbidden candidate) loses."""
    from convnn.backends.chunked import topk_grouped

    torch._dynamo.reset()
    fn = torch.compile(topk_low_ties, backend="aot_eager", fullgraph=True) if compiled else None
    g = torch.Generator().manual_seed(6)
    for M, K, topk in [(40, 7, None), (64, 9, None), (4 * 10 * 64 + 37, 9, topk_grouped)]:
        scores = 0.5 + 0.004 * torch.randn(3, 6, M, generator=g)
        scores[0, 0] = 0.5  # every score ties
        specials = torch.tensor([-0.0, 0.0, -torch.inf, 1e-3])
        spots = torch.randint(0, M, (3, 6, M // 4), generator=g)
        scores[1:].scatter_(-1, spots[1:], specials[spots[1:] % 4])
        vals, idx = (fn or topk_low_ties)(scores, K, topk, rounding)
        rounded = scores.to(rounding)
        want = rounded.sort(dim=-1, descending=True, stable=True).indices[..., :K]
        assert torch.equal(idx, want), (M, K)
        assert vals.dtype == rounding and torch.equal(vals, rounded.gather(-1, idx))
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ranking_keys_follow_the_tie_rule(dtype):
    """A compiled graph ranks distinct integer keys: signed zeros tie (as the scores
    compare), -inf loses to every real score, and the grouped top-K of wide rows agrees."""
    from convnn.backends.chunked import topk_grouped

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    table = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.5, -torch.inf, 3e-39])  # zeros cut ties
    for M, K, topk in [(50, 9, None), (4 * 10 * 64 + 37, 9, topk_grouped)]:
        scores = table[torch.randint(0, len(table), (2, 3, M), generator=g)].to(dtype)
        fn = torch.compile(topk_low_ties, backend="aot_eager", fullgraph=True)
        vals, idx = fn(scores, K, topk)
        want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values), M
        assert torch.equal(vals, scores.gather(-1, idx))
    torch._dynamo.reset()


@pytest.mark.parametrize("metric", ["scaled_dot", "dot"])
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize(
    ("K", "options"),
    [(1, {}), (4, {}), (10, {}), (3, dict(candidates="window", window=3, hw=(3, 4)))],
)
def test_top_k_attention_is_sdpa_masked_to_the_selection(metric, include_self, K, options):
    """Softmax over K selected keys, kernel 'none': the automatic choice runs SDPA masked
    to the selection (on the heads as they are: strided views of one qkv projection, as in
    a ViT), and agrees with the k-NN path forward and backward, indices included."""
    N = 12
    out, grads, indices = [], [], []
    for backend in (None, "chunked"):
        qkv = randn(2, N, 3, 3, 4, seed=5).requires_grad_()  # (B, N, q/k/v, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y, idx = convnn_attention(
            q, k, v, K, metric=metric, include_self=include_self, backend=backend,
            return_indices=True, **options,
        )  # fmt: skip
        (y * randn(*y.shape, seed=9)).sum().backward()
        out.append(y), indices.append(idx), grads.append(qkv.grad)
    assert torch.equal(indices[0], indices[1])
    assert max_diff(out[0], out[1]) < 1e-12
    assert max_diff(grads[0], grads[1]) < 1e-12


@pytest.mark.parametrize("metric", ["scaled_dot", "dot"])
@pytest.mark.parametrize("include_self", [False, True])
def test_top_k_window_attention_is_sdpa_masked_by_blocks(monkeypatch, metric, include_self):
    """The K best keys of each query's window, softmax, kernel 'none' (top-K attention among
    the window's keys): on a map whose windows are a small share of it, SDPA masked to the
    selection block by block (each block's mask over the span of keys its windows reach),
    agreeing with the k-NN path forward and backward, indices included; a ConvNN2d with the
    same options on its padded map too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from convnn import ConvNN2d
    from convnn.functional import _BlockSDPA

    monkeypatch.setenv("CONVNN_NATIVE", "0")  # SDPA's paths, not the native kernel's
    hw, N, K = (14, 14), 196, 9
    out, grads, indices, blocks = [], [], [], []
    apply = _BlockSDPA.apply
    monkeypatch.setattr(_BlockSDPA, "apply", lambda *a: blocks.append(a) or apply(*a))
    # the flash kernels block by block; one SDPA graph per block (flash off, as for dropout);
    # the k-NN path
    for backend, kernel in ((None, SDPBackend.FLASH_ATTENTION), (None, None), ("chunked", None)):
        qkv = randn(2, N, 3, 3, 4, seed=5).requires_grad_()  # (B, N, q/k/v, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        with sdpa_kernel([kernel or SDPBackend.MATH, SDPBackend.MATH]), _CountFlash() as count:
            y, idx = convnn_attention(
                q, k, v, K, metric=metric, include_self=include_self, candidates="window",
                window=7, hw=hw, backend=backend, return_indices=True,
            )  # fmt: skip
            (y * randn(*y.shape, seed=9)).sum().backward()
        assert count.backward == (3 if kernel else 0)  # three blocks of rows
        assert len(blocks) == (backend is None) and (not blocks or len(blocks.pop()[3]) == 3)
        out.append(y), indices.append(idx), grads.append(qkv.grad)
    for i in (1, 2):
        assert torch.equal(indices[0], indices[i])
        assert max_diff(out[0], out[i]) < 1e-12
        assert max_diff(grads[0], grads[i]) < 1e-12
    layer = ConvNNAttention(12, 3, K=K, kernel="none", candidates="window", window=7)
    (d, e) = explain(layer, torch.randn(2, N, 12), hw=hw)
    assert (e.stage, e.backend) == ("shortcut", "SDPA") and "by blocks" in e.reason
    conv = ConvNN2d(
        6, 6, K=9, padding=2, candidates="window", window=5, metric=metric,
        weighting="softmax", kernel="none",
    ).double()  # fmt: skip
    x = randn(2, 6, 24, 24, seed=4).requires_grad_()
    assert "by blocks" in explain(conv, x)[-1].reason
    got = conv(x, return_indices=True)
    (g,) = torch.autograd.grad((got[0] * randn(*got[0].shape, seed=2)).sum(), x)
    with dispatch.use("chunked"):
        want = conv(x, return_indices=True)
        (h,) = torch.autograd.grad((want[0] * randn(*want[0].shape, seed=2)).sum(), x)
    assert torch.equal(got[1], want[1])
    assert max_diff(got[0], want[0]) < 1e-12 and max_diff(g, h) < 1e-12


@pytest.mark.parametrize("K", [49, 9])
def test_window_attention_blocks_backward_twice_and_under_autocast(monkeypatch, K):
    """Whole-window (K 49) and top-K (K 9) attention by blocks: a retained graph gives the
    same gradients on a second backward (each block's output, log-sum-exp and mask are
    saved tensors), and the Jacobian is the k-NN path's; with dropout a second backward is
    refused clearly. Under CPU autocast a ConvNN layer on the block path runs in bfloat16
    like SDPA, close to its float32 result."""
    from torch.autograd.functional import jacobian

    from convnn import ConvNN2d
    from convnn.functional import _BlockSDPA
    from convnn.stages.candidates import Grid, window_blocks

    q, k, v = (randn(2, 3, 196, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    y = convnn_attention(q, k, v, K, candidates="window", window=7, hw=(14, 14))
    w = randn(*y.shape, seed=4)
    first = torch.autograd.grad((y * w).sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad((y * w).sum(), (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    q1, k1 = randn(2, 1, 1, 208, 2, seed=5)
    v1 = randn(1, 1, 208, 2, seed=6)

    def attend(backend):
        return lambda v: convnn_attention(
            q1, k1, v, 9, candidates="window", window=3, hw=(13, 16), backend=backend
        )

    assert max_diff(jacobian(attend(None), v1), jacobian(attend("chunked"), v1)) < 1e-12
    blocks = window_blocks(Grid(14, 14), 7, "cpu")
    y = _BlockSDPA.apply(q, k, v, blocks, 0.25, True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="freed by the first backward"):
        y.sum().backward()
    conv = ConvNN2d(
        6, 6, K=K if K < 49 else 25, padding=2, candidates="window", window=5,
        metric="scaled_dot", weighting="softmax", kernel="none",
    )  # fmt: skip
    x = randn(2, 6, 24, 24, seed=7).float()
    monkeypatch.setenv("CONVNN_NATIVE", "0")  # float32 top-K attention: SDPA's blocks
    assert "by blocks" in explain(conv, x)[-1].reason
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(x)
    assert got.dtype == torch.bfloat16
    want = conv(x)
    assert max_diff(got.float(), want) < 0.05 * want.abs().max()


def test_explain_names_the_top_k_shortcut_and_its_limits(monkeypatch):
    from convnn import ConvNN2d

    kvt = ConvNNAttention(8, 2, K=4, kernel="none")
    for x in (torch.randn(2, 20, 8), torch.randn(1, 65, 8)):  # any number of tokens
        decisions = explain(kvt, x)
        assert [(d.stage, d.backend) for d in decisions] == [
            ("selection", "chunked"),
            ("shortcut", "native"),
        ]
        assert "selected keys" in decisions[1].reason
    with dispatch.use("chunked"):  # a forced backend runs the k-NN path
        assert "shortcut" not in [d.stage for d in explain(kvt, torch.randn(2, 20, 8))]
    kvt_drop = ConvNNAttention(8, 2, K=4, kernel="none", attn_drop=0.1).train()
    assert explain(kvt_drop, torch.randn(2, 20, 8))[-1].backend == "SDPA"  # dropout: SDPA's
    for other in (dict(kernel="depthwise"), dict(metric="cosine"), dict(weighting="none")):
        layer = ConvNNAttention(8, 2, K=4, **{"kernel": "none", **other})
        assert "shortcut" not in [d.stage for d in explain(layer, torch.randn(2, 20, 8))]
    # a ConvNN2d with the same options, on its padded map (M > N), takes it too
    conv = ConvNN2d(6, 6, K=5, padding=1, metric="scaled_dot", weighting="softmax", kernel="none")
    x = randn(2, 6, 4, 5, seed=4).float()
    assert ("shortcut", "native") in [(d.stage, d.backend) for d in explain(conv, x)]
    with dispatch.use("chunked"):
        want = conv(x, return_indices=True)
    got = conv(x, return_indices=True)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    # without the native kernels: SDPA masked to the selection, on few enough tokens only
    monkeypatch.setenv("CONVNN_NATIVE", "0")
    assert explain(kvt, torch.randn(2, 20, 8))[-1].backend == "SDPA"
    assert "shortcut" not in [d.stage for d in explain(kvt, torch.randn(1, 65, 8))]  # > 16 K
    assert ("shortcut", "SDPA") in [(d.stage, d.backend) for d in explain(conv, x)]
    torch.testing.assert_close(conv(x), want[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_on_a_cpu_without_half_gemms_are_the_half_gemm(monkeypatch, dtype):
    """On a CPU without half matrix instructions the half score GEMM runs in fp32 and is
    rounded: with small-integer features every product and sum is exact, so the scores
    equal the exact ones rounded to half, as the half GEMM gives them, and both routes
    select the same neighbours."""
    from convnn import metrics

    g = torch.Generator().manual_seed(5)
    q = torch.randint(-6, 7, (2, 40, 16), generator=g).to(dtype)
    k = torch.randint(-6, 7, (2, 50, 16), generator=g).to(dtype)
    exact = (q.double() @ k.double().transpose(1, 2)).to(dtype)
    cand = torch.randint(0, 50, (2, 40, 7), generator=g)
    found = {}
    for native in (False, True):
        monkeypatch.setattr(metrics, "_native_half_gemm", lambda dtype, native=native: native)
        # where the one-pass kernel runs, bfloat16 takes the fp32 route on every CPU
        monkeypatch.setattr(metrics.native, "one_pass_here", lambda: False)
        scores = metrics.GemmScores(q, k)
        assert (scores._wide is None) == native
        assert scores.rounding == (None if native else dtype)  # finite: rounded by the top-K
        assert torch.equal(scores.block(slice(None), slice(None)), exact)
        assert torch.equal(scores.window(slice(None), cand), exact.gather(-1, cand))
        found[native] = convnn_attention(
            q[:, None].float(), k[:, None, :40].float(), k[:, None, :40].float(), 5,
            selection_dtype=dtype, return_indices=True, backend="chunked",
        )[1]  # fmt: skip
    assert torch.equal(found[False], found[True])
    monkeypatch.setattr(metrics.native, "one_pass_here", lambda: True)
    assert (metrics.GemmScores(q, k)._wide is None) == (dtype == torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_image_blocks_select_as_the_reference(monkeypatch, dtype):
    """Blocks smaller than a batch of query rows split by image (one taller GEMM each):
    the same indices as the reference, for self-similarity, a query batch of 1 against keys
    of 3 and an excluded key per query."""
    from convnn.backends import chunked, reference
    from convnn.metrics import GemmScores

    monkeypatch.setattr(chunked, "KEY_BLOCK", 7)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-3, 4, (3, 20, 5), generator=g).to(dtype)  # small integers: many ties
    exclude = torch.randint(-1, 20, (20,), generator=g)
    for query, key, ex in [(x, x, None), (x[:1], x, exclude), (x, x[1:2], exclude)]:
        scores = GemmScores(query, key)
        assert all(scores.image(b) is not None for b in range(scores.batch))
        want = reference.select_scores(scores, 6, exclude=ex)
        assert torch.equal(chunked.select_scores(scores, 6, exclude=ex), want)


def test_selection_blocks_run_whole_on_worker_threads(monkeypatch):
    """With two torch threads on the CPU the query blocks run on worker threads, one thread
    each: the same indices as one thread, and the thread count is back after, also when a
    block fails."""
    import threading

    from convnn.backends import chunked
    from convnn.metrics import GemmScores

    monkeypatch.setattr(chunked, "KEY_BLOCK", 16)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 256)
    # the blocks of the GEMM and top-K path (the one-pass kernel: test_native)
    monkeypatch.setattr(GemmScores, "fused", lambda self, K, exclude=None: False)
    x = torch.nn.functional.normalize(randn(2, 60, 8, seed=3).float(), dim=-1)
    scores, exclude = GemmScores(x, x), torch.arange(60)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = chunked.select_scores(scores, 5, exclude=exclude)
        torch.set_num_threads(2)
        seen = set()
        block = chunked._select_block

        def spy(*args):
            seen.add((threading.current_thread().name, torch.get_num_threads()))
            return block(*args)

        monkeypatch.setattr(chunked, "_select_block", spy)
        assert torch.equal(chunked.select_scores(scores, 5, exclude=exclude), want)
        assert seen and all(n.startswith("convnn-select") and t == 1 for n, t in seen)
        assert torch.get_num_threads() == 2

        def fail(*args):
            raise RuntimeError("a block failed")

        monkeypatch.setattr(chunked, "_select_block", fail)
        with pytest.raises(RuntimeError, match="a block failed"):
            chunked.select_scores(scores, 5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_window_mask_is_built_once_per_map():
    """The whole-window shortcut's SDPA mask: each query's window, built once per map,
    window and device (a layer reads it on every call)."""
    from convnn.stages.candidates import Grid, window_mask

    grid = Grid(5, 7, ph=1, pw=2)
    mask = window_mask(grid, 3, "cpu")
    win = grid.window(3, "cpu")
    want = torch.zeros(win.shape[0], 7 * 11, dtype=torch.bool).scatter_(1, win, True)
    assert torch.equal(mask, want) and mask.sum(1).eq(9).all()
    assert window_mask(grid, 3, torch.device("cpu")) is mask
    assert window_mask(Grid(5, 7, ph=1, pw=2), 5, "cpu").sum(1).eq(25).all()


class _CountFlash(TorchDispatchMode):
    """Counts the CPU flash-attention kernel's calls, forward (queries per call) and backward."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.forward.append(args[0].shape[2])
        self.backward += (
            func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        )
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("hw", "window"), [((14, 14), 7), ((12, 20), 5), ((1, 144), 9), ((40, 40), 7)]
)
@pytest.mark.parametrize("flash", [True, False])
def test_whole_window_attention_by_blocks_is_the_knn_path(hw, window, flash):
    """On maps large enough, whole-window attention runs SDPA block by block, each block of
    queries against the span of keys its windows reach (fewer pairs than the whole mask),
    and agrees with the k-NN path forward and backward: on the CPU flash-attention kernels
    called block by block, and (flash attention switched off, as for dropout) on one SDPA
    graph per block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from convnn.stages.candidates import (
        Grid,
        _window_mask_cached,
        window_blocks,
        window_indices,
        window_mask,
        window_pairs,
    )

    grid = Grid(*hw)
    N, K = hw[0] * hw[1], window * window if hw[0] > 1 else window
    _window_mask_cached.cache_clear()
    blocks = window_blocks(grid, window, "cpu")
    assert _window_mask_cached.cache_info().currsize == 0  # no N x N mask on the way
    assert window_indices(grid, window, "cpu") is window_indices(grid, window, "cpu")  # once
    mask = window_mask(grid, window, "cpu")
    pairs = window_pairs(grid, window, "cpu")
    assert pairs == sum(m.numel() for *_, m in blocks)
    assert dispatch.masked_sdpa_pays(pairs / N, K, True)  # the automatic choice: SDPA by blocks
    assert len(blocks) > 1 and window_blocks(grid, window, "cpu") is blocks  # built once
    covered = torch.zeros_like(mask)
    for qs, ks, m in blocks:
        covered[qs, ks] = m
    assert torch.equal(covered, mask)  # the spans hold every window
    assert sum(m.numel() for _, _, m in blocks) <= 0.75 * mask.numel()
    out, grads = [], []
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH] if flash else [SDPBackend.MATH]
    for backend in (None, "chunked"):
        qkv = randn(2, N, 3, 2, 4, seed=6).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        with sdpa_kernel(kernels), _CountFlash() as count:
            y = convnn_attention(
                q, k, v, K, candidates="window", window=window, hw=hw, backend=backend
            )
            (y * randn(*y.shape, seed=9)).sum().backward()
        out.append(y), grads.append(qkv.grad)
        if backend is None and flash:  # the automatic choice only: one call per block
            assert count.forward == [qs.stop - qs.start for qs, _, _ in blocks]
            assert count.backward == len(blocks)
        else:
            assert count.forward == [] and count.backward == 0
    assert max_diff(out[0], out[1]) < 1e-12
    assert max_diff(grads[0], grads[1]) < 1e-12


def test_window_attention_blocks_with_dropout_keep_one_graph_per_block():
    """With dropout the blocks run SDPA's own graphs (its CPU flash kernel has no dropout):
    seeded alike, the blocks' output and gradients are those of SDPA called block by block."""
    from convnn.functional import _BlockSDPA, _flash_blocks
    from convnn.stages.candidates import Grid, window_blocks

    blocks = window_blocks(Grid(14, 14), 7, "cpu")
    q, k, v = (randn(2, 2, 196, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    w = randn(2, 2, 196, 8, seed=4)
    assert _flash_blocks(q, k, v, 0.0) and not _flash_blocks(q, k, v, 0.25)
    torch.manual_seed(0)
    with _CountFlash() as count:
        y = _BlockSDPA.apply(q, k, v, blocks, 0.25, True)
        got = torch.autograd.grad((y * w).sum(), (q, k, v))
    assert count.forward == [] and count.backward == 0
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    parts = [
        sdpa(q[:, :, a], k[:, :, b], v[:, :, b], attn_mask=m, dropout_p=0.25) for a, b, m in blocks
    ]
    ref = torch.cat(parts, 2)
    assert max_diff(y, ref) < 1e-12
    assert max_diff(y, _BlockSDPA.apply(q, k, v, blocks, 0.0, True)) > 0.1  # weights dropped
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert max_diff(a, b) < 1e-12


def test_window_attention_blocks_differentiate_each_input():
    """The blocks' gradients go straight into each input's gradient: with only some of q, k,
    v requiring one, each as the whole-mask SDPA gives it (float64), none for the others; a
    second derivative is refused clearly (SDPA's CPU kernel has none either)."""
    from convnn.stages.candidates import Grid, window_blocks, window_mask

    hw, window = (14, 14), 7
    assert len(window_blocks(Grid(*hw), window, "cpu")) > 1
    mask = window_mask(Grid(*hw), window, "cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for need in ((True, False, False), (False, True, True), (True, True, True)):
        q, k, v = (randn(2, 2, 196, 8, seed=s).requires_grad_(n) for s, n in zip((1, 2, 3), need))
        w = randn(2, 196, 16, seed=4)
        y = convnn_attention(q, k, v, 49, candidates="window", window=window, hw=hw)
        got = torch.autograd.grad((y * w).sum(), [t for t in (q, k, v) if t.requires_grad])
        ref = sdpa(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 196, 16)
        want = torch.autograd.grad((ref * w).sum(), [t for t in (q, k, v) if t.requires_grad])
        assert max_diff(y, ref) < 1e-12
        for a, b in zip(got, want):
            assert max_diff(a, b) < 1e-12
    y = convnn_attention(q, k, v, 49, candidates="window", window=window, hw=hw)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(y.sum(), q, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_attention_blocks_take_every_dtype_and_layout(dtype):
    """The flash kernels called block by block in half and single precision, with q's head
    dimension strided (the kernel reads rows with unit stride: such an input is copied, as
    SDPA copies it): output and gradients as the float64 formula of DESIGN.md gives them,
    softmax(q k^T / sqrt(d) + mask) v over each query's window."""
    from convnn.stages.candidates import Grid, window_mask

    B, G, N, d = 2, 2, 196, 16
    mask = window_mask(Grid(14, 14), 7, "cpu")
    q = randn(B, G, d, N, seed=1).transpose(-1, -2).to(dtype)  # head dimension strided
    k, v = (randn(B, G, N, d, seed=s).to(dtype) for s in (2, 3))
    w = randn(B, N, G * d, seed=4)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    y = convnn_attention(*leaves, 49, candidates="window", window=7, hw=(14, 14))
    got = torch.autograd.grad((y.double() * w).sum(), leaves)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in leaves)
    scores = (q64 @ k64.transpose(-1, -2)) / d**0.5
    ref = scores.masked_fill(~mask, -torch.inf).softmax(-1) @ v64
    ref = ref.transpose(1, 2).reshape(B, N, G * d)
    want = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and max_diff(y.double(), ref) < tol * ref.abs().max()
    for a, b in zip(got, want):
        assert a.dtype == dtype and max_diff(a.double(), b) < tol * b.abs().max()


def test_block_sdpa_gradients_where_spans_overlap_leave_gaps():
    """Blocks whose key spans overlap (their gradients add) and leave keys no block reaches
    (gradient zero) give the gradients of one SDPA with the blocks' masks put together."""
    from convnn.functional import _BlockSDPA

    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.rand(3, 4, generator=g) > 0.3, torch.rand(4, 5, generator=g) > 0.3
    m1[:, 0] = m2[:, 0] = True  # every query sees a key
    blocks = ((slice(0, 3), slice(2, 6), m1), (slice(3, 7), slice(4, 9), m2))
    whole = torch.zeros(7, 11, dtype=torch.bool)
    whole[0:3, 2:6], whole[3:7, 4:9] = m1, m2  # keys 0-1 and 9-10: in no span
    q, k, v = (randn(2, 3, n, 4, seed=s).requires_grad_() for s, n in ((1, 7), (2, 11), (3, 11)))
    w = randn(2, 3, 7, 4, seed=4)
    got = torch.autograd.grad((_BlockSDPA.apply(q, k, v, blocks, 0.0, True) * w).sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=whole)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert max_diff(a, b) < 1e-12
    assert (got[1][:, :, [0, 1, 9, 10]] == 0).all()


def test_window_attention_blocks_keep_timms_layout():
    """q, k, v as timm's Attention makes them (views of one (B, N, 3, heads, d) projection):
    the blocks' output is laid out as SDPA lays it out, so merging the heads is a view, and
    each gradient is laid out like its input; values and gradients as the whole-mask SDPA
    gives them (float64)."""
    from convnn.stages.candidates import Grid, window_mask

    B, G, hw, d, window = 2, 3, (14, 14), 8, 7
    qkv = randn(B, 196, 3 * G * d, seed=5).requires_grad_()
    w = randn(B, 196, G * d, seed=6)
    outs, grads = [], []
    for whole in (False, True):
        q, k, v = qkv.reshape(B, 196, 3, G, d).permute(2, 0, 3, 1, 4).unbind(0)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if whole:
            mask = window_mask(Grid(*hw), window, "cpu")
            y = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask)
            outs.append(y.transpose(1, 2).reshape(B, 196, G * d))
        else:
            outs.append(convnn_attention(*leaves, 49, candidates="window", window=window, hw=hw))
            assert outs[-1]._is_view()  # heads merged without a copy
        grads.append(torch.autograd.grad((outs[-1] * w).sum(), leaves))
        if not whole:
            for t, g in zip(leaves, grads[-1]):
                order = sorted(range(4), key=lambda i: -t.stride(i))
                assert sorted(range(4), key=lambda i: -g.stride(i)) == order
    assert max_diff(*outs) < 1e-12
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-12


def test_worker_threads_keep_the_callers_modes(monkeypatch):
    """Selection on worker threads under inference mode (whose tensors only that mode may
    write) gives the same result; under a dispatch mode (here one counting the top-K's
    operators) every operator stays on the caller's thread, where the mode sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from convnn import ConvNN2d
    from convnn.backends import chunked

    class CountTopK(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # every way of ranking (native, rounds, topk) gathers the K best scores
            CountTopK.calls += func is torch.ops.aten.gather.default
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 256)
    torch.manual_seed(0)
    layer = ConvNN2d(4, 4, K=5)
    x = randn(2, 4, 8, 8, seed=4).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = layer(x)
        with torch.inference_mode():
            assert torch.equal(layer(x), want)
        with CountTopK():
            assert torch.equal(layer(x), want)
        assert CountTopK.calls >= 4  # 2 images x 2 blocks of 32 queries, each ranked
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("M,K", [(65, 9), (324, 8), (1500, 9), (700, 9)])
def test_rounds_of_no_rows(M, K):
    """No rows (an empty batch) on every path: whole rows, best groups, topk."""
    for lead in [(0,), (2, 0), (0, 3)]:
        vals, idx = topk_low_ties(torch.randn(*lead, M), K)
        assert vals.shape == idx.shape == (*lead, K) and idx.dtype == torch.int64
