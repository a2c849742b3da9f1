"""The fast paths of the backends and the dispatcher give the k-NN path's answer exactly:
the window-attention shortcut to masked SDPA, and the tie repair without a sort."""

from __future__ import annotations

import pytest
import torch
from _helpers import max_diff, randn

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


def test_explain_names_the_window_shortcut_and_its_limits():
    x = torch.randn(1, 36, 8)
    whole = ConvNNAttention(8, 2, K=9, kernel="none", candidates="window", window=3)
    top = ConvNNAttention(8, 2, K=4, kernel="none", candidates="window", window=3)
    decisions = explain(whole, x, hw=(6, 6))
    assert [(d.stage, d.backend) for d in decisions] == [("shortcut", "SDPA")]
    assert "window" in decisions[0].reason
    assert "shortcut" not in [
        d.stage for d in explain(top, x, hw=(6, 6))
    ]  # K < the window: a top-K
    with dispatch.use("chunked"):  # a forced backend runs the k-NN path
        assert "shortcut" not in [d.stage for d in explain(whole, x, hw=(6, 6))]
    side = 13  # 169 tokens > 16 * 9: the k-NN path scores fewer pairs than masked SDPA
    assert not dispatch.masked_sdpa_pays(side * side, 9)
    big = explain(whole, torch.randn(1, side * side, 8), hw=(side, side))
    assert "shortcut" not in [d.stage for d in big]


@pytest.mark.parametrize("compiled", [False, True])
def test_tie_repair_matches_a_stable_sort(compiled):
    """Rows with few distinct scores (and -inf, the mark of a forbidden candidate) tie at
    the K-th score: the K kept are those of a stable descending sort, for every K."""
    torch._dynamo.reset()
    fn = torch.compile(topk_low_ties, backend="aot_eager", fullgraph=True) if compiled else None
    g = torch.Generator().manual_seed(3)
    for M, K, levels in [(2, 1, 2), (9, 4, 3), (40, 7, 4), (40, 39, 2), (64, 9, 5), (33, 33, 3)]:
        scores = torch.randint(0, levels, (3, 4, M), generator=g).float()
        scores[scores == 0] = -torch.inf
        vals, idx = (fn or topk_low_ties)(scores, K)
        want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values), (M, K)
        assert torch.equal(vals, scores.gather(-1, idx))
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
