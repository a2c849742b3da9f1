"""Fused Triton backend: streaming top-K selection and gather-aggregate kernels.

- ``select``: each program takes a block of queries and one range of keys, computes
  ``q' . k'`` tile by tile with ``tl.dot`` (fp32 accumulation) and merges every tile into a
  running top-K of packed (score, index) keys, so the (N, M) similarity matrix is never
  written. Key ranges are split over programs when N * B alone cannot fill the GPU; the
  per-range top-Ks are merged afterwards (a top-K of ``splits * K`` packed keys per query).
- ``aggregate``: ``y_n = sum_k W_k (rho_nk * v_{idx_nk}) + b`` gathers neighbour rows inside
  the kernel (a gather-GEMM for 'standard', a weighted sum for 'none'/'depthwise'), so the
  (B, N, K, C) tensor of gathered neighbours is never formed, forward or backward. The
  gradients of values (scatter with ``tl.atomic_add``), rho and weight are kernels too;
  the weight gradients are reduced over per-program partials, so they are deterministic.

**What runs.** Every kernel launch is one entry of :func:`table` (kernel, tile sizes, warps,
stages, dtype); the ahead-of-time test compiles each entry for every arch in ``ARCHS`` and
checks that it fits (registers, shared memory, no spills) and uses tensor cores.
:func:`unsupported_select` and :func:`unsupported_aggregate` say whether a call is inside
that table: float32/bfloat16/float16,
``K <= MAX_K``, sizes whose offsets fit 32 bits, and (on CUDA) a device in ``ARCHS``.

The dispatcher (:mod:`convnn.backends.dispatch`) applies these rules; this module only says
what its kernels can run (:func:`no_kernel_select`, :func:`unsupported_select`, ...) and
refuses anything else, never handing work to another backend itself.

- By design the selection kernel ranks a GEMM form (``q' . k'``) over all keys or a shared
  subset: spatial selection, per-query candidates (windows), metrics without GEMM operands
  (L1 / Lp, user metrics without ``operands``), relative position biases and empty inputs
  have no kernel; the dispatcher runs those stages on :mod:`convnn.backends.chunked`, even
  when the triton backend is forced, and says so (``convnn.explain``).
- Forced (``backend="triton"``): a call the kernels are designed for but that lies outside
  the table is a ``ValueError``.
- Auto (``backend=None`` on CUDA, :data:`auto`): the kernels run only for calls inside the
  table, and each configuration only after a one-time check on the device, on the first
  call that needs it, against the chunked backend on a tiny input (:func:`checks`: the
  selection kernel of each top-K width, the channelwise aggregation kernels, the standard
  ones at each products' precision; together they launch every table entry). If the device
  is not in ``ARCHS``, or a check fails, what it covers runs on chunked, with one warning
  that says why. The checks run eagerly: code traced by ``torch.compile`` before any eager
  call runs chunked (an eager warm-up step first lets the compiled code use the kernels).
- Compiled code (``torch.compile``) launches the same kernels: the functions that launch
  them run eagerly between the graphs, never traced and recompiled under the compiler's
  options.

Accumulation is fp32; outputs have the input dtype. float32 products run on tensor cores:
selection always as ``tf32x3`` (three TF32 products, close to fp32, so the ranking matches
the chunked backend's), aggregation as ``tf32x3`` under ``torch.get_float32_matmul_precision()
== 'highest'`` (the default) and as ``tf32`` otherwise. Channel dims are zero-padded to
multiples of 16 (a copy only when they are not already), so every row is 16-element aligned.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slow: for tests only).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import chunked
from . import triton_kernels as kernels
from ._common import BlockScores, graph_grads, tensor_scores

name = "triton"

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ARCHS = (80, 90)  # compute capabilities the AOT test compiles for (sm_80, sm_90)
MAX_K = 128  # largest K the selection kernel keeps in registers
TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU when splitting key ranges
ALIGN = 16  # channel dims are padded to a multiple of this (elements)
_INT32 = 2**31
_LOW32 = 2**32 - 1


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Launch:
    """One compiled configuration: a kernel of :mod:`triton_kernels` with its compile-time
    constants, for one operand dtype. The AOT test compiles exactly these."""

    kernel: str
    dtype: torch.dtype
    constants: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int = 128  # register cap given to ptxas: without one it may spill to reach occupancy

    def options(self) -> dict:
        """Compile options (warps, stages, register cap)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def kwargs(self) -> dict:
        """Keyword arguments of the launch: compile-time constants and options."""
        out = {k: _tl_dtype(v) if k == "DOT" else v for k, v in self.constants}
        return dict(out, **self.options())

    @property
    def has_matmul(self) -> bool:
        """Whether the kernel multiplies matrices (tl.dot), so it must use tensor cores."""
        consts = dict(self.constants)
        return "DOT" in consts and consts.get("STANDARD", True)

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constants if k != "DOT")
        dtype = str(self.dtype).removeprefix("torch.")
        opts = " ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.kernel}[{dtype}] {consts} {opts}"


