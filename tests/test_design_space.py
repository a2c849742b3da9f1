"""The design space as components (DESIGN.md 2 and 2b): one options object, the metrics,
the positional encodings and the dispatcher, each against an independent float64 formula."""

from __future__ import annotations

import inspect
import math
import os
import re
from contextlib import contextmanager, nullcontext

import pytest
import torch

import convnn
import convnn.functional as CF
from convnn import ConvNN1d, ConvNN2d, ConvNNAttention
from convnn.spec import ConvNNSpec

F64 = torch.float64


def _documented(doc: str) -> set[str]:
    """Names documented as ``name:`` entries of a docstring's argument list."""
    return {m.group(1) for m in re.finditer(r"^\s+(\w+)(?:, \w+)*:", doc, re.M)} | {
        n for m in re.finditer(r"^\s+(\w+(?:, \w+)+):", doc, re.M) for n in m.group(1).split(", ")
    }


@pytest.mark.parametrize("layer", [ConvNN2d, ConvNNAttention])
def test_layer_options_are_the_spec(layer):
    """Every option of ConvNNSpec is a documented argument of the layer and of its
    functional form, and the layer keeps it in ``layer.spec``."""
    fields = set(ConvNNSpec.fields())
    fn = CF.convnn2d if layer is ConvNN2d else CF.convnn_attention
    for callable_ in (layer.__init__, fn):
        assert fields <= set(inspect.signature(callable_).parameters), callable_
    missing = fields - _documented(layer.__doc__)
    assert not missing, f"{layer.__name__} does not document {sorted(missing)}"


def test_spec_validates_once_with_clear_errors():
    with pytest.raises(ValueError, match="metric must be one of"):
        ConvNNSpec(metric="nope")
    with pytest.raises(ValueError, match="num_candidates is required"):
        ConvNNSpec(candidates="grid")
    with pytest.raises(ValueError, match="K=None"):
        ConvNNSpec(K=None)
    spec = ConvNNSpec(metric="euclidean", weighting="softmax")
    assert spec.changed() == {"metric": "euclidean", "weighting": "softmax"}
    assert ConvNN2d(4, 4, K=4, metric="euclidean", weighting="softmax").spec == spec.replace(K=4)


def test_extra_repr_shows_non_default_options():
    r = repr(ConvNN2d(4, 4, K=4, metric="euclidean", weighting="softmax"))
    assert "metric='euclidean'" in r and "weighting='softmax'" in r and "candidates" not in r
    r = repr(ConvNNAttention(8, 2, K=3))
    assert "metric" not in r and "K=3" in r
    r = repr(ConvNN1d(4, 4, K=3, positional="coords", lam=0.25))
    assert "positional='coords'" in r and "lam=0.25" in r


def test_coords_deprecated_name_is_positional_coords():
    x = torch.randn(1, 3, 5, 6, dtype=F64)
    w = torch.randn(3, 3, 4, dtype=F64)
    a = CF.convnn2d(x, w, K=4, coords="xy", lam=0.3)
    b = CF.convnn2d(x, w, K=4, positional="coords", lam=0.3)
    assert torch.equal(a, b)
    assert ConvNN2d(3, 3, K=4, coords="xy").spec.positional == "coords"
    with pytest.raises(ValueError, match="coords='xy' is positional='coords'"):
        CF.convnn2d(x, w, K=4, coords="xy", positional="rope")


# --------------------------------------------------------------------------- metrics
# Independent float64 formulas of DESIGN.md 2b: x (..., n, d), y (..., m, d) -> (..., n, m).


def _diff(x, y):
    return x[..., :, None, :] - y[..., None, :, :]


def _centred_unit(x):
    c = x - x.mean(-1, keepdim=True)
    n = c.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, c / n.clamp_min(1e-300), torch.zeros_like(c))


def formula(name, x, y, params=None, p=2.0):
    """s(x, y) of DESIGN.md 2b; params: {name: (d, d)} for the learnable metrics."""
    if name == "manhattan":
        return -_diff(x, y).abs().sum(-1)
    if name == "minkowski":
        if p == math.inf:
            return -_diff(x, y).abs().amax(-1)
        total = _diff(x, y).abs().pow(p).sum(-1)
        nonzero = total > 0  # the subgradient 0 at a zero difference (a query and itself)
        return -torch.where(nonzero, total, 1).pow(1 / p) * nonzero
    if name == "chebyshev":
        return -_diff(x, y).abs().amax(-1)
    if name == "pearson":
        return _centred_unit(x) @ _centred_unit(y).transpose(-1, -2)
    if name == "mahalanobis":  # -|L^T (x - y)|^2
        L = params["L"].tril()
        return -(_diff(x, y) @ L).pow(2).sum(-1)
    if name == "bilinear":  # x^T W y / sqrt(d)
        return (x @ params["W"] @ y.transpose(-1, -2)) / math.sqrt(x.shape[-1])
    raise AssertionError(name)


