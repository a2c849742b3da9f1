"""Behaviour: stateless modules, determinism, autocast and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import BACKENDS, F64, max_diff, on_backend, qkv_heads, randn
from torch import nn

from convnn import ConvNN2d, ConvNNAttention

CONV_CONFIGS = {
    "cosine-all": dict(K=4),
    "euclidean-softmax-pad": dict(K=5, metric="euclidean", weighting="softmax", padding=1),
    "random": dict(K=3, candidates="random", num_candidates=6),
    "grid": dict(K=3, candidates="grid", num_candidates=6, stride=2),
    "window": dict(K=4, candidates="window", window=3, kernel="depthwise"),
    "spatial": dict(K=9, metric="spatial", padding=1, stride=2),
    "coords": dict(K=4, coords="xy", lam=0.4, kernel="separable"),
}
SIZES = [(5, 5), (7, 4), (3, 9), (5, 5), (6, 6), (7, 4)]


def _conv(name, c_out=3):
    kwargs = CONV_CONFIGS[name]
    c_out = 3 if kwargs.get("kernel") in ("depthwise", "none") else c_out
    torch.manual_seed(0)
    return ConvNN2d(3, c_out, **kwargs).to(F64).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_is_stateless_across_sizes(backend, name):
    layer = _conv(name)
    state = dict(vars(layer))
    with on_backend(backend):
        for i, hw in enumerate(SIZES):
            x = randn(2, 3, *hw, seed=i)
            fresh = _conv(name)
            fresh.load_state_dict(layer.state_dict())
            y = layer(x)
            assert torch.equal(y, fresh(x)), hw
    assert list(layer.buffers()) == []
    assert vars(layer).keys() == state.keys(), "forward must not add attributes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(K=None, kernel="none"), dict(K=3), dict(K=4)])
def test_attention_is_stateless_across_lengths(backend, options):
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, **options).to(F64).eval()
    with on_backend(backend):
        for i, N in enumerate([9, 5, 16, 9, 7]):
            x = randn(2, N, 8, seed=i)
            fresh = copy.deepcopy(layer)
            assert torch.equal(layer(x), fresh(x))
    assert list(layer.buffers()) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_deterministic(backend, name):
    layer = _conv(name)
    x = randn(2, 3, 6, 5, seed=3)
    with on_backend(backend):
        first = layer(x)
        torch.manual_seed(99)  # eval mode must not depend on the global RNG
        second = layer(x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_leaves_its_input_as_it_was(backend, name):
    """Forward and backward read the input (a view of it, without padding) and never write
    it: x and its gradient's source are bit for bit what they were."""
    layer = _conv(name).train()
    x = randn(2, 3, 6, 5, seed=4).requires_grad_()
    before = x.detach().clone()
    with on_backend(backend):
        y = layer(x)
        y.backward(randn(*y.shape, seed=5))
    assert torch.equal(x.detach(), before)
    assert x.grad is not None and x.grad.isfinite().all()


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=4, attn_drop=0.5).to(F64)
    plain = copy.deepcopy(layer)
    plain.attn_drop.p = 0.0
    x = randn(2, 9, 8, seed=12)
    assert torch.equal(layer.eval()(x), plain.eval()(x))
    layer.train()
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    assert torch.equal(a, layer(x)), "dropout must follow the seeded global RNG"
    assert max_diff(a, plain(x)) > 1e-3, "attention dropout must act in training"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cosine-all", "random", "window", "spatial"])
