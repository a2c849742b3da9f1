"""Validate the Triton backend on a GPU, then benchmark it: one command that writes the CUDA
sections of BENCHMARKS.md and exits non-zero when any check fails.

    python benchmarks/gpu_validate.py                  # all steps on GPU 0 (CUDA_VISIBLE_DEVICES picks another)
    python benchmarks/gpu_validate.py --suite quick    # the same with a minutes-long benchmark
    python benchmarks/gpu_validate.py --aot-only       # no GPU needed: the kernels' resources

Steps, each with its verdict in the ``cuda validation`` section:

1. ``aot``: compile the kernel table for this device's arch ahead of time (registers, shared
   memory against the device's own limits, no spills, tensor cores) and check that Triton's
   JIT would specialise every launch the same way (``python -m convnn.backends.triton_aot``);
2. ``tests``: the agreement tests on the device (``tests/test_triton_cuda.py`` with
   ``TRITON_INTERPRET=0``): kernels against the reference and chunked backends forward and
   backward, the auto backend's first-use check, and every variant the JIT compiled is a
   table entry whose loaded binary spills nothing;
3. ``kernels``: ``benchmarks/triton_check.py`` in float32 and bfloat16 (checks at benchmark
   sizes, and the kernels' times against the chunked backend and SDPA);
4. ``bench``: ``convnn bench --device cuda`` writes the ``cuda`` section and
   ``benchmarks/results-cuda.json``; a case that errors fails the step. Skipped when an
   earlier step failed (``--bench-anyway`` runs it regardless).

Subprocesses run this checkout's ``src`` (first on PYTHONPATH), with ``TRITON_INTERPRET=0``.
``--aot-only`` compiles the table for ``--arch`` (default: the archs the dispatcher trusts)
on any machine and writes the ``triton kernels`` section instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout, not an installed copy

import torch  # noqa: E402

from convnn.backends import triton_aot  # noqa: E402
from convnn.bench import hardware, write_markdown  # noqa: E402


@dataclass
class Step:
    name: str
    command: list[str]
    ok: bool = False
    seconds: float = 0.0
    summary: str = ""
    output: list[str] = field(default_factory=list)


def _env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_step(name: str, command: list[str]) -> Step:
    """Run ``command`` from the checkout, echoing its output; ok when it exits 0."""
    step = Step(name, command)
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            step.output.append(line.rstrip("\n"))
    step.seconds = time.perf_counter() - start
    step.ok = proc.returncode == 0
    step.summary = f"exit {proc.returncode}"
    return step


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def aot_step(arch: int, limits: dict | None, json_path: Path) -> tuple[Step, list[dict]]:
    cmd = _python("-m", "convnn.backends.triton_aot", "--arch", str(arch), "--json", str(json_path))
    if limits:
        cmd += ["--shared", str(limits["shared"]), "--regs-per-sm", str(limits["regs_sm"])]
    step = run_step(f"aot sm_{arch}", cmd)
    records = []
    if json_path.is_file():
        data = json.loads(json_path.read_text())
        records = data["records"]
        failed = sum(bool(r["errors"]) for r in records)
        step.summary = (
            f"{len(records) - failed} of {len(records)} configurations fit without spills; "
            f"{len(data['specialisation_errors'])} launches would specialise otherwise"
        )
    return step, records


def tests_step() -> Step:
    step = run_step(
        "tests", _python("-m", "pytest", "tests/test_triton_cuda.py", "-p", "no:cacheprovider")
    )
    last = next((line for line in reversed(step.output) if line.strip()), "")
    step.summary = last.strip("= ")
    if "skipped" in last or "passed" not in last:  # a skipped file proves nothing
        step.ok = False
    return step


def bench_step(suite: str, out: Path, markdown: Path) -> Step:
    cmd = _python("benchmarks/bench.py", "--device", "cuda", "--suite", suite, "--out", str(out))
    step = run_step("bench", cmd + ["--markdown", str(markdown), "cuda"])
    if out.is_file():
        data = json.loads(out.read_text())
        errors = [r for r in data["results"] if r.get("status") == "error"]
        # A forced 'triton' row outside the kernels' table (K = all > MAX_K) is refused by
        # design: reported in the tables, not a failure.
        refused = [r for r in errors if "backend='triton' does not cover" in r.get("reason", "")]
        errors = [r for r in errors if r not in refused]
        missed = [t for t in data.get("targets", []) if t.get("verdict") == "not met"]
        step.summary = (
            f"{len(data['results'])} cases, {len(errors)} errors, {len(refused)} forced-triton "
            f"rows outside the table; {len(missed)} performance targets missed (cuda section)"
        )
        step.ok = step.ok and not errors
    return step


def _device_limits() -> tuple[int, dict]:
    props = torch.cuda.get_device_properties(0)
    arch = 10 * props.major + props.minor
    shared = props.shared_memory_per_block_optin
    return arch, dict(shared=shared, regs_thread=255, regs_sm=props.regs_per_multiprocessor)


def _section(steps: list[Step], records: list[dict], tail: dict[str, list[str]]) -> str:
    hw = hardware("cuda")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    about = ", ".join(
        f"{k} {hw[k]}" for k in ("gpu", "cuda", "torch", "triton", "commit") if k in hw
    )
    lines = [
        "`" + " ".join(["python benchmarks/gpu_validate.py", *sys.argv[1:]]) + "`",
        "",
        f"{date}; {about}.",
        "",
        "| step | verdict | seconds | summary |",
        "|---|---|---|---|",
    ]
    for s in steps:
        verdict = "pass" if s.ok else "**FAIL**"
        lines.append(f"| {s.name} | {verdict} | {s.seconds:.0f} | {s.summary} |")
    if records:
        lines += ["", "#### Kernel resources on this device (ahead of time)", ""]
        lines.append(triton_aot.markdown(records))
    for name, out in tail.items():
        lines += ["", f"#### {name}", "", "```", *out, "```"]
    return "\n".join(lines) + "\n"


def aot_only(archs: list[int], markdown: Path) -> int:
    """Compile the table for ``archs`` here (no GPU) and write the 'triton kernels' section."""
    records = triton_aot.run(archs)
    launches = triton_aot.sample_launches()
    mismatches = [e for a in archs for e in triton_aot.specialisation_errors(launches, a)]
    import triton

    failed = [r for r in records if r["errors"]]
    body = [
        f"`python benchmarks/gpu_validate.py --aot-only --arch {' '.join(map(str, archs))}` "
        f"(triton {triton.__version__}; no GPU needed)",
        "",
        f"{len(records) - len(failed)} of {len(records)} configurations fit without spills; "
        f"{len(mismatches)} launches would specialise otherwise.",
        "",
        triton_aot.markdown(records),
    ]
    print("\n".join(body))
    for error in mismatches:
        print(f"specialisation mismatch: {error}", file=sys.stderr)
    write_markdown(markdown, "triton kernels", "\n".join(body) + "\n")
    print(f"updated section 'triton kernels' of {markdown}")
    return 1 if failed or mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="full", help="convnn bench suite (default full)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-cuda.json")
    parser.add_argument("--bench-anyway", action="store_true", help="bench after a failed check")
    parser.add_argument("--aot-only", action="store_true", help="only compile (no GPU needed)")
    parser.add_argument("--arch", type=int, nargs="+", help="with --aot-only (default 80 90)")
    args = parser.parse_args(argv)
    if args.aot_only:
        from convnn.backends.triton import ARCHS

        return aot_only(args.arch or list(ARCHS), args.markdown)
    if not torch.cuda.is_available():
        print("gpu_validate needs a CUDA device (or --aot-only)", file=sys.stderr)
        return 2
    arch, limits = _device_limits()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory() as tmp:
        step, records = aot_step(arch, limits, Path(tmp) / "aot.json")
        steps.append(step)
    steps.append(tests_step())
    tail = {}
    for dtype in ("float32", "bfloat16"):
        step = run_step(f"kernels {dtype}", _python("benchmarks/triton_check.py", "--dtype", dtype))
        step.summary = step.output[-1] if step.output else step.summary
        steps.append(step)
        tail[f"benchmarks/triton_check.py --dtype {dtype}"] = step.output
    if all(s.ok for s in steps) or args.bench_anyway:
        steps.append(bench_step(args.suite, args.out, args.markdown))
    else:
        steps.append(Step("bench", [], ok=False, summary="not run: an earlier step failed"))
    write_markdown(args.markdown, "cuda validation", _section(steps, records, tail))
    print()
    for s in steps:
        print(f"{'pass' if s.ok else 'FAIL'}  {s.name}: {s.summary}")
    print(f"updated section 'cuda validation' of {args.markdown}")
    ok = all(s.ok for s in steps)
    print("GPU validation passed" if ok else "GPU VALIDATION FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
