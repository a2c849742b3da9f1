"""Fused Triton backend: streaming top-K selection and gather-aggregate kernels.

- ``select``: each program takes a block of queries and one range of keys, computes
  ``q' . k'`` tile by tile with ``tl.dot`` (fp32 accumulation) and merges every tile into a
  running top-K held in registers, so the (N, M) similarity matrix is never written. Key
  ranges are split over programs when N * B alone cannot fill the GPU; the per-range top-Ks
  are merged afterwards (a sort of ``splits * K`` candidates per query).
- ``aggregate``: ``y_n = sum_k W_k (rho_nk * v_{idx_nk}) + b`` gathers neighbour rows inside
  the kernel (a gather-GEMM for 'standard', a weighted sum for 'none'/'depthwise'), so the
  (B, N, K, C) tensor of gathered neighbours is never formed, forward or backward. The
  gradients of values (scatter with ``tl.atomic_add``), rho and weight are kernels too;
  the weight gradients are reduced over per-program partials, so they are deterministic.

Contracts are those of :mod:`convnn.backends.reference`. Falls back to
:mod:`convnn.backends.chunked` where a kernel would not pay: spatial or windowed selection,
K > ``MAX_K``, dtypes other than float16/bfloat16/float32/float64, empty inputs.
Accumulation is fp32 (fp64 for float64 inputs); outputs have the input dtype. float32
``tl.dot`` follows ``torch.get_float32_matmul_precision()``: 'highest' (the default) is
exact IEEE fp32, 'high'/'medium' allow TF32.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slow: for tests only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import chunked
from ._common import canonical_order

name = "triton"

MAX_K = 128  # largest K the selection kernel keeps in registers; above it chunked runs
SELECT_BLOCK_M = 64  # keys per tile
AGG_BLOCK_N = 32  # queries per aggregation program
TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU when splitting key ranges
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision for float32: TF32 only where torch's matmuls allow it."""
    if dtype != torch.float32:
        return None  # half types: native tensor cores; float64 does not use tl.dot
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """Operand type of tl.dot: the input's, except bfloat16 under the interpreter (which
    stores it as raw uint16 and multiplies those), where fp32 is exact instead."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int, lo: int = 16, hi: int = 64, dtype: torch.dtype | None = None) -> int:
    """Power-of-2 block for a dim of size n, within [lo, hi] (tl.dot needs >= 16).

    float64 products run as (a, b, c) broadcasts, so their blocks stay small.
    """
    hi = min(hi, 16) if dtype == torch.float64 else hi
    return max(min(lo, hi), min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """acc + a @ b: tl.dot on DOT operands with ACC accumulation; float64 by FMA (fp64
    tl.dot is not available on every target)."""
    if ACC == tl.float64:
        return acc + tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
    else:
        return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)


# --------------------------------------------------------------------------- selection


@triton.jit
def _select_kernel(
    q_ptr,
    k_ptr,
    ex_ptr,
    out_v_ptr,
    out_i_ptr,
    N,
    M,
    D,
    stride_qb,
    stride_kb,
    keys_per_split,
    num_splits,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    LOWEST: tl.constexpr,
):
    """Top-K of q[b, n] . k[b, m] over one key range; writes (B, N, splits, KP) candidates."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slots = tl.arange(0, KP)
    if HAS_EXCLUDE:
        ex = tl.load(ex_ptr + offs_n, mask=mask_n, other=-1)
    # Running top-K: slots >= K hold +inf so they are never the worst and never evicted;
    # empty slots hold -inf and distinct negative indices (so "evict the highest index
    # among the tied worst" always names exactly one slot).
    top_v = tl.where(
        slots[None, :] < K,
        tl.full((BLOCK_N, KP), float("-inf"), ACC),
        tl.full((BLOCK_N, KP), float("inf"), ACC),
    )
    top_i = -1 - slots[None, :] + tl.zeros((BLOCK_N, KP), dtype=tl.int32)
    m_start = split * keys_per_split
    m_end = tl.minimum(m_start + keys_per_split, M)
    q_base = q_ptr + b * stride_qb + offs_n[:, None] * D
    k_base = k_ptr + b * stride_kb
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        s = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(q_base + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0)
            kt = tl.load(
                k_base + offs_m[None, :] * D + offs_d[:, None],
                mask=mask_d[:, None] & mask_m[None, :],
                other=0,
            )
            s = _mm(q, kt, s, PRECISION, ACC, DOT)
        # NaN ranks first (as torch.topk); real scores stay above the -inf of blocked keys.
        s = tl.where(s == float("-inf"), tl.full((BLOCK_N, BLOCK_M), LOWEST, ACC), s)
        s = tl.where(s != s, float("inf"), s)
        valid = mask_m[None, :]
        if HAS_EXCLUDE:
            valid = valid & (offs_m[None, :] != ex[:, None])
        s = tl.where(valid, s, float("-inf"))
        # At most min(K, #entries beating the current worst) insertions per row.
        worst = tl.min(top_v, axis=1)
        beat = tl.sum((s > worst[:, None]).to(tl.int32), axis=1)
        rounds = tl.minimum(tl.max(beat, axis=0), K)
        for _ in range(rounds):
            best = tl.max(s, axis=1)
            best_i = tl.min(tl.where(s == best[:, None], offs_m[None, :], 2147483647), axis=1)
            worst = tl.min(top_v, axis=1)
            worst_i = tl.max(tl.where(top_v == worst[:, None], top_i, -2147483647), axis=1)
            evict = (top_i == worst_i[:, None]) & (best > worst)[:, None]
            top_v = tl.where(evict, best[:, None], top_v)
            top_i = tl.where(evict, best_i[:, None], top_i)
            s = tl.where(offs_m[None, :] == best_i[:, None], float("-inf"), s)
    out = ((b * N + offs_n[:, None]) * num_splits + split) * KP + slots[None, :]
    keep = slots[None, :] < K
    tl.store(out_v_ptr + out, tl.where(keep, top_v, float("-inf")), mask=mask_n[:, None])
    tl.store(out_i_ptr + out, tl.where(keep & (top_i >= 0), top_i, M), mask=mask_n[:, None])


