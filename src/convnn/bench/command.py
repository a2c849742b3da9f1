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
from .rounds import interleave

__all__ = ["DESCRIPTION", "add_arguments", "main", "run"]

DESCRIPTION = (
    "Time and peak memory of ConvNN layers against their dense and PyTorch twins (see "
    "BENCHMARKS.md). Every case builds one module with a fixed seed and warms it up; each "
    "comparison (a ConvNN config and its baselines) then times one training step of each "
    "case per round, round after round, and reports every ratio as the median of its "
    "per-round ratios with their range ('noisy' when too spread to mean anything). On the "
    "CPU each case runs in a fresh process of its own."
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
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds per comparison: each case takes one timed step (or --reps) "
        "per round (default %(default)s; fewer than 3 makes every ratio 'noisy')",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="training steps timed together per round (default 1 on CPU, 10 on CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every case (default 1 on CPU; CUDA: torch's default)",
    )
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
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds an isolated case may take to build or to take one round",
    )
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


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    threads = args.threads if args.threads is not None else (None if cuda else 1)
    reps = args.reps or (10 if cuda else 1)
    if args.rounds < 1 or reps < 1 or (threads is not None and threads < 1):
        raise ValueError(
            f"--rounds, --reps and --threads must be >= 1, got {args.rounds}, {reps}, {threads}"
        )
    if args.case is not None:
        import torch

        from .measurement import worker

        if threads is not None:
            torch.set_num_threads(threads)
        return worker(args.case, device, args.dtype, reps)

    cases = build_cases(args.suite, "cuda" if cuda else device)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if args.list:
        for c in cases:
            print(c.name, tuple(c.shape), c.options, c.backend)
        return 0

    import torch

    from .cases import comparisons
    from .measurement import CaseError, InProcess, Isolated, failure, selection_recall, summarize
    from .reporting import case_rows, hardware, ratio_rows, ratios, report, targets, write_markdown

    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a visible GPU")
    if threads is not None:
        torch.set_num_threads(threads)
    isolate = (not cuda) if args.isolate is None else args.isolate
    budget = _dense_budget(args, device)
    groups = comparisons(cases)
    start = time.perf_counter()
    results = []
    print(
        f"{len(cases)} cases in {len(groups)} comparisons on {device}, {args.rounds} "
        f"interleaved rounds of {reps} step(s), {torch.get_num_threads()} thread(s) "
        f"({'a fresh process per case' if isolate else 'in process'})"
    )
    for i, (config, members) in enumerate(groups, 1):
        load_before = _load()
        rows: dict[str, dict] = {}
        runners = {}
        for case in members:
            if case.est_bytes > budget:
                gb = f"~{case.est_bytes / 1e9:.1f} GB (budget {budget / 1e9:.1f} GB)"
                rows[case.name] = dict(status="skipped", reason=f"would need {gb}")
                continue
            try:
                if isolate:
                    runners[case.name] = Isolated(
                        case, device, args.dtype, reps, threads, args.timeout
                    )
                else:
                    runners[case.name] = InProcess(case, device, args.dtype, reps)
            except CaseError as exc:
                rows[case.name] = exc.result
        errors: dict[str, BaseException] = {}
        steps = {name: runner.step for name, runner in runners.items()}
        times = interleave(steps, args.rounds, on_error=errors.__setitem__)
        for name, runner in runners.items():
            try:
                if name in errors:
                    raise errors[name]
                rows[name] = {**summarize(times[name], reps), **runner.finish()}
            except CaseError as exc:
                rows[name] = exc.result
            except Exception as exc:  # one failing case does not end the suite
                rows[name] = failure(exc)
        del runners, steps
        if cuda:
            torch.cuda.empty_cache()
        load_after = _load()
        group = [
            dict(
                asdict(case),
                group=config,
                **rows[case.name],
                load_before=load_before,
                load_after=load_after,
            )
            for case in members
        ]
        results += group
        loads = f"load {_fmt_load(load_before)} -> {_fmt_load(load_after)}"
        print(f"[{i}/{len(groups)}] {members[0].scope} | {config or '-'} ({loads})", flush=True)
        for cells in case_rows(group):
            print("    " + " | ".join(cells[2:]), flush=True)
        for cells in ratio_rows(ratios(group)):
            print("    " + " | ".join(cells[2:]), flush=True)
    recall = selection_recall(device) if args.suite in ("precision", "full") else []
    data = dict(
        command=_command(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=device,
        dtype=args.dtype,
        suite=args.suite,
        rounds=args.rounds,
        reps=reps,
        threads=torch.get_num_threads(),
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


def _fmt_load(load: float | None) -> str:
    return "?" if load is None else f"{load:.2f}"


def main(argv: list[str] | None = None) -> int:
    """``convnn bench`` without the rest of the command (``python -m convnn.bench``,
    benchmarks/bench.py)."""
    parser = argparse.ArgumentParser(prog="convnn bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
