"""The Triton backend agrees with the reference backend (kernels run under TRITON_INTERPRET=1
on the CPU, so every size here is tiny), covers exactly its table, and the auto backend's
rule on CUDA (covered calls only, after a one-time check) holds, simulated on the CPU."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

pytest.importorskip("triton")

from convnn import backends  # noqa: E402
from convnn.backends import chunked, reference, triton_aot  # noqa: E402
from convnn.backends import triton as tb  # noqa: E402
from convnn.backends._common import prepare  # noqa: E402
from convnn.functional import convnn2d, convnn_attention  # noqa: E402

F32, F64 = torch.float32, torch.float64
HALF = [torch.bfloat16, torch.float16]


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def small_ints(*shape, seed=0, dtype=F32):
    """Features in {-2..2}: every score is an exact small integer in every dtype (many tie)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=gen).to(dtype)


@pytest.fixture(params=["split", "stream"])
def key_ranges(request, monkeypatch):
    """'stream' runs every key tile of a query block through one program's running top-K,
    'split' gives each tile its own program and merges the per-range top-Ks."""
    monkeypatch.setattr(tb, "TARGET_PROGRAMS", 1 if request.param == "stream" else 1 << 20)


# --------------------------------------------------------------------------- select

SHAPES = [  # (B_query, B_key, N, M, D): N, M, D not multiples of any block; batch broadcast
    (2, 2, 19, 53, 5),
    (1, 2, 7, 100, 17),
    (3, 1, 5, 41, 3),
]


@pytest.mark.parametrize("K", [1, 3, 8, 20, 40])  # every running top-K width up to 64
@pytest.mark.parametrize("shape", SHAPES)
def test_select_matches_reference(key_ranges, K, shape):
    Bq, Bk, N, M, D = shape
    q, k = randn(Bq, N, D, seed=1, dtype=F32), randn(Bk, M, D, seed=2, dtype=F32)
    exclude = torch.randint(-1, M, (N,), generator=torch.Generator().manual_seed(3))
    for ex in (None, exclude):
        got = tb.select(q, k, K, exclude=ex)
        assert got.dtype == torch.long and got.shape == (max(Bq, Bk), N, K)
        assert torch.equal(got, reference.select(q, k, K, exclude=ex))


def test_select_widest_top_k(key_ranges):
    """K = MAX_K (the 128-wide running top-K), with the key range split or streamed."""
    q, k = randn(1, 3, 7, seed=4, dtype=F32), randn(1, 150, 7, seed=5, dtype=F32)
    assert torch.equal(tb.select(q, k, tb.MAX_K), reference.select(q, k, tb.MAX_K))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("K", [1, 6, 33])
def test_select_half_precision(key_ranges, dtype, K):
    """bfloat16/float16 operands, fp32 accumulation: with integer features every score is
    exact, so the result is the reference's on the same values, ties included."""
    q, k = small_ints(2, 9, 20, seed=6, dtype=dtype), small_ints(2, 70, 20, seed=7, dtype=dtype)
    ex = torch.arange(9)
    assert torch.equal(
        tb.select(q, k, K, exclude=ex), reference.select(q.double(), k.double(), K, exclude=ex)
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "scaled_dot"])
def test_select_prepared_metrics(key_ranges, metric):
    q, k = prepare(metric, randn(2, 11, 6, seed=4, dtype=F32), randn(2, 37, 6, seed=5, dtype=F32))
    ex = torch.arange(11)
    assert torch.equal(tb.select(q, k, 5, exclude=ex), reference.select(q, k, 5, exclude=ex))


