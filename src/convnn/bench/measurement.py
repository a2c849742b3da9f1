"""Measuring one case: time of forward, backward and forward+backward (median of repeats) and
peak memory above a baseline, in this process or in a fresh one (see :mod:`convnn.bench`)."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..nn import ConvNN2d, ConvNNAttention
from .cases import MIB, Case

__all__ = [
    "MARK",
    "build_case",
    "measure",
    "primer_shape",
    "run_isolated",
    "selection_recall",
    "worker",
]

MARK = "@@convnn-bench@@"


def build_case(case: Case, device: str, dtype, shape: tuple[int, ...] | None = None):
    """(module, input, output gradient) with fixed seeds; ``shape`` overrides the case's.

    Every kind maps its input shape to itself ((B, C, H, W) at stride 1, or (B, N, dim)), so
    the output gradient is drawn without running a forward pass before the baseline.
    """
    shape = tuple(shape or case.shape)
    torch.manual_seed(0)
    if case.kind == "convnn2d":
        C = case.shape[1]
        module = ConvNN2d(C, C, **case.options)
    elif case.kind == "conv2d":
        C = case.shape[1]
        module = nn.Conv2d(C, C, 3, padding=1)
    elif case.kind == "attention":
        options = dict(case.options)
        if options.get("candidates") in ("window", "grid"):
            # the benchmark's token layout: a square map when N is a square, else a 1 x N row
            side = math.isqrt(shape[1])
            options["grid_size"] = (side, side) if side * side == shape[1] else (1, shape[1])
        module = ConvNNAttention(case.shape[2], case.heads, options.pop("K"), **options)
    elif case.kind == "sdpa":
        module = _SDPAAttention(case.shape[2], case.heads)
    elif case.kind == "kvt":
        module = _DenseKVT(case.shape[2], case.heads, case.options["K"])
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    module = module.to(device=device, dtype=dtype).train()
    torch.manual_seed(1)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    return module, x, torch.randn(shape, device=device, dtype=dtype)


def primer_shape(case: Case) -> tuple[int, ...]:
    """A small input of the case's kind, laid out as the case's is (8 x 8 map; 64 tokens, or
    65 tokens when the case's do not form a square map, so a 1 x N row window still fits)."""
    if case.kind in ("convnn2d", "conv2d"):
        return (1, case.shape[1], 8, 8)
    square = math.isqrt(case.shape[1]) ** 2 == case.shape[1]
    return (1, 64 if square else 65, case.shape[2])


class _AttentionBaseline(nn.Module):
    """qkv / proj projections in timm's layout, as ConvNNAttention has them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, self.dim))


class _SDPAAttention(_AttentionBaseline):
    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class _DenseKVT(_AttentionBaseline):
    """Top-K attention as KVT writes it: full scores, top-K per row, -inf elsewhere."""

    def __init__(self, dim: int, heads: int, K: int):
        super().__init__(dim, heads)
        self.K = K

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        top = s.topk(self.K, dim=-1)
        s = torch.full_like(s, -torch.inf).scatter(-1, top.indices, top.values)
        return s.softmax(-1) @ v


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the peak resident set (VmHWM) of this process; False where Linux /proc cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _repeats(seconds: float, budget_s: float, cuda: bool) -> int:
    if cuda:
        return max(10, min(100, int(budget_s / max(seconds, 1e-6))))
    low = 1 if seconds > 8 else 2 if seconds > 2 else 3
    return max(low, min(10, int(budget_s / max(seconds, 1e-9))))


def measure(
    case: Case,
    device: str = "cpu",
    dtype: str = "float32",
    budget_s: float = 1.5,
    repeats: int | None = None,
) -> dict:
    """Time forward / backward / forward+backward of ``case`` and its peak memory, here.

    Returns milliseconds (medians), the repeat count, the peak memory above the baseline in
    MiB and how it was measured. On the CPU run it in a fresh process (see
    :func:`run_isolated`) so that the peak resident set belongs to this case alone.
    """
    torch_dtype = getattr(torch, dtype)
    cuda = device.startswith("cuda")
    with backends.use(case.backend):
        try:
            backends.get(None, torch.device(device).type)
        except ValueError as exc:  # e.g. triton without the package
            return dict(status="skipped", reason=str(exc))
        # One training step at a small size first, so that the process-wide one-time costs
        # (thread pools, kernel caches, lazy imports) count in neither the time nor the memory.
        module, x, grad = build_case(case, device, torch_dtype, primer_shape(case))
        module(x).backward(grad)
        module, x, grad = build_case(case, device, torch_dtype)
    params = [p for p in module.parameters()]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        for t in (x, *params):
            t.grad = None
        if cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        t0 = time.perf_counter()
        with backends.use(case.backend):
            y = module(x)
            if cuda:
                marks[1].record()
            t1 = time.perf_counter()
            y.backward(grad)
        if cuda:
            marks[2].record()
            torch.cuda.synchronize()
            return marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    sync()
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "cuda max_memory_allocated - memory_allocated before"
    else:
        base = _rss()
        reset = _reset_peak()
        method = "VmHWM (reset) - RSS before" if reset else "ru_maxrss - RSS before"
    fwd, bwd = step()  # warm-up: one step, three on CUDA or when fast
    for _ in range(2 if cuda or fwd + bwd < 1e3 else 0):
        fwd, bwd = step()
    if repeats is None and not cuda and fwd + bwd > 20e3:
        # A step of 20 s or more after the primer: its warm-up step is its measurement.
        n, times = 1, [(fwd, bwd)]
    else:
        n = repeats or _repeats((fwd + bwd) / 1e3, budget_s, cuda)
        times = [step() for _ in range(n)]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss(reset) - base
    return dict(
        status="ok",
        fwd_ms=statistics.median(t[0] for t in times),
        bwd_ms=statistics.median(t[1] for t in times),
        total_ms=statistics.median(t[0] + t[1] for t in times),
        repeats=n,
        peak_mib=max(peak, 0) / MIB,
        baseline_mib=base / MIB,
        memory_method=method,
    )


def worker(case_json: str, device: str, dtype: str, budget_s: float, repeats: int | None):
    case = Case.from_json(case_json)
    try:
        result = measure(case, device, dtype, budget_s, repeats)
    except Exception as exc:  # reported as the case's result, the suite goes on
        result = dict(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    print(MARK + json.dumps(result), flush=True)
    return 0


def run_isolated(
    case: Case,
    device: str = "cpu",
    dtype: str = "float32",
    budget_s: float = 1.5,
    repeats: int | None = None,
    timeout_s: float = 900,
) -> dict:
    """:func:`measure` in a fresh ``python -m convnn.bench --case`` process."""
    cmd = [sys.executable, "-m", "convnn.bench", "--case", case.to_json(), "--device", device]
    cmd += ["--dtype", dtype, "--budget", str(budget_s)]
    cmd += [] if repeats is None else ["--repeats", str(repeats)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="error", reason=f"timed out after {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    if proc.returncode == -9:
        return dict(status="error", reason="worker killed (SIGKILL: out of memory?)")
    tail = " ".join(proc.stderr.strip().splitlines()[-3:])
    return dict(status="error", reason=f"worker exited with {proc.returncode}: {tail}"[:500])


# ------------------------------------------------------------------------ recall / precision


def selection_recall(device: str = "cpu") -> list[dict]:
    """Recall of the exact top-K when similarities are ranked in bfloat16, and the time of both.

    Gaussian features; recall = mean over queries of |bf16 set & fp32 set| / K.
    """
    from ..functional import knn_select

    rows = []
    sizes = [
        ("conv 1024 tokens x 64", 4, 1024, 64, "cosine"),
        ("conv 4096 tokens x 64", 2, 4096, 64, "cosine"),
        ("conv 16384 tokens x 64", 1, 16384, 64, "cosine"),
        ("attention 197 tokens x 64", 24, 197, 64, "scaled_dot"),
        ("attention 1024 tokens x 64", 24, 1024, 64, "scaled_dot"),
    ]
    for label, B, N, D, metric in sizes:
        torch.manual_seed(0)
        x = torch.randn(B, N, D, device=device)
        for K in (9, 16):
            timed = {}
            for name, sel in (("fp32", None), ("bf16", torch.bfloat16)):
                runs = []
                for _ in range(3):
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    _, idx = knn_select(x, x, K, metric=metric, selection_dtype=sel)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    runs.append((time.perf_counter() - t0) * 1e3)
                timed[name] = (statistics.median(runs[1:]), idx)
            exact, approx = timed["fp32"][1], timed["bf16"][1]
            hits = (approx[..., :, None] == exact[..., None, :]).any(-1).float().sum(-1)
            rows.append(
                dict(
                    size=label,
                    metric=metric,
                    K=K,
                    recall=float((hits / K).mean()),
                    fp32_ms=timed["fp32"][0],
                    bf16_ms=timed["bf16"][0],
                )
            )
    return rows
