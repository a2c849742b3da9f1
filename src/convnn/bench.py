"""``convnn bench``: time and peak memory of ConvNN layers against their dense and PyTorch twins.

Every case builds one module with a fixed seed, warms it up and times forward, backward and
forward+backward (median of several repeats) on a training step with gradients for the input
and the parameters. Peak memory is measured above a baseline taken after the module, the input
and the output gradient exist:

- CPU: each case runs in a fresh ``python -m convnn.bench --case <json>`` process; the peak
  resident set (VmHWM, reset just before the case, so imports do not count; ``ru_maxrss`` where
  /proc cannot be reset) minus the resident set right before the case;
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the case.

Implementations ("roles") of one comparison share a size (``scope``) and a configuration:
``ours`` is the default (auto) backend, ``dense`` the same module under the ``reference``
backend (the dense formulation), ``chunked``/``triton`` those backends forced (on CUDA),
``conv`` an ``nn.Conv2d`` 3x3, ``sdpa`` attention through ``scaled_dot_product_attention``
and ``kvt`` dense-mask top-K attention (full score matrix, top-K, -inf elsewhere). Dense cases
whose score matrix would exceed ``--dense-budget-gb`` are skipped with their estimate.

``convnn bench --suite full --out results.json --markdown BENCHMARKS.md`` prints the per-case
rows, the ratio table (ours / dense, ours / conv, ours / SDPA, ours / KVT from the same run)
and the target verdicts, writes everything with the hardware to JSON and updates the section
of BENCHMARKS.md for the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .nn import ConvNN2d, ConvNNAttention
from .spec import ConvNNSpec

__all__ = ["Case", "add_arguments", "build_cases", "main", "measure", "ratios", "run", "targets"]

SUITES = ("quick", "conv", "attention", "sweep", "precision", "full")
ROLES = ("ours", "chunked", "triton", "dense", "conv", "sdpa", "kvt")
BASELINES = {"dense": "dense", "conv": "nn.Conv2d 3x3", "sdpa": "SDPA", "kvt": "dense KVT"}
MARK = "@@convnn-bench@@"
MIB = 2**20
GIB = 2**30
NUM_CANDIDATES = 64  # 'random' and 'grid' candidates
CONV_WINDOW = 7  # 'window' candidates of ConvNN2d: 7 x 7
SWEEP_SIDES = (32, 64, 128, 192, 256)


# ------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One measured implementation at one size.

    kind: 'convnn2d' | 'conv2d' (shape (B, C, H, W)), 'attention' | 'sdpa' | 'kvt'
    (shape (B, N, dim)); options: module keyword arguments; backend: for ConvNN modules.
    """

    scope: str
    config: str
    role: str
    kind: str
    shape: tuple[int, ...]
    options: dict = field(default_factory=dict)
    backend: str = "auto"
    heads: int = 1
    est_bytes: int = 0  # estimated O(N*M) / O(N*K*C) footprint; over the budget: skipped

    def __post_init__(self) -> None:
        # The operator options of a case are ConvNNSpec fields: a catalogue entry with an
        # unknown or invalid option fails here, not halfway through a run.
        if self.kind in ("convnn2d", "attention"):
            unknown = set(self.options) - set(ConvNNSpec.fields())
            if unknown:
                raise ValueError(f"options must be ConvNNSpec fields, got {sorted(unknown)}")
            ConvNNSpec.take(self.options)

    @property
    def name(self) -> str:
        return f"{self.scope} | {self.config} | {self.role}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


def _conv_config(metric: str, candidates: str, K: int) -> tuple[str, dict]:
    options = dict(K=K, metric=metric, candidates=candidates)
    label = f"{metric} {candidates}"
    if candidates in ("random", "grid"):
        options["num_candidates"] = NUM_CANDIDATES
        label += f"({NUM_CANDIDATES})"
    if candidates == "window":
        options["window"] = CONV_WINDOW
        label += f"({CONV_WINDOW}x{CONV_WINDOW})"
    return f"{label} K={K}", options


