"""``convnn compare``: a side-by-side table of run directories and a comparison plot."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import yaml

from .config import ConfigError
from .metrics import format_mean_std, read_metrics_csv

__all__ = ["compare_runs", "format_table", "load_run"]


def load_run(path: str | os.PathLike) -> dict:
    """What a run directory holds: config, summary (if finished) and the per-epoch rows."""
    run = Path(path)
    if not (run / "config.yaml").exists():
        raise ConfigError(f"{str(run)!r} is not a run directory (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics_path = run / "metrics.csv"
    rows = read_metrics_csv(metrics_path) if metrics_path.exists() else []
    return {"dir": run, "config": cfg, "summary": summary, "rows": rows}


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def _row(run: dict) -> list[str]:
    cfg, s, rows = run["config"], run["summary"], run["rows"]
    val = [r["val_acc"] for r in rows if r["val_acc"] == r["val_acc"]]
    params = s.get("params")
    rate = s.get("train_img_per_s")
    seconds = s.get("train_time_s", sum(r["epoch_time_s"] for r in rows))
    return [
        run["dir"].name,
        cfg.get("model", {}).get("name", "?"),
        cfg.get("model", {}).get("layer", "?"),
        f"{params:,}" if params else "-",
        _pct(s.get("best_val_acc", max(val) if val else None)),
        _pct(s.get("test_acc")) + ("" if s else " (running)"),
        f"{rate:.0f}" if rate else "-",
        f"{seconds:.0f}s",
    ]


HEADER = ["run", "model", "layer", "params", "best val %", "test %", "img/s", "time"]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _seed_groups(runs: list[dict]) -> str:
    """mean +- std lines for runs that differ only by their ``-seed<k>`` suffix."""
    groups: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        m = re.fullmatch(r"(.+)-seed\d+", run["dir"].name)
        if m and run["summary"].get("test_acc") is not None:
            groups[m.group(1)].append(run["summary"]["test_acc"])
    lines = [
        f"{name}: test acc {format_mean_std(accs)} % over {len(accs)} seeds"
        for name, accs in groups.items()
        if len(accs) > 1
    ]
    return "\n".join(lines)


def compare_runs(
    paths: list[str], out: str | os.PathLike | None = None, title: str | None = None
) -> tuple[str, Path | None]:
    """(table text, plot path). The plot goes to ``out`` or ``compare.png`` beside the runs."""
    runs = [load_run(p) for p in paths]
    text = format_table(HEADER, [_row(r) for r in runs])
    groups = _seed_groups(runs)
    if groups:
        text += "\n" + groups
    if out is None:
        parents = {r["dir"].resolve().parent for r in runs}
        out = (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare.png"
    try:
        from convnn.viz.curves import plot_comparison
    except ImportError:
        return text, None
    labels = [f"{r['dir'].name}" for r in runs]
    plot_comparison(list(zip(labels, (r["rows"] for r in runs))), out, title=title or "")
    return text, Path(out)