def test_select_ties_keep_lower_indices(key_ranges):
    """Identical keys score identically: they come out by lower index, and a tie at the
    K-th score keeps the lower index. (Integer features: the interpreter's numpy matmul
    rounds by position in a tile, so only exact scores tie reliably.)"""
    k = small_ints(1, 45, 4, seed=6)
    k[0, [9, 20, 41]] = k[0, 33] = torch.tensor([2.0, -1.0, 2.0, 1.0])
    q = k[:, [33, 33, 0]]
    assert torch.equal(tb.select(q, k, 5), reference.select(q, k, 5))
    assert tb.select(q, k, 4)[0, 0].tolist() == [9, 20, 33, 41]
    assert tb.select(q, k, 3)[0, 0].tolist() == [9, 20, 33]


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_select_ties_of_identical_real_keys(key_ranges, dtype):
    """Identical real-valued keys (cosine of random features) score identically wherever
    they lie among the key tiles and split ranges: they come out by lower index, and a tie
    at the K-th score keeps the lower index; the other query's picks are float64's."""
    k = randn(1, 1000, 24, seed=6, dtype=F32)
    k[0, [9, 20, 513, 999]] = k[0, 33].clone()
    q, k = prepare("cosine", k[:, [33, 33, 0]].to(dtype), k.to(dtype))
    got = tb.select(q, k, 5)
    assert got[0, :2].tolist() == [[9, 20, 33, 513, 999]] * 2
    assert tb.select(q, k, 3)[0, :2].tolist() == [[9, 20, 33]] * 2
    assert torch.equal(got, reference.select(q.double(), k.double(), 5))


def test_select_keeps_lower_indices_on_ties(key_ranges):
    """Small integer features tie everywhere: the kept keys must be the reference's (lower
    indices first among scores tied at the K-th), across tiles and split key ranges."""
    q, k = small_ints(2, 9, 3, seed=7), small_ints(2, 45, 3, seed=8)
    for K in (1, 4, 8, 17):
        assert torch.equal(tb.select(q, k, K), reference.select(q, k, K))


def test_select_nan_ranks_first():
    """NaN scores rank first (as torch.topk); zero scores tie (lower index first)."""
    q = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    k = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [float("nan"), 0.0], [-3.0, 0.0], [0.0, -1.0]]])
    for K in (2, 3, 4):
        assert torch.equal(tb.select(q, k, K), reference.select(q, k, K))


def test_select_refuses_what_it_has_no_kernel_for():
    """Windows and spatial selection have no kernel: the backend refuses them (it never hands
    work to another backend itself); the dispatcher runs that stage on chunked, says so,
    and the result is the reference's."""
    q, k = randn(1, 9, 4, seed=7, dtype=F32), randn(1, 30, 4, seed=8, dtype=F32)
    window = torch.randint(0, 30, (9, 12), generator=torch.Generator().manual_seed(9))
    window = torch.stack([w.unique()[:6] for w in window])
    with pytest.raises(ValueError, match="no selection kernel for per-query candidates"):
        tb.select(q, k, 3, window=window)
    pos = torch.randn(1, 9, 3, dtype=F64)
    with pytest.raises(ValueError, match="spatial metric ranks positions"):
        tb.select(pos, pos, 3, spatial_grid=(3, 3))
    x = randn(1, 2, 5, 6, seed=10, dtype=F32)
    options = dict(K=4, metric="cosine", candidates="window", window=3, kernel="none")
    want = convnn2d(x, None, backend="reference", return_indices=True, **options)
    decisions = backends.explain(partial(convnn2d, backend="triton", **options), x, None)
    assert [(d.stage, d.backend) for d in decisions] == [
        ("selection", "chunked"),
        ("aggregation", "triton"),
    ]
    assert "no selection kernel for per-query candidates" in decisions[0].reason
    got = convnn2d(x, None, backend="triton", return_indices=True, **options)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_ann_candidates_select_the_same_and_aggregate_on_triton():
    """'ann' candidates: the index ranks its (B', N, L) candidate lists itself (the same
    indices on every backend, and explain says so); the Triton kernels aggregate them, as
    the reference does, forward and backward."""
    x = randn(2, 6, 9, 9, seed=21, dtype=F32).requires_grad_()
    w = randn(5, 6, 9, seed=22, dtype=F32).requires_grad_()
    options = dict(K=9, padding=1, candidates="ann", num_candidates=48, ann_tables=4)
    decisions = backends.explain(partial(convnn2d, backend="triton", **options), x, w)
    assert [(d.stage, d.backend) for d in decisions] == [
        ("selection", "ann index"),
        ("aggregation", "triton"),
    ]
    out = {}
    for be in ("reference", "triton"):
        y, idx = convnn2d(x, w, backend=be, return_indices=True, **options)
        y.backward(torch.ones_like(y))
        out[be] = y.detach(), idx, x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
    assert torch.equal(out["triton"][1], out["reference"][1])
    for part in (0, 2, 3):  # the output, the gradients of x and of the weight
        torch.testing.assert_close(
            out["triton"][part], out["reference"][part], rtol=1e-4, atol=1e-4
        )


