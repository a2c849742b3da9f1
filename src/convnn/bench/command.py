"""``convnn bench`` arguments and the run of a suite (see :mod:`convnn.bench`).

Only argparse and the case catalogue are imported at the top, so ``convnn bench --help``
does not import torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .cases import SUITES, build_cases

__all__ = ["DESCRIPTION", "add_arguments", "main", "run"]

DESCRIPTION = (
    "Time and peak memory of ConvNN layers against their dense and PyTorch twins (see "
    "BENCHMARKS.md). Every case builds one module with a fixed seed, warms it up and times "
    "forward, backward and forward+backward; on the CPU each case runs in a fresh process."
)


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
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of modules and inputs: %(choices)s (default: %(default)s)",
    )
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
    import torch

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
        from .measurement import worker

        return worker(args.case, args.device, args.dtype, args.budget, args.repeats)

    device = args.device
    cases = build_cases(args.suite, "cuda" if device.startswith("cuda") else device)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if args.list:
        for c in cases:
            print(c.name, tuple(c.shape), c.options, c.backend)
        return 0

    import torch

    from .measurement import measure, run_isolated, selection_recall
    from .reporting import case_rows, hardware, ratios, report, targets, write_markdown

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a visible GPU")
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
    """``convnn bench`` without the rest of the command (``python -m convnn.bench``,
    benchmarks/bench.py)."""
    parser = argparse.ArgumentParser(prog="convnn bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