def select(
    query: Tensor,
    key: Tensor,
    K: int,
    *,
    spatial_grid: tuple[int, int] | None = None,
    exclude: Tensor | None = None,
    window: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.select`, fused.

    Spatial and windowed selection (cheap, not the hot path), K > ``MAX_K``, unsupported
    dtypes and empty inputs run on the chunked backend.
    """
    N, M = query.shape[1], key.shape[1]
    if (
        spatial_grid is not None
        or window is not None
        or K > MAX_K
        or query.dtype not in _DTYPES
        or key.dtype != query.dtype
        or 0 in (query.shape[0], key.shape[0], N, M)
    ):
        return chunked.select(
            query, key, K, spatial_grid=spatial_grid, exclude=exclude, window=window
        )
    with torch.no_grad():
        B = max(query.shape[0], key.shape[0])
        D = query.shape[-1]
        q, k = query.contiguous(), key.contiguous()
        acc = _acc_dtype(q.dtype)
        KP = triton.next_power_of_2(K)
        block_n = 64 if KP <= 32 else (32 if KP <= 64 else 16)
        block_m = SELECT_BLOCK_M
        if q.dtype == torch.float64:
            block_n, block_m = 16, min(block_m, 32)
        tiles, rows = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
        tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, TARGET_PROGRAMS // (rows * B))))
        splits = triton.cdiv(tiles, tiles_per_split)
        vals = torch.empty(B, N, splits, KP, dtype=acc, device=q.device)
        idx = torch.empty(B, N, splits, KP, dtype=torch.int32, device=q.device)
        ex = q if exclude is None else exclude.to(device=q.device, dtype=torch.int32).contiguous()
        _select_kernel[(rows, splits, B)](
            q,
            k,
            ex,
            vals,
            idx,
            N,
            M,
            D,
            0 if q.shape[0] == 1 else N * D,
            0 if k.shape[0] == 1 else M * D,
            tiles_per_split * block_m,
            splits,
            K=K,
            KP=KP,
            HAS_EXCLUDE=exclude is not None,
            BLOCK_N=block_n,
            BLOCK_M=block_m,
            BLOCK_D=_block(D, dtype=q.dtype),
            PRECISION=_precision(q.dtype),
            ACC=_TL_ACC[acc],
            DOT=_dot_dtype(q.dtype),
            LOWEST=-torch.finfo(acc).max,
        )
        vals, idx = vals.view(B, N, splits * KP), idx.view(B, N, splits * KP).long()
        # Merge the per-range candidates; ties at the K-th score keep the lower index, as
        # each range's running top-K does.
        return canonical_order(vals, idx)[1][..., :K].contiguous()


# --------------------------------------------------------------------------- aggregation


@triton.jit
def _gather(
    v_ptr,
    idx_ptr,
    rho_ptr,
    b,
    offs_n,
    offs_c,
    k,
    N,
    M,
    C,
    K,
    G,
    GROUP_C,
    HAS_RHO: tl.constexpr,
    GROUPED: tl.constexpr,
    ACC: tl.constexpr,
):
    """(BLOCK_N, BLOCK_C) tile of rho[b, g, n, k] * v[b, idx[b, g, n, k], c], g = c // GROUP_C.

    idx/rho are contiguous (B, G, N, K), v is contiguous (B, M, C). Returns ACC.
    """
    mask_n = offs_n < N
    mask_c = offs_c < C
    mask = mask_n[:, None] & mask_c[None, :]
    if GROUPED:  # the channel block may span groups: one index per (n, c)
        g = offs_c // GROUP_C
        at = ((b * G + g[None, :]) * N + offs_n[:, None]) * K + k
        idx = tl.load(idx_ptr + at, mask=mask, other=0)
        x = tl.load(v_ptr + (b * M + idx) * C + offs_c[None, :], mask=mask, other=0)
        x = x.to(ACC)
        if HAS_RHO:
            x = x * tl.load(rho_ptr + at, mask=mask, other=0).to(ACC)
    else:
        at = (b * N + offs_n) * K + k
        idx = tl.load(idx_ptr + at, mask=mask_n, other=0)
        x = tl.load(v_ptr + (b * M + idx[:, None]) * C + offs_c[None, :], mask=mask, other=0)
        x = x.to(ACC)
        if HAS_RHO:
            x = x * tl.load(rho_ptr + at, mask=mask_n, other=0).to(ACC)[:, None]
    return x


@triton.jit
def _channelwise_fwd(
    v_ptr,
    idx_ptr,
    rho_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    M,
    C,
    K,
    G,
    GROUP_C,
    HAS_RHO: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """'none' / 'depthwise': y[b, n, c] = sum_k w[c, k] rho v[idx, c] + bias[c]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for k in range(K):
        x = _gather(
            v_ptr,
            idx_ptr,
            rho_ptr,
            b,
            offs_n,
            offs_c,
            k,
            N,
            M,
            C,
            K,
            G,
            GROUP_C,
            HAS_RHO,
            GROUPED,
            ACC,
        )
        if HAS_W:
            x = x * tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0).to(acc.dtype)[None, :]
        acc += x
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0).to(acc.dtype)[None, :]
    out = (b * N + offs_n[:, None]) * C + offs_c[None, :]
    tl.store(out_ptr + out, acc, mask=(offs_n < N)[:, None] & mask_c[None, :])


@triton.jit
def _standard_fwd(
    v_ptr,
    idx_ptr,
    rho_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    M,
    C,
    C_OUT,
    K,
    G,
    GROUP_C,
    HAS_RHO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
):
    """Gather-GEMM: y[b, n, :] = sum_k (rho v[idx_k]) @ W_k + bias; w is (K, C, C_out)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.program_id(2).to(tl.int64)
    mask_o = offs_o < C_OUT
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=ACC)
    for k in range(K):
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            a = _gather(
                v_ptr,
                idx_ptr,
                rho_ptr,
                b,
                offs_n,
                offs_c,
                k,
                N,
                M,
                C,
                K,
                G,
                GROUP_C,
                HAS_RHO,
                GROUPED,
                ACC,
            )
            w = tl.load(
                w_ptr + (k * C + offs_c[:, None]) * C_OUT + offs_o[None, :],
                mask=(offs_c < C)[:, None] & mask_o[None, :],
                other=0,
            )
            acc = _mm(a, w, acc, PRECISION, ACC, DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0).to(ACC)[None, :]
    out = (b * N + offs_n[:, None]) * C_OUT + offs_o[None, :]
    tl.store(out_ptr + out, acc, mask=(offs_n < N)[:, None] & mask_o[None, :])


@triton.jit
def _aggregate_bwd(
    gy_ptr,
    v_ptr,
    idx_ptr,
    rho_ptr,
    w_ptr,
    gv_ptr,
    grho_ptr,
    gw_ptr,
    N,
    M,
    C,
    C_OUT,
    K,
    G,
    GROUP_C,
    KERNEL: tl.constexpr,  # 0 none, 1 depthwise, 2 standard
    HAS_RHO: tl.constexpr,
    NEED_V: tl.constexpr,
    NEED_RHO: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
):
    """One (query block, slot k, batch): grads of values (atomic scatter), rho and, for
    'depthwise', per-program partials of the weight grad.

    g'[n, c] = dL/d(rho v[idx])[n, k, c] is gy (none), gy * w[c, k] (depthwise) or
    gy @ W_k^T (standard); grad_rho[b, g, n, k] = sum_{c in g} g' v[idx, c];
    grad_v[b, idx, c] += g' rho.
    """
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for g in range(G):
        at = ((b * G + g) * N + offs_n) * K + k
        idx = tl.load(idx_ptr + at, mask=mask_n, other=0)
        if HAS_RHO:
            rho = tl.load(rho_ptr + at, mask=mask_n, other=0).to(ACC)
        g_rho = tl.zeros((BLOCK_N,), dtype=ACC)
        for c0 in range(0, GROUP_C, BLOCK_C):
            offs_j = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_j < GROUP_C
            offs_c = g * GROUP_C + offs_j
            mask = mask_n[:, None] & mask_c[None, :]
            if KERNEL == 2:
                gp = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
                for o0 in range(0, C_OUT, BLOCK_O):
                    offs_o = o0 + tl.arange(0, BLOCK_O)
                    mask_o = offs_o < C_OUT
                    gy = tl.load(
                        gy_ptr + (b * N + offs_n[:, None]) * C_OUT + offs_o[None, :],
                        mask=mask_n[:, None] & mask_o[None, :],
                        other=0,
                    )
                    wt = tl.load(  # W_k^T block: (BLOCK_O, BLOCK_C) of w (K, C, C_OUT)
                        w_ptr + (k * C + offs_c[None, :]) * C_OUT + offs_o[:, None],
                        mask=mask_o[:, None] & mask_c[None, :],
                        other=0,
                    )
                    gp = _mm(gy, wt, gp, PRECISION, ACC, DOT)
            else:
                gy = tl.load(
                    gy_ptr + (b * N + offs_n[:, None]) * C + offs_c[None, :], mask=mask, other=0
                ).to(ACC)
                gp = gy
                if KERNEL == 1:
                    w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0).to(ACC)
                    gp = gy * w[None, :]
            if NEED_RHO or (KERNEL == 1 and NEED_W):
                x = tl.load(
                    v_ptr + (b * M + idx[:, None]) * C + offs_c[None, :], mask=mask, other=0
                )
                x = x.to(ACC)
                if NEED_RHO:
                    g_rho += tl.sum(gp * x, axis=1)
                if KERNEL == 1 and NEED_W:  # partial dL/dw[c, k] = sum_n gy rho v
                    if HAS_RHO:
                        x = x * rho[:, None]
                    part = tl.sum(gy * x, axis=0)
                    row = b * tl.num_programs(0) + pid_n
                    tl.store(gw_ptr + (row * C + offs_c) * K + k, part, mask=mask_c)
            if NEED_V:
                if HAS_RHO:
                    gp = gp * rho[:, None]
                tl.atomic_add(gv_ptr + (b * M + idx[:, None]) * C + offs_c[None, :], gp, mask=mask)
        if NEED_RHO:
            tl.store(grho_ptr + at, g_rho, mask=mask_n)


@triton.jit
def _standard_grad_w(
    gy_ptr,
    v_ptr,
    idx_ptr,
    rho_ptr,
    gw_ptr,
    B,
    N,
    M,
    C,
    C_OUT,
    K,
    G,
    GROUP_C,
    blocks_per_split,
    HAS_RHO: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
):
    """Partial dL/dW_k = sum_{b, n} (rho v[idx_k])^T gy over one split of the query blocks.

    Writes gw[split, k, c, o]; the splits are summed afterwards (deterministic).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    k = tl.program_id(2) % K
    split = tl.program_id(2) // K
    mask_o = offs_o < C_OUT
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=ACC)
    n_start = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, N)
    zero = tl.program_id(0).to(tl.int64) * 0  # 64-bit batch offsets
    for b64 in range(zero, B):
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            a = _gather(
                v_ptr,
                idx_ptr,
                rho_ptr,
                b64,
                offs_n,
                offs_c,
                k,
                N,
                M,
                C,
                K,
                G,
                GROUP_C,
                HAS_RHO,
                GROUPED,
                ACC,
            )
            gy = tl.load(
                gy_ptr + (b64 * N + offs_n[:, None]) * C_OUT + offs_o[None, :],
                mask=(offs_n < N)[:, None] & mask_o[None, :],
                other=0,
            )
            acc = _mm(tl.trans(a), gy, acc, PRECISION, ACC, DOT)
    out = ((split * K + k) * C + offs_c[:, None]) * C_OUT + offs_o[None, :]
    tl.store(gw_ptr + out, acc, mask=(offs_c < C)[:, None] & mask_o[None, :])


_KERNEL_CODE = {"none": 0, "depthwise": 1, "standard": 2}


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, rho, weight, bias, kernel):
        values, indices = values.contiguous(), indices.contiguous()
        rho = None if rho is None else rho.contiguous()
        B, M, C = values.shape
        G, N, K = indices.shape[1:]
        c_out = weight.shape[0] if kernel == "standard" else C
        out = values.new_empty(B, N, c_out)
        dummy = values
        common = dict(HAS_RHO=rho is not None, HAS_BIAS=bias is not None, GROUPED=G > 1)
        args = (values, indices, dummy if rho is None else rho)
        if kernel == "standard":
            w = weight.permute(2, 1, 0).contiguous()  # (K, C, C_out): rows of W_k^T
            block_o = _block(c_out, hi=64, dtype=values.dtype)
            grid = (triton.cdiv(N, AGG_BLOCK_N), triton.cdiv(c_out, block_o), B)
            _standard_fwd[grid](
                *args,
                w,
                dummy if bias is None else bias,
                out,
                N,
                M,
                C,
                c_out,
                K,
                G,
                C // G,
                **common,
                BLOCK_N=AGG_BLOCK_N,
                ACC=_TL_ACC[_acc_dtype(values.dtype)],
                DOT=_dot_dtype(values.dtype),
                BLOCK_C=_block(C, hi=32, dtype=values.dtype),
                BLOCK_O=block_o,
                PRECISION=_precision(values.dtype),
            )
        else:
            w = None if weight is None else weight[:, 0].contiguous()  # (C, K)
            block_c = _block(C, lo=1, hi=64)
            grid = (triton.cdiv(N, AGG_BLOCK_N), triton.cdiv(C, block_c), B)
            _channelwise_fwd[grid](
                *args,
                dummy if w is None else w,
                dummy if bias is None else bias,
                out,
                N,
                M,
                C,
                K,
                G,
                C // G,
                **common,
                HAS_W=w is not None,
                BLOCK_N=AGG_BLOCK_N,
                ACC=_TL_ACC[_acc_dtype(values.dtype)],
                BLOCK_C=block_c,
            )
        ctx.kernel = kernel
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(values, indices, rho, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, rho, weight = ctx.saved_tensors
        kernel = ctx.kernel
        B, M, C = values.shape
        G, N, K = indices.shape[1:]
        need_v, _, need_rho, need_w, need_b = ctx.needs_input_grad[:5]
        acc = _acc_dtype(values.dtype)
        gy = grad_out.to(values.dtype).contiguous()
        c_out = gy.shape[-1]
        dummy = values
        w = None
        if kernel == "standard":
            w = weight.permute(2, 1, 0).contiguous()
        elif kernel == "depthwise":
            w = weight[:, 0].contiguous()
        rows = triton.cdiv(N, AGG_BLOCK_N)
        g_values = torch.zeros(values.shape, dtype=acc, device=values.device) if need_v else None
        g_rho = torch.empty(indices.shape, dtype=acc, device=values.device) if need_rho else None
        g_w = None
        need_w_part = need_w and kernel == "depthwise"
        if need_w_part:
            g_w = torch.empty(B * rows, C, K, dtype=acc, device=values.device)
        precision = _precision(values.dtype)
        group_c = C // G
        if need_v or need_rho or need_w_part:
            _aggregate_bwd[(rows, K, B)](
                gy,
                values,
                indices,
                dummy if rho is None else rho,
                dummy if w is None else w,
                dummy if g_values is None else g_values,
                dummy if g_rho is None else g_rho,
                dummy if g_w is None else g_w,
                N,
                M,
                C,
                c_out,
                K,
                G,
                group_c,
                KERNEL=_KERNEL_CODE[kernel],
                HAS_RHO=rho is not None,
                NEED_V=need_v,
                NEED_RHO=need_rho,
                NEED_W=need_w_part,
                BLOCK_N=AGG_BLOCK_N,
                ACC=_TL_ACC[_acc_dtype(values.dtype)],
                DOT=_dot_dtype(values.dtype),
                BLOCK_C=_block(group_c, hi=32, dtype=values.dtype),
                BLOCK_O=_block(c_out, hi=32, dtype=values.dtype),
                PRECISION=precision,
            )
        if need_w_part:
            g_w = g_w.sum(0)[:, None, :]  # (C, 1, K)
        elif need_w and kernel == "standard":
            block_c = _block(C, hi=64, dtype=values.dtype)
            block_o = _block(c_out, hi=64, dtype=values.dtype)
            tiles = triton.cdiv(C, block_c) * triton.cdiv(c_out, block_o) * K
            per_split = triton.cdiv(rows, max(1, min(rows, TARGET_PROGRAMS // tiles)))
            splits = triton.cdiv(rows, per_split)
            part = torch.empty(splits, K, C, c_out, dtype=acc, device=values.device)
            _standard_grad_w[(triton.cdiv(C, block_c), triton.cdiv(c_out, block_o), K * splits)](
                gy,
                values,
                indices,
                dummy if rho is None else rho,
                part,
                B,
                N,
                M,
                C,
                c_out,
                K,
                G,
                group_c,
                per_split,
                HAS_RHO=rho is not None,
                GROUPED=G > 1,
                BLOCK_N=AGG_BLOCK_N,
                ACC=_TL_ACC[_acc_dtype(values.dtype)],
                DOT=_dot_dtype(values.dtype),
                BLOCK_C=block_c,
                BLOCK_O=block_o,
                PRECISION=precision,
            )
            g_w = part.sum(0).permute(2, 1, 0)  # (C_out, C, K)
        g_b = grad_out.to(acc).sum((0, 1)) if need_b else None
        cast = lambda g, like: None if g is None else g.to(like)  # noqa: E731
        return (
            cast(g_values, values.dtype),
            None,
            cast(g_rho, None if rho is None else rho.dtype),
            cast(g_w, None if weight is None else weight.dtype),
            cast(g_b, ctx.bias_dtype),
            None,
        )


def aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
) -> Tensor:
    """Same contract as :func:`convnn.backends.reference.aggregate`, fused (never gathers
    the (B, N, K, C) neighbour tensor). Unsupported dtypes and empty inputs run chunked."""
    if values.dtype not in _DTYPES or values.numel() == 0 or indices.numel() == 0:
        return chunked.aggregate(values, indices, rho, weight, bias, kernel)
    return _Aggregate.apply(values, indices, rho, weight, bias, kernel)