# --------------------------------------------------------------------------- aggregate


def _aggregate_case(kernel, G, with_rho, with_bias, B=2, M=13, N=9, C=6, K=3, C_out=5):
    """float64 tensors {values, rho, weight, bias} (None where absent), indices, grad_out."""
    c_out = C_out if kernel == "standard" else C
    tensors = {
        "values": randn(B, M, C, seed=10),
        "rho": randn(B, G, N, K, seed=12).sigmoid() if with_rho else None,
        "weight": {
            "none": None,
            "depthwise": randn(C, 1, K, seed=13),
            "standard": randn(C_out, C, K, seed=13),
        }[kernel],
        "bias": randn(c_out, seed=14) if with_bias else None,
    }
    idx = torch.randint(0, M, (B, G, N, K), generator=torch.Generator().manual_seed(11))
    return tensors, idx, randn(B, N, c_out, seed=15)


def _run(be, tensors, idx, grad_out, kernel, dtype):
    """Output and gradients of every given tensor, inputs cast to ``dtype``."""
    leaves = {n: t.to(dtype).requires_grad_() for n, t in tensors.items() if t is not None}
    get = leaves.get
    out = be.aggregate(get("values"), idx, get("rho"), get("weight"), get("bias"), kernel)
    return [out, *torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))]


