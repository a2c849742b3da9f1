"""Measuring cases: a built, warmed-up case (:class:`Session`) takes timed training steps on
demand, here (:class:`InProcess`) or in a fresh process of its own that stays up between
rounds (:class:`Isolated`), and reports its peak memory above a baseline (see
:mod:`convnn.bench`)."""

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
    "CaseError",
    "InProcess",
    "Isolated",
    "Session",
    "Unavailable",
    "build_case",
    "failure",
    "measure",
    "primer_shape",
    "selection_recall",
    "summarize",
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


class Unavailable(RuntimeError):
    """The case's backend cannot run here (the case is skipped, not failed)."""


class Session:
    """One case built and warmed up, ready to take timed training steps (see :mod:`convnn.bench`).

    ``step()`` times ``reps`` training steps and returns their mean forward and backward
    milliseconds; ``memory()`` the peak memory above the baseline over every step so far.
    ``own_process``: the case is alone in this process, so the baseline is the resident set
    right after the build and the peak is the process's (VmHWM, reset after the build). With
    other cases alive in the process each step is measured above the memory right before it.
    Failures raise (:class:`Unavailable` for a backend this machine lacks); the caller reports
    them.
    """

    def __init__(
        self,
        case: Case,
        device: str = "cpu",
        dtype: str = "float32",
        reps: int = 1,
        own_process: bool = False,
    ):
        torch_dtype = getattr(torch, dtype)
        self.case, self.reps, self.own_process = case, reps, own_process
        self.cuda = device.startswith("cuda")
        with backends.use(case.backend):
            try:
                backends.get(None, torch.device(device).type)
            except ValueError as exc:  # e.g. triton without the package
                raise Unavailable(str(exc)) from exc
            # One training step at a small size first, so that the process-wide one-time
            # costs (thread pools, kernel caches, lazy imports) count in neither time nor memory.
            module, x, grad = build_case(case, device, torch_dtype, primer_shape(case))
            module(x).backward(grad)
            self.module, self.x, self.grad = build_case(case, device, torch_dtype)
        self.params = list(self.module.parameters())
        self.peak = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated - memory_allocated before the step"
        else:
            self.base = _rss()
            self.reset = _reset_peak()
            self.method = ("VmHWM (reset)" if self.reset else "ru_maxrss") + (
                " - RSS after the build" if own_process else " - RSS before the step"
            )
        fwd, bwd = self._step()  # warm-up: one step, three on CUDA or when fast
        for _ in range(2 if self.cuda or fwd + bwd < 1e3 else 0):
            self._step()

    def _step(self) -> tuple[float, float]:
        for t in (self.x, *self.params):
            t.grad = None
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        else:
            before = self.base if self.own_process else _rss()
            if not self.own_process:
                _reset_peak()
        t0 = time.perf_counter()
        with backends.use(self.case.backend):
            y = self.module(self.x)
            if self.cuda:
                marks[1].record()
            t1 = time.perf_counter()
            y.backward(self.grad)
        if self.cuda:
            marks[2].record()
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - before)
            return marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
        t2 = time.perf_counter()
        self.peak = max(self.peak, _peak_rss(self.reset) - before)
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def step(self) -> tuple[float, float]:
        times = [self._step() for _ in range(self.reps)]
        return sum(t[0] for t in times) / self.reps, sum(t[1] for t in times) / self.reps

    def memory(self) -> dict:
        return dict(
            peak_mib=max(self.peak, 0) / MIB,
            baseline_mib=self.base / MIB,
            memory_method=self.method,
        )


def summarize(rounds_ms: list, reps: int) -> dict:
    """A case's result from its per-round (fwd, bwd) milliseconds (None: not measured)."""
    done = [t for t in rounds_ms if t is not None]
    return dict(
        status="ok",
        fwd_ms=statistics.median(t[0] for t in done),
        bwd_ms=statistics.median(t[1] for t in done),
        total_ms=statistics.median(t[0] + t[1] for t in done),
        rounds=len(done),
        reps=reps,
        rounds_ms=[None if t is None else [t[0], t[1]] for t in rounds_ms],
    )