def test_conv_empty_batch(backend, name):
    """Like nn.Conv2d, a batch of zero images gives zero outputs of the right shape."""
    layer = _conv(name)
    stride = CONV_CONFIGS[name].get("stride", 1)
    with on_backend(backend):
        y = layer(randn(0, 3, 5, 6))
    assert y.shape == (0, layer.out_channels, -(-5 // stride), -(-6 // stride))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [None, 3])
def test_attention_empty_batch(backend, K):
    """Like nn.MultiheadAttention, a batch of zero sequences gives an empty output."""
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=K, kernel="none").to(F64).eval()
    with on_backend(backend):
        assert layer(randn(0, 9, 8)).shape == (0, 9, 8)


def test_window_attention_on_map_sizes():
    """The same layer lays tokens out as any (h, w) map it is given."""
    torch.manual_seed(0)
    layer = ConvNNAttention(6, 2, K=9, kernel="none", candidates="window", window=3)
    layer = layer.to(F64).eval()
    for hw in [(4, 5), (5, 4), (3, 3), (6, 6)]:
        x = randn(1, hw[0] * hw[1], 6, seed=hw[0])
        assert layer(x, hw=hw).shape == x.shape


# --------------------------------------------------------------------------- autocast


def _bf16_close(y_amp, y_ref):
    assert y_amp.dtype == torch.bfloat16
    assert y_amp.isfinite().all()
    scale = y_ref.abs().max().item()
    assert max_diff(y_amp, y_ref) <= 3e-2 * scale, (max_diff(y_amp, y_ref), scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cosine-all", "euclidean-softmax-pad", "window", "spatial"])
def test_conv_under_autocast(backend, name):
    layer = _conv(name).float().train()
    x = randn(2, 3, 6, 7, seed=4, dtype=torch.float32).requires_grad_()
    with on_backend(backend):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        _bf16_close(y, ref)
        y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.isfinite().all()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_from_conv2d_under_autocast_matches_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, 1, 1)
    layer = ConvNN2d.from_conv2d(conv)
    x = randn(2, 3, 6, 7, seed=5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = conv(x)
        for backend in BACKENDS:
            with on_backend(backend):
                y = layer(x)
            assert y.dtype == ref.dtype == torch.bfloat16
            assert max_diff(y, ref) <= 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(K=None, kernel="none"), dict(K=4, kernel="none"), dict(K=4), dict(K=16, kernel="none")],
)
def test_attention_under_autocast(backend, options):
    """bf16 q and k may rank near-tied keys differently, so the fp32 reference aggregates the
    neighbours the bf16 run picked: what must match is the weighting and aggregation."""
    torch.manual_seed(0)
    layer = ConvNNAttention(16, 2, qkv_bias=True, **options).eval()
    x = randn(2, 16, 16, seed=6, dtype=torch.float32)
    with on_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx = layer(x, return_indices=True)  # idx (B, h, N, K)
    q, k, v = qkv_heads(x, layer.qkv.weight, layer.qkv.bias, 2)
    pick = lambda t: torch.stack(
        [torch.stack([t[b, g][idx[b, g]] for g in range(2)]) for b in range(2)]
    )  # (B, h, N, K, d)
    p = (q[:, :, :, None] * pick(k)).sum(-1).div(8**0.5).softmax(-1)  # (B, h, N, K)
    vk = pick(v) * p[..., None]
    if layer.weight is not None:  # depthwise: channel g*d + j of slot k scaled by W[c, 0, k]
        w = layer.weight[:, 0].view(2, 8, -1).permute(0, 2, 1)  # (h, K, d)
        vk = vk * w[None, :, None]
    ref = layer.proj(vk.sum(3).transpose(1, 2).flatten(2))
    _bf16_close(y, ref)


# --------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_conv(fresh_dynamo):
    layer = _conv("cosine-all")
    compiled = torch.compile(layer, backend="aot_eager")
    for i, hw in enumerate([(5, 6), (5, 6), (4, 7)]):  # a new size recompiles, no stale shapes
        x = randn(2, 3, *hw, seed=i)
        assert max_diff(compiled(x), layer(x)) < 1e-12


def test_compile_attention(fresh_dynamo):
    torch.manual_seed(0)
    layer = ConvNNAttention(8, 2, K=3).to(F64).eval()
    compiled = torch.compile(layer, backend="aot_eager")
    for i, N in enumerate([9, 9, 12]):
        x = randn(2, N, 8, seed=i)
        assert max_diff(compiled(x), layer(x)) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compile_fullgraph(fresh_dynamo, backend):
    """DESIGN: the layers trace without graph breaks (dispatch included), at a second input
    size too (which traces with symbolic sizes)."""
    torch.manual_seed(0)
    conv = ConvNN2d(3, 3, K=4, weighting="softmax").to(F64).eval()
    attention = ConvNNAttention(8, 2, K=3).to(F64).eval()
    with on_backend(backend):
        for layer, inputs in (
            (conv, [randn(1, 3, 4, 5), randn(2, 3, 5, 6)]),
            (attention, [randn(1, 6, 8), randn(2, 9, 8)]),
        ):
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
            for x in inputs:
                assert max_diff(compiled(x), layer(x)) < 1e-12


@pytest.mark.parametrize("positional", ["coords", "fourier", "relative_bias", "cpe", "rope"])
def test_compile_positional_encodings(fresh_dynamo, positional):
    """Every positional encoding traces whole (no graph break) in ConvNN2d and in
    ConvNNAttention; outputs and the gradients of the input and of every parameter
    (the learnable encodings' included, moved off their zero start) equal eager's."""
    torch.manual_seed(0)
    conv = ConvNN2d(4, 4, K=4, positional=positional, weighting="softmax").to(F64)
    attention = ConvNNAttention(8, 2, K=5, positional=positional, grid_size=(3, 4)).to(F64)
    for layer, x in ((conv, randn(2, 4, 5, 6, seed=1)), (attention, randn(2, 12, 8, seed=2))):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        x.requires_grad_()
        wrt = [x, *layer.parameters()]
        y_eager, y_comp = layer(x), compiled(x)
        assert max_diff(y_comp, y_eager) < 1e-12
        g_eager = torch.autograd.grad(y_eager.square().sum(), wrt)
        g_comp = torch.autograd.grad(y_comp.square().sum(), wrt)
        for a, b in zip(g_eager, g_comp):
            assert max_diff(a, b) < 1e-12


