"""What a benchmark run says: ratios against the baselines, the targets' verdicts, the
hardware, Markdown tables and the BENCHMARKS.md section."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

from .. import native
from ..utils import atomic_write_text
from .cases import (
    COSINE_K9,
    GIB,
    MEMCHECK_SCOPE,
    SWEEP_SIDES,
    TARGET_SCOPE,
    conv_config,
    partners,
    sweep_scope,
)
from .rounds import MIN_ROUNDS, NOISY_SPREAD, format_ratio, ratio_stats

__all__ = [
    "case_rows",
    "hardware",
    "ratio_rows",
    "ratios",
    "report",
    "targets",
    "time_stats",
    "write_markdown",
]


def _find(
    results: list[dict], scope: str, config: str, role: str, group: str | None = None
) -> dict | None:
    """The measured row of (scope, config, role), within comparison ``group`` when given."""
    for r in results:
        if (r["scope"], r["config"], r["role"]) == (scope, config, role) and r["status"] == "ok":
            if group is None or r.get("group", group) == group:
                return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _per_round(row: dict, part: int | None) -> list[float | None]:
    """A row's per-round milliseconds: forward (part 0), backward (1) or both (None). A row
    without rounds (an old result file) counts as one round of its medians."""
    if "rounds_ms" not in row:
        return [row[("fwd_ms", "bwd_ms")[part] if part is not None else "total_ms"]]
    return [
        None if t is None else (t[0] + t[1] if part is None else t[part]) for t in row["rounds_ms"]
    ]


def ratios(results: list[dict]) -> list[dict]:
    """Every ConvNN row against the baselines it was timed with, round by round.

    Rows: scope, config, role (ours / chunked / triton), vs (dense / conv / sdpa / kvt); time
    (fwd+bwd), fwd and bwd: medians of the per-round ratios, with time's range (time_min,
    time_max), rounds and ``noisy`` (see :mod:`convnn.bench.rounds`); memory: the peak-memory
    ratio. < 1 means ours is faster / smaller.
    """
    out = []
    for r in results:
        if r["status"] != "ok":
            continue
        for vs, config in partners(r["role"], r["kind"], r["config"], r["options"].get("K")):
            base = _find(results, r["scope"], config, vs, r.get("group"))
            if base is None:
                continue
            total = ratio_stats(_per_round(r, None), _per_round(base, None))
            if total is None:
                continue
            part = [ratio_stats(_per_round(r, i), _per_round(base, i)) for i in (0, 1)]
            out.append(
                dict(
                    scope=r["scope"],
                    config=r["config"],
                    role=r["role"],
                    vs=vs,
                    time=total["median"],
                    time_min=total["min"],
                    time_max=total["max"],
                    rounds=total["rounds"],
                    noisy=total["noisy"],
                    fwd=part[0] and part[0]["median"],
                    bwd=part[1] and part[1]["median"],
                    memory=_ratio(r.get("peak_mib"), base.get("peak_mib")),
                )
            )
    return out


def time_stats(ratio: dict) -> dict:
    """A ratio row's fwd+bwd time as :func:`~convnn.bench.rounds.ratio_stats` gives it."""
    keys = ("time", "time_min", "time_max", "rounds", "noisy")
    return dict(zip(("median", "min", "max", "rounds", "noisy"), (ratio[k] for k in keys)))


def _verdict(ok: bool | None, noisy: bool = False) -> str:
    """A target's verdict; never 'met' (nor 'not met') from a noisy ratio."""
    if ok is None:
        return "n/a"
    return "noisy: no verdict" if noisy else "met" if ok else "not met"


