"""Approximate candidates (convnn.ann): exact when the budget covers every key, recall that
never falls as the budget grows, and candidate sets that depend only on the features' values.

The exact top-K is written here from the specification (float64 similarities, slots by
descending similarity, ties to the lower index), not taken from the library."""

from __future__ import annotations

import pytest
import torch
from _helpers import F64, on_backend, randn, similarity
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from convnn import ConvNN2d
from convnn.ann import AnnIndex, AnnSpec, ann_candidates, ann_select
from convnn.nn import ConvNNAttention

METRICS = ("cosine", "euclidean", "dot", "scaled_dot")
INDEXES = (
    dict(method="grid"),
    dict(method="grid", projection="pca"),
    dict(method="lsh"),
    dict(method="grid", dims=3, tables=2, tile=5),
)


def exact_topk(metric: str, q: torch.Tensor, k: torch.Tensor, K: int, include_self: bool):
    """Indices (B, N, K) of the exact selection: float64 scores, descending, ties to the lower
    index; with include_self the query itself (index n) in slot 0 and the K - 1 best others."""
    s = similarity(metric, q.double(), k.double())  # (B, N, M)
    B, N, M = s.shape
    if include_self:
        s = s.masked_fill(torch.eye(N, M, dtype=torch.bool), -torch.inf)
    idx = torch.arange(M).expand_as(s)
    # a stable sort of the ascending indices by descending score puts lower indices first
    order = s.sort(dim=-1, descending=True, stable=True).indices
    top = idx.gather(-1, order)[..., : K - include_self]
    if include_self:
        top = torch.cat([torch.arange(N).expand(B, N)[..., None], top], -1)
    return top


