"""How much a native (C) top-K would save on the CPU: an experiment, not part of the library.

The chunked backend ranks each block of scores with torch ops (:func:`topk_low_ties`, by
rounds of a row maximum), each op paying its own dispatch and its own pass over the block.
This script compiles a small C kernel with the system's C compiler, swaps it in for the
backend's per-block top-K of fp32 GEMM scores, checks that it picks exactly the same keys,
and times the headline step and a ResNet-18 'branching' training step both ways, interleaved
in one process on one thread (BENCHMARKS.md, "A native top-K"). A third way bounds what any
top-K could save: the score blocks are computed, and the keys the rounds gave on the first
step are returned at no cost. The kernel, per row:

- lane maxima of blocks of 16 x 8 scores (groups of 16 scores 8 apart, no horizontal step);
- the K-th best of those maxima bounds the K best scores from below (K groups reach it);
- only the groups at or above that bound are read again, into a running top-K that keeps the
  tie rule (descending score, equal scores by lower index) whatever order they come in.

    PYTHONPATH=$PWD/src python benchmarks/native_topk.py --rounds 9    # headline and ResNet-18
    PYTHONPATH=$PWD/src python benchmarks/native_topk.py --quick       # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import convnn
from convnn.backends import _common, chunked
from convnn.bench.rounds import format_ratio, interleave, ratio_stats
from convnn.metrics import GemmScores
from convnn.models.registry import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import gemm_floor, load_average  # noqa: E402  (a sibling script)

SOURCE = r"""
#include <stdint.h>

/* (x, pos) ranks before (v, p): a higher score, or an equal one at a lower position */
static inline int before(float x, int64_t pos, float v, int64_t p) {
    return x > v || (x == v && pos < p);
}

/* running top-K v/ix holding c entries, canonical whatever the order of insertion */
static inline void insert(float *v, int64_t *ix, int64_t *c, int64_t K, float x, int64_t pos) {
    int64_t n = *c, p = n < K ? n : K - 1;
    if (n == K && !before(x, pos, v[K - 1], ix[K - 1])) return;
    while (p > 0 && before(x, pos, v[p - 1], ix[p - 1])) {
        v[p] = v[p - 1]; ix[p] = ix[p - 1]; p--;
    }
    v[p] = x; ix[p] = pos;
    if (n < K) *c = n + 1;
}

#define L 8               /* lanes */
#define D 16              /* a group: one lane of D consecutive vectors */
#define BW (L * D)
#define MAXGROUPS 8192

/* Rows r of scores s (R, W), row stride ld, columns m0 + j: merge into each row's running
   top-K vals/idx (R, K) with cnt (R,) entries. exclude[r % period] - m0 (when given) is
   ranked as -inf, as the backend masks it. Scores hold no NaN (the backend's rankable). */
void topk_update(const float *s, int64_t R, int64_t W, int64_t ld, int64_t m0,
                 const int64_t *exclude, int64_t period, int64_t K, float *vals,
                 int64_t *idx, int64_t *cnt) {
    float gm[MAXGROUPS], kv[1024];
    int64_t kix[1024];
    int64_t nb = W / BW;
    if (nb * L > MAXGROUPS) nb = MAXGROUPS / L;
    int64_t G = nb * L;
    for (int64_t r = 0; r < R; r++) {
        const float *row = s + r * ld;
        float *v = vals + r * K;
        int64_t *ix = idx + r * K;
        int64_t c = cnt[r];
        int64_t ex = exclude ? exclude[r % period] - m0 : -1;
        for (int64_t b = 0; b < nb; b++) {
            const float *p = row + b * BW;
            float m[L];
            for (int l = 0; l < L; l++) m[l] = p[l];
            for (int d = 1; d < D; d++)
                for (int l = 0; l < L; l++) m[l] = p[d * L + l] > m[l] ? p[d * L + l] : m[l];
            for (int l = 0; l < L; l++) gm[b * L + l] = m[l];
        }
        int in_groups = ex >= 0 && ex < nb * BW;
        if (in_groups) { /* the excluded score leaves its group's maximum */
            int64_t b = ex / BW, l = ex % L;
            float mx = -__builtin_inff();
            for (int d = 0; d < D; d++) {
                int64_t j = b * BW + d * L + l;
                if (j != ex && row[j] > mx) mx = row[j];
            }
            gm[b * L + l] = mx;
        }
        float lo = -__builtin_inff();
        if (G >= K && K <= 1024) {
            int64_t kc = 0;
            for (int64_t g = 0; g < G; g++)
                if (kc < K || gm[g] > kv[K - 1]) insert(kv, kix, &kc, K, gm[g], g);
            lo = kv[K - 1];
        }
        for (int64_t g = 0; g < G; g++) {
            if (gm[g] < lo || (c == K && gm[g] < v[K - 1])) continue;
            int64_t base = (g / L) * BW + g % L;
            for (int d = 0; d < D; d++) {
                int64_t j = base + d * L;
                if (j != ex && row[j] >= lo) insert(v, ix, &c, K, row[j], m0 + j);
            }
        }
        for (int64_t j = nb * BW; j < W; j++) {
            float x = j == ex ? -__builtin_inff() : row[j];
            if (x >= lo) insert(v, ix, &c, K, x, m0 + j);
        }
        if (in_groups) insert(v, ix, &c, K, -__builtin_inff(), m0 + ex);
        cnt[r] = c;
    }
}
"""


def build(workdir: Path) -> ctypes.CDLL:
    """Compile :data:`SOURCE` with ``$CC`` (default ``cc``) for this CPU and load it."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise SystemExit("native_topk: no C compiler found (set CC)")
    src, lib = workdir / "topk.c", workdir / "topk.so"
    src.write_text(SOURCE)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", lib, src], check=True)
    native = ctypes.CDLL(str(lib))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    native.topk_update.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr]
    native.topk_update.restype = None
    return native


