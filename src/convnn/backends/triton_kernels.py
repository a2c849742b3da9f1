"""Triton kernels of the fused backend (launched by :mod:`convnn.backends.triton`).

Every kernel has one fixed signature: ``ARGS[name]`` gives the type of each runtime
argument, and that is what the ahead-of-time compile test (:mod:`convnn.backends.triton_aot`)
compiles and what a launch specialises to:

- ``*x``: a pointer to the operand dtype (float32, bfloat16 or float16); ``*f32``, ``*i32``,
  ``*i64``: pointers of that type. The launcher hands over 16-byte aligned tensors only.
- ``i32``: an int that is never specialised (sizes, counts, flags), so a size of 1 or a
  multiple of 16 compiles no new variant;
- ``i32:16``: an int the launcher pads to a multiple of 16 (row strides), so loads vectorise.

Optional inputs and code paths (exclusion, rho, weights, bias, which gradients) are runtime
flags, uniform over a program, rather than compile-time constants: one compiled kernel per
(tile configuration, dtype) covers them all.
"""

from __future__ import annotations

import triton
import triton.language as tl

EMPTY = tl.constexpr(-(2**63))  # packed key below every real one (a blocked key, an empty slot)
UNUSED = tl.constexpr(2**63 - 1)  # packed key of a slot >= K: never the worst, never evicted
LOW32 = tl.constexpr(2**32 - 1)


def _ints(names: str, kind: str = "i32") -> dict[str, str]:
    return dict.fromkeys(names.split(), kind)


_ROWS = _ints("C C_OUT GROUP_C", "i32:16")  # row strides, padded to multiples of 16
_GATHER = dict(v_ptr="*x", idx_ptr="*i64", rho_ptr="*x")
ARGS: dict[str, dict[str, str]] = {  # per kernel: its runtime arguments' kinds (by name)
    "select_topk": dict(q_ptr="*x", k_ptr="*x", ex_ptr="*i32", out_ptr="*i64")
    | _ints("N M q_batched k_batched keys_per_split num_splits K has_exclude")
    | _ints("D", "i32:16"),
    "channelwise_fwd": _GATHER
    | dict(w_ptr="*x", bias_ptr="*x", out_ptr="*x")
    | _ints("N M K G has_rho has_w has_bias")
    | _ints("C GROUP_C", "i32:16"),
    "standard_fwd": _GATHER
    | dict(w_ptr="*x", bias_ptr="*x", out_ptr="*x")
    | _ints("N M K G has_rho has_bias")
    | _ROWS,
    "aggregate_bwd": dict(gy_ptr="*x", w_ptr="*x", gv_ptr="*f32", grho_ptr="*f32", gw_ptr="*f32")
    | _GATHER
    | _ints("N M K G has_rho has_w need_v need_rho need_w")
    | _ROWS,
    "standard_grad_w": dict(gy_ptr="*x", gw_ptr="*f32")
    | _GATHER
    | _ints("B N M K G blocks_per_split has_rho")
    | _ROWS,
}


def _plain_ints(kernel: str) -> list[str]:
    return [name for name, kind in ARGS[kernel].items() if kind == "i32"]


# --------------------------------------------------------------------------- selection