NEW_METRICS = [
    ("manhattan", 2.0),
    ("minkowski", 3.0),
    ("minkowski", math.inf),
    ("chebyshev", 2.0),
    ("pearson", 2.0),
    ("mahalanobis", 2.0),
    ("bilinear", 2.0),
]
BACKENDS = ["reference", "chunked", "triton"]
CANDIDATE_MODES = [
    dict(candidates="all"),
    dict(candidates="random", num_candidates=20),
    dict(candidates="grid", num_candidates=12),
    dict(candidates="window", window=3),
]


def _learned(name, d, heads=None, seed=0):
    """Random (not initial) parameters of a learnable metric: (d, d), or (heads, d, d)."""
    g = torch.Generator().manual_seed(seed)
    shape = (d, d) if heads is None else (heads, d, d)
    if name == "mahalanobis":
        return {"L": torch.eye(d) + 0.3 * torch.randn(shape, generator=g, dtype=F64)}
    if name == "bilinear":
        return {"W": torch.eye(d) + 0.3 * torch.randn(shape, generator=g, dtype=F64)}
    return None


def _candidate_sets(grid, options, queries, M):
    """Each query's candidate keys, as a boolean (N, M) mask (the candidate stage's sets)."""
    from convnn.stages import candidates as cstage

    spec = ConvNNSpec(K=1, **options)
    cands = cstage.build(spec, grid, False, None, "cpu")
    mask = torch.zeros(queries.numel(), M, dtype=torch.bool)
    if cands.shared is not None:
        mask[:, cands.shared] = True
    elif cands.per_query is not None:
        mask.scatter_(1, cands.per_query, True)
    else:
        mask[:] = True
    return mask


def _backend_ok(backend):
    if backend != "triton":
        return nullcontext()
    pytest.importorskip("triton")
    return _interpret()


@contextmanager
def _interpret():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _assert_same_result(dtype, pairs, grads):
    """Library and formula outputs and gradients agree: pairs [(ours, formula)]; grads
    [(ours, formula)] tensors whose .grad compare."""
    tol = dict(rtol=2e-3, atol=2e-3) if dtype != F64 else dict(rtol=1e-7, atol=1e-9)
    for a, b in pairs:
        torch.testing.assert_close(a.detach().to(F64), b.detach(), **tol)
    for a, b in grads:
        torch.testing.assert_close(a.grad.to(F64).reshape(b.grad.shape), b.grad, **tol)


def _check_map(name, p, backend, options, *, seed=0):
    """ConvNN2d's functional form with a new metric on a non-square map with padding and
    stride, softmax weighting: the selected neighbours are the formula's top K among each
    query's candidates, and output and gradients equal the formula's."""
    dtype = torch.float32 if backend == "triton" else F64
    B, C, H, W, K, pad, stride = 2, 4, 5, 7, 4, 1, 2
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(B, C, H, W, generator=g, dtype=F64)
    w64 = torch.randn(C, C, K, generator=g, dtype=F64)
    params64 = _learned(name, C)
    x = x64.to(dtype, copy=True).requires_grad_()
    w = w64.to(dtype, copy=True).requires_grad_()
    params = None
    if params64 is not None:
        params = {n: t[None].to(dtype, copy=True).requires_grad_() for n, t in params64.items()}
    with _backend_ok(backend):
        y, idx = CF.convnn2d(
            x, w, None, K, stride, pad, metric=name, p=p, weighting="softmax",
            include_self=False, metric_params=params, return_indices=True, backend=backend,
            **options,
        )  # fmt: skip
        y.square().sum().backward()
    # the formula, on the same selected neighbours
    grid = CF.Grid(H, W, pad, pad, stride, stride)
    queries = grid.index("cpu")
    xr = x64.clone().requires_grad_()
    wr = w64.clone().requires_grad_()
    pr = None if params64 is None else {n: t.clone().requires_grad_() for n, t in params64.items()}
    tokens = torch.nn.functional.pad(xr, (pad, pad, pad, pad)).flatten(2).transpose(1, 2)
    S = formula(name, tokens[:, queries], tokens, pr, p).detach()  # (B, N, M), for selection
    mask = _candidate_sets(grid, options, queries, tokens.shape[1])
    # selection: the K best candidates by the formula (compare values: ties may swap)
    best = S.detach().masked_fill(~mask, -math.inf).topk(K, -1).values
    got = S.detach().gather(-1, idx)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != F64 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.sort(-1, descending=True).values, best, **tol)
    assert bool(mask.gather(1, idx[0]).all()) and bool(mask.gather(1, idx[1]).all())
    nb = tokens[torch.arange(B)[:, None, None], idx]  # (B, N, K, C)
    # differentiate the formula on the selected pairs only (an Lp norm's gradient at a zero
    # difference elsewhere, e.g. padding against padding, would be 0 * inf)
    rho = formula(name, tokens[:, queries, None], nb, pr, p)[..., 0, :].softmax(-1)
    yr = torch.einsum("bnk,bnkc,ock->bon", rho, nb, wr).reshape(y.shape)
    yr.square().sum().backward()
    learned = [(params[n], pr[n]) for n in params or {}]
    _assert_same_result(dtype, [(y, yr)], [(x, xr), (w, wr), *learned])