def measure(
    case: Case, device: str = "cpu", dtype: str = "float32", rounds: int = 3, reps: int = 1
) -> dict:
    """One case alone, here: ``rounds`` timed rounds of ``reps`` steps and its peak memory
    (the comparisons of ``convnn bench`` interleave several cases instead)."""
    try:
        session = Session(case, device, dtype, reps)
    except Unavailable as exc:
        return dict(status="skipped", reason=str(exc))
    times = [session.step() for _ in range(rounds)]
    return {**summarize(times, reps), **session.memory()}


def worker(case_json: str, device: str, dtype: str, reps: int) -> int:
    """The fresh process of one case: builds it, then answers the parent's commands on stdin
    ('step': one round, 'memory': the peak, then exit), one marked JSON line each."""

    def say(obj: dict) -> None:
        print(MARK + json.dumps(obj), flush=True)

    try:
        session = Session(Case.from_json(case_json), device, dtype, reps, own_process=True)
    except Unavailable as exc:
        say(dict(status="skipped", reason=str(exc)))
        return 0
    except Exception as exc:  # reported as the case's result, the suite goes on
        say(failure(exc))
        return 0
    say(dict(status="ready"))
    for line in sys.stdin:
        if line.strip() == "step":
            try:
                fwd, bwd = session.step()
                say(dict(status="ok", fwd_ms=fwd, bwd_ms=bwd))
            except Exception as exc:
                say(failure(exc))
                return 0
        else:
            say(dict(status="ok", **session.memory()))
            return 0
    return 0


def failure(exc: BaseException) -> dict:
    """A case's result when it raised: its status and a one-line reason."""
    return dict(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])


class CaseError(RuntimeError):
    """A case that could not be built or stepped: ``result`` is its row's status/reason."""

    def __init__(self, result: dict):
        super().__init__(result.get("reason", ""))
        self.result = result


class InProcess:
    """A :class:`Session` here, behind the interface of :class:`Isolated`."""

    def __init__(self, case: Case, device: str, dtype: str, reps: int):
        try:
            self.session = Session(case, device, dtype, reps)
        except Unavailable as exc:
            raise CaseError(dict(status="skipped", reason=str(exc))) from exc
        except Exception as exc:
            raise CaseError(failure(exc)) from exc

    def step(self) -> tuple[float, float]:
        return self.session.step()

    def finish(self) -> dict:
        return self.session.memory()


class Isolated:
    """A :class:`Session` in a fresh ``python -m convnn.bench --case`` process that stays up
    between rounds, so its peak resident set belongs to this case alone."""

    def __init__(
        self,
        case: Case,
        device: str,
        dtype: str,
        reps: int,
        threads: int | None = None,
        timeout_s: float = 900,
    ):
        import queue
        import tempfile
        import threading

        cmd = [sys.executable, "-m", "convnn.bench", "--case", case.to_json(), "--device", device]
        cmd += ["--dtype", dtype, "--reps", str(reps)]
        cmd += [] if threads is None else ["--threads", str(threads)]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.timeout_s = timeout_s
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe cannot block it
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env,
        )  # fmt: skip
        self.lines: queue.Queue = queue.Queue()

        def read():
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    self.lines.put(json.loads(line[len(MARK) :]))
            self.lines.put(None)  # end of output

        threading.Thread(target=read, daemon=True).start()
        ready = self._answer()
        if ready["status"] != "ready":
            self.close()
            raise CaseError(ready)

    def _answer(self) -> dict:
        import queue

        try:
            answer = self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            return dict(status="error", reason=f"timed out after {self.timeout_s:.0f} s")
        if answer is None:
            code = self.proc.wait()
            if code == -9:
                return dict(status="error", reason="worker killed (SIGKILL: out of memory?)")
            self.stderr.seek(0)
            tail = " ".join(self.stderr.read().strip().splitlines()[-3:])
            return dict(status="error", reason=f"worker exited with {code}: {tail}"[:500])
        return answer

    def _ask(self, command: str) -> dict:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: _answer says why
        answer = self._answer()
        if answer["status"] != "ok":
            self.close()
            raise CaseError(answer)
        return answer

    def step(self) -> tuple[float, float]:
        answer = self._ask("step")
        return answer["fwd_ms"], answer["bwd_ms"]

    def finish(self) -> dict:
        answer = self._ask("memory")
        self.close()
        return {k: answer[k] for k in ("peak_mib", "baseline_mib", "memory_method")}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


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