def _tl_dtype(name: str):
    # bfloat16 under the interpreter: numpy has no bfloat16 matmul (it would multiply the raw
    # uint16 storage); fp32 products of bfloat16 values are exact.
    if name == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[name]


_DOT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SELECT_KP = (16, 32, 64, 128)  # running top-K widths (K rounded up to a power of 2, >= 16)
# KP -> (queries per program, keys per tile, register cap): the running top-K and the score
# tile stay in registers without spilling (measured by the AOT test; see BENCHMARKS.md).
_SELECT_TILES = {16: (64, 32, 128), 32: (64, 32, 128), 64: (32, 16, 168), 128: (16, 32, 128)}
AGG_BLOCK_N = 32  # queries per aggregation program


def _precisions(dtype: torch.dtype) -> tuple[str | None, ...]:
    return ("tf32x3", "tf32") if dtype == torch.float32 else (None,)


def _matmul_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision of the aggregation GEMMs (torch's float32 matmul setting)."""
    if dtype != torch.float32:
        return None
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _select_width(K: int) -> int:
    """The running top-K width of the selection kernel for ``K`` neighbours."""
    return max(SELECT_KP[0], triton.next_power_of_2(K))


def select_launch(dtype: torch.dtype, K: int) -> Launch:
    """The selection kernel's configuration for ``K`` neighbours of ``dtype`` operands."""
    kp = _select_width(K)
    block_n, block_m, regs = _SELECT_TILES[kp]
    consts = dict(KP=kp, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=16)
    consts.update(PRECISION="tf32x3" if dtype == torch.float32 else None, DOT=_DOT[dtype])
    return Launch("select_topk", dtype, tuple(consts.items()), maxnreg=regs)


def aggregate_launches(dtype: torch.dtype, kernel: str, precision: str | None) -> dict:
    """The aggregation kernels of ``kernel`` ('none'/'depthwise' or 'standard'):
    {'fwd': Launch, 'bwd': Launch[, 'grad_w': Launch]}."""
    precision = precision if kernel == "standard" else None  # no products otherwise
    gemm = (("PRECISION", precision), ("DOT", _DOT[dtype]))
    bwd = (("BLOCK_N", AGG_BLOCK_N), ("BLOCK_C", 32), ("BLOCK_O", 32)) + gemm
    if kernel != "standard":
        return {
            "fwd": Launch("channelwise_fwd", dtype, (("BLOCK_N", AGG_BLOCK_N), ("BLOCK_C", 64))),
            "bwd": Launch("aggregate_bwd", dtype, (("STANDARD", False),) + bwd),
        }
    return {
        "fwd": Launch(
            "standard_fwd",
            dtype,
            (("BLOCK_N", AGG_BLOCK_N), ("BLOCK_C", 32), ("BLOCK_O", 64)) + gemm,
        ),
        # tf32x3 needs more than 128 registers not to spill
        "bwd": Launch("aggregate_bwd", dtype, (("STANDARD", True),) + bwd, maxnreg=168),
        "grad_w": Launch(
            "standard_grad_w",
            dtype,
            (("BLOCK_N", AGG_BLOCK_N), ("BLOCK_C", 32), ("BLOCK_O", 64)) + gemm,
        ),
    }


def table() -> list[Launch]:
    """Every configuration the backend can launch (what the AOT test compiles)."""
    out: list[Launch] = []
    for dtype in DTYPES:
        out += [select_launch(dtype, kp) for kp in SELECT_KP]
        out += aggregate_launches(dtype, "none", None).values()
        for precision in _precisions(dtype):
            out += aggregate_launches(dtype, "standard", precision).values()
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- coverage


def _arch(device: torch.device) -> int | None:
    """Compute capability as an int (80 for sm_80) of a CUDA device; None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _device_reason(device: torch.device) -> str | None:
    arch = _arch(device)
    if arch is None or arch in ARCHS:
        return None
    covered = ", ".join(f"sm_{a}" for a in ARCHS)
    return f"the kernels are compiled and checked for {covered}; this device is sm_{arch}"


def _pad16(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dtype_reason(*tensors: Tensor | None) -> str | None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        got = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"the kernels take one dtype among float32, bfloat16, float16; got {got}"
    return None


def _size_reason(**sizes: int) -> str | None:
    big = {k: v for k, v in sizes.items() if v >= _INT32}
    if big:
        return f"offsets past 32 bits ({', '.join(f'{k}={v}' for k, v in big.items())})"
    return None


def unsupported_select(query: Tensor, key: Tensor, K: int) -> str | None:
    """Why the selection kernel does not cover this call (None: it does)."""
    reason = _dtype_reason(query, key) or _device_reason(query.device)
    if reason is None and K > MAX_K:
        reason = f"K must be <= {MAX_K}, got K={K}"
    D = _pad16(query.shape[-1])
    return reason or _size_reason(
        query_elements=query.shape[1] * D, key_elements=key.shape[1] * D, keys=key.shape[1]
    )


def unsupported_aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
) -> str | None:
    """Why the aggregation kernels do not cover this call (None: they do)."""
    B, M, C = values.shape
    G, N, K = indices.shape[1:]
    c_pad = G * _pad16(C // G)
    c_out = _pad16(weight.shape[0]) if kernel == "standard" else c_pad
    reason = _dtype_reason(values, rho, weight, bias) or _device_reason(values.device)
    return reason or _size_reason(
        value_elements=M * c_pad,
        output_elements=N * c_out,
        index_elements=G * N * K,
        weight_elements=K * c_pad * c_out,
    )


def no_kernel_select(scores: BlockScores, window: Tensor | None) -> str | None:
    """Why the selection kernel is not designed for this call (None: it is)."""
    if window is not None:
        return "per-query candidates (a window or a candidate list per query)"
    if scores.operands is None:
        return scores.why_not_gemm or "scores without a GEMM form"
    if 0 in (scores.batch, scores.num_queries, scores.num_keys):
        return "an empty input"
    return None


def no_kernel_aggregate(values: Tensor, indices: Tensor) -> str | None:
    """Why the aggregation kernels are not designed for this call (None: they are)."""
    return "an empty input" if values.numel() == 0 or indices.numel() == 0 else None


def _refuse(what: str, reason: str):
    raise ValueError(
        f"backend='triton' does not cover this {what}: {reason}. Use backend='auto' (the "
        f"chunked backend runs it) or backend='chunked'"
    )


# --------------------------------------------------------------------------- launching

# A test hook: called with (launch, grid, args) instead of launching, when set.
_recorder: Callable | None = None


def _launch(launch: Launch, grid: tuple[int, int, int], *args) -> None:
    if _recorder is not None:
        _recorder(launch, grid, args)
        return
    getattr(kernels, launch.kernel)[grid](*args, **launch.kwargs())


def _aligned(t: Tensor) -> Tensor:
    """Contiguous and 16-byte aligned (the kernels are compiled for aligned pointers). A
    traced graph has no addresses: its buffers are the compiler's (aligned when fresh)."""
    t = t.contiguous()
    if torch.compiler.is_compiling() or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def _dummy(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(ALIGN, dtype=dtype, device=device)


# --------------------------------------------------------------------------- selection


# The kernels run as they are compiled and checked (the table's entries), in compiled code
# too: torch.compile runs the functions that launch them eagerly, where tracing them would
# recompile user-defined kernels under its own options, unchecked.
@torch.compiler.disable
def _select(query: Tensor, key: Tensor, K: int, exclude: Tensor | None) -> Tensor:
    """The kernel path of :func:`select` (the call is covered)."""
    with torch.no_grad():
        B = max(query.shape[0], key.shape[0])
        N, M, D = query.shape[1], key.shape[1], query.shape[-1]
        pad = _pad16(D) - D
        q, k = (_aligned(F.pad(t, (0, pad)) if pad else t) for t in (query, key))
        launch = select_launch(q.dtype, K)
        consts = dict(launch.constants)
        block_n, block_m = consts["BLOCK_N"], consts["BLOCK_M"]
        tiles, rows = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
        tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, TARGET_PROGRAMS // (rows * B))))
        splits = triton.cdiv(tiles, tiles_per_split)
        packed = torch.empty(B, N, splits * K, dtype=torch.int64, device=q.device)
        if exclude is None:
            ex = _dummy(torch.int32, q.device)
        else:
            ex = _aligned(exclude.to(device=q.device, dtype=torch.int32))
        _launch(
            launch,
            (rows, splits, B),
            *(q, k, ex, packed),
            *(N, M, D + pad, int(q.shape[0] > 1), int(k.shape[0] > 1)),
            *(tiles_per_split * block_m, splits, K, int(exclude is not None)),
        )
        # Packed keys order as (score desc, index asc): a top-K of them is the merge with
        # the tie rule, and sorted=True gives the canonical slot order.
        packed = packed.topk(K, dim=-1).values
        idx = _LOW32 - (packed & _LOW32)
        return idx.masked_fill_(packed >> 32 == -_INT32, M)  # empty slots (EMPTY + slot)


def select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    spatial_grid: tuple[int, int] | None = None,
    exclude: Tensor | None = None,
    window: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.select`, fused. An empty batch or
    query set gives empty indices; see :func:`select_scores`."""
    B, N = max(query.shape[0], key.shape[0]), query.shape[1]
    if B == 0 or N == 0:
        return torch.empty(B, N, K, dtype=torch.long, device=query.device)
    scores = tensor_scores(query, key, spatial_grid)
    return select_scores(scores, K, exclude=exclude, window=window)


def select_scores(
    scores: BlockScores, K: int, *, exclude: Tensor | None = None, window: Tensor | None = None
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.select_scores`, fused. A call the
    kernel is not designed for (:func:`no_kernel_select`) or that its table does not cover
    (:func:`unsupported_select`) is a ``ValueError``."""
    reason = no_kernel_select(scores, window)
    if reason:
        raise ValueError(
            f"backend='triton' has no selection kernel for {reason}: the dispatcher runs this "
            f"stage on the chunked backend (convnn.explain shows it), got such a call"
        )
    query, key = scores.operands
    reason = unsupported_select(query, key, K)
    if reason:
        _refuse("selection", reason)
    return _select(query, key, K, exclude)


# --------------------------------------------------------------------------- aggregation


class _Aggregate(torch.autograd.Function):
    """Kernel-layout aggregation: values (B, M, C), w None | (C, K) depthwise | (K, C, C_out)
    standard, channel dims multiples of 16, every tensor of one dtype."""

    @staticmethod
    def forward(ctx, values, indices, rho, w, bias, kernel, precision):
        B, M, C = values.shape
        G, N, K = indices.shape[1:]
        c_out = w.shape[-1] if kernel == "standard" else C
        out = values.new_empty(B, N, c_out)
        launches = aggregate_launches(values.dtype, kernel, precision)
        fwd = launches["fwd"]
        block = dict(fwd.constants)
        rows = triton.cdiv(N, AGG_BLOCK_N)
        dummy = values
        head = (values, indices, dummy if rho is None else rho, dummy if w is None else w)
        head += (dummy if bias is None else bias, out)
        if kernel == "standard":
            grid = (rows, triton.cdiv(c_out, block["BLOCK_O"]), B)
            sizes = (N, M, C, c_out, K, G, C // G, int(rho is not None), int(bias is not None))
        else:
            grid = (rows, triton.cdiv(C, block["BLOCK_C"]), B)
            flags = (int(rho is not None), int(w is not None), int(bias is not None))
            sizes = (N, M, C, K, G, C // G, *flags)
        _launch(fwd, grid, *head, *sizes)
        ctx.kernel, ctx.launches = kernel, launches
        ctx.save_for_backward(values, indices, rho, w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # a backward that builds a graph (double backward)
            return _graph_backward(ctx, grad_out)
        return _kernel_backward(ctx, grad_out)


def _graph_backward(ctx, grad_out):
    """The gradients of :class:`_Aggregate` as torch operators (the chunked backend's
    aggregation of the kernels' layout, differentiated), so that a second derivative sees
    them: the kernels' gradients are not differentiable."""
    values, indices, rho, w = ctx.saved_tensors
    need_v, _, need_rho, need_w, need_b = ctx.needs_input_grad[:5]
    # the chunked layout of the weight: (C_out, C, K) standard, (C, 1, K) depthwise
    weight = None if w is None else w.permute(2, 1, 0) if ctx.kernel == "standard" else w[:, None]
    out = chunked._Aggregate.apply(values, indices, rho, weight, None, ctx.kernel)
    needs = (need_v, need_rho, need_w)
    g_v, g_rho, g_w = graph_grads(out, (values, rho, w), needs, grad_out)
    g_b = grad_out.to(torch.float32).sum((0, 1)).to(values.dtype) if need_b else None
    return g_v, None, g_rho, g_w, g_b, None, None


# see _select: the backward's launches run eagerly too (compiled autograd traces backward)
@torch.compiler.disable
def _kernel_backward(ctx, grad_out):
    """The gradients of :class:`_Aggregate` by the kernels."""
    values, indices, rho, w = ctx.saved_tensors
    kernel, launches = ctx.kernel, ctx.launches
    B, M, C = values.shape
    G, N, K = indices.shape[1:]
    need_v, _, need_rho, need_w, need_b = ctx.needs_input_grad[:5]
    gy = _aligned(grad_out.to(values.dtype))
    c_out = gy.shape[-1]
    dev, f32 = values.device, torch.float32
    rows = triton.cdiv(N, AGG_BLOCK_N)
    g_v = torch.zeros(values.shape, dtype=f32, device=dev) if need_v else None
    g_rho = torch.empty(indices.shape, dtype=f32, device=dev) if need_rho else None
    g_w = None
    dummy, dummy32 = values, _dummy(f32, dev)
    rho_arg, w_arg = dummy if rho is None else rho, dummy if w is None else w
    part_w = need_w and kernel == "depthwise"  # per-program partials of its weight grad
    if part_w:
        g_w = torch.empty(B * rows, C, K, dtype=f32, device=dev)
    if need_v or need_rho or part_w:
        grads = [dummy32 if g is None else g for g in (g_v, g_rho, g_w)]
        flags = (int(need_v), int(need_rho), int(part_w))
        _launch(
            launches["bwd"],
            (rows, K, B),
            *(gy, values, indices, rho_arg, w_arg, *grads),
            *(N, M, C, c_out, K, G, C // G, int(rho is not None), int(w is not None), *flags),
        )
    if part_w:
        g_w = g_w.sum(0)  # (C, K)
    elif need_w:  # 'standard'
        g_w = _standard_grad_w(launches["grad_w"], gy, values, indices, rho_arg, rho)
    g_b = grad_out.to(f32).sum((0, 1)) if need_b else None
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    grads = cast(g_v, values), None, cast(g_rho, rho), cast(g_w, w), cast(g_b, values)
    return *grads, None, None


def _standard_grad_w(launch, gy, values, indices, rho_arg, rho) -> Tensor:
    """dL/dW as (K, C, C_out): per-split partial GEMMs, summed (deterministic)."""
    B, M, C = values.shape
    G, N, K = indices.shape[1:]
    c_out = gy.shape[-1]
    block = dict(launch.constants)
    rows = triton.cdiv(N, AGG_BLOCK_N)
    c_blocks, o_blocks = triton.cdiv(C, block["BLOCK_C"]), triton.cdiv(c_out, block["BLOCK_O"])
    per_split = triton.cdiv(rows, max(1, min(rows, TARGET_PROGRAMS // (c_blocks * o_blocks * K))))
    splits = triton.cdiv(rows, per_split)
    part = torch.empty(splits, K, C, c_out, dtype=torch.float32, device=values.device)
    _launch(
        launch,
        (c_blocks, o_blocks, K * splits),
        *(gy, values, indices, rho_arg, part),
        *(B, N, M, C, c_out, K, G, C // G, per_split, int(rho is not None)),
    )
    return part.sum(0)


def _pad_groups(t: Tensor, dim: int, groups: int) -> Tensor:
    """Zero-pad each of ``groups`` equal chunks of ``dim`` to a multiple of 16."""
    size = t.shape[dim] // groups
    pad = _pad16(size) - size
    if pad == 0:
        return t
    t = t.unflatten(dim, (groups, size))
    spec = [0, 0] * (t.dim() - dim - 2) + [0, pad]
    return F.pad(t, spec).flatten(dim, dim + 1)


@torch.compiler.disable  # see _select
def _aggregate(values, indices, rho, weight, bias, kernel, precision=None) -> Tensor:
    """The kernel path of :func:`aggregate`: pad channels, lay weights out, run, unpad.
    ``precision``: the float32 products' (default: torch's float32 matmul setting, see
    :func:`_matmul_precision`)."""
    precision = precision or _matmul_precision(values.dtype)
    G = indices.shape[1]
    B, M, C = values.shape
    v = _aligned(_pad_groups(values, 2, G))
    indices = _aligned(indices.long())
    r = None if rho is None else _aligned(rho)
    if kernel == "standard":
        c_out = weight.shape[0]
        w = _pad_groups(_pad_groups(weight, 0, 1), 1, G)  # (C_out', C', K)
        w = _aligned(w.permute(2, 1, 0))  # (K, C', C_out'): rows of W_k^T
        b = None if bias is None else _aligned(_pad_groups(bias, 0, 1))
        return _Aggregate.apply(v, indices, r, w, b, kernel, precision)[..., :c_out]
    w = None if weight is None else _aligned(_pad_groups(weight[:, 0], 0, G))  # (C', K)
    b = None if bias is None else _aligned(_pad_groups(bias, 0, G))
    out = _Aggregate.apply(v, indices, r, w, b, kernel, precision)
    if out.shape[-1] == C:
        return out
    return out.unflatten(-1, (G, -1))[..., : C // G].flatten(-2)


def aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.aggregate`, fused (never gathers
    the (B, N, K, C) neighbour tensor). An empty input (no kernel: the dispatcher runs it
    chunked) or a call the kernels do not cover (see :func:`unsupported_aggregate`) is a
    ``ValueError``."""
    empty = no_kernel_aggregate(values, indices)
    if empty:
        raise ValueError(
            f"backend='triton' has no aggregation kernel for {empty}: the dispatcher runs it "
            f"on the chunked backend, got values {tuple(values.shape)}, indices "
            f"{tuple(indices.shape)}"
        )
    reason = unsupported_aggregate(values, indices, rho, weight, bias, kernel)
    if reason:
        _refuse("aggregation", reason)
    return _aggregate(values, indices, rho, weight, bias, kernel)


# --------------------------------------------------------------------------- auto

_ready: dict[tuple, bool] = {}  # (device, dtype, check) -> passed; check None: the device
_ready_lock = threading.Lock()
_CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def select_check(K: int) -> tuple | None:
    """The first-use check that covers the selection kernel for ``K`` neighbours (its running
    top-K width); None where no kernel covers K."""
    return ("select", _select_width(K)) if K <= MAX_K else None


def aggregate_check(dtype: torch.dtype, kernel: str) -> tuple:
    """The first-use check that covers the aggregation kernels of ``kernel`` for ``dtype``
    operands (the standard kernel's at the products' precision it would launch with)."""
    if kernel == "standard":
        return ("standard", _matmul_precision(dtype))
    return ("channelwise", None)


def checks(dtype: torch.dtype) -> list[tuple]:
    """Every first-use check of ``dtype``: together they launch every entry of :func:`table`
    for that dtype."""
    selects = [("select", kp) for kp in SELECT_KP]
    return selects + [("channelwise", None)] + [("standard", p) for p in _precisions(dtype)]


def describe_check(check: tuple) -> str:
    what, arg = check
    if what == "select":
        return f"the selection kernel for K <= {arg}"
    if what == "channelwise":
        return "the aggregation kernels of kernel='none' and 'depthwise'"
    return "the aggregation kernels of kernel='standard'" + (f", {arg} products" if arg else "")


def first_use_check(
    device: torch.device, dtype: torch.dtype, which: list[tuple] | None = None
) -> str | None:
    """Run kernels once on tiny inputs against the chunked backend: those of the checks
    ``which`` (default: every check of ``dtype``, :func:`checks`, which launch every table
    entry of ``dtype``).

    Returns None when all agree, else what went wrong (an exception while compiling or
    launching, or a result that differs). Selection compares indices exactly: the features
    are small integers, so every score is exact in every dtype, and many tie.
    """
    device = torch.device(device)
    try:
        # Whatever the caller's modes: the check needs autograd, and fp32 must stay fp32.
        with torch.inference_mode(False), torch.enable_grad():
            with torch.autocast(device.type, enabled=False):
                for check in checks(dtype) if which is None else which:
                    reason = _compare_with_chunked(device, dtype, check)
                    if reason:
                        return f"{describe_check(check)}: {reason}"
                return None
    except Exception as err:  # compile, resource or launch errors: report, never raise
        first = str(err).strip().splitlines()
        return f"{type(err).__name__}: {first[0] if first else ''}".strip()


def _compare_with_chunked(device: torch.device, dtype: torch.dtype, check: tuple) -> str | None:
    """One check's kernels against the chunked backend (None: they agree)."""
    gen = torch.Generator().manual_seed(0)

    def ints(*shape, lo=-2, hi=3, scale=1.0):  # dyadic values: exact in every dtype
        t = torch.randint(lo, hi, shape, generator=gen) * scale
        return t.to(device=device, dtype=dtype)

    what, arg = check
    if what == "select":
        K = 5 if arg == SELECT_KP[0] else arg // 2 + 1  # the smallest K of that width
        q, k = ints(2, 21, 8), ints(2, 2 * K + 11, 8)
        ex = torch.arange(21, device=device)
        got, want = _select(q, k, K, ex), chunked.select(q, k, K, exclude=ex)
        if not torch.equal(got, want):
            return (
                f"it picked other neighbours than the chunked backend "
                f"({int((got != want).sum())} of {got.numel()} indices)"
            )
        return None
    tol = _CHECK_TOLERANCE[dtype]
    cases = (("none", 2), ("depthwise", 1)) if what == "channelwise" else (("standard", 2),)
    for kernel, G in cases:
        # 12 channels (6 per group): exercises the padding to 16 too.
        tensors = [
            ints(2, 13, 12, scale=0.25),
            ints(2, G, 9, 3, lo=1, hi=5, scale=0.25),
            {"none": None, "depthwise": ints(12, 1, 3, scale=0.5)}.get(kernel),
            ints(10 if kernel == "standard" else 12, scale=0.5),
        ]
        if kernel == "standard":
            tensors[2] = ints(10, 12, 3, scale=0.125)
        idx = torch.randint(0, 13, (2, G, 9, 3), generator=gen).to(device)
        gy = ints(2, 9, tensors[3].shape[0], scale=0.5)
        results = []
        runs = (functools.partial(_aggregate, precision=arg), chunked.aggregate)
        for run in runs:
            leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
            values, rho, weight, bias = leaves
            out = run(values, idx, rho, weight, bias, kernel)
            present = [t for t in leaves if t is not None]
            results.append([out, *torch.autograd.grad(out, present, gy)])
        names = ["output", "grad values", "grad rho", "grad weight", "grad bias"]
        names = [n for n, t in zip(names, [gy] + tensors) if t is not None]
        for label, a, b in zip(names, *results):
            err = (a.float() - b.float()).abs().max().item()
            if not err <= tol * (1 + b.float().abs().max().item()):
                return f"kernel={kernel!r}: {label} differs from the chunked backend by {err:.3g}"
    return None


def _kernels_ready(device: torch.device, dtype: torch.dtype, check: tuple | None) -> bool:
    """Whether auto may run the kernels of ``check`` (None: whether it may run any) for
    (device, dtype): the device is covered and that check passed on first use. Each is
    decided once; a failure warns once, saying why."""
    ok = _ready.get((device, dtype, None))
    if ok and check is not None:
        ok = _ready.get((device, dtype, check))
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():
        return False  # a traced graph cannot run the check: chunked until an eager call has
    with _ready_lock:
        for key in [(device, dtype, None)] + ([] if check is None else [(device, dtype, check)]):
            if key not in _ready:
                if key[2] is None:
                    reason = _device_reason(device)
                else:
                    reason = first_use_check(device, dtype, [check])
                if reason:
                    warnings.warn(
                        f"convnn: the Triton kernels do not run on {device} for {dtype}: "
                        f"{reason}. The chunked backend runs instead.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                _ready[key] = reason is None
            if not _ready[key]:
                return False
    return True


class _Auto:
    """The automatic choice on CUDA as a backend object (what ``backends.get(None, 'cuda')``
    returns): each call goes through the dispatcher's auto rule for CUDA (the kernels for
    the calls they cover, once checked; the chunked backend for everything else)."""

    name = "auto"

    @staticmethod
    def select(
        query: Tensor,
        key: Tensor,
        K: int,
        *,
        spatial_grid: tuple[int, int] | None = None,
        exclude: Tensor | None = None,
        window: Tensor | None = None,
    ) -> Tensor:
        from . import dispatch

        scores = tensor_scores(query, key, spatial_grid)
        be = dispatch.select_backend(scores, K, exclude, window, backend="auto", device="cuda")
        return be.select_scores(scores, K, exclude=exclude, window=window)

    @staticmethod
    def aggregate(values, indices, rho, weight, bias, kernel) -> Tensor:
        from . import dispatch

        be = dispatch.aggregate_backend(
            values, indices, rho, weight, bias, kernel, backend="auto", device="cuda"
        )
        return be.aggregate(values, indices, rho, weight, bias, kernel)


auto = _Auto()
