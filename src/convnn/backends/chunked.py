"""Chunked backend: O(N*K) memory on any device.

Selection streams key blocks through a running top-K, so the (N, M) similarity matrix is
never formed; with several torch threads on the CPU each block of queries runs whole on one
worker thread. Aggregation is a custom autograd function that gathers neighbours one query
block at a time and recomputes them in the backward pass, so the (B, N, K, C) tensor of
gathered neighbours is never stored either.

On a CPU that runs the native one-pass kernels (:mod:`convnn.native`), GEMM scores against
all candidates are scored and ranked in one pass (no block of scores at all), and the
standard kernel's aggregation reads the neighbours in place, as one op forward and one
backward (``convnn::native_aggregate``); elsewhere these torch paths run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .. import native
from ..metrics import GemmScores
from ._common import (
    BlockScores,
    graph_grads,
    group_gather,
    group_scatter,
    scale_groups,
    tensor_scores,
    topk_low_ties,
)

native.key_compile_caches(__file__)  # the ops below, for torch.compile's caches

name = "chunked"

# Elements of one score or gathered-neighbour block (8 MiB of fp32): big enough for fast
# GEMMs, small enough to stay in cache (measured fastest on CPU) and far below the dense
# formulation's footprint.
BLOCK_ELEMENTS = 1 << 21
KEY_BLOCK = 8192


def _mask_excluded(scores: Tensor, exclude: Tensor | None, offset: Tensor | int) -> Tensor:
    """Set scores[:, n, exclude[n] - offset] to -inf where that key lies in this block."""
    if exclude is None:
        return scores
    local = exclude - offset  # (n,) or (n, W) / (B, n, W) for per-query candidates
    if local.dim() == 1:
        inside = (local >= 0) & (local < scores.shape[-1])
        slot = local.clamp(0, scores.shape[-1] - 1)[None, :, None].expand(scores.shape[0], -1, 1)
        kept = scores.gather(-1, slot)
        return scores.scatter_(-1, slot, torch.where(inside[None, :, None], -torch.inf, kept))
    return scores.masked_fill(local == 0, -torch.inf)


def topk_grouped(scores: Tensor, K: int, group: int = 64) -> tuple[Tensor, Tensor]:
    """Exact top-K of the last dim (unsorted), touching most scores only once.

    The K best scores lie in the K groups of ``group`` consecutive scores whose maxima are
    largest, so a cheap pass of group maxima narrows the full top-K to K * group scores.
    """
    m = scores.shape[-1]
    if m < 4 * K * group:
        return scores.topk(K, dim=-1, sorted=False)
    body, ng = (m // group) * group, m // group
    lead = scores.shape[:-1]
    rows = scores.reshape(-1, m)
    groups = rows[:, :body].reshape(-1, group)  # (R * ng, group); a copy only if body < m
    best = groups.view(-1, ng, group).amax(-1).topk(K, dim=-1, sorted=False).indices  # (R, K)
    # Whole rows of a contiguous (R * ng, group) matrix: index_select, far cheaper than a
    # gather of the same elements.
    first = torch.arange(rows.shape[0], device=scores.device)[:, None] * ng
    cand = groups.index_select(0, (first + best).reshape(-1)).view(-1, K * group)
    offsets = torch.arange(group, device=scores.device)
    idx = (best[..., None] * group + offsets).flatten(-2)
    if body < m:  # the tail that does not fill a group
        cand = torch.cat([cand, rows[:, body:]], -1)
        tail = torch.arange(body, m, device=scores.device)
        idx = torch.cat([idx, tail.expand(idx.shape[0], -1)], -1)
    vals, pos = cand.topk(K, dim=-1, sorted=False)
    return vals.view(*lead, K), idx.gather(-1, pos).view(*lead, K)


def select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    spatial_grid: tuple[int, int] | None = None,
    exclude: Tensor | None = None,
    window: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.select`, in O(N*K) memory."""
    scores = tensor_scores(query, key, spatial_grid)
    return select_scores(scores, K, exclude=exclude, window=window)