@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
def test_aggregate_second_derivatives_match_reference(kernel):
    """A backward that builds a graph (create_graph=True: a gradient penalty, a Hessian-vector
    product) gives the reference's second derivatives, for every input: the kernels'
    gradients are not differentiable, so that backward runs as torch operators."""
    tensors, idx, gy = _aggregate_case(kernel, 2, True, True)
    results = []
    for be, dtype in ((tb, F32), (reference, F64)):
        leaves = {n: t.to(dtype).requires_grad_() for n, t in tensors.items() if t is not None}
        get = leaves.get
        out = be.aggregate(get("values"), idx, get("rho"), get("weight"), get("bias"), kernel)
        firsts = torch.autograd.grad(out, list(leaves.values()), gy.to(dtype), create_graph=True)
        penalty = sum((g**2).sum() for g in firsts)
        results.append(torch.autograd.grad(penalty, list(leaves.values()), allow_unused=True))
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("with_rho", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_aggregate_matches_reference(kernel, G, with_rho, with_bias):
    case = _aggregate_case(kernel, G, with_rho, with_bias)
    got = _run(tb, *case, kernel, F32)
    want = _run(reference, *case, kernel, F64)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == F32
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_aggregate_many_blocks(kernel, precision):
    """Several query, channel and output blocks, groups that straddle channel blocks, both
    float32 product precisions (the interpreter computes both exactly)."""
    case = _aggregate_case(kernel, 4, True, True, N=36, C=96, C_out=80, K=2)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = _run(tb, *case, kernel, F32)
    finally:
        torch.set_float32_matmul_precision(previous)
    for g, r in zip(got, _run(reference, *case, kernel, F64), strict=True):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kernel", ["none", "depthwise", "standard"])
def test_aggregate_half_accumulates_in_fp32(dtype, kernel):
    tensors, idx, gy = _aggregate_case(kernel, 1, True, True, K=9, C=16)
    tensors = {n: None if t is None else t.to(dtype).double() for n, t in tensors.items()}
    got = _run(tb, tensors, idx, gy, kernel, dtype)
    want = _run(reference, tensors, idx, gy.to(dtype).double(), kernel, F64)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------- end to end


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize(
    "options",
    [
        dict(metric="cosine", weighting="softmax", kernel="standard"),
        dict(metric="euclidean", kernel="depthwise", include_self=False),
        dict(metric="spatial", kernel="standard", padding=1),
    ],
)
def test_convnn2d_matches_reference(options):
    x = randn(2, 4, 5, 6, seed=20, dtype=F32)
    w = randn(3 if options["kernel"] == "standard" else 4, 1, 4, seed=21, dtype=F32)
    if options["kernel"] == "standard":
        w = randn(3, 4, 4, seed=21, dtype=F32)
    b = randn(w.shape[0], seed=22, dtype=F32)
    got, want = (
        _grads(partial(convnn2d, K=4, backend=be, **options), [x, w, b])
        for be in ("triton", "reference")
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["none", "depthwise"])
def test_convnn_attention_matches_reference(kernel):
    q, k, v = (randn(2, 2, 10, 4, seed=s, dtype=F32) for s in (30, 31, 32))
    w = randn(8, 1, 3, seed=33, dtype=F32) if kernel == "depthwise" else None
    got, want = (
        _grads(partial(convnn_attention, K=3, kernel=kernel, weight=w, backend=be), [q, k, v])
        for be in ("triton", "reference")
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- coverage


def test_forced_triton_refuses_what_the_table_does_not_cover(monkeypatch):
    """backend='triton' outside the compiled table: a ValueError naming what is uncovered."""
    q, k = randn(1, 9, 4, seed=7, dtype=F32), randn(1, 300, 4, seed=8, dtype=F32)
    with pytest.raises(ValueError, match=f"K must be <= {tb.MAX_K}, got K=129"):
        tb.select(q, k, 129)
    with pytest.raises(ValueError, match="float64"):
        tb.select(q.double(), k.double(), 3)
    with pytest.raises(ValueError, match="bfloat16, float32"):
        tb.select(q, k.bfloat16(), 3)
    tensors, idx, _ = _aggregate_case("standard", 1, True, True)
    t = {n: v.float() for n, v in tensors.items()}
    with pytest.raises(ValueError, match="float64"):
        tb.aggregate(t["values"].double(), idx, t["rho"], t["weight"], t["bias"], "standard")
    monkeypatch.setattr(tb, "_arch", lambda device: 86)  # as if on an sm_86 GPU
    with pytest.raises(ValueError, match="sm_80, sm_90; this device is sm_86"):
        tb.select(q, k, 3)
    with pytest.raises(ValueError, match="sm_86"):
        tb.aggregate(t["values"], idx, t["rho"], t["weight"], t["bias"], "standard")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_code_launches_the_checked_kernels(compiler, monkeypatch):
    """Under torch.compile the kernels run as the table compiles them and the checks run
    them: the functions that launch them run eagerly between the graphs (tracing them would
    recompile user-defined kernels under the compiler's own options). Every call launches
    what eager code does, with the same numbers forward and backward."""
    from convnn import ConvNN2d

    torch.manual_seed(0)
    layer = ConvNN2d(16, 16, K=5)
    x = randn(1, 16, 6, 6, seed=3, dtype=F32)
    launched, launch = [], tb._launch
    monkeypatch.setattr(tb, "_launch", lambda lc, *a: launched.append(lc) or launch(lc, *a))
    results = []
    with backends.use("triton"):
        for run in (layer, torch.compile(layer, backend=compiler)):
            for _ in range(2):
                launched.clear()
                xi = x.clone().requires_grad_()
                y = run(xi)
                (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
                assert [lc.kernel for lc in launched] == [
                    "select_topk", "standard_fwd", "aggregate_bwd", "standard_grad_w"
                ]  # fmt: skip
                assert all(lc in tb.table() for lc in launched)
                results.append((y, gx))
    # compiled autograd traces the backward too: its launches run eagerly as well
    launched.clear()
    xi = x.clone().requires_grad_()
    with backends.use("triton"):
        y = layer(xi)
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend=compiler)):
            y.backward(torch.ones_like(y))
    assert [lc.kernel for lc in launched][2:] == ["aggregate_bwd", "standard_grad_w"]
    results.append((y, xi.grad))
    for y, gx in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, results[0][1], rtol=1e-6, atol=1e-6)


def test_every_launch_is_a_table_entry_with_its_compiled_signature():
    """What the wrappers launch is exactly what the AOT test compiles: each launch is an entry
    of table() and its arguments specialise as triton_aot.signature says (dtypes, 16-byte
    alignment, ints below 2**31, multiples of 16 where promised); and no entry is dead."""
    launches = triton_aot.sample_launches()
    assert {launch for launch, _ in launches} == set(tb.table())
    errors = [e for launch, args in launches for e in triton_aot.argument_errors(launch, args)]
    assert errors == []