@triton.jit
def _packed_keys(s, offs_m):
    """fp32 scores (R, BLOCK_M) of keys offs_m -> int64 keys that order as (score desc, index
    asc): the score's bits made monotonic as a signed int, above the complemented index.
    NaN ranks first (as torch.topk); -0.0 ties +0.0."""
    s = tl.where(s != s, float("nan"), s)  # one NaN, the positive quiet one
    s = tl.where(s == 0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (order.to(tl.int64) << 32) | (LOW32 - offs_m[None, :].to(tl.int64))


@triton.jit(do_not_specialize=_plain_ints("select_topk"))
def select_topk(
    q_ptr,
    k_ptr,
    ex_ptr,
    out_ptr,
    N,
    M,
    D,
    q_batched,
    k_batched,
    keys_per_split,
    num_splits,
    K,
    has_exclude,
    KP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    """Top-K of q[b, n] . k[b, m] over one key range -> (B, N, splits, K) packed keys.

    The running top-K of each query is a row of KP packed int64 keys (score, index): one
    reduction finds the best candidate of a tile (ties: lower index), one the slot it
    replaces, so the state is half of a (value, index) pair's and never spills.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slots = tl.arange(0, KP)
    ex = tl.load(ex_ptr + offs_n, mask=mask_n & (has_exclude != 0), other=-1)
    # Empty slots hold distinct keys below every real one (EMPTY + slot), so exactly one
    # slot is the worst; slots >= K hold UNUSED, above every real key, so they never are.
    empty = EMPTY + slots[None, :].to(tl.int64) + tl.zeros((BLOCK_N, KP), dtype=tl.int64)
    top = tl.where(slots[None, :] < K, empty, UNUSED)
    m_start = split * keys_per_split
    m_end = tl.minimum(m_start + keys_per_split, M)
    q_base = q_ptr + b * q_batched * N * D + offs_n[:, None] * D
    k_base = k_ptr + b * k_batched * M * D
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(q_base + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0)
            kt = tl.load(
                k_base + offs_m[None, :] * D + offs_d[:, None],
                mask=mask_d[:, None] & mask_m[None, :],
                other=0,
            )
            s = tl.dot(q.to(DOT), kt.to(DOT), s, input_precision=PRECISION)
        key = _packed_keys(s, offs_m)
        key = tl.where(mask_m[None, :] & (offs_m[None, :] != ex[:, None]), key, EMPTY)
        # At most min(K, #keys beating the current worst) insertions per row.
        worst = tl.min(top, axis=1)
        beat = tl.sum((key > worst[:, None]).to(tl.int32), axis=1)
        for _ in range(tl.minimum(tl.max(beat, axis=0), K)):
            best = tl.max(key, axis=1)
            worst = tl.min(top, axis=1)
            evict = (top == worst[:, None]) & (best > worst)[:, None]
            top = tl.where(evict, best[:, None], top)
            key = tl.where(key == best[:, None], EMPTY, key)
    out = ((b * N + offs_n[:, None]) * num_splits + split) * K + slots[None, :]
    tl.store(out_ptr + out, top, mask=mask_n[:, None] & (slots[None, :] < K))


# --------------------------------------------------------------------------- aggregation


@triton.jit
def _gather(v_ptr, idx_ptr, rho_ptr, b, offs_n, offs_c, k, N, M, C, K, G, GROUP_C, has_rho):
    """fp32 (BLOCK_N, BLOCK_C) tile of rho[b, g, n, k] * v[b, idx[b, g, n, k], c], g = c // GROUP_C.

    idx/rho are contiguous (B, G, N, K), v is contiguous (B, M, C).
    """
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_c < C)[None, :]
    if G == 1:  # one index per query row
        at = (b * N + offs_n) * K + k
        idx = tl.load(idx_ptr + at, mask=mask_n, other=0)
        x = tl.load(v_ptr + (b * M + idx[:, None]) * C + offs_c[None, :], mask=mask, other=0)
        x = x.to(tl.float32)
        if has_rho != 0:
            x = x * tl.load(rho_ptr + at, mask=mask_n, other=0).to(tl.float32)[:, None]
    else:  # the channel block may span groups: one index per (n, c)
        g = offs_c // GROUP_C
        at2 = ((b * G + g[None, :]) * N + offs_n[:, None]) * K + k
        idx2 = tl.load(idx_ptr + at2, mask=mask, other=0)
        x = tl.load(v_ptr + (b * M + idx2) * C + offs_c[None, :], mask=mask, other=0)
        x = x.to(tl.float32)
        if has_rho != 0:
            x = x * tl.load(rho_ptr + at2, mask=mask, other=0).to(tl.float32)
    return x


@triton.jit(do_not_specialize=_plain_ints("channelwise_fwd"))
def channelwise_fwd(
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
    has_rho,
    has_w,
    has_bias,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """'none' / 'depthwise': y[b, n, c] = sum_k w[c, k] rho v[idx, c] + bias[c]; w is (C, K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k in range(K):
        x = _gather(v_ptr, idx_ptr, rho_ptr, b, offs_n, offs_c, k, N, M, C, K, G, GROUP_C, has_rho)
        if has_w != 0:
            x = x * tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0).to(tl.float32)[None, :]
        acc += x
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0).to(tl.float32)[None, :]
    out = (b * N + offs_n[:, None]) * C + offs_c[None, :]
    tl.store(out_ptr + out, acc, mask=(offs_n < N)[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=_plain_ints("standard_fwd"))
def standard_fwd(
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
    has_rho,
    has_bias,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    """Gather-GEMM: y[b, n, :] = sum_k (rho v[idx_k]) @ W_k + bias; w is (K, C, C_out)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.program_id(2).to(tl.int64)
    mask_o = offs_o < C_OUT
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k in range(K):
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            a = _gather(
                v_ptr, idx_ptr, rho_ptr, b, offs_n, offs_c, k, N, M, C, K, G, GROUP_C, has_rho
            )
            w = tl.load(
                w_ptr + (k * C + offs_c[:, None]) * C_OUT + offs_o[None, :],
                mask=(offs_c < C)[:, None] & mask_o[None, :],
                other=0,
            )
            acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0).to(tl.float32)[None, :]
    out = (b * N + offs_n[:, None]) * C_OUT + offs_o[None, :]
    tl.store(out_ptr + out, acc, mask=(offs_n < N)[:, None] & mask_o[None, :])


@triton.jit(do_not_specialize=_plain_ints("aggregate_bwd"))
def aggregate_bwd(
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
    has_rho,
    has_w,
    need_v,
    need_rho,
    need_w,
    STANDARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
):
    """Backward for values and rho (and the depthwise weight) of one (query block, slot k, batch).

    g'[n, c] = dL/d(rho v[idx])[n, k, c] is gy @ W_k^T (STANDARD, w (K, C, C_out)), else gy,
    times w[c, k] for 'depthwise' (w (C, K)); grad_rho[b, g, n, k] = sum_{c in g} g' v[idx, c];
    grad_v[b, idx, c] += g' rho (atomic); for 'depthwise', gw[b * blocks + block, c, k] =
    sum_n gy rho v[idx, c], a per-program partial of the weight gradient summed afterwards
    (deterministic). The 'standard' weight gradient is :func:`standard_grad_w`.
    """
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for g in range(G):
        at = ((b * G + g) * N + offs_n) * K + k
        idx = tl.load(idx_ptr + at, mask=mask_n, other=0)
        rho = tl.load(rho_ptr + at, mask=mask_n & (has_rho != 0), other=1).to(tl.float32)
        g_rho = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, GROUP_C, BLOCK_C):
            offs_j = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_j < GROUP_C
            offs_c = g * GROUP_C + offs_j
            mask = mask_n[:, None] & mask_c[None, :]
            if STANDARD:
                gp = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
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
                    gp = tl.dot(gy.to(DOT), wt.to(DOT), gp, input_precision=PRECISION)
            else:
                gy = tl.load(
                    gy_ptr + (b * N + offs_n[:, None]) * C + offs_c[None, :], mask=mask, other=0
                ).to(tl.float32)
                gp = gy
                if has_w != 0:
                    w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0).to(tl.float32)
                    gp = gy * w[None, :]
            if need_rho != 0 or need_w != 0:
                x = tl.load(
                    v_ptr + (b * M + idx[:, None]) * C + offs_c[None, :], mask=mask, other=0
                ).to(tl.float32)
                if need_rho != 0:
                    g_rho += tl.sum(gp * x, axis=1)
                if not STANDARD:
                    if need_w != 0:
                        part = tl.sum(gy * x * rho[:, None], axis=0)
                        row = b * tl.num_programs(0) + pid_n
                        tl.store(gw_ptr + (row * C + offs_c) * K + k, part, mask=mask_c)
            if need_v != 0:
                at_v = (b * M + idx[:, None]) * C + offs_c[None, :]
                tl.atomic_add(gv_ptr + at_v, gp * rho[:, None], mask=mask)
        if need_rho != 0:
            tl.store(grho_ptr + at, g_rho, mask=mask_n)


@triton.jit(do_not_specialize=_plain_ints("standard_grad_w"))
def standard_grad_w(
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
    has_rho,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
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
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    n_start = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, N)
    zero = tl.program_id(0).to(tl.int64) * 0  # 64-bit batch offsets (also when interpreted)
    for b64 in range(zero, B):
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            a = _gather(
                v_ptr, idx_ptr, rho_ptr, b64, offs_n, offs_c, k, N, M, C, K, G, GROUP_C, has_rho
            )
            gy = tl.load(
                gy_ptr + (b64 * N + offs_n[:, None]) * C_OUT + offs_o[None, :],
                mask=(offs_n < N)[:, None] & mask_o[None, :],
                other=0,
            )
            acc = tl.dot(tl.trans(a).to(DOT), gy.to(DOT), acc, input_precision=PRECISION)
    out = ((split * K + k).to(tl.int64) * C + offs_c[:, None]) * C_OUT + offs_o[None, :]
    tl.store(gw_ptr + out, acc, mask=(offs_c < C)[:, None] & mask_o[None, :])
