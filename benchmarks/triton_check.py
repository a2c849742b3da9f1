"""Check the Triton kernels against exact scores and the chunked backend on a GPU, then time
both (and SDPA).

    python benchmarks/triton_check.py                # check + time, default sizes
    python benchmarks/triton_check.py --check-only
    python benchmarks/triton_check.py --dtype bfloat16 --tf32

Needs CUDA and triton; prints one line per case (milliseconds, median of triton's
``do_bench``) and exits 1 when a check fails:

- selection: the selected scores, recomputed in float64 from the same operands, must be the
  exact top-K scores in order (relative error <= 1e-5: tf32x3 products, fp32 accumulation);
  the fraction of indices equal to the chunked backend's is printed (near-ties may differ);
- aggregation, forward and backward: max error relative to the chunked backend's largest
  value, within the dtype's tolerance.

``benchmarks/gpu_validate.py`` runs it as one of its steps. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from convnn.backends import chunked
from convnn.backends._common import prepare
from convnn.functional import convnn_attention

SELECT_TOL = 1e-5
AGGREGATE_TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50)


def _select_cases():
    # (B, N, M, D, K): conv-like maps (N = M = H * W, D = channels + 1 for euclidean) and
    # attention-like (B * heads, N, d); K up to the kernel's widest top-K (KVT's k = 100).
    return [
        (32, 1024, 1024, 65, 9),
        (8, 4096, 4096, 129, 9),
        (64, 1024, 1024, 64, 32),
        (16, 4096, 4096, 64, 64),
        (8, 1024, 1024, 64, 100),
        (2, 16384, 16384, 64, 16),
    ]


def _agg_cases():
    # (B, M, C, G, N, K, C_out)
    return [
        (32, 1024, 64, 1, 1024, 9, 64),
        (8, 4096, 128, 1, 4096, 9, 128),
        (16, 1024, 512, 8, 1024, 32, 512),
        (4, 4096, 512, 8, 4096, 64, 512),
        (8, 3136, 3, 1, 3136, 9, 64),  # a first layer: 3 channels, padded to 16
    ]


def selection_error(q, k, K, ex, got) -> float:
    """Largest |selected - exact top-K| score, relative, recomputed in float64 per batch."""
    worst = 0.0
    for b in range(got.shape[0]):
        s = q[min(b, q.shape[0] - 1)].double() @ k[min(b, k.shape[0] - 1)].double().T
        if ex is not None:
            s[torch.arange(len(ex), device=s.device), ex] = float("-inf")
        want = s.topk(K, dim=-1).values
        err = (s.gather(-1, got[b]) - want).abs().max() / (want.abs().max() + 1)
        worst = max(worst, err.item())
    return worst


def select_case(tb, B, N, M, D, K, dtype, check_only, dev) -> bool:
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, N, D, device=dev, generator=g)
    k = torch.randn(B, M, D, device=dev, generator=g)
    q, k = (t.to(dtype) for t in prepare("cosine", q, k))
    ex = torch.arange(N, device=dev) if N == M else None
    got = tb.select(q, k, K, exclude=ex)
    same = (got == chunked.select(q, k, K, exclude=ex)).float().mean().item()
    err = selection_error(q, k, K, ex, got)
    line = f"  {B} {N} {M} {D} {K} | "
    if not check_only:
        t_tr = _bench(lambda: tb.select(q, k, K, exclude=ex))
        t_ch = _bench(lambda: chunked.select(q, k, K, exclude=ex))
        line += f"{t_tr:8.3f} | {t_ch:8.3f} | "
    ok = err <= SELECT_TOL
    print(line + f"{err:.1e} | {same:.4f}" + ("" if ok else "  FAIL"), flush=True)
    return ok


def aggregate_case(tb, B, M, C, G, N, K, C_out, kernel, dtype, check_only, dev) -> bool:
    g = torch.Generator(device=dev).manual_seed(0)
    v = torch.randn(B, M, C, device=dev, generator=g, dtype=dtype)
    idx = torch.randint(0, M, (B, G, N, K), device=dev, generator=g)
    rho = torch.rand(B, G, N, K, device=dev, generator=g, dtype=dtype)
    gy = torch.randn(B, N, C_out, device=dev, generator=g, dtype=dtype)
    w = {
        "none": None,
        "depthwise": torch.randn(C, 1, K, device=dev, generator=g, dtype=dtype),
        "standard": torch.randn(C_out, C, K, device=dev, generator=g, dtype=dtype) / C**0.5,
    }[kernel]
    leaves = [t.requires_grad_() for t in (v, rho, w) if t is not None]

    def step(be):
        out = be.aggregate(v, idx, rho, w, None, kernel)
        return (out, *torch.autograd.grad(out, leaves, gy))

    err = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        for a, b in zip(step(tb), step(chunked))
    )
    line = f"  {B} {M} {C} {G} {N} {K} {C_out} {kernel} | "
    if not check_only:
        line += f"{_bench(lambda: step(tb)):8.3f} | {_bench(lambda: step(chunked)):8.3f} | "
    ok = err <= AGGREGATE_TOL[dtype]
    print(line + f"{err:.2e}" + ("" if ok else "  FAIL"), flush=True)
    return ok


def attention_case(B, H, N, d, K, dtype, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(B, H, N, d, device=dev, generator=g, dtype=dtype).requires_grad_()
        for _ in range(3)
    )

    def run(backend):
        convnn_attention(q, k, v, K, backend=backend).sum().backward()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    times = [_bench(lambda: run("triton")), _bench(lambda: run("chunked")), _bench(sdpa)]
    print(f"  {B} {H} {N} {d} {K} | " + " | ".join(f"{t:8.3f}" for t in times), flush=True)


def run_all(tb, dtype, check_only, dev) -> bool:
    """Every case; True when every check passes."""
    ok = True
    timed = "" if check_only else "triton ms | chunked ms | "
    print(f"select (cosine, {dtype}): B N M D K | {timed}score error | fraction = chunked")
    for case in _select_cases():
        ok &= select_case(tb, *case, dtype, check_only, dev)
    print(f"aggregate fwd+bwd ({dtype}): B M C G N K C_out kernel | {timed}max rel err")
    for B, M, C, G, N, K, C_out in _agg_cases():
        for kernel in ("none", "depthwise", "standard") if C == C_out else ("standard",):
            ok &= aggregate_case(tb, B, M, C, G, N, K, C_out, kernel, dtype, check_only, dev)
    if not check_only:
        print("attention fwd+bwd: B heads N d K | triton top-K | chunked top-K | SDPA (all N) ms")
        for case in [(8, 8, 1024, 64, 32), (4, 8, 4096, 64, 64), (1, 8, 16384, 64, 64)]:
            attention_case(*case, dtype, dev)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 tl.dot")
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    from convnn.backends import triton as tb

    ok = run_all(tb, getattr(torch, args.dtype), args.check_only, torch.device("cuda"))
    print("all checks pass" if ok else "SOME CHECKS FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