def test_argument_errors_finds_a_misaligned_tensor(monkeypatch):
    launches = []
    monkeypatch.setattr(tb, "_recorder", lambda launch, grid, args: launches.append((launch, args)))
    monkeypatch.setattr(tb, "_aligned", lambda t: t.contiguous())
    q = torch.randn(5 * 16 + 1)[1:].view(1, 5, 16)
    tb.select(q, torch.randn(1, 9, 16), 3)
    (launch, args), *_ = launches
    assert triton_aot.argument_errors(launch, args) == [
        f"select_topk: argument q_ptr (*x) got a torch.float32 tensor at address {q.data_ptr()}"
    ]


def test_signature_lists_every_kernel_parameter():
    for launch in tb.table():
        sig, consts, attrs = triton_aot.signature(launch)
        assert set(sig) == set(tb.kernels.ARGS[launch.kernel]) | set(consts)


# --------------------------------------------------------------------------- dispatch


def test_auto_on_cuda_is_the_checked_triton_backend(monkeypatch):
    assert backends.get(None, "cuda") is tb.auto
    assert backends.get("triton", "cuda") is tb
    assert backends.get(None, "cpu") is chunked


@pytest.fixture
def fresh_checks(monkeypatch):
    """An empty first-use record, and counters of checks and kernel calls."""
    monkeypatch.setattr(tb, "_ready", {})
    calls = {"check": 0, "select": 0, "aggregate": 0}

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tb, "first_use_check", count("check", tb.first_use_check))
    monkeypatch.setattr(tb, "_select", count("select", tb._select))
    monkeypatch.setattr(tb, "_aggregate", count("aggregate", tb._aggregate))
    return calls


def _auto_calls():
    q, k = randn(1, 9, 4, seed=7, dtype=F32), randn(1, 30, 4, seed=8, dtype=F32)
    tensors, idx, _ = _aggregate_case("depthwise", 1, True, False)
    t = {n: None if v is None else v.float() for n, v in tensors.items()}
    return [
        (lambda be: be.select(q, k, 3)),
        (lambda be: be.aggregate(t["values"], idx, t["rho"], t["weight"], None, "depthwise")),
    ]


def test_auto_runs_the_kernels_after_one_passing_check(fresh_checks):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for call in _auto_calls():
                torch.testing.assert_close(call(tb.auto), call(reference))
    # one check each (the selection kernel's, the channelwise aggregation's) +: the checks'
    assert fresh_checks == {"check": 2, "select": 2 + 1, "aggregate": 2 + 2}