def _conv_cases(scope, shape, configs, device, dense=True, conv=True) -> list[Case]:
    B, _, H, W = shape
    cases = []
    for metric, candidates, K in configs:
        config, options = _conv_config(metric, candidates, K)
        roles = ["ours"] + (["chunked", "triton"] if device == "cuda" else [])
        roles += ["dense"] if dense else []
        M = NUM_CANDIDATES if candidates in ("random", "grid") else H * W
        for role in roles:
            backend = {"ours": "auto", "dense": "reference"}.get(role, role)
            # dense: the (B, N, M) scores and copies of the (B, N, K, C) gathered neighbours
            nbytes = B * H * W * (M + 3 * K * shape[1]) * 4 if role == "dense" else 0
            cases.append(Case(scope, config, role, "convnn2d", shape, options, backend, 1, nbytes))
    if conv:
        cases.append(Case(scope, "", "conv", "conv2d", shape))
    return cases


def _attention_cases(scope, shape, heads, device) -> list[Case]:
    B, N, _ = shape
    side = math.isqrt(N)
    window = 7 if side * side == N else 49  # a 7 x 7 map window, or 49 tokens of a 1 x N row
    extra = ["chunked", "triton"] if device == "cuda" else []
    configs = [
        ("all K=9", dict(K=9), ["ours", *extra, "dense"]),
        ("all K=16", dict(K=16), ["ours", *extra, "dense"]),
        (
            f"window({window}) K=9",
            dict(K=9, candidates="window", window=window),
            ["ours", *extra, "dense"],
        ),
        # K=None under the auto backend is exactly attention, so it dispatches to SDPA; the
        # chunked row is the ConvNN operator itself with K = N.
        ("all K=all", dict(K=None, kernel="none"), ["ours", "chunked", *extra[1:], "dense"]),
    ]
    cases = []
    for config, options, roles in configs:
        K = options["K"] or N
        for role in roles:
            backend = {"ours": "auto", "dense": "reference"}.get(role, role)
            # Softmax weights gather (B, heads, N, K, d) keys on every backend (and dense
            # copies its (B, N, K, C) neighbours); the dense scores are (B, heads, N, N).
            nbytes = 3 * B * N * K * shape[2] * 4 + (
                B * heads * N * N * 4 if role == "dense" else 0
            )
            if role == "ours" and options["K"] is None:
                nbytes = 0  # dispatched to SDPA
            cases.append(
                Case(scope, config, role, "attention", shape, options, backend, heads, nbytes)
            )
    cases.append(Case(scope, "", "sdpa", "sdpa", shape, {}, "auto", heads))
    for K in (9, 16):
        nbytes = 3 * B * heads * N * N * 4
        cases.append(Case(scope, f"K={K}", "kvt", "kvt", shape, dict(K=K), "auto", heads, nbytes))
    return cases


TARGET_SCOPE = "target 8x64x64x64"
MEMCHECK_SCOPE = "memcheck 1x64x128x128"
STAGE1_SCOPE = "resnet-s1 {b}x64x56x56"
COSINE_K9 = ("cosine", "all", 9)
# A non-GEMM metric and a relative position bias: both stream block by block, so the peak
# stays far below one 16384 x 16384 fp32 score matrix (1 GiB).
DESIGN_SPACE_MEMCHECK = Case(
    MEMCHECK_SCOPE,
    "manhattan relative_bias K=9",
    "ours",
    "convnn2d",
    (1, 64, 128, 128),
    dict(K=9, metric="manhattan", positional="relative_bias", weighting="softmax"),
)


def _sweep_scope(side: int) -> str:
    """The sweep's scope at side x side (its 128 x 128 point is the memory-check case)."""
    return MEMCHECK_SCOPE if side == 128 else f"sweep 1x64x{side}x{side}"