class RunningTopK:
    """The C kernel's state for R rows: each key block's scores merge into it."""

    def __init__(self, lib, R: int, K: int, exclude: torch.Tensor | None, period: int) -> None:
        self.lib, self.R, self.K, self.period = lib, R, K, max(period, 1)
        self.vals, self.idx = torch.empty(R, K), torch.empty(R, K, dtype=torch.long)
        self.cnt = torch.zeros(R, dtype=torch.long)
        self.exclude = None if exclude is None else exclude.contiguous()  # (period,)

    def update(self, scores: torch.Tensor, m0: int) -> None:
        """scores (R, w), contiguous fp32, of keys m0 .. m0 + w - 1."""
        ex = None if self.exclude is None else self.exclude.data_ptr()
        w = scores.shape[-1]
        ptrs = (self.vals.data_ptr(), self.idx.data_ptr(), self.cnt.data_ptr())
        self.lib.topk_update(scores.data_ptr(), self.R, w, w, m0, ex, self.period, self.K, *ptrs)


def native_topk(lib, scores: torch.Tensor, K: int, exclude: torch.Tensor | None = None):
    """Positions (R, K) of the K best of fp32 scores (R, W), exclude (R,) ranked as -inf."""
    top = RunningTopK(lib, scores.shape[0], K, exclude, scores.shape[0])
    top.update(scores.contiguous(), 0)
    return top.idx


def native_select_block(lib):
    """A stand-in for ``chunked._select_block``: fp32 GEMM scores go to the C kernel, key
    block by key block into one running top-K per row; anything else to the original."""
    original = chunked._select_block

    def select_block(scores, K, exclude, kb, qs):
        fp32 = type(scores) is GemmScores and scores.query.dtype == torch.float32
        if not fp32 or scores.rounding is not None or (exclude is not None and exclude.dim() != 1):
            return original(scores, K, exclude, kb, qs)
        ex = None if exclude is None else exclude[qs]
        top = None
        for m0 in range(0, scores.num_keys, kb):
            s = scores.wide_block(qs, slice(m0, m0 + kb)).contiguous()  # (B', n, w)
            B, n, w = s.shape
            top = top or RunningTopK(lib, B * n, K, ex, n)
            top.update(s.view(B * n, w), m0)
        return top.idx.view(B, n, K)

    return original, select_block


class Replay:
    """A top-K that costs nothing, for a bound: each block's scores are still computed (the
    score GEMM stays), and the keys returned are those the rounds gave for the same block,
    by call order, on the first step after :meth:`start` (one thread: blocks come in order)."""

    def __init__(self, original) -> None:
        self.original, self.recorded, self.calls = original, [], 0

    def start(self) -> None:
        self.calls = 0

    def __call__(self, scores, K, exclude, kb, qs):
        for m0 in range(0, scores.num_keys, kb):
            scores.wide_block(qs, slice(m0, m0 + kb))
        if self.calls == len(self.recorded):
            self.recorded.append(self.original(scores, K, exclude, kb, qs))
        self.calls += 1
        return self.recorded[self.calls - 1]


