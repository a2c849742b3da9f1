"""``convnn compare``: a side-by-side table of run directories and a comparison plot."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import yaml

from ..utils import unique_path
from .config import ConfigError
from .metrics import format_mean_std, read_metrics_csv

__all__ = ["compare_runs", "default_title", "format_table", "load_run", "seed_groups"]


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


SEED_SUFFIX = re.compile(r"(.+)-seed\d+")


def seed_groups(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by configuration: those named ``<name>-seed<k>`` share ``<name>``; any other run
    is a group of its own. Order of first appearance."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        m = SEED_SUFFIX.fullmatch(run["dir"].name)
        groups[m.group(1) if m else run["dir"].name].append(run)
    return dict(groups)


def _seed_lines(groups: dict[str, list[dict]]) -> str:
    """mean +- std lines for groups of several seeds."""
    lines = []
    for name, runs in groups.items():
        accs = [r["summary"]["test_acc"] for r in runs if r["summary"].get("test_acc") is not None]
        if len(accs) > 1:
            lines.append(f"{name}: test acc {format_mean_std(accs)} % over {len(accs)} seeds")
    return "\n".join(lines)


def default_title(runs: list[dict]) -> str:
    """'model layer vs layer on dataset', from the runs' configs."""

    def distinct(values):
        return list(dict.fromkeys(values))

    models = distinct(r["config"].get("model", {}).get("name", "?") for r in runs)
    layers = distinct(r["config"].get("model", {}).get("layer", "?") for r in runs)
    datasets = distinct(r["config"].get("data", {}).get("dataset", "?") for r in runs)
    what = " vs ".join(models) if len(models) > 1 else models[0]
    return f"{what}: {' vs '.join(layers)} on {', '.join(datasets)}"


def compare_runs(
    paths: list[str], out: str | os.PathLike | None = None, title: str | None = None
) -> tuple[str, Path | None]:
    """(table text, plot path).

    The plot goes to ``out`` (replaced if it exists), else to ``compare.png`` beside the runs,
    or ``compare-2.png``, ... when that exists: a second comparison never overwrites the
    first. Runs that differ only by their seed are drawn as mean +- std.
    """
    runs = [load_run(p) for p in paths]
    text = format_table(HEADER, [_row(r) for r in runs])
    groups = seed_groups(runs)
    lines = _seed_lines(groups)
    if lines:
        text += "\n" + lines
    try:
        from convnn.viz.curves import Series, plot_comparison
    except ImportError:  # matplotlib is optional
        return text, None
    if out is None:
        parents = {r["dir"].resolve().parent for r in runs}
        folder = parents.pop() if len(parents) == 1 else Path.cwd()
        out = unique_path(folder / "compare.png")
    series = [Series(name, [r["rows"] for r in group]) for name, group in groups.items()]
    plot_comparison(series, out, title=title or default_title(runs))
    return text, Path(out)