def targets(results: list[dict], device: str) -> list[dict]:
    """The issue's performance targets, each with its measured value and a verdict."""
    rows = []
    cpu, cuda = device == "cpu", device.startswith("cuda")
    config = conv_config(*COSINE_K9)[0]

    def add(name, value, ok, applies=True, note="", noisy=False):
        verdict = _verdict(ok if applies else None, noisy)
        rows.append(dict(target=name, measured=value, verdict=verdict, note=note))

    ours = _find(results, TARGET_SCOPE, config, "ours")
    dense = _find(results, TARGET_SCOPE, config, "dense", ours and ours.get("group"))
    vs_dense = [
        r
        for r in ratios([ours, dense] if ours and dense else [])
        if r["vs"] == "dense" and r["role"] == "ours"
    ]
    if vs_dense:
        t = vs_dense[0]
        speed = 1 / t["time"]
        mem = _ratio(ours["peak_mib"], dense["peak_mib"])
        add(
            "CPU: ConvNN2d(64,64,K=9,cosine,all) fwd+bwd on 8x64x64x64 >= 3x faster than dense",
            f"{speed:.2f}x, {1 / t['time_max']:.2f}-{1 / t['time_min']:.2f}x over "
            f"{t['rounds']} rounds (ours {ours['total_ms']:.0f} ms = fwd {ours['fwd_ms']:.0f} + "
            f"bwd {ours['bwd_ms']:.0f}; dense {dense['total_ms']:.0f} ms = fwd "
            f"{dense['fwd_ms']:.0f} + bwd {dense['bwd_ms']:.0f}; medians)",
            speed >= 3,
            cpu,
            "" if cpu else "a CPU target: measured here for reference",
            t["noisy"],
        )
        add(
            "CPU: same case, peak memory <= 1/4 of dense (above baseline)",
            f"{mem:.3f} (ours {ours['peak_mib']:.0f} MiB, dense {dense['peak_mib']:.0f} MiB)"
            if mem is not None
            else "n/a",
            mem is not None and mem <= 0.25,
            cpu,
        )
    sweep = [(side, _find(results, sweep_scope(side), config, "ours")) for side in SWEEP_SIDES]
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
                f"worst ours/{baseline} {format_ratio(time_stats(worst))} ({worst['scope']}, "
                f"{worst['config']})",
                all(r["time"] <= limit for r in rows),
                cuda,
                "" if cuda else "a CUDA goal: CPU ratios for reference",
                any(r["noisy"] for r in rows),
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
    """CPU, cores, memory, torch (and GPU, CUDA, Triton) versions and the git commit."""
    import torch

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
        native_topk=native.status(),
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        root = Path(__file__).resolve().parents[3]
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
            cells.append(str(r.get("rounds", r.get("repeats"))))
        else:
            cells = ["-", "-", "-", "-", f"{r['status']}: {r.get('reason', '')}"]
        rows.append([r["scope"], r["config"] or "-", r["role"], *cells])
    return rows


def ratio_rows(rows: list[dict]) -> list[list[str]]:
    return [
        [r["scope"], r["config"], f"{r['role']} / {r['vs']}", format_ratio(time_stats(r))]
        + [_fmt(r[k], 2) for k in ("fwd", "bwd", "memory")]
        for r in rows
    ]


def sweep_rows(results: list[dict]) -> list[list[str]]:
    config = conv_config(*COSINE_K9)[0]
    rows = []
    for side in SWEEP_SIDES:
        ours = _find(results, sweep_scope(side), config, "ours")
        if ours is None:
            continue
        dense = _find(results, sweep_scope(side), config, "dense")
        if dense is None:
            skip = [r for r in results if r["scope"] == sweep_scope(side) and r["role"] == "dense"]
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
    if "rounds" in data:
        parts.append(
            f"Timing: {data['rounds']} interleaved rounds of {data['reps']} training step(s) "
            f"per comparison, {data['threads']} thread(s); a ratio is the median of its "
            f"per-round ratios (range in brackets), 'noisy' when under {MIN_ROUNDS} rounds or "
            f"spread over {NOISY_SPREAD:g}x  "
        )
    loads = {}
    for key in ("load_before", "load_after"):
        loads[key] = [r[key] for r in data["results"] if r.get(key) is not None]
    if loads["load_before"]:
        before, after = loads["load_before"], loads["load_after"] or [math.nan]
        parts.append(
            f"1-min load average before / after each comparison: median "
            f"{statistics.median(before):.1f} / {statistics.median(after):.1f}, max "
            f"{max(before):.1f} / {max(after):.1f} (the benchmark alone keeps it near its thread "
            f"count, {hw.get('torch_threads')}; more means other work shared the machine)"
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
            "#### Ratios (interleaved rounds; < 1 = ours faster / smaller)",
            "",
            _table(
                [
                    "scope",
                    "config",
                    "ratio",
                    "time fwd+bwd: median (range)",
                    "fwd",
                    "bwd",
                    "peak memory",
                ],
                ratio_rows(data["ratios"]),
            ),
        ]
    parts += [
        "",
        "#### Cases (median ms over the rounds; peak MiB above the baseline)",
        "",
        _table(
            ["scope", "config", "role", "fwd ms", "bwd ms", "fwd+bwd ms", "peak MiB", "rounds"],
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
    atomic_write_text(path, text)