@pytest.mark.parametrize("options", CANDIDATE_MODES, ids=lambda o: o["candidates"])
@pytest.mark.parametrize("name,p", NEW_METRICS, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_new_metric_map_matches_formula(backend, name, p, options):
    _check_map(name, p, backend, options)


@pytest.mark.parametrize("options", CANDIDATE_MODES, ids=lambda o: o["candidates"])
@pytest.mark.parametrize("name,p", NEW_METRICS[::2] + [NEW_METRICS[-1]], ids=lambda v: str(v))
def test_new_metric_map_matches_formula_triton(name, p, options):
    """The Triton backend (TRITON_INTERPRET=1 on the CPU): the metrics with a GEMM form
    select on its kernel, the others on chunked (the dispatcher says so)."""
    _check_map(name, p, "triton", options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,p", NEW_METRICS, ids=lambda v: str(v))
@pytest.mark.parametrize("candidates", ["all", "window"])
def test_new_metric_attention_matches_formula(backend, name, p, candidates):
    """Per-head scores (and per-head learnable parameters) in convnn_attention."""
    dtype = torch.float32 if backend == "triton" else F64
    B, G, h, w, d, K = 1, 2, 3, 4, 4, 3
    N = h * w
    g = torch.Generator().manual_seed(3)
    q64, k64, v64 = (torch.randn(B, G, N, d, generator=g, dtype=F64) for _ in range(3))
    p64 = _learned(name, d, heads=G)
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (q64, k64, v64))
    params = (
        None
        if p64 is None
        else {n: t.to(dtype, copy=True).requires_grad_() for n, t in p64.items()}
    )
    options = dict(candidates="window", window=3) if candidates == "window" else {}
    with _backend_ok(backend):
        y, idx = CF.convnn_attention(
            q, k, v, K, metric=name, p=p, hw=(h, w), metric_params=params,
            return_indices=True, backend=backend, **options,
        )  # fmt: skip
        y.square().sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    pr = None if p64 is None else {n: t.clone().requires_grad_() for n, t in p64.items()}
    S = torch.stack(
        [
            formula(name, q64[:, j], k64[:, j], p64 and {n: t[j] for n, t in p64.items()}, p)
            for j in range(G)
        ],
        1,
    )  # (B, G, N, N), for selection
    mask = _candidate_sets(CF.Grid(h, w), options or {"candidates": "all"}, torch.arange(N), N)
    best = S.detach().masked_fill(~mask, -math.inf).topk(K, -1).values
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != F64 else dict(rtol=1e-9, atol=1e-9)
    got = S.detach().gather(-1, idx).sort(-1, descending=True).values
    torch.testing.assert_close(got, best, **tol)
    at = (torch.arange(B)[:, None, None, None], torch.arange(G)[None, :, None, None], idx)
    nb = vr[at]
    kb = kr[at]  # (B, G, N, K, d): each query's selected keys
    Sp = torch.stack(
        [
            formula(name, qr[:, j, :, None], kb[:, j], pr and {n: t[j] for n, t in pr.items()}, p)
            for j in range(G)
        ],
        1,
    )[..., 0, :]
    rho = Sp.softmax(-1)
    yr = torch.einsum("bgnk,bgnkd->bngd", rho, nb).reshape(B, N, G * d)
    yr.square().sum().backward()
    learned = [(params[n], pr[n]) for n in params or {}]
    _assert_same_result(dtype, [(y, yr)], [(q, qr), (k, kr), (v, vr), *learned])


@pytest.mark.parametrize("name", ["mahalanobis", "bilinear"])
def test_learnable_metric_gradcheck(name):
    """gradcheck of the learnable metric parameters through softmax weighting."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 4, 5, generator=g, dtype=F64)
    w = torch.randn(3, 3, 4, generator=g, dtype=F64)
    (n, t), = _learned(name, 3).items()  # fmt: skip
    t = t[None].clone().requires_grad_()
    f = lambda t: CF.convnn2d(  # noqa: E731
        x, w, K=4, padding=1, metric=name, weighting="softmax", metric_params={n: t},
        backend="reference",
    )  # fmt: skip
    assert torch.autograd.gradcheck(f, (t,))


@pytest.mark.parametrize("layer", ["conv", "attention"])
@pytest.mark.parametrize("name", ["mahalanobis", "bilinear"])
def test_learnable_metric_belongs_to_the_layer_and_trains(layer, name):
    torch.manual_seed(0)
    if layer == "conv":
        m = ConvNN2d(4, 4, K=4, metric=name, weighting="softmax")
        x = torch.randn(2, 4, 5, 6)
    else:
        m = ConvNNAttention(8, 2, K=3, metric=name)
        x = torch.randn(2, 7, 8)
    key = f"metric_params.{'L' if name == 'mahalanobis' else 'W'}"
    assert key in m.state_dict()
    start = m.state_dict()[key].clone()
    heads = 1 if layer == "conv" else 2
    assert torch.equal(start, torch.eye(start.shape[-1]).expand(heads, -1, -1))  # identity
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).square().mean().backward()
    opt.step()
    assert not torch.equal(m.state_dict()[key], start)


def test_learnable_metrics_start_as_their_plain_forms():
    """mahalanobis starts as euclidean, bilinear as scaled_dot."""
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    torch.manual_seed(0)
    a = ConvNN2d(4, 4, K=4, metric="mahalanobis", weighting="softmax", dtype=F64)
    torch.manual_seed(0)
    b = ConvNN2d(4, 4, K=4, metric="euclidean", weighting="softmax", dtype=F64)
    torch.testing.assert_close(a(x), b(x))
    t = torch.randn(2, 7, 8, dtype=F64)
    torch.manual_seed(0)
    a = ConvNNAttention(8, 2, K=3, metric="bilinear", dtype=F64)
    torch.manual_seed(0)
    b = ConvNNAttention(8, 2, K=3, metric="scaled_dot", dtype=F64)
    torch.testing.assert_close(a(t), b(t))


def test_learnable_metric_without_softmax_warns():
    with pytest.warns(UserWarning, match="receive no gradient"):
        ConvNN2d(4, 4, K=4, metric="mahalanobis")


def test_self_pair_gradients_are_finite():
    """include_self puts a zero difference in slot 0: Lp metrics' gradient stays finite."""
    for name, p in NEW_METRICS[:4]:
        x = torch.randn(1, 3, 4, 5, dtype=F64, requires_grad=True)
        w = torch.randn(3, 3, 4, dtype=F64)
        CF.convnn2d(x, w, K=4, metric=name, p=p, weighting="softmax").sum().backward()
        assert torch.isfinite(x.grad).all(), name


def test_bad_p_is_a_clear_error():
    with pytest.raises(ValueError, match="p must be a number >= 1"):
        ConvNN2d(4, 4, K=4, metric="minkowski", p=0.5)


@pytest.mark.parametrize("name,p", NEW_METRICS, ids=lambda v: str(v))
def test_dispatcher_says_where_each_metric_selects(name, p):
    """Forced 'triton': a metric with a GEMM form selects on the kernel; one without (Lp)
    selects on chunked, and the decision says why (never a silent hand-off)."""
    pytest.importorskip("triton")
    from convnn.backends import explain
    from convnn.metrics import get_metric

    x = torch.randn(1, 4, 4, 5)
    w = torch.randn(4, 4, 4)
    with _interpret():
        decisions = explain(CF.convnn2d, x, w, K=4, metric=name, p=p, backend="triton")
    sel = [d for d in decisions if d.stage == "selection"]
    gemm = get_metric(name, p).operands(x[0, :, 0].T, x[0, :, 0].T) is not None
    assert [d.backend for d in sel] == ["triton" if gemm else "chunked"]
    if not gemm:
        assert "no GEMM form" in sel[0].reason


def test_forced_backend_that_cannot_run_is_a_clear_error():
    x = torch.randn(1, 4, 4, 5)
    with _interpret():
        del os.environ["TRITON_INTERPRET"]
        with pytest.raises(ValueError, match="backend 'triton' needs a CUDA tensor"):
            CF.convnn2d(x, torch.randn(4, 4, 4), K=4, backend="triton")
        os.environ["TRITON_INTERPRET"] = "1"


def test_explain_names_the_exact_shortcuts():
    from convnn.backends import explain

    x = torch.randn(1, 3, 6, 5)
    conv = ConvNN2d(3, 3, 3, padding=1, metric="spatial")
    assert [(d.stage, d.backend) for d in explain(conv, x)] == [("shortcut", "F.conv2d")]
    att = ConvNNAttention(8, 2, K=None, kernel="none")
    assert [(d.stage, d.backend) for d in explain(att, torch.randn(1, 5, 8))] == [
        ("shortcut", "SDPA")
    ]


# --------------------------------------------------------------------------- a user's metric


class Cauchy:
    """A user's metric: -log(1 + |x - y|^2), scored block by block (no GEMM form)."""

    def score(self, x, y):
        return -torch.log1p(torch.cdist(x, y).pow(2))


@pytest.fixture
def cauchy():
    from convnn.metrics import register_metric, unregister_metric

    register_metric("cauchy", Cauchy())
    yield "cauchy"
    unregister_metric("cauchy")


def _dense_cauchy(x, y):
    return -torch.log1p((x[..., :, None, :] - y[..., None, :, :]).pow(2).sum(-1))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_custom_metric_in_conv_and_attention(cauchy, backend):
    torch.manual_seed(0)
    conv = ConvNN2d(3, 3, K=4, padding=1, metric=cauchy, weighting="softmax", dtype=F64)
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    with convnn.backends.use(backend):
        y, idx = conv(x, return_indices=True)
    tokens = torch.nn.functional.pad(x, (1, 1, 1, 1)).flatten(2).transpose(1, 2)
    q = CF.Grid(4, 5, 1, 1).index("cpu")
    S = _dense_cauchy(tokens[:, q], tokens)  # (B, N, M)
    S.scatter_(-1, q.expand(2, -1)[..., None], -math.inf)  # include_self: slot 0 is the query
    best = S.topk(3, -1)
    torch.testing.assert_close(
        S.gather(-1, idx[..., 1:]).sort(-1).values, best.values.sort(-1).values
    )
    assert torch.equal(idx[..., 0], q.expand(2, -1))
    nb = tokens[torch.arange(2)[:, None, None], idx]
    s = _dense_cauchy(tokens[:, q, None], nb)[..., 0, :]
    yr = torch.einsum("bnk,bnkc,ock->bon", s.softmax(-1), nb, conv.weight) + conv.bias[:, None]
    torch.testing.assert_close(y, yr.reshape(y.shape))

    att = ConvNNAttention(8, 2, K=3, metric=cauchy, kernel="none", dtype=F64)
    t = torch.randn(2, 6, 8, dtype=F64)
    with convnn.backends.use(backend):
        out = att(t)
    q_, k_, v_ = att.qkv(t).view(2, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    S = _dense_cauchy(q_, k_)
    top = S.topk(3, -1)
    rho = top.values.softmax(-1)
    nb = v_[torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None], top.indices]
    ref = att.proj(torch.einsum("bgnk,bgnkd->bngd", rho, nb).reshape(2, 6, 8))
    torch.testing.assert_close(out, ref)


def test_custom_metric_on_triton_runs_chunked_visibly(cauchy):
    pytest.importorskip("triton")
    from convnn.backends import explain

    x = torch.randn(1, 3, 4, 5)
    with _interpret():
        decisions = explain(
            CF.convnn2d, x, torch.randn(3, 3, 4), K=4, metric=cauchy, backend="triton"
        )
    sel = [d for d in decisions if d.stage == "selection"][0]
    assert sel.backend == "chunked" and "no GEMM form" in sel.reason


def test_register_metric_errors():
    from convnn.metrics import register_metric

    with pytest.raises(ValueError, match="built-in"):
        register_metric("cosine", Cauchy())
    with pytest.raises(ValueError, match="score"):
        register_metric("bad", object())


# --------------------------------------------------------------------------- positional
# Independent float64 formulas of DESIGN.md 2b's encodings on token positions.


def _positions(Hp, Wp, ph, pw, H, W):
    """(row, col) in grid steps of the original map and normalised to [-1, 1]: (M, 2) each."""
    r = torch.arange(Hp, dtype=F64)[:, None].expand(Hp, Wp).reshape(-1) - ph
    c = torch.arange(Wp, dtype=F64)[None, :].expand(Hp, Wp).reshape(-1) - pw
    steps = torch.stack([r, c], -1)
    norm = torch.stack([r / max(H - 1, 1) * 2 - 1, c / max(W - 1, 1) * 2 - 1], -1)
    return steps, norm


def _rope_ref(x, angles_pos, ndim):
    """Rotate x (..., n, d): blocks of D channels (2-D: [row | col], 1-D: [index]); in a
    block channel j pairs with j + D/2 and turns by pos * 10000^(-2j/D)."""
    d = x.shape[-1]
    blocks = [(0, d, angles_pos[:, 1])] if ndim == 1 else [
        (0, d // 2, angles_pos[:, 0]), (d // 2, d, angles_pos[:, 1])
    ]  # fmt: skip
    out = x.clone()
    for a, b, pos in blocks:
        D = b - a
        for j in range(D // 2):
            t = pos * 10000.0 ** (-2 * j / D)
            u, v = x[..., a + j], x[..., a + j + D // 2]
            out[..., a + j] = u * torch.cos(t) - v * torch.sin(t)
            out[..., a + j + D // 2] = u * torch.sin(t) + v * torch.cos(t)
    return out


def _encode(pos_name, feats, steps, norm, params, ndim, lam=0.5):
    """Selection features (..., M, d) of every token with the encoding (feature side)."""
    if ndim == 1:
        norm = norm[:, 1:]
    if pos_name == "coords":
        return torch.cat([(1 - lam) * feats, lam * norm.expand(*feats.shape[:-1], -1)], -1)
    if pos_name == "fourier":
        proj = 2 * math.pi * norm @ params["B"].T
        enc = torch.cat([proj.sin(), proj.cos()], -1)
        return torch.cat([feats, enc.expand(*feats.shape[:-2], -1, -1)], -1)
    if pos_name == "rope":
        return _rope_ref(feats, steps, ndim)
    return feats


def _rel_bias(table, steps_q, steps_k):
    """T[clamp(dy), clamp(dx)] (G, n, m) of queries at steps_q (n, 2), keys at steps_k (m, 2)."""
    Ry, Rx = (table.shape[-2] - 1) // 2, (table.shape[-1] - 1) // 2
    dy = (steps_k[None, :, 0] - steps_q[:, None, 0]).clamp(-Ry, Ry).long() + Ry
    dx = (steps_k[None, :, 1] - steps_q[:, None, 1]).clamp(-Rx, Rx).long() + Rx
    return table[:, dy, dx]


def _pos_params(pos_name, C, heads, ndim, R=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    if pos_name == "fourier":
        return {"B": torch.randn(3, ndim, generator=g, dtype=F64)}
    if pos_name == "relative_bias":
        return {
            "table": torch.randn(
                heads, 2 * R + 1 if ndim == 2 else 1, 2 * R + 1, generator=g, dtype=F64
            )
        }
    if pos_name == "cpe":
        kh = 3 if ndim == 2 else 1
        return {
            "weight": 0.5 * torch.randn(C, 1, kh, 3, generator=g, dtype=F64),
            "bias": torch.randn(C, generator=g, dtype=F64),
        }
    return None


POSITIONALS = ["coords", "fourier", "relative_bias", "cpe", "rope"]
POS_OPTIONS = dict(num_frequencies=3, max_offset=2)


def _check_map_positional(pos_name, backend, options, ndim, metric="cosine"):
    dtype = torch.float32 if backend == "triton" else F64
    B, C, K = 2, 4, 4
    H, W, pad, stride = (5, 7, 1, 2) if ndim == 2 else (1, 11, 1, 2)
    ph = pad if ndim == 2 else 0
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(B, C, H, W, generator=g, dtype=F64)
    w64 = torch.randn(C, C, K, generator=g, dtype=F64)
    p64 = _pos_params(pos_name, C, 1, ndim)
    x = x64.to(dtype, copy=True).requires_grad_()
    w = w64.to(dtype, copy=True).requires_grad_()
    params = (
        None
        if p64 is None
        else {n: t.to(dtype, copy=True).requires_grad_() for n, t in p64.items()}
    )
    fn = CF.convnn2d if ndim == 2 else CF.convnn1d
    xin = x if ndim == 2 else x[:, :, 0]
    with _backend_ok(backend):
        y, idx = fn(
            xin, w, None, K, stride, pad, metric=metric, weighting="softmax", positional=pos_name,
            positional_params=params, return_indices=True, backend=backend, **POS_OPTIONS, **options,
        )  # fmt: skip
        y.square().sum().backward()
    xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    pr = None if p64 is None else {n: t.clone().requires_grad_() for n, t in p64.items()}
    xe = xr
    if pos_name == "cpe":
        cw = pr["weight"]
        xe = xr + torch.nn.functional.conv2d(
            xr, cw, pr["bias"], padding=(cw.shape[2] // 2, 1), groups=C
        )
    tokens = torch.nn.functional.pad(xe, (pad, pad, ph, ph)).flatten(2).transpose(1, 2)
    Hp, Wp = H + 2 * ph, W + 2 * pad
    steps, norm = _positions(Hp, Wp, ph, pad, H, W)
    grid = CF.Grid(H, W, ph, pad, 1 if ndim == 1 else stride, stride)
    queries = grid.index("cpu")
    feats = _encode(pos_name, tokens, steps, norm, pr, ndim)
    dist = lambda a, b: (
        torch.nn.functional.normalize(a, dim=-1)
        @ torch.nn.functional.normalize(b, dim=-1).transpose(-1, -2)
    )  # noqa: E731
    S = dist(feats[:, queries], feats)
    if pos_name == "relative_bias":
        S = S + _rel_bias(pr["table"], steps[queries], steps)
    # include_self (the default): slot 0 is the query, the others the best of the rest
    assert torch.equal(idx[..., 0], queries.expand(B, -1))
    mask = _candidate_sets(grid, options, queries, tokens.shape[1])
    mask[torch.arange(len(queries)), queries] = False
    Sd = S.detach()
    best = Sd.masked_fill(~mask, -math.inf).topk(K - 1, -1).values
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != F64 else dict(rtol=1e-9, atol=1e-9)
    got = Sd.gather(-1, idx[..., 1:]).sort(-1, descending=True).values
    torch.testing.assert_close(got, best, **tol)
    rho = S.gather(-1, idx).softmax(-1)
    nb = tokens[torch.arange(B)[:, None, None], idx]
    yr = torch.einsum("bnk,bnkc,ock->bon", rho, nb, wr).reshape(y.shape)
    yr.square().sum().backward()
    learned = [(params[n], pr[n]) for n in params or {} if n != "B"]
    _assert_same_result(dtype, [(y, yr)], [(x, xr), (w, wr), *learned])


@pytest.mark.parametrize("options", CANDIDATE_MODES, ids=lambda o: o["candidates"])
@pytest.mark.parametrize("pos_name", POSITIONALS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_positional_map_matches_formula(backend, pos_name, options):
    _check_map_positional(pos_name, backend, options, ndim=2)


@pytest.mark.parametrize("pos_name", POSITIONALS)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_positional_sequence_matches_formula(backend, pos_name):
    """The 1-D forms (ConvNN1d): positions are the sequence index."""
    _check_map_positional(pos_name, backend, dict(candidates="all"), ndim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_name", ["coords", "fourier", "relative_bias", "rope"])
@pytest.mark.parametrize("hw", [(3, 4), None], ids=["2d", "1d"])
def test_positional_attention_matches_formula(backend, pos_name, hw):
    dtype = torch.float32 if backend == "triton" else F64
    B, G, N, d, K = 1, 2, 12, 4, 3
    ndim = 1 if hw is None else 2
    g = torch.Generator().manual_seed(4)
    q64, k64, v64 = (torch.randn(B, G, N, d, generator=g, dtype=F64) for _ in range(3))
    p64 = _pos_params(pos_name, None, G, ndim)
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (q64, k64, v64))
    params = (
        None
        if p64 is None
        else {n: t.to(dtype, copy=True).requires_grad_() for n, t in p64.items()}
    )
    with _backend_ok(backend):
        y, idx = CF.convnn_attention(
            q, k, v, K, hw=hw, positional=pos_name, positional_params=params,
            return_indices=True, backend=backend, **POS_OPTIONS,
        )  # fmt: skip
        y.square().sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    pr = None if p64 is None else {n: t.clone().requires_grad_() for n, t in p64.items()}
    h, w = hw or (1, N)
    steps, norm = _positions(h, w, 0, 0, h, w)
    qe, ke = (_encode(pos_name, t, steps, norm, pr, ndim) for t in (qr, kr))
    S = qe @ ke.transpose(-1, -2) / math.sqrt(qe.shape[-1])  # scaled_dot of the encoded features
    if pos_name == "relative_bias":
        S = S + _rel_bias(pr["table"], steps, steps)
    best = S.detach().topk(K, -1).values
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != F64 else dict(rtol=1e-9, atol=1e-9)
    got = S.detach().gather(-1, idx).sort(-1, descending=True).values
    torch.testing.assert_close(got, best, **tol)
    rho = S.gather(-1, idx).softmax(-1)
    nb = vr[torch.arange(B)[:, None, None, None], torch.arange(G)[None, :, None, None], idx]
    yr = torch.einsum("bgnk,bgnkd->bngd", rho, nb).reshape(B, N, G * d)
    yr.square().sum().backward()
    learned = [(params[n], pr[n]) for n in params or {} if n != "B"]
    _assert_same_result(dtype, [(y, yr)], [(q, qr), (k, kr), (v, vr), *learned])


def test_relative_bias_table_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 4, 5, generator=g, dtype=F64)
    w = torch.randn(3, 3, 4, generator=g, dtype=F64)
    table = torch.randn(1, 5, 5, generator=g, dtype=F64, requires_grad=True)
    f = lambda t: CF.convnn2d(  # noqa: E731
        x, w, K=4, padding=1, stride=(2, 1), weighting="softmax", positional="relative_bias",
        max_offset=2, positional_params={"table": t}, backend="reference",
    )  # fmt: skip
    assert torch.autograd.gradcheck(f, (table,))


@pytest.mark.parametrize("pos_name", ["relative_bias", "cpe"])
def test_learnable_encodings_start_as_the_layer_without_them(pos_name):
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    torch.manual_seed(0)
    a = ConvNN2d(4, 4, K=4, padding=1, positional=pos_name, weighting="softmax", dtype=F64)
    torch.manual_seed(0)
    b = ConvNN2d(4, 4, K=4, padding=1, weighting="softmax", dtype=F64)
    torch.testing.assert_close(a(x), b(x))
    key = "positional_params.table" if pos_name == "relative_bias" else "positional_params.weight"
    assert key in a.state_dict() and not a.state_dict()[key].any()
    t = torch.randn(2, 13, 8, dtype=F64)
    torch.manual_seed(0)
    a = (
        ConvNNAttention(
            8, 2, K=3, positional=pos_name, grid_size=(3, 4), num_prefix_tokens=1, dtype=F64
        )
        if pos_name == "cpe"
        else ConvNNAttention(8, 2, K=3, positional=pos_name, grid_size=(3, 4), dtype=F64)
    )
    torch.manual_seed(0)
    b = ConvNNAttention(
        8, 2, K=3, grid_size=(3, 4), num_prefix_tokens=1 if pos_name == "cpe" else 0, dtype=F64
    )
    t = t if pos_name == "cpe" else t[:, 1:]
    torch.testing.assert_close(a(t), b(t))
    # and it trains
    a(t).square().sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in a.positional_params.parameters()
    )


def test_cpe_attention_layer_matches_formula():
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=3, positional="cpe", grid_size=(3, 4), dtype=F64)
    with torch.no_grad():
        for p in layer.positional_params.parameters():
            p.normal_()
    t = torch.randn(2, 12, 8, dtype=F64)
    maps = t.transpose(1, 2).reshape(2, 8, 3, 4)
    pp = layer.positional_params
    te = maps + torch.nn.functional.conv2d(maps, pp.weight, pp.bias, padding=1, groups=8)
    te = te.reshape(2, 8, 12).transpose(1, 2)
    plain = ConvNNAttention(8, 2, K=3, grid_size=(3, 4), dtype=F64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "positional" not in k})
    torch.testing.assert_close(layer(t), plain(te))


def test_positional_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvNN2d(6, 6, K=4, positional="rope")(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="even feature dim"):
        ConvNN1d(3, 3, K=3, positional="rope")(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="positional must be 'none' for metric='spatial'"):
        ConvNN2d(4, 4, 3, padding=1, metric="spatial", positional="rope")
    with pytest.raises(ValueError, match="ConvNNAttention layer"):
        q = torch.randn(1, 2, 6, 4)
        CF.convnn_attention(q, q, q, 3, positional="cpe")
    with pytest.raises(ValueError, match="metric='spatial' ranks by position"):
        ConvNNAttention(8, 2, K=3, metric="spatial", grid_size=(2, 2), num_prefix_tokens=1)(
            torch.randn(1, 5, 8)
        )
    with pytest.raises(ValueError, match=r"positional_params\['table'\] must have shape"):
        CF.convnn2d(
            torch.randn(1, 3, 4, 4), torch.randn(3, 3, 4), K=4, positional="relative_bias",
            positional_params={"table": torch.zeros(1, 3, 3)},
        )  # fmt: skip


def test_relative_bias_never_builds_n_by_n():
    """Selection with a relative bias streams: each bias block is at most the chunked
    backend's block of scores (a 64 x 64 map: N x N would be 16.8M scores)."""
    from convnn.stages import positional as enc

    seen = []
    orig = enc._bias

    def spy(*args):
        out = orig(*args)
        seen.append(out.numel())
        return out

    enc._bias = spy
    try:
        x = torch.randn(1, 4, 64, 64)
        CF.convnn2d(x, torch.randn(4, 4, 9), K=9, positional="relative_bias", backend="chunked")
    finally:
        enc._bias = orig
    from convnn.backends import chunked

    assert len(seen) > 1 and max(seen) <= chunked.BLOCK_ELEMENTS < 64**4


def test_new_options_reach_models_and_convert():
    """create_model and convert take every ConvNNSpec field (the option list of one place)."""
    from convnn.models import create_model

    m = create_model(
        "resnet18", num_classes=3, img_size=16, layer="convnn", metric="manhattan",
        positional="relative_bias", weighting="softmax",
    )  # fmt: skip
    layers = [x for x in m.modules() if isinstance(x, ConvNN2d)]
    assert layers and all(x.spec.positional == "relative_bias" for x in layers)
    assert any(k.endswith("positional_params.table") for k in m.state_dict())
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))
    convnn.convert(net, conv="convnn", metric="pearson", positional="rope")
    assert net[0].spec.metric == "pearson" and net[0].spec.positional == "rope"
    with pytest.raises(ValueError, match="positional"):
        create_model("resnet18", layer="convnn", positional="nope")