def test_auto_falls_back_with_one_warning_when_the_check_fails(fresh_checks, monkeypatch):
    monkeypatch.setattr(tb, "_compare_with_chunked", lambda device, dtype, c: "it went wrong")
    with pytest.warns(RuntimeWarning) as caught:
        first = [call(tb.auto) for call in _auto_calls()]
    assert [str(w.message) for w in caught] == [
        f"convnn: the Triton kernels do not run on cpu for torch.float32: {what}: it went "
        f"wrong. The chunked backend runs instead."
        for what in (
            "the selection kernel for K <= 16",
            "the aggregation kernels of kernel='none' and 'depthwise'",
        )
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        second = [call(tb.auto) for call in _auto_calls()]
    for a, b, call in zip(first, second, _auto_calls()):
        torch.testing.assert_close(a, call(reference))
        torch.testing.assert_close(b, a)
    assert fresh_checks == {"check": 2, "select": 0, "aggregate": 0}


def test_auto_checks_each_configuration_on_first_use(fresh_checks, monkeypatch):
    """A configuration is checked when a call first needs it, once: a failed check keeps
    chunked for what it covers (one warning naming it) and the kernels for the rest."""
    real = tb._compare_with_chunked
    failing = ("select", 32)
    monkeypatch.setattr(
        tb,
        "_compare_with_chunked",
        lambda device, dtype, c: "it went wrong" if c == failing else real(device, dtype, c),
    )
    q, k = randn(1, 9, 4, seed=7, dtype=F32), randn(1, 70, 4, seed=8, dtype=F32)
    with pytest.warns(RuntimeWarning, match="for K <= 32: it went wrong") as caught:
        for _ in range(2):
            for K in (3, 20, 17, 40):  # widths 16, 32, 32, 64
                assert torch.equal(tb.auto.select(q, k, K), reference.select(q, k, K))
    assert len(caught) == 1
    assert {key[2] for key in tb._ready} == {None, ("select", 16), failing, ("select", 64)}
    assert tb._ready[(q.device, F32, failing)] is False
    # the checks' own (16, 64) and the calls of widths 16 and 64, twice each
    assert fresh_checks == {"check": 3, "select": 2 + 4, "aggregate": 0}
    # the standard aggregation is checked at the products' precision it would run with
    for precision, want in (("highest", "tf32x3"), ("high", "tf32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda p=precision: p)
        assert tb.aggregate_check(F32, "standard") == ("standard", want)
    assert tb.aggregate_check(torch.bfloat16, "standard") == ("standard", None)
    assert tb.aggregate_check(F32, "depthwise") == ("channelwise", None)
    assert tb.select_check(129) is None and tb.select_check(128) == ("select", 128)
    for K in (0, 1, 16, 17, 33, 100):  # the width the launch would take, whatever K
        assert tb.select_check(K) == ("select", dict(tb.select_launch(F32, K).constants)["KP"])


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_first_use_checks_launch_every_table_entry(dtype, monkeypatch):
    """Together the checks of a dtype launch every entry of its table: no configuration the
    auto backend runs goes unchecked."""
    launched, launch = set(), tb._launch
    monkeypatch.setattr(tb, "_launch", lambda lc, *a: launched.add(lc) or launch(lc, *a))
    assert tb.first_use_check(torch.device("cpu"), dtype) is None
    assert launched == {entry for entry in tb.table() if entry.dtype == dtype}


def test_auto_falls_back_with_one_warning_on_an_uncovered_arch(fresh_checks, monkeypatch):
    monkeypatch.setattr(tb, "_arch", lambda device: 86)
    with pytest.warns(RuntimeWarning, match="sm_80, sm_90; this device is sm_86"):
        for call in _auto_calls():
            torch.testing.assert_close(call(tb.auto), call(reference))
    assert fresh_checks == {"check": 0, "select": 0, "aggregate": 0}


def test_auto_runs_chunked_silently_outside_the_table(fresh_checks):
    q, k = randn(1, 9, 4, seed=7, dtype=F64), randn(1, 300, 4, seed=8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tb.auto.select(q, k, 3), reference.select(q, k, 3))  # float64
        q, k = q.float(), k.float()
        assert torch.equal(tb.auto.select(q, k, 129), reference.select(q, k, 129))  # K > 128
    assert fresh_checks == {"check": 0, "select": 0, "aggregate": 0}


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_first_use_check_passes_on_correct_kernels(dtype):
    assert tb.first_use_check(torch.device("cpu"), dtype) is None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_first_use_check_ignores_the_callers_modes(mode):
    """A first call under no_grad / inference_mode / autocast must not fail the check."""
    context = {
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
    }[mode]
    with context:
        assert tb.first_use_check(torch.device("cpu"), F32) is None


def test_first_use_check_catches_wrong_kernels(monkeypatch):
    cpu = torch.device("cpu")
    real = tb._select
    monkeypatch.setattr(tb, "_select", lambda q, k, K, ex: real(q, k, K, ex).flip(-1))
    assert "picked other neighbours" in tb.first_use_check(cpu, F32)
    monkeypatch.setattr(tb, "_select", real)
    real_agg = tb._aggregate
    monkeypatch.setattr(tb, "_aggregate", lambda *a, **kw: real_agg(*a, **kw) * 1.001)
    assert "kernel='none': output differs" in tb.first_use_check(cpu, F32)

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory\nmore text")

    monkeypatch.setattr(tb, "_aggregate", broken)
    assert tb.first_use_check(cpu, F32) == "RuntimeError: out of resource: shared memory"