@contextlib.contextmanager
def swapped(block):
    original = chunked._select_block
    chunked._select_block = block
    try:
        yield
    finally:
        chunked._select_block = original


def check_exact(lib, quick: bool) -> None:
    """The C kernel picks what ``topk_low_ties`` picks: tie-heavy integer scores, signed
    zeros, random scores; row widths around a block of 128; an excluded key in every row."""
    g = torch.Generator().manual_seed(0)
    cases = 0
    for W in (5, 65, 127, 128, 300, 1156) if quick else (5, 65, 127, 128, 129, 300, 1156, 4096):
        for K in (1, 3, 9, 17):
            if K >= W:
                continue
            for kind in ("ties", "zeros", "random"):
                if kind == "ties":
                    s = torch.randint(-3, 4, (64, W), generator=g).float()
                else:
                    s = torch.randn(64, W, generator=g)
                if kind == "zeros":
                    s[:, ::7], s[:, 1::7] = 0.0, -0.0
                ex = torch.randint(0, W, (64,), generator=g)
                masked = s.clone()
                masked[torch.arange(64), ex] = -torch.inf
                want = _common.topk_low_ties(masked, K)[1]
                got = native_topk(lib, s, K, ex)
                if not torch.equal(got, want):
                    raise SystemExit(
                        f"native_topk: differs from topk_low_ties at W={W} K={K} {kind}"
                    )
                cases += 1
    print(f"exact: {cases} score blocks give the same keys as topk_low_ties")


def _steps(quick: bool) -> dict:
    """name -> (a training step, its GEMM floor or None): the headline layer (its floor is
    ``cpu_floor.py``'s) and a ResNet-18 'branching' model."""
    torch.manual_seed(0)
    B, C, S = (2, 8, 16) if quick else (8, 64, 64)
    layer = convnn.ConvNN2d(C, C, K=9, metric="cosine", candidates="all")
    x = torch.randn(B, C, S, S, requires_grad=True)
    grad = torch.randn(B, C, S, S)

    def headline():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(grad)
        return y.detach()

    steps = {f"headline {B}x{C}x{S}x{S}": (headline, gemm_floor(B, C, S * S, 9, C))}
    if not quick:
        model = create_model("resnet18", num_classes=10, img_size=32, layer="branching").train()
        images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

        def resnet():
            model.zero_grad(set_to_none=True)
            logits = model(images)
            F.cross_entropy(logits, labels).backward()
            return logits.detach()

        steps["resnet18 branching, batch 32, 32x32"] = (resnet, None)
    return steps


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"load {load_average()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        check_exact(lib, args.quick)
        original, native = native_select_block(lib)
        for name, (step, floor) in _steps(args.quick).items():
            free = Replay(original)
            y = {}
            for label, block in (("native", native), ("free", free), ("rounds", original)):
                free.start()
                with swapped(block):
                    y[label] = step()
            if not all(torch.equal(y[k], y["rounds"]) for k in ("native", "free")):
                raise SystemExit(f"native_topk: {name}: the outputs differ")

            def timed(block, step=step, free=free):
                def run():
                    free.start()
                    with swapped(block):
                        return _seconds(step)

                return run

            runners = {"rounds": timed(original), "native": timed(native), "free": timed(free)}
            if floor is not None:
                runners["floor"] = functools.partial(_seconds, floor)
            times = interleave(runners, args.rounds)
            ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            ratio = {k: format_ratio(ratio_stats(times[k], times["rounds"])) for k in times}
            print(
                f"{name}: the same outputs; step {ms['rounds']:.0f} ms by rounds, "
                f"{ms['native']:.0f} ms native: native / rounds {ratio['native']}; "
                f"a top-K that costs nothing (GEMM kept): {ms['free']:.0f} ms, {ratio['free']}"
            )
            if floor is not None:
                over = {k: format_ratio(ratio_stats(times[k], times["floor"])) for k in times}
                print(
                    f"  against the GEMM floor ({ms['floor']:.0f} ms): rounds {over['rounds']}, "
                    f"native {over['native']}, a top-K that costs nothing {over['free']}"
                )
    print(f"load {load_average()}")


if __name__ == "__main__":
    main()
