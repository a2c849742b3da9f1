"""What the native top-K saves on the CPU, what any top-K could still save, and what the
one-pass kernels save.

The library ranks every eager CPU top-K in the native kernel (``convnn.native``,
``_rank.c``) when it is built, else by torch ops (rounds of a row maximum). This script times
the headline step and a ResNet-18 'branching' training step three ways, interleaved in one
process on one thread: ranked natively, by the torch path (``CONVNN_NATIVE=0``), and by a
top-K that costs nothing, for a bound (the score blocks are still computed, and the keys the
native kernel gave on the first step come back by call order), each with the one-pass
selection and the native aggregation off; and a fourth way, the library as it runs (scores
and top-K in one pass, the aggregation with the neighbours in place). It checks first that
the three give the same outputs and, on the headline layer, the fourth the same to float32
rounding (through ResNet-18's 13 ConvNN layers a near tie that the one-pass sums order
differently changes a neighbour, and later layers compound it), and times the
headline's GEMM floor (``cpu_floor.py``'s) in the same rounds (BENCHMARKS.md, "The native
kernels" and "The one-pass kernels"). First it times the top-K alone on blocks of the shapes
these steps, KVT and windows rank, natively and by torch ops.

    PYTHONPATH=$PWD/src python benchmarks/native_topk.py --rounds 9    # headline and ResNet-18
    PYTHONPATH=$PWD/src python benchmarks/native_topk.py --quick       # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import convnn
from convnn import native
from convnn.backends import chunked
from convnn.backends._common import topk_low_ties
from convnn.bench.rounds import format_ratio, interleave, ratio_stats
from convnn.metrics import GemmScores
from convnn.models.registry import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import gemm_floor, load_average  # noqa: E402  (a sibling script)


class Replay:
    """A top-K that costs nothing, for a bound: each block's scores are still computed (the
    score GEMM stays), and the keys returned are those ``original`` gave for the same block,
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
def ranked(way: str, free: Replay | None = None):
    """Run ``way``: 'native', 'torch' (``CONVNN_NATIVE=0``) or 'free' (``free`` in place of
    the chunked backend's block selection), the three with the one-pass selection and the
    native aggregation off; or 'library', the library as it runs."""
    saved_env, saved_block = os.environ.get("CONVNN_NATIVE"), chunked._select_block
    saved_fused, saved_agg = GemmScores.fused, chunked._native_aggregation
    os.environ["CONVNN_NATIVE"] = "0" if way == "torch" else "1"
    if way != "library":
        GemmScores.fused = lambda self, K, exclude=None: False
        chunked._native_aggregation = lambda *args: False
    if way == "free":
        free.start()
        chunked._select_block = free
    try:
        yield
    finally:
        chunked._select_block = saved_block
        GemmScores.fused, chunked._native_aggregation = saved_fused, saved_agg
        if saved_env is None:
            del os.environ["CONVNN_NATIVE"]
        else:
            os.environ["CONVNN_NATIVE"] = saved_env


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


# (rows, width, K): the headline's score blocks (512 and 64 rows of 4096), a 34 x 34 map's
# rows (1156, K 8), KVT's 32 x 3 heads x 65 tokens (K 9 and 32) and 7 x 7 window rows
BLOCKS = [(512, 4096, 9), (64, 4096, 9), (1024, 1156, 8), (6240, 65, 9), (6240, 65, 32),
          (4096, 49, 9)]  # fmt: skip


def block_times(rounds: int, quick: bool) -> None:
    """The top-K alone (``topk_low_ties`` of random fp32 scores), native against torch ops,
    interleaved; the two must pick the same positions."""
    gen = torch.Generator().manual_seed(0)
    for R, M, K in [(8, 300, 9), (16, 65, 9)] if quick else BLOCKS:
        scores = torch.randn(R, M, generator=gen)
        runs = {}
        for way in ("native", "torch"):

            def run(way=way, scores=scores, K=K):
                with ranked(way):
                    return _seconds(lambda: topk_low_ties(scores, K, chunked.topk_grouped))

            runs[way] = run
        with ranked("torch"):
            want = topk_low_ties(scores, K)[1]
        if not torch.equal(topk_low_ties(scores, K)[1], want):
            raise SystemExit(f"native_topk: {R} x {M}, K {K}: the positions differ")
        times = interleave(runs, rounds)
        ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        ratio = format_ratio(ratio_stats(times["native"], times["torch"]))
        print(
            f"top-K of {R} x {M}, K {K}: {ms['native']:.2f} ms native, {ms['torch']:.2f} ms "
            f"by torch ops: native / torch {ratio}"
        )


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
    if native._rank is None:
        raise SystemExit(f"native_topk: {native.status()}")
    print(native.status())
    block_times(args.rounds, args.quick)
    for name, (step, floor) in _steps(args.quick).items():
        free = Replay(chunked._select_block)
        y = {}
        for way in ("native", "free", "torch", "library"):  # 'free' records native keys first
            with ranked(way, free):
                y[way] = step()
        if not all(torch.equal(y[k], y["torch"]) for k in ("native", "free")):
            raise SystemExit(f"native_topk: {name}: the outputs differ")
        # one layer: the same outputs to float32 rounding. Deeper, a near tie that the two
        # roundings order differently changes a neighbour, and later layers see it: not checked
        if floor is not None and not torch.allclose(y["library"], y["torch"], rtol=1e-4, atol=1e-4):
            raise SystemExit(f"native_topk: {name}: the one-pass kernels' outputs differ")

        def timed(way, step=step, free=free):
            def run():
                with ranked(way, free):
                    return _seconds(step)

            return run

        runners = {way: timed(way) for way in ("torch", "native", "free", "library")}
        if floor is not None:
            runners["floor"] = functools.partial(_seconds, floor)
        times = interleave(runners, args.rounds)
        ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        ratio = {k: format_ratio(ratio_stats(times[k], times["torch"])) for k in times}
        print(
            f"{name}: the same outputs; step {ms['torch']:.0f} ms by the torch path, "
            f"{ms['native']:.0f} ms native: native / torch {ratio['native']}; "
            f"a top-K that costs nothing (GEMM kept): {ms['free']:.0f} ms, {ratio['free']}; "
            f"one pass (the library): {ms['library']:.0f} ms, {ratio['library']}"
        )
        if floor is not None:
            over = {k: format_ratio(ratio_stats(times[k], times["floor"])) for k in times}
            print(
                f"  against the GEMM floor ({ms['floor']:.0f} ms): torch path {over['torch']}, "
                f"native {over['native']}, a top-K that costs nothing {over['free']}, one pass "
                f"{over['library']}"
            )
    print(f"load {load_average()}")


if __name__ == "__main__":
    main()