def build_cases(suite: str, device: str = "cpu") -> list[Case]:
    """The cases of a suite ('full' = conv + attention + sweep; 'precision' has no cases)."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    cuda = device == "cuda"
    if suite == "quick":  # tiny: a smoke test of the harness, seconds on any machine
        return _conv_cases("quick 2x8x8x8", (2, 8, 8, 8), [COSINE_K9], device) + [
            Case("quick 2x16x32", "all K=4", "ours", "attention", (2, 16, 32), dict(K=4), heads=2),
            Case("quick 2x16x32", "", "sdpa", "sdpa", (2, 16, 32), heads=2),
        ]
    cases: list[Case] = []
    if suite in ("conv", "full"):
        b = 64 if cuda else 8
        every = [
            (metric, candidates, K)
            for metric in ("cosine", "euclidean")
            for candidates in ("all", "random", "grid", "window")
            for K in (9, 16)
        ]
        cases += _conv_cases(f"cifar {b}x64x32x32", (b, 64, 32, 32), every, device)
        cases += _conv_cases(TARGET_SCOPE, (8, 64, 64, 64), [COSINE_K9], device)
        stage = [COSINE_K9, ("cosine", "all", 16), ("cosine", "window", 9)]
        b = 32 if cuda else 8
        cases += _conv_cases(STAGE1_SCOPE.format(b=b), (b, 64, 56, 56), stage, device)
        cases += _conv_cases(f"resnet-s2 {b}x128x28x28", (b, 128, 28, 28), stage, device)
        cases += _conv_cases(MEMCHECK_SCOPE, (1, 64, 128, 128), [COSINE_K9], device, conv=False)
        cases.append(DESIGN_SPACE_MEMCHECK)
    if suite in ("attention", "full"):
        for n, b_cpu, b_cuda in ((197, 8, 64), (1024, 2, 16)):
            for dim, heads, tag in ((192, 3, "vit-ti"), (768, 12, "vit-b")):
                b = b_cuda if cuda else b_cpu
                cases += _attention_cases(f"{tag} {b}x{n}x{dim}", (b, n, dim), heads, device)
    if suite in ("sweep", "full"):
        for side in SWEEP_SIDES:
            if side == 128 and suite == "full":
                continue  # the memory-check case above
            shape = (1, 64, side, side)
            cases += _conv_cases(_sweep_scope(side), shape, [COSINE_K9], device, conv=False)
    return cases


# ------------------------------------------------------------------------------ the worker


def _build(case: Case, device: str, dtype, shape: tuple[int, ...] | None = None):
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


def _primer_shape(case: Case) -> tuple[int, ...]:
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
        module, x, grad = _build(case, device, torch_dtype, _primer_shape(case))
        module(x).backward(grad)
        module, x, grad = _build(case, device, torch_dtype)
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


def _worker(case_json: str, device: str, dtype: str, budget_s: float, repeats: int | None):
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
    src = str(Path(__file__).resolve().parents[1])
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
    from .functional import knn_select

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


# ------------------------------------------------------------------------------- analysis


def _find(results: list[dict], scope: str, config: str, role: str) -> dict | None:
    for r in results:
        if (r["scope"], r["config"], r["role"]) == (scope, config, role) and r["status"] == "ok":
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def ratios(results: list[dict]) -> list[dict]:
    """Every ConvNN row against the baselines of its scope measured in the same run.

    Rows: scope, config, role (ours / chunked / triton), vs (dense / conv / sdpa / kvt) and
    time ratios (total, forward, backward) and the peak-memory ratio; < 1 means ours is
    faster / smaller.
    """
    out = []
    for r in results:
        if r["role"] not in ("ours", "chunked", "triton") or r["status"] != "ok":
            continue
        K = r["options"].get("K")
        partners = [("dense", r["config"])]
        if r["kind"] == "convnn2d":
            partners.append(("conv", ""))
        else:
            partners.append(("sdpa", ""))
            if K is not None:
                partners.append(("kvt", f"K={K}"))
        for vs, config in partners:
            base = _find(results, r["scope"], config, vs)
            if base is None:
                continue
            out.append(
                dict(
                    scope=r["scope"],
                    config=r["config"],
                    role=r["role"],
                    vs=vs,
                    time=_ratio(r["total_ms"], base["total_ms"]),
                    fwd=_ratio(r["fwd_ms"], base["fwd_ms"]),
                    bwd=_ratio(r["bwd_ms"], base["bwd_ms"]),
                    memory=_ratio(r["peak_mib"], base["peak_mib"]),
                )
            )
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "not met"


def targets(results: list[dict], device: str) -> list[dict]:
    """The issue's performance targets, each with its measured value and a verdict."""
    rows = []
    cpu, cuda = device == "cpu", device.startswith("cuda")
    config = _conv_config(*COSINE_K9)[0]

    def add(name, value, ok, applies=True, note=""):
        rows.append(
            dict(target=name, measured=value, verdict=_verdict(ok if applies else None), note=note)
        )

    ours = _find(results, TARGET_SCOPE, config, "ours")
    dense = _find(results, TARGET_SCOPE, config, "dense")
    if ours and dense:
        speed = dense["total_ms"] / ours["total_ms"]
        mem = _ratio(ours["peak_mib"], dense["peak_mib"])
        add(
            "CPU: ConvNN2d(64,64,K=9,cosine,all) fwd+bwd on 8x64x64x64 >= 1.6x faster than dense",
            f"{speed:.2f}x (ours {ours['total_ms']:.0f} ms = fwd {ours['fwd_ms']:.0f} + bwd "
            f"{ours['bwd_ms']:.0f}; dense {dense['total_ms']:.0f} ms = fwd {dense['fwd_ms']:.0f} "
            f"+ bwd {dense['bwd_ms']:.0f})",
            speed >= 1.6,
            cpu,
            "" if cpu else "a CPU target: measured here for reference",
        )
        add(
            "CPU: same case, peak memory <= 1/4 of dense (above baseline)",
            f"{mem:.3f} (ours {ours['peak_mib']:.0f} MiB, dense {dense['peak_mib']:.0f} MiB)"
            if mem is not None
            else "n/a",
            mem is not None and mem <= 0.25,
            cpu,
        )
    sweep = [(side, _find(results, _sweep_scope(side), config, "ours")) for side in SWEEP_SIDES]
    sweep = [(side, r) for side, r in sweep if r is not None]
    if len(sweep) >= 2:
        (s0, r0), (s1, r1) = sweep[-2], sweep[-1]
        slope = math.log(max(r1["peak_mib"], 1e-3) / max(r0["peak_mib"], 1e-3)) / math.log(
            (s1 / s0) ** 2
        )
        ran256 = sweep[-1][0] == SWEEP_SIDES[-1]
        add(
            "N sweep: ours' memory grows O(N*K); 256x256 runs",
            f"memory ~ N^{slope:.2f} between {s0}^2 and {s1}^2 ({r0['peak_mib']:.0f} -> "
            f"{r1['peak_mib']:.0f} MiB); largest run {s1}x{s1}",
            slope <= 1.25 and ran256,
        )
    mc = _find(results, MEMCHECK_SCOPE, config, "ours")
    if mc:
        add(
            "ConvNN2d(64,64,K=9,cosine,all) fwd+bwd on 1x64x128x128 far below 1 GiB",
            f"{mc['peak_mib']:.0f} MiB",
            mc["peak_mib"] <= 256,
            note="met = at most a quarter of 1 GiB",
        )

    def add_worst(name, rows, baseline, limit):
        """A CUDA goal judged by the worst ours / baseline time ratio among ``rows``."""
        if rows:
            worst = max(rows, key=lambda r: r["time"])
            add(
                name,
                f"worst ours/{baseline} {worst['time']:.2f} ({worst['scope']}, {worst['config']})",
                all(r["time"] <= limit for r in rows),
                cuda,
                "" if cuda else "a CUDA goal: CPU ratios for reference",
            )

    ours_vs = lambda vs: [r for r in ratios(results) if r["vs"] == vs and r["role"] == "ours"]
    add_worst(
        "CUDA: ConvNNAttention K<=16 within 1.5x of SDPA at N=197 and N=1024",
        [r for r in ours_vs("sdpa") if "K=all" not in r["config"]],
        "SDPA",
        1.5,
    )
    add_worst(
        "CUDA: ConvNN2d within 3x of cuDNN conv at ResNet stage-1 sizes",
        [r for r in ours_vs("conv") if r["scope"].startswith("resnet-s1")],
        "conv",
        3,
    )
    return rows