def clustered(B: int, N: int, D: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Features with structure (like a network's): 12 cluster centres plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, 12, D, generator=g, dtype=F64) * 2
    which = torch.randint(0, 12, (B, N), generator=g)
    x = centres.gather(1, which[..., None].expand(B, N, D)) + torch.randn(
        B, N, D, generator=g, dtype=F64
    )
    return x.to(dtype)


@pytest.mark.parametrize("index", INDEXES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("include_self", [False, True])
def test_full_budget_is_the_exact_selection(index, metric, include_self):
    x = randn(2, 48, 6, seed=1)
    y = randn(2, 48, 6, seed=2)
    for budget in (48, 1000):
        s, idx = ann_select(
            x, y, 7, metric=metric, budget=budget, include_self=include_self, **index
        )
        assert torch.equal(idx, exact_topk(metric, x, y, 7, include_self))
        ref = similarity(metric, x, y).gather(-1, idx)
        torch.testing.assert_close(s, ref)


def test_full_budget_float32_and_ties_to_the_lower_index():
    x = randn(1, 40, 5, seed=3, dtype=torch.float32)
    x[0, 20:30] = x[0, 5]  # ten exact copies of token 5: equal scores, lower index first
    for metric in METRICS:
        _, idx = ann_select(x, x, 6, metric=metric, budget=40, include_self=True)
        assert torch.equal(idx, exact_topk(metric, x, x, 6, True)), metric
    _, idx = ann_select(x, x, 4, metric="cosine", budget=40)
    assert idx[0, 5].tolist() == [5, 20, 21, 22]


@pytest.mark.parametrize("include_self", [False, True])
def test_ties_within_a_budget_go_to_the_lower_index(include_self):
    # Integer features: every dot product is exact whatever the summation order, and most
    # scores tie. Within a budget the windows hold keys in code order, not index order.
    g = torch.Generator().manual_seed(16)
    x = torch.randint(-2, 3, (2, 300, 4), generator=g).double()
    _, idx = ann_select(x, x, 8, metric="dot", budget=96, include_self=include_self, tables=3)
    lists = ann_candidates(x, x, 96, metric="dot", tables=3)
    assert torch.equal(idx, topk_of_lists(x @ x.transpose(1, 2), lists, 8, include_self))


def topk_of_lists(s: torch.Tensor, lists: torch.Tensor, K: int, include_self: bool):
    """The exact top-K (B, N, K) of each query's candidate lists (B, N, L) (ascending, -1 for
    none) under the full scores s (B, N, M): descending, ties to the lower index; with
    include_self the query itself (index n) in slot 0 and the K - 1 best others."""
    B, N = lists.shape[:2]
    s = s.gather(-1, lists.clamp_min(0)).masked_fill(lists < 0, -torch.inf)
    if include_self:
        s = s.masked_fill(lists == torch.arange(N)[:, None], -torch.inf)
    order = s.sort(dim=-1, descending=True, stable=True).indices  # lists ascend: low ties
    top = lists.gather(-1, order)[..., : K - include_self]
    if include_self:
        top = torch.cat([torch.arange(N).expand(B, N)[..., None], top], -1)
    return top


def recall(idx: torch.Tensor, ref: torch.Tensor) -> float:
    return (idx[..., None] == ref[..., None, :]).any(-1).double().mean().item()


@pytest.mark.parametrize("index", INDEXES[:3], ids=lambda o: "-".join(map(str, o.values())))
def test_recall_rises_with_the_budget(index):
    x = clustered(2, 512, 12, seed=4)
    K = 8
    ref = exact_topk("cosine", x, x, K, True)
    spec = AnnSpec(**index)
    T = spec.num_tables
    budgets = [T * w for w in (8, 16, 32, 64)] + [512]
    idx_prev = cands_prev = None
    recalls = []
    for budget in budgets:
        _, idx = ann_select(x, x, K, budget=budget, include_self=True, **index)
        cands = ann_candidates(x, x, budget, **index)
        recalls.append(recall(idx[..., 1:], ref[..., 1:]))
        if cands_prev is not None:  # every query's candidates contain its smaller set's
            held = (cands_prev[..., :, None] == cands[..., None, :]).any(-1)
            assert bool((held | (cands_prev < 0)).all())
            # and its selection finds every true neighbour the smaller one found
            before = (idx_prev[..., 1:, None] == ref[..., None, 1:]).any(-1).sum(-1)
            after = (idx[..., 1:, None] == ref[..., None, 1:]).any(-1).sum(-1)
            assert bool((after >= before).all())
        idx_prev, cands_prev = idx, cands
    assert recalls == sorted(recalls), recalls
    assert recalls[0] < 0.9 and recalls[-1] == 1.0, recalls


def test_recall_at_a_quarter_budget_on_clustered_features():
    """Content-based candidates find true neighbours far better than chance: random
    candidates of the same budget would find about budget / N of them."""
    x = clustered(1, 1024, 16, seed=5)
    ref = exact_topk("cosine", x, x, 9, True)
    for index in INDEXES[:3]:
        _, idx = ann_select(x, x, 9, budget=256, include_self=True, **index)
        assert recall(idx[..., 1:], ref[..., 1:]) > 0.6, index


@pytest.mark.parametrize("index", INDEXES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("metric", METRICS)
def test_candidates_depend_only_on_the_values(index, metric):
    x32 = clustered(2, 300, 10, seed=6)
    x64 = x32.double()
    c32 = ann_candidates(x32, x32, 64, metric=metric, **index)
    assert c32.shape == (2, 300, 64)
    assert torch.equal(c32, ann_candidates(x64, x64, 64, metric=metric, **index))
    assert torch.equal(c32, ann_candidates(x32, x32, 64, metric=metric, **index))  # repeatable
    # distinct, ascending, -1 only at the end of a row (keys two tables both proposed)
    real = c32 >= 0
    assert bool((real[..., :-1] | ~real[..., 1:]).all())
    assert bool(((c32[..., 1:] > c32[..., :-1]) | ~real[..., 1:]).all())
    W = 64 // AnnSpec(**index).num_tables
    assert bool((real.sum(-1) >= W).all())


def test_pca_tables_mix_the_principal_axes_of_the_keys():
    """projection='pca': table 0 projects on the keys' principal axes (largest variance
    first), every other table on a seeded mix of the same axes; the fixed-point entries stay
    within a projection's bound, and each table's order differs."""
    from convnn import ann as A

    g = torch.Generator().manual_seed(8)
    scales = torch.tensor([9.0, 5.0, 3.0, 2.0, 0.2, 0.1], dtype=F64)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    x = ((torch.randn(1, 400, 6, generator=g, dtype=F64) * scales) @ basis.T).float()
    index = AnnIndex(6, method="grid", projection="pca", dims=2, tables=3)
    _, hk, bits = A._hash_space("euclidean", x, x, True)
    P = A._principal_axes(hk, 2, bits, index.projection)  # (1, 3, 7, 2) fixed point
    assert P.shape == (1, 3, 7, 2) and bool((P.abs() <= A._P_MAX).all())
    axes = P[0, 0, :6].double() / 2**A._P_BITS  # the appended constant dim has no variance
    # the top two principal directions of the keys, written here with float64 eigh
    xc = x[0].double() - x[0].double().mean(0)
    ref = torch.linalg.eigh(xc.T @ xc)[1][:, -2:].flip(-1)
    assert torch.allclose((axes.T @ ref).abs(), torch.eye(2, dtype=F64), atol=1e-5)
    mix = index.projection[1:, :2, :2].double()
    want = torch.round(P[0, 0].double() @ mix / 2**23)
    assert torch.equal(P[0, 1:].double(), want)
    order = A._plan(index, x, x, 60, "euclidean").key_order  # (T, M): each table's order
    assert all(not torch.equal(order[i], order[j]) for i in range(3) for j in range(i))


def test_selection_is_deterministic_and_the_same_on_every_backend():
    x = clustered(2, 400, 8, seed=7)
    index = AnnIndex(8, method="grid", seed=3)
    index.eval()
    first = index.select(x, x, 9, 96, include_self=True)[1]
    for backend in ("reference", "chunked", "auto"):
        with on_backend(backend):
            assert torch.equal(index.select(x, x, 9, 96, include_self=True)[1], first)
    again = AnnIndex(8, method="grid", seed=3).select(x, x, 9, 96, include_self=True)[1]
    assert torch.equal(again, first)
    other = AnnIndex(8, method="grid", seed=4).select(x, x, 9, 96, include_self=True)[1]
    assert not torch.equal(other, first)  # the seed draws the projections
    moved = AnnIndex(8, method="grid", seed=3).double()  # integer buffers never round
    assert torch.equal(moved.projection, index.projection)


def test_queries_and_keys_may_differ():
    q, k = clustered(2, 100, 6, seed=8), clustered(2, 300, 6, seed=9)
    self_index = torch.arange(0, 300, 3)
    s, idx = ann_select(q, k, 5, budget=80, include_self=True, self_index=self_index)
    assert idx.shape == (2, 100, 5) and torch.equal(idx[..., 0], self_index.expand(2, -1))
    assert bool((idx[..., 1:] != self_index[:, None]).all())
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # distinct
    torch.testing.assert_close(s, similarity("cosine", q, k).gather(-1, idx))
    desc = s[..., 1:]
    assert bool((desc[..., :-1] >= desc[..., 1:]).all())


def test_scores_carry_the_gradient():
    x = randn(1, 64, 4, seed=10).requires_grad_()
    s, idx = ann_select(x, x, 5, metric="euclidean", budget=32, tables=2)
    s.sum().backward()
    xd = x.detach().requires_grad_()
    similarity("euclidean", xd, xd).gather(-1, idx).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_memory_is_never_n_by_m():
    N, budget, K = 4096, 128, 9
    x = clustered(1, N, 8, seed=11)
    for index in INDEXES[:3]:
        with _Largest() as seen:
            ann_select(x, x, K, budget=budget, include_self=True, **index)
        assert seen.numel <= 4 * N * (K + budget), (index, seen.numel)
        assert seen.numel < N * N // 8


BAD = [
    (dict(method="kd"), "method"),
    (dict(projection="pca", method="lsh"), "projection"),
    (dict(dims=0), "dims"),
    (dict(dims=9), "dims"),
    (dict(tables=0), "tables"),
    (dict(tile=0), "tile"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
]


@pytest.mark.parametrize("options,name", BAD)
def test_bad_options_name_the_argument(options, name):
    with pytest.raises(ValueError, match=name):
        AnnSpec(**options)
    x = randn(1, 20, 3)
    with pytest.raises(ValueError, match=name):
        ann_select(x, x, 3, budget=8, **options)


def test_bad_inputs_name_the_argument():
    x, y = randn(1, 40, 3), randn(1, 100, 3)
    cases = [
        (lambda: ann_select(x, x, 3, metric="spatial"), "metric"),
        (lambda: ann_select(x, x, 3, budget=0), "budget"),
        (lambda: ann_select(y, y, 9, budget=64, method="grid"), "budget"),  # 8 tables x 8 < 9
        (lambda: ann_select(x, x, 0, budget=40), "K"),
        (lambda: ann_select(x[0], x, 3), "query"),
        (lambda: ann_select(x, x[..., :2], 3), "query and key"),
        (lambda: ann_select(x, x.float(), 3), "key"),
        (lambda: ann_select(x, torch.full_like(x, torch.nan), 3), "key"),
        (lambda: ann_select(x, x, 3, include_self=1), "include_self"),
        (lambda: ann_select(x[:, :10], x, 3, include_self=True), "self_index"),
        (
            lambda: ann_select(x, x, 3, include_self=True, self_index=torch.arange(1, 41)),
            "self_index",
        ),
        (lambda: AnnIndex(4).select(x, x, 3, 40), "feature dims"),
        (lambda: AnnIndex(0), "dim"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# --------------------------------------------------------------------------- the layers


def feature_map(B: int, C: int, H: int, W: int, seed: int) -> torch.Tensor:
    return clustered(B, H * W, C, seed).transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize(
    "method,projection", [("grid", "random"), ("grid", "pca"), ("lsh", "random")]
)
def test_layers_rank_the_same_ann_candidates_on_every_backend(method, projection):
    x = feature_map(2, 8, 12, 12, seed=12)
    torch.manual_seed(0)
    layer = ConvNN2d(
        8,
        8,
        K=9,
        padding=1,
        candidates="ann",
        num_candidates=64,
        ann_method=method,
        ann_projection=projection,
        ann_tables=4,
    ).eval()
    found = {}
    for backend in ("reference", "chunked", "auto"):
        with on_backend(backend):
            found[backend] = layer(x, return_indices=True)
    y, idx = found["reference"]
    for backend, (y_b, idx_b) in found.items():
        assert torch.equal(idx_b, idx), backend
        torch.testing.assert_close(y_b, y)
    with on_backend("chunked"):
        assert torch.equal(layer(x, return_indices=True)[1], idx)  # deterministic
    # a budget covering the padded map (196 tokens) is the exact selection
    exact = ConvNN2d(8, 8, K=9, padding=1).eval()
    full = ConvNN2d(8, 8, K=9, padding=1, candidates="ann", num_candidates=196).eval()
    full.load_state_dict(exact.state_dict())
    assert torch.equal(full(x, return_indices=True)[1], exact(x, return_indices=True)[1])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("include_self", [False, True])
def test_layers_rank_exactly_the_index_lists(metric, include_self):
    # The layer scores a tile's shared window with one GEMM; its selection must be the top-K
    # of each query's lists (ann_candidates) with ties to the lower index, and the same as
    # the query-by-query path that scores without a GEMM form (a zero relative bias).
    x = feature_map(2, 8, 10, 10, seed=15).double()
    options = dict(K=7, metric=metric, candidates="ann", num_candidates=40, ann_tables=4)
    layer = ConvNN2d(8, 8, include_self=include_self, **options).double().eval()
    idx = layer(x, return_indices=True)[1]  # (B, N, K); padding 0: the tokens are the map
    tokens = x.flatten(2).transpose(1, 2)
    lists = ann_candidates(tokens, tokens, 40, metric=metric, tables=4)
    s = similarity(metric, tokens, tokens)
    assert torch.equal(idx, topk_of_lists(s, lists, 7, include_self))
    biased = ConvNN2d(
        8, 8, include_self=include_self, positional="relative_bias", weighting="softmax", **options
    )
    biased = biased.double().eval()
    with torch.no_grad():
        biased.get_parameter(_bias_table(biased)).zero_()
    assert torch.equal(biased(x, return_indices=True)[1], idx)


def _bias_table(layer: nn.Module) -> str:
    (name,) = [n for n, _ in layer.named_parameters() if "table" in n]
    return name


def test_attention_ranks_the_same_ann_candidates_on_every_backend():
    x = clustered(2, 64, 16, seed=13)
    torch.manual_seed(0)
    attn = ConvNNAttention(
        16, num_heads=2, K=6, candidates="ann", num_candidates=24, ann_tables=2
    ).eval()
    out = {}
    for backend in ("reference", "chunked"):
        with on_backend(backend):
            out[backend] = attn(x)
    torch.testing.assert_close(out["reference"], out["chunked"])


def test_ann_layer_options_name_the_argument():
    cases = [
        (dict(candidates="ann"), "num_candidates"),
        (dict(candidates="ann", num_candidates=64, ann_method="kd"), "ann_method"),
        (dict(candidates="ann", num_candidates=64, ann_tables=0), "ann_tables"),
        (dict(candidates="ann", num_candidates=64, ann_projection="pcaa"), "ann_projection"),
        (
            dict(candidates="ann", num_candidates=64, ann_method="lsh", ann_projection="pca"),
            "ann_projection",
        ),
        (dict(candidates="ann", num_candidates=64, ann_seed=-1), "ann_seed"),
        (dict(candidates="ann", num_candidates=64, metric="manhattan"), "metric"),
    ]
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            ConvNN2d(4, 4, K=9, **options)
    layer = ConvNN2d(4, 4, K=9, candidates="ann", num_candidates=32)  # 8 tables of 4 < K
    with pytest.raises(ValueError, match="num_candidates"):
        layer(feature_map(1, 4, 8, 8, seed=14))


def test_a_network_with_ann_candidates_learns_the_digits():
    from convnn.data.digits import load_digits

    train, _, test, _ = load_digits()
    torch.manual_seed(0)
    ann = dict(K=9, padding=1, candidates="ann", num_candidates=32, ann_tables=2)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # pixels are scalars: give the index features to hash
        nn.ReLU(),
        ConvNN2d(16, 16, **ann),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        i = torch.randint(0, len(train.labels), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(train.images[i]), train.labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.images).argmax(-1) == test.labels).double().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