def select_scores(
    scores: BlockScores, K: int, *, exclude: Tensor | None = None, window: Tensor | None = None
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.select_scores`, in O(N*K) memory:
    key blocks stream through a running top-K."""
    if torch.compiler.is_compiling() and type(scores) is GemmScores:
        k = None if scores.key is scores.query else scores.key.detach()
        return torch.ops.convnn.chunked_select_gemm(scores.query.detach(), k, K, exclude, window)
    with torch.no_grad():
        if window is not None:
            return _select_window(scores, K, exclude, window)
        return _select_all(scores, K, exclude)


def _select_all(scores: BlockScores, K: int, exclude: Tensor | None) -> Tensor:
    """Every query against every key, in blocks of queries against blocks of keys merged in
    a running top-K. Blocks are independent: with several torch threads on the CPU each
    block runs whole on one thread, the threads taking blocks as they finish them (one
    parallel region per selection, not several per block, so a thread slowed by another
    process holds no barrier up)."""
    if type(scores) is GemmScores and scores.fused(K, exclude):
        return _select_fused(scores, K, exclude)
    B, N, M = scores.batch, scores.num_queries, scores.num_keys
    kb = min(M, max(K, KEY_BLOCK))
    parts = [(scores, slice(None))]
    if B > 1 and BLOCK_ELEMENTS // (B * kb) < N:
        # Blocks of one image's rows hold as many scores as blocks across the batch and come
        # as many, but from one taller GEMM each (13% faster than batched short ones)
        images = [scores.image(b) for b in range(B)]
        if all(im is not None for im in images):
            parts = [(im, slice(b, b + 1)) for b, im in enumerate(images)]
    qb = max(32, BLOCK_ELEMENTS // max(1, parts[0][0].batch * kb))
    out = torch.empty(B, N, K, dtype=torch.long, device=scores.device)

    units = [(part, batch, slice(n0, n0 + qb)) for part, batch in parts for n0 in range(0, N, qb)]

    def run(unit):
        # grad mode is per thread. The caller writes the blocks into ``out``: under
        # inference mode only that thread may write an inference tensor (entering the mode
        # on each worker instead held hundreds of MiB)
        with torch.no_grad():
            return _select_block(unit[0], K, exclude, kb, unit[2])

    # a traced graph runs the blocks in order (no worker threads in a graph)
    threads = 1 if torch.compiler.is_compiling() else torch.get_num_threads()
    if scores.device.type == "cpu" and threads > 1 and len(units) > 1 and _no_torch_modes():
        with _block_pool(threads) as pool:
            for (_, batch, qs), idx in zip(units, pool.map(run, units)):
                out[batch, qs] = idx  # as each block comes: no block's result waits in a list
    else:
        for unit in units:
            out[unit[1], unit[2]] = run(unit)
    return out


def _select_fused(scores: GemmScores, K: int, exclude: Tensor | None) -> Tensor:
    """Every query against every key by the native one-pass kernel (no block of scores is
    ever formed). With several threads each takes a run of images, or, with fewer images
    than threads, a block of queries (self-similarity then computes every score, not half)."""
    if scores.batch >= torch.get_num_threads():
        parts = _in_runs(scores.batch, lambda s: scores.fused_topk(K, exclude, s))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    parts = _in_runs(scores.num_queries, lambda s: scores.fused_topk(K, exclude, qs=s))
    return torch.cat(parts, 1)


def _no_torch_modes() -> bool:
    """Whether the calling thread runs under no torch function or dispatch mode (a device
    context, a FLOP counter, fake tensors...): a worker thread would not see one."""
    return torch._C._len_torch_function_stack() == 0 and torch._C._len_torch_dispatch_stack() == 0


_POOL: dict[int, ThreadPoolExecutor] = {}  # by number of workers
_POOL_LOCK = threading.Lock()
# a forked child has none of the parent's worker threads: it starts its own pools
os.register_at_fork(after_in_child=_POOL.clear)


@contextlib.contextmanager
def _block_pool(threads: int):
    """``threads`` workers for whole blocks, torch set to one thread meanwhile (each block's
    operators run on its worker alone) and set back after."""
    with _POOL_LOCK:
        pool = _POOL.get(threads)
        if pool is None:
            pool = _POOL[threads] = ThreadPoolExecutor(threads, "convnn-select")
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)


def _select_block(scores: BlockScores, K: int, exclude: Tensor | None, kb: int, qs: slice):
    """The K best keys of queries ``qs``: key blocks of ``kb`` merged in a running top-K."""
    ex = None if exclude is None else exclude[qs]
    best_s = best_i = None
    for m0 in range(0, scores.num_keys, kb):
        s = _mask_excluded(scores.wide_block(qs, slice(m0, m0 + kb)), ex, m0)
        s, i = topk_low_ties(s, min(K, s.shape[-1]), topk_grouped, scores.rounding)
        i = i + m0
        if best_s is not None:  # merge; a stable sort keeps earlier (lower) indices first
            s, i = torch.cat([best_s, s], -1), torch.cat([best_i, i], -1)
            s, pos = s.sort(dim=-1, descending=True, stable=True)
            s, i = s[..., :K], i.gather(-1, pos[..., :K])
        best_s, best_i = s, i
    return best_i


@torch.library.custom_op(
    "convnn::chunked_select_gemm",
    mutates_args=(),
    schema="(Tensor query, Tensor? key, int K, Tensor? exclude, Tensor? window) -> Tensor",
)
def _select_gemm(query, key, K, exclude, window):
    """:func:`select_scores` of GEMM scores as one opaque op of a compiled graph, so it runs
    as eager code: its data-dependent shortcuts (no rankable pass when the scores are finite,
    only the tied rows repaired) stay, where a traced graph would rank every score's
    tie-free key. ``key`` None: self-similarity, the keys are the queries (one operand, so
    the one-pass kernel stays symmetric; a graph may hand one tensor over as two copies)."""
    scores = GemmScores(query, query if key is None else key)
    return select_scores(scores, K, exclude=exclude, window=window)


@_select_gemm.register_fake
def _(query, key, K, exclude, window):
    batch = query.shape[0] if key is None else max(query.shape[0], key.shape[0])
    return query.new_empty(batch, query.shape[1], K, dtype=torch.long)


def _select_window(scores: BlockScores, K, exclude, window):
    """Per-query candidate lists (N, W) or (B, N, W): score only each query's W."""
    B = scores.batch
    N, W = window.shape[-2:]
    # columns ascend in index, so ties go to the lower index (a map's windows already do;
    # checked on the CPU only, where the answer costs no device sync)
    if (
        torch.compiler.is_compiling()
        or window.device.type != "cpu"
        or not bool((window[..., 1:] > window[..., :-1]).all())
    ):
        window = window.sort(-1).values
    # a block holds its scores, and a gathered copy of its keys unless they are read in place
    in_place = type(scores) is GemmScores and scores.window_in_place()
    qb = max(1, BLOCK_ELEMENTS // max(1, B * W * (1 if in_place else scores.width)))
    out = torch.empty(B, N, K, dtype=torch.long, device=scores.device)
    for n0 in range(0, N, qb):
        qs = slice(n0, n0 + qb)
        w = window[..., qs, :]  # (n, W) or (B', n, W)
        if in_place:  # scored and ranked in one native pass, where it serves
            idx = scores.window_topk(qs, w, K, None if exclude is None else exclude[qs])
            if idx is not None:
                out[:, qs] = idx
                continue
        s = scores.window(qs, w)
        if exclude is not None:
            s = _mask_excluded(s, w - exclude[qs, None], 0)
        pos = topk_low_ties(s, K)[1]  # canonical: w ascends, so positions order as indices
        out[:, qs] = w.expand(s.shape[0], -1, -1).gather(-1, pos)
    return out


def _kernel_forward(prime: Tensor, weight: Tensor | None, kernel: str) -> Tensor:
    """(B, n, K, C) gathered neighbours -> (B, n, C_out)."""
    if kernel == "none":
        return prime.sum(2)
    if kernel == "depthwise":
        # A broadcast multiply-sum: einsum would run a channel-batched matmul over copies.
        return (prime * weight[:, 0].t()).sum(2)
    B, n, K, C = prime.shape
    return prime.reshape(B, n, K * C) @ weight.permute(2, 1, 0).reshape(K * C, -1)


@torch.library.custom_op("convnn::contiguous_copy", mutates_args=())
def _contiguous_copy(values: Tensor) -> Tensor:
    """A contiguous copy as one opaque op, in eager code and in a compiled graph: the
    compiler would fuse the copy into the gathers that read it (one strided load per
    element, 8 per vector, where a row gather loads whole vectors) and recompute it in the
    backward pass. A map's tokens are transposed by the native kernel where it serves
    (:func:`convnn.native.rows_copy`)."""
    if native.rows_copy_usable(values):
        return native.rows_copy(values)
    return values.clone(memory_format=torch.contiguous_format)


@_contiguous_copy.register_fake
def _(values):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


# a copy's gradient is the gradient itself (the native aggregation differentiates through it)
_contiguous_copy.register_autograd(
    lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None
)


def contiguous_rows(values: Tensor) -> Tensor:
    """``values`` (B, M, C) with contiguous rows (each block gathers rows of a flat view); in
    a compiled graph, or where the native kernel copies a map's tokens, a copy is one op of
    its own (:func:`_contiguous_copy`)."""
    if not values.is_contiguous() and (
        torch.compiler.is_compiling()
        # the op has no forward-mode rule: under forward AD torch's copy carries the tangent
        or (native.rows_copy_usable(values) and torch.autograd.forward_ad._current_level < 0)
    ):
        return _contiguous_copy(values)
    return values.contiguous()


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, rho, weight, bias, kernel):
        values = contiguous_rows(values)  # once
        B, M, C = values.shape
        G, N, K = indices.shape[1:]
        acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
        w = None if weight is None else weight.to(acc)
        c_out = C if weight is None or kernel == "depthwise" else weight.shape[0]
        out = values.new_empty(B, N, c_out)
        nb = max(1, BLOCK_ELEMENTS // max(1, B * K * C))
        for n0 in range(0, N, nb):
            prime = group_gather(values, indices[:, :, n0 : n0 + nb]).to(acc)
            if rho is not None:
                prime = scale_groups(prime, rho[:, :, n0 : n0 + nb].to(acc))
            y = _kernel_forward(prime, w, kernel)
            out[:, n0 : n0 + nb] = y if bias is None else y + bias.to(acc)
        ctx.kernel, ctx.block = kernel, nb
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(values, indices, rho, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, rho, weight = ctx.saved_tensors
        kernel, nb = ctx.kernel, ctx.block
        B, M, C = values.shape
        N, K = indices.shape[2:]
        need_v, _, need_rho, need_w, need_b = ctx.needs_input_grad[:5]
        acc = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
        grad_out = grad_out.to(acc)
        w = None if weight is None else weight.to(acc)
        g_values = torch.zeros(values.shape, dtype=acc, device=values.device) if need_v else None
        g_rho = torch.empty(rho.shape, dtype=acc, device=rho.device) if need_rho else None
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for n0 in range(0, N, nb):
            idx = indices[:, :, n0 : n0 + nb]
            gy = grad_out[:, n0 : n0 + nb]  # (B, n, C_out)
            gathered = group_gather(values, idx).to(acc)  # recomputed, never stored
            r = None if rho is None else rho[:, :, n0 : n0 + nb].to(acc)
            prime = gathered if r is None else scale_groups(gathered, r)
            n = gy.shape[1]
            if kernel == "none":
                g_prime = gy[:, :, None, :].expand(B, n, K, C)
            elif kernel == "depthwise":
                g_prime = gy[:, :, None, :] * w[:, 0].t()
                if need_w:
                    g_w[:, 0] += (prime * gy[:, :, None, :]).sum((0, 1)).t()
            else:
                w_t = w.permute(2, 1, 0).reshape(K * C, -1)
                g_prime = (gy @ w_t.t()).view(B, n, K, C)
                if need_w:
                    g_flat = prime.reshape(-1, K * C).t() @ gy.reshape(-1, gy.shape[-1])
                    g_w += g_flat.view(K, C, -1).permute(2, 1, 0)
            if need_rho:
                g = (g_prime * gathered).view(B, n, K, rho.shape[1], C // rho.shape[1]).sum(-1)
                g_rho[:, :, n0 : n0 + nb] = g.permute(0, 3, 1, 2)
            if need_v:
                group_scatter(g_prime if r is None else scale_groups(g_prime, r), idx, g_values)
        g_b = grad_out.sum((0, 1)) if need_b else None
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (
            cast(g_values, values),
            None,
            cast(g_rho, rho),
            cast(g_w, weight),
            None if g_b is None else g_b.to(ctx.bias_dtype),
            None,
        )


@torch.library.custom_op(
    "convnn::native_aggregate",
    mutates_args=(),
    schema="(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor",
)
def _native_aggregate(values, indices, weight, bias):
    """The standard kernel's aggregation by the native kernels (:func:`convnn.native.aggregate`),
    the neighbours read in place, images split over the worker threads: one op, eager and in
    compiled graphs. The output (B, N, C_out) is laid out as (B, C_out, N), so the layer's
    (B, C_out, H, W) map is a view; the backward reads the gradient in that layout."""
    out = native.aggregate_output(values.shape[0], indices.shape[2], weight.shape[0])
    _in_runs(
        values.shape[0], lambda s: native.aggregate(values[s], indices[s], weight, bias, out[s])
    )
    return out


@_native_aggregate.register_fake
def _(values, indices, weight, bias):
    return native.aggregate_output(values.shape[0], indices.shape[2], weight.shape[0], values)


@torch.library.custom_op(
    "convnn::native_aggregate_grad",
    mutates_args=(),
    schema="(Tensor grad, Tensor values, Tensor indices, Tensor weight, bool need_values, "
    "bool need_weight, bool map_layout) -> (Tensor, Tensor)",
)
def _native_aggregate_grad(grad, values, indices, weight, need_values, need_weight, map_layout):
    """The values' and the weight's gradients of :func:`_native_aggregate` (empty where not
    needed): each image's into its rows of the values' gradient (laid out as a (B, C, M) map
    where ``map_layout``, see :func:`convnn.native.values_grad`), the weight's summed over the
    threads' runs of images."""
    g_values = native.values_grad(values, map_layout) if need_values else values.new_empty(0)
    parts = _in_runs(
        values.shape[0],
        lambda s: native.aggregate_grad(
            grad[s],
            values[s],
            indices[s],
            weight,
            g_values[s] if need_values else None,
            need_weight,
        ),
    )
    # the runs' weight gradients summed onto the first (one run's is returned as it is)
    return g_values, sum(parts[1:], parts[0]) if need_weight else weight.new_empty(0)


@_native_aggregate_grad.register_fake
def _(grad, values, indices, weight, need_values, need_weight, map_layout):
    g_values = native.values_grad(values, map_layout) if need_values else values.new_empty(0)
    return g_values, torch.empty_like(weight) if need_weight else weight.new_empty(0)


def _native_aggregate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _native_aggregate_backward(ctx, grad):
    values, indices, weight, bias = ctx.saved_tensors
    need_v, _, need_w, need_b = ctx.needs_input_grad
    if torch.is_grad_enabled():  # a backward that builds a graph (double backward)
        y = _Aggregate.apply(values, indices, None, weight, bias, "standard")
        g_v, g_w, g_b = graph_grads(y, (values, weight, bias), (need_v, need_w, need_b), grad)
        return g_v, None, g_w, g_b
    # the values' gradient in the layout of the output's (a map's: the map's gradient is a
    # view of it)
    g_values, g_weight = torch.ops.convnn.native_aggregate_grad(
        grad, values, indices, weight, need_v, need_w, native.map_layout(grad)
    )
    return (
        g_values if need_v else None,
        None,
        g_weight if need_w else None,
        grad.sum((0, 1)) if need_b else None,
    )


_native_aggregate.register_autograd(
    _native_aggregate_backward, setup_context=_native_aggregate_setup
)


def _in_runs(size: int, run) -> list:
    """``run(part)`` over runs of ``size`` (images, or queries), one to a worker thread where
    torch has several threads; the results in order."""
    threads = torch.get_num_threads()
    if threads == 1 or size < 2:
        return [run(slice(None))]
    step = -(-size // threads)
    with _block_pool(threads) as pool:
        return list(pool.map(run, [slice(i, i + step) for i in range(0, size, step)]))


def _rows_contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors with their last dim contiguous (copied only where it is not)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


@torch.library.custom_op(
    "convnn::listed_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor idx, float scale) -> (Tensor, Tensor)",
)
def _listed_attention(q, k, v, idx, scale):
    """Softmax attention of each query over its own list of keys by the native kernels
    (:func:`convnn.native.listed_attention`), the heads split over the worker threads: one
    op, eager and in compiled graphs. -> the output (B, N, G * d), heads merged, and the
    weights (B, G, N, K) its backward reads."""
    q, k, v, idx = _rows_contiguous(q, k, v, idx)
    B, G, N, d = q.shape
    y, prob = native.listed_attention_output(q, idx)
    out = native.heads_of(y, G)
    _in_runs(B * G, lambda s: native.listed_attention(q, k, v, idx, scale, out, prob, s))
    return y, prob


@_listed_attention.register_fake
def _(q, k, v, idx, scale):
    B, G, N, d = q.shape
    return q.new_empty(B, N, G * d), q.new_empty(B, G, N, idx.shape[3])


@torch.library.custom_op(
    "convnn::listed_attention_grad",
    mutates_args=(),
    schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor idx, Tensor prob, float scale, "
    "bool[] needs) -> (Tensor, Tensor, Tensor)",
)
def _listed_attention_grad(grad, q, k, v, idx, prob, scale, needs):
    """The gradients of :func:`_listed_attention` for ``grad`` (B, N, G * d) of its output:
    dq, dk, dv where ``needs`` says (else empty), laid out as SDPA lays out its own."""
    q, k, v, idx, grad = _rows_contiguous(q, k, v, idx, grad)
    prob = prob.contiguous()  # read as (B * G, N, K)
    B, G, N, d = q.shape
    grads = native.listed_attention_grads(q, k, needs)
    g = native.heads_of(grad, G)
    _in_runs(B * G, lambda s: native.listed_attention_grad(q, k, v, idx, scale, prob, g, grads, s))
    return tuple(t if t is not None else q.new_empty(0) for t in grads)


@_listed_attention_grad.register_fake
def _(grad, q, k, v, idx, prob, scale, needs):
    B, G, N, d = q.shape
    M = k.shape[2]
    make = lambda n: q.new_empty_strided((B, G, n, d), (n * G * d, d, G * d, 1))  # noqa: E731
    return tuple(make(n) if need else q.new_empty(0) for n, need in zip((N, M, M), needs))


def _listed_setup(ctx, inputs, output):
    q, k, v, idx, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, idx, output[1])  # not the output: it may change in place


def _listed_backward(ctx, grad, _grad_prob):
    q, k, v, idx, prob = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # a backward that builds a graph (double backward)
        grads = graph_grads(_listed_formula(q, k, v, idx, ctx.scale), (q, k, v), needs, grad)
    else:
        got = torch.ops.convnn.listed_attention_grad(grad, q, k, v, idx, prob, ctx.scale, needs)
        grads = [g if need else None for g, need in zip(got, needs)]
    return *grads, None, None


_listed_attention.register_autograd(_listed_backward, setup_context=_listed_setup)


def _listed_formula(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """:func:`listed_attention` in torch operators (differentiable twice): the listed rows of
    k and v gathered, (B, G, N, K, d) each."""
    B, G, N, d = q.shape
    K = idx.shape[3]
    rows = idx.expand(B, G, N, K).reshape(B, G, N * K, 1).expand(-1, -1, -1, d)
    pick = lambda t: t.gather(2, rows).view(B, G, N, K, d)  # noqa: E731
    w = torch.softmax((q[..., None, :] * pick(k)).sum(-1) * scale, -1)
    return (w[..., None] * pick(v)).sum(-2).transpose(1, 2).reshape(B, N, G * d)


def listed_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Softmax attention of q (B, G, N, d) over the keys ``idx`` (B or 1, G or 1, N, K, int64)
    lists of k and v (B, G, M, d) (any strides, rows contiguous: the heads as a projection's
    views) by the native kernels -> (B, N, G * d), the heads merged. Attention over K listed
    keys costs K per query where SDPA masked to them weighs every key. The weights are kept
    for the backward pass; a backward that builds a graph (a second derivative) recomputes
    the output in torch operators. Only where :func:`convnn.native.listed_attention_usable`."""
    return torch.ops.convnn.listed_attention(q, k, v, idx, scale)[0]


def _native_aggregation(values, indices, rho, weight, bias, kernel) -> bool:
    """Whether the native kernels aggregate: :func:`convnn.native.aggregate_usable`, a float32
    bias, and one thread or at least as many images as threads (the input gradient adds
    into shared rows, so the threads split images, never one image)."""
    threads = 1 if torch.compiler.is_compiling() else torch.get_num_threads()
    return (
        native.aggregate_usable(values, indices, rho, weight, kernel)
        and (bias is None or bias.dtype == torch.float32)
        and (threads == 1 or values.shape[0] >= threads)
    )


def aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.aggregate`, in O(N*K) memory."""
    if _native_aggregation(values, indices, rho, weight, bias, kernel):
        return torch.ops.convnn.native_aggregate(contiguous_rows(values), indices, weight, bias)
    return _Aggregate.apply(values, indices, rho, weight, bias, kernel)