# ---------------------------------------------------------------------------------- output


def hardware(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        git = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        if commit:
            dirty = git("status", "--porcelain", "--", "src/convnn")
            info["commit"] = commit + (" (+ uncommitted changes in src/convnn)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def case_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["status"] == "ok":
            cells = [_fmt(r[k]) for k in ("fwd_ms", "bwd_ms", "total_ms", "peak_mib")]
            cells.append(str(r["repeats"]))
        else:
            cells = ["-", "-", "-", "-", f"{r['status']}: {r.get('reason', '')}"]
        rows.append([r["scope"], r["config"] or "-", r["role"], *cells])
    return rows


def ratio_rows(rows: list[dict]) -> list[list[str]]:
    return [
        [r["scope"], r["config"], f"{r['role']} / {r['vs']}"]
        + [_fmt(r[k], 2) for k in ("time", "fwd", "bwd", "memory")]
        for r in rows
    ]


def sweep_rows(results: list[dict]) -> list[list[str]]:
    config = _conv_config(*COSINE_K9)[0]
    rows = []
    for side in SWEEP_SIDES:
        ours = _find(results, _sweep_scope(side), config, "ours")
        if ours is None:
            continue
        dense = _find(results, _sweep_scope(side), config, "dense")
        if dense is None:
            skip = [r for r in results if r["scope"] == _sweep_scope(side) and r["role"] == "dense"]
            dense_cells = ["-", skip[0].get("reason", "-") if skip else "-"]
        else:
            dense_cells = [_fmt(dense["total_ms"]), _fmt(dense["peak_mib"])]
        cells = [f"{side}x{side}", str(side * side), _fmt(ours["total_ms"]), _fmt(ours["peak_mib"])]
        rows.append(cells + dense_cells)
    return rows


def report(data: dict) -> str:
    """Markdown tables of a run: hardware, targets, ratios, cases, sweep, recall."""
    hw = data["hardware"]
    parts = [
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}  ",
        f"Device: {data['device']} ({data['dtype']})  ",
        "Hardware: "
        + ", ".join(
            f"{k} {v}"
            for k, v in hw.items()
            if k
            in ("cpu", "cores", "torch_threads", "memory_gib", "gpu", "cuda", "torch", "triton")
        )
        + "  ",
    ]
    if "commit" in hw:
        parts.append(f"Commit: {hw['commit']}  ")
    parts.append(f"Wall time: {data['wall_s'] / 60:.1f} min  ")
    loads = [r["load_before"] for r in data["results"] if r.get("load_before") is not None]
    if loads:
        parts.append(
            f"1-min load average before each case: median {statistics.median(loads):.1f}, max "
            f"{max(loads):.1f} (the benchmark alone keeps it near the thread count, "
            f"{hw.get('torch_threads')}; more means other work shared the machine)"
        )
    if data["targets"]:
        parts += ["", "#### Targets", ""]
        rows = [
            [t["target"], t["measured"], f"**{t['verdict']}**", t["note"]] for t in data["targets"]
        ]
        parts.append(_table(["target", "measured", "verdict", "note"], rows))
    if data["ratios"]:
        parts += [
            "",
            "#### Ratios (same run; < 1 = ours faster / smaller)",
            "",
            _table(
                ["scope", "config", "ratio", "time fwd+bwd", "fwd", "bwd", "peak memory"],
                ratio_rows(data["ratios"]),
            ),
        ]
    parts += [
        "",
        "#### Cases (median ms; peak MiB above the baseline)",
        "",
        _table(
            ["scope", "config", "role", "fwd ms", "bwd ms", "fwd+bwd ms", "peak MiB", "repeats"],
            case_rows(data["results"]),
        ),
    ]
    sweep = sweep_rows(data["results"])
    if sweep:
        parts += [
            "",
            "#### N sweep: ConvNN2d(64, 64, K=9, cosine, all), batch 1, fwd+bwd",
            "",
            _table(["map", "N", "ours ms", "ours MiB", "dense ms", "dense MiB"], sweep),
        ]
    if data.get("recall"):
        rows = [
            [
                r["size"],
                r["metric"],
                str(r["K"]),
                f"{r['recall']:.4f}",
                _fmt(r["fp32_ms"]),
                _fmt(r["bf16_ms"]),
            ]
            for r in data["recall"]
        ]
        parts += [
            "",
            "#### Selection in bfloat16 (`selection_dtype=torch.bfloat16`): recall of the exact top-K",
            "",
            _table(["features", "metric", "K", "recall", "fp32 select ms", "bf16 select ms"], rows),
        ]
    return "\n".join(parts) + "\n"


def write_markdown(path: Path, section: str, body: str) -> None:
    """Replace (or append) the ``section`` block of ``path`` between its markers."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + f"\n\n## {section}\n\n" + block
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument(
        "--suite",
        default="full",
        choices=SUITES,
        help="quick (smoke test) | conv | attention | sweep | precision (bf16 selection "
        "recall) | full (all of them; default)",
    )
    p.add_argument("--filter", default=None, help="only cases whose name contains this text")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--markdown",
        nargs="+",
        metavar=("PATH", "SECTION"),
        default=None,
        help="write/update the tables in PATH (e.g. BENCHMARKS.md) under SECTION "
        "(default: the device and suite, e.g. 'cpu full')",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--budget", type=float, default=1.5, help="seconds of timed repeats per case (about)"
    )
    p.add_argument("--repeats", type=int, default=None, help="fixed repeats per case")
    p.add_argument(
        "--dense-budget-gb",
        type=float,
        default=None,
        help="skip cases whose estimated O(N*M) or O(N*K*C) tensors (the dense N x M x B "
        "scores, gathered neighbours) exceed this (default: min(4, RAM/6) GB on CPU, a "
        "quarter of GPU memory on CUDA)",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each case in a fresh process (default: on CPU, where memory is the process "
        "peak; off on CUDA)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per isolated case")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)


def _dense_budget(args, device: str) -> float:
    if args.dense_budget_gb is not None:
        return args.dense_budget_gb * 1e9
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory / 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(4e9, ram / 6)


def _command() -> str:
    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1 :]
    return shlex.join(["convnn", "bench", *argv])


def run(args: argparse.Namespace) -> int:
    if args.case is not None:
        return _worker(args.case, args.device, args.dtype, args.budget, args.repeats)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a visible GPU")
    cases = build_cases(args.suite, "cuda" if device.startswith("cuda") else device)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if args.list:
        for c in cases:
            print(c.name, tuple(c.shape), c.options, c.backend)
        return 0
    isolate = (not device.startswith("cuda")) if args.isolate is None else args.isolate
    budget = _dense_budget(args, device)
    start = time.perf_counter()
    results = []
    print(f"{len(cases)} cases on {device} ({'fresh process each' if isolate else 'in process'})")
    for i, case in enumerate(cases, 1):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if case.est_bytes > budget:
            r = dict(
                status="skipped",
                reason=f"would need ~{case.est_bytes / 1e9:.1f} GB (budget {budget / 1e9:.1f} GB)",
            )
        elif isolate:
            r = run_isolated(case, device, args.dtype, args.budget, args.repeats, args.timeout)
        else:
            try:
                r = measure(case, device, args.dtype, args.budget, args.repeats)
            except Exception as exc:  # one failing case does not end the suite
                r = dict(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        row = {**asdict(case), **r, "load_before": load}
        results.append(row)
        cells = case_rows([row])[0]
        print(f"[{i}/{len(cases)}] " + " | ".join(cells), flush=True)
    recall = selection_recall(device) if args.suite in ("precision", "full") else []
    data = dict(
        command=_command(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=device,
        dtype=args.dtype,
        suite=args.suite,
        hardware=hardware(device),
        results=results,
        ratios=ratios(results),
        targets=targets(results, device),
        recall=recall,
        wall_s=time.perf_counter() - start,
    )
    text = report(data)
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.markdown:
        path = Path(args.markdown[0])
        section = " ".join(args.markdown[1:]) or f"{device} {args.suite}"
        write_markdown(path, section, text)
        print(f"updated section {section!r} of {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convnn bench", description=__doc__.split("\n\n")[0].strip("`")
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