def test_compile_backward(fresh_dynamo):
    """Gradients through the compiled chunked aggregation match eager."""
    layer = _conv("euclidean-softmax-pad")
    compiled = torch.compile(layer, backend="aot_eager")
    x = randn(1, 3, 5, 5, seed=7).requires_grad_()
    (g_eager,) = torch.autograd.grad(layer(x).sum(), x)
    (g_comp,) = torch.autograd.grad(compiled(x).sum(), x)
    assert max_diff(g_eager, g_comp) < 1e-12


def test_compiled_gemm_selection_is_one_eager_op(fresh_dynamo):
    """On the chunked backend a compiled graph calls the GEMM selection as one opaque op
    (so its eager shortcuts run), with the eager indices; the op's fake and real forms agree
    (opcheck), also for self-similarity's one operand (no keys)."""
    from convnn.backends import chunked  # noqa: F401  (registers the op)

    op = torch.ops.convnn.chunked_select_gemm
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm

    torch.manual_seed(0)
    layer = ConvNN2d(4, 4, K=5, selection_dtype=torch.bfloat16).eval()
    x = randn(2, 4, 5, 6).float()
    with on_backend("chunked"):
        got = torch.compile(layer, backend=backend, fullgraph=True)(x)
        want = layer(x)
    assert op in seen or op.default in seen
    assert torch.equal(got, want)
    q = torch.nn.functional.normalize(randn(2, 30, 8).float(), dim=-1)
    for args in [(q, q, 4, None, None), (q, None, 4, torch.arange(30), None),
                 (q, q[:1], 3, torch.arange(30), None)]:  # fmt: skip
        torch.library.opcheck(op.default, args)


def test_compiled_half_selection_ranks_what_eager_ranks(fresh_dynamo):
    """bfloat16 and float16 selection through Inductor pick the neighbours eager code picks:
    the metric's operands (cosine's normalisation, euclidean's squared norms) are formed in
    float32 and rounded once, in a compiled graph by one opaque op (fused, Inductor formed
    them its own way: with a narrow dtype's many ties an eighth of the picks differed, and
    outputs by 1.7). The op's fake and real forms agree (opcheck)."""
    from convnn.stages import similarity  # noqa: F401  (registers the op)

    # (the float16 case: float32 normalisations formed in and out of a graph differ in a last
    # bit here, and 2 of its picks with them, unless the graph forms them eagerly)
    # and a float16 layer's own float16 selection: its operands are formed in float32 too
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cases = [("cosine", bf16, "all", 20, f32), ("euclidean", bf16, "all", 20, f32),
             ("cosine", f16, "all", 18, f32), ("euclidean", f16, "window", 20, f32),
             ("cosine", f16, "all", 18, f16)]  # fmt: skip
    for metric, dtype, candidates, size, features in cases:
        torch.manual_seed(0)
        window = dict(window=5) if candidates == "window" else {}
        layer = ConvNN2d(
            8, 8, K=9, selection_dtype=dtype, metric=metric, candidates=candidates, **window
        ).to(features)
        x = torch.randn(2, 8, size, size).to(features)  # 324-400 keys: the one-pass kernel
        y, idx = layer(x, return_indices=True)
        y2, idx2 = torch.compile(layer)(x, return_indices=True)
        assert torch.equal(idx, idx2), (metric, dtype, (idx != idx2).sum().item())
        torch.testing.assert_close(y2, y)
    op = torch.ops.convnn.selection_operands.default
    q, k = randn(2, 30, 8, seed=1).float(), randn(2, 20, 8, seed=2).float()
    for args in [(q, None, "cosine", 2.0, torch.bfloat16), (q, k, "euclidean", 2.0, torch.float16),
                 (q, None, "euclidean", 2.0, torch.bfloat16)]:  # fmt: skip
        torch.library.opcheck(op, args)


def test_compiled_aggregation_gathers_from_one_contiguous_copy(fresh_dynamo):
    """A compiled graph copies the tokens to contiguous rows once, as an opaque op that the
    backward pass reuses: fused into the gathers, the copy became one strided load per
    element, in the forward and again in the backward pass. Gradients match eager; the
    op's fake and real forms agree (opcheck)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from convnn.backends import chunked  # noqa: F401  (registers the op)

    op = torch.ops.convnn.contiguous_copy.default
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = [node.target for node in gm.graph.nodes]
            return make_boxed_func(gm)

        return compiler

    layer = _conv("euclidean-softmax-pad")
    x = randn(1, 3, 5, 5, seed=7).requires_grad_()
    with on_backend("chunked"):
        backend = aot_autograd(  # the partition inductor uses: it may recompute in backward
            fw_compiler=keep("fw"),
            bw_compiler=keep("bw"),
            partition_fn=min_cut_rematerialization_partition,
        )
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        (g_comp,) = torch.autograd.grad(compiled(x).sum(), x)
        (g_eager,) = torch.autograd.grad(layer(x).sum(), x)
    assert max_diff(g_eager, g_comp) < 1e-12
    assert graphs["fw"].count(op) == 1 and op not in graphs["bw"]  # saved, not recomputed
    values = randn(2, 6, 4).transpose(1, 2)
    torch.library.opcheck(op, (values,))
