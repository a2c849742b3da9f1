"""``convnn sweep``: a grid of configurations x seeds through the ordinary training runner.

A grid is ``KEY=V1,V2,...`` items over any config key; ``layer.X`` is short for
``model.layer_kwargs.X``. Every point of the grid (every combination of the items' values) is
trained with every seed into an ordinary run directory of the sweep folder
(``<output.dir>/<name>/<point>-seed<k>``), so ``convnn compare`` and ``convnn inspect`` work on
them. The whole grid is checked before anything trains; finished runs are skipped and
interrupted ones resumed, so the same command continues a sweep. The sweep folder then holds::

    sweep.json   the grid, the seeds and the base config
    sweep.csv    per point: its values, seeds, mean and std of the validation-selected test
                 accuracy (and of the best validation accuracy), parameters, img/s, warnings
    sweep.md     the same as a Markdown table (mean +- std)
    sweep.png    test accuracy per point: mean +- std, one dot per seed
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text, mean_std
from .config import Config, ConfigError, load_config

__all__ = ["ALIASES", "Point", "expand_grid", "parse_grid", "run_sweep", "sweep_table"]

ALIASES = {"layer.": "model.layer_kwargs."}


@dataclass(frozen=True)
class Point:
    """One configuration of the grid: (key, value as written) pairs in grid order."""

    items: tuple[tuple[str, str], ...]

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={raw}" for key, raw in self.items]

    @property
    def tag(self) -> str:
        """A folder-safe name: ``metric-cosine_K-4``."""
        parts = [f"{key.rpartition('.')[2]}-{raw}" for key, raw in self.items]
        return re.sub(r"[^A-Za-z0-9._+-]+", "", "_".join(parts)) or "base"

    def label(self) -> str:
        return ", ".join(f"{key.rpartition('.')[2]}={raw}" for key, raw in self.items)


def _split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ``['a', 'b', '[1, 2]']``: commas inside brackets or braces belong to
    the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["layer.metric=cosine,euclidean", "optim.lr=1e-3,3e-4"]`` -> keys (aliases
    resolved) with their values as written."""
    grid = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(
                f"--grid expects KEY=V1,V2,... (e.g. layer.metric=cosine,euclidean), got {item!r}"
            )
        for short, full in ALIASES.items():
            if key.startswith(short):
                key = full + key[len(short) :]
        values = _split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r} has an empty value; expected KEY=V1,V2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r} repeats a value")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid names {key!r} twice; give all its values in one item")
        grid.append((key, values))
    return grid


def expand_grid(grid: list[tuple[str, list[str]]]) -> list[Point]:
    """Every combination of the grid's values (the last key varies fastest)."""
    keys = [key for key, _ in grid]
    return [Point(tuple(zip(keys, combo))) for combo in itertools.product(*(v for _, v in grid))]


def _config(base, overrides, point: Point, seed: int, folder: Path) -> Config:
    return load_config(
        base,
        [
            *overrides,
            *point.overrides,
            f"train.seed={seed}",
            f"output.dir={folder}",
            f"output.name={point.tag}-seed{seed}",
        ],
    )


def check_grid(base, overrides: list[str], points: list[Point], folder: Path) -> None:
    """Every point's config, its values and its model options, before anything trains."""
    from .engine import check_model_config

    tags = [p.tag for p in points]
    if len(set(tags)) != len(tags):
        raise ConfigError("two points of the grid give the same run name; use distinct values")
    for point in points:
        try:
            check_model_config(_config(base, overrides, point, 0, folder))
        except ConfigError as e:
            raise ConfigError(f"grid point {point.label()}: {e}") from None


def default_name(cfg: Config, grid_items: list[str], seeds: list[int]) -> str:
    """``sweep-<model>-<dataset>-<hash of the grid>``: the same command resumes the sweep."""
    digest = hashlib.sha256(repr((sorted(grid_items), seeds)).encode()).hexdigest()[:8]
    return f"sweep-{cfg.model.name}-{cfg.data.dataset}-{digest}"


def _load_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status", "finished") == "finished" else None


def run_sweep(
    base: str | None,
    overrides: list[str],
    grid_items: list[str],
    seeds: list[int],
    *,
    name: str | None = None,
    progress: bool = True,
) -> tuple[Path, list[dict]]:
    """Train the grid x seeds (skipping finished runs) and write the table and the plot.

    Returns (sweep folder, table rows)."""
    from .distributed import cleanup, init_distributed, say
    from .rundir import CHECKPOINT
    from .runner import run_training

    probe = load_config(base, overrides)
    grid = parse_grid(grid_items)
    points = expand_grid(grid)
    folder = Path(probe.output.dir) / (name or default_name(probe, grid_items, seeds))
    check_grid(base, overrides, points, folder)
    dist_info = init_distributed(probe.train.device)
    if dist_info.enabled:
        raise ConfigError("convnn sweep runs in one process; use convnn train under torchrun")
    spec = {
        "base": str(base) if base else None,
        "overrides": overrides,
        "grid": grid,
        "seeds": seeds,
    }
    atomic_write_text(folder / "sweep.json", json.dumps(spec, indent=2) + "\n")
    runs = [(point, seed) for point in points for seed in seeds]
    say(
        dist_info,
        f"sweep {folder}: {len(points)} configurations x {len(seeds)} seeds = {len(runs)} runs",
    )
    results: dict[tuple[Point, int], dict] = {}
    from tqdm import tqdm

    bar = tqdm(runs, desc="sweep", unit="run", file=sys.stderr, disable=not progress)
    try:
        for point, seed in bar:
            cfg = _config(base, overrides, point, seed, folder)
            run_dir = folder / cfg.output.name
            bar.set_postfix_str(cfg.output.name)
            done = _load_summary(run_dir)
            if done is not None:
                say(dist_info, f"{cfg.output.name}: finished before, skipped")
                results[point, seed] = done
                continue
            resume = "auto" if (run_dir / CHECKPOINT).exists() else None  # interrupted: resume
            try:
                results[point, seed] = run_training(cfg, resume=resume, dist_info=dist_info)
            except FloatingPointError as e:  # recorded as diverged; the sweep goes on
                say(dist_info, f"{cfg.output.name}: diverged ({e})")
                results[point, seed] = {"status": "diverged", "warnings": [str(e)]}
    finally:
        bar.close()
        cleanup()
    rows = sweep_table(grid, points, seeds, results)
    _write_outputs(folder, grid, rows, probe)
    say(dist_info, (folder / "sweep.md").read_text().rstrip())
    say(
        dist_info,
        f"table: {folder / 'sweep.csv'}, {folder / 'sweep.md'}; plot: {folder / 'sweep.png'}",
    )
    return folder, rows


def sweep_table(grid, points: list[Point], seeds: list[int], results: dict) -> list[dict]:
    """One row per point: its values and the mean +- std of its seeds' results."""
    rows = []
    for point in points:
        runs = [results[point, seed] for seed in seeds]
        finished = [r for r in runs if r.get("status", "finished") == "finished"]
        row: dict[str, Any] = {key: raw for key, raw in point.items}
        row["point"] = point.label()
        row["seeds"] = len(finished)
        row["diverged"] = len(runs) - len(finished)
        for key in ("test_acc", "best_val_acc"):
            values = [r[key] for r in finished if r.get(key) is not None]
            mean, std = mean_std(values)
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            row[f"{key}_all"] = values
        row["params"] = finished[0]["params"] if finished else None
        rates = [r["train_img_per_s"] for r in finished if r.get("train_img_per_s")]
        row["train_img_per_s"] = sum(rates) / len(rates) if rates else math.nan
        row["warnings"] = sum(len(r.get("warnings", [])) for r in runs)
        row["runs"] = [f"{point.tag}-seed{seed}" for seed in seeds]
        rows.append(row)
    return rows


def _pct(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.2f} +- {100 * std:.2f}"


def _write_outputs(folder: Path, grid, rows: list[dict], cfg: Config) -> None:
    keys = [key for key, _ in grid]
    columns = [
        *keys,
        "seeds",
        "diverged",
        "test_acc_mean",
        "test_acc_std",
        "best_val_acc_mean",
        "best_val_acc_std",
        "params",
        "train_img_per_s",
        "warnings",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    atomic_write_text(folder / "sweep.csv", buf.getvalue())

    short = [key.rpartition(".")[2] for key in keys]
    header = [*short, "test acc %", "best val acc %", "seeds", "params", "img/s", "warnings"]
    lines = [
        f"Sweep of {cfg.model.name} ({cfg.model.layer}) on {cfg.data.dataset}: test accuracy "
        "of the validation-selected weights, mean +- std over seeds",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [
            *(str(row[k]) for k in keys),
            _pct(row["test_acc_mean"], row["test_acc_std"]),
            _pct(row["best_val_acc_mean"], row["best_val_acc_std"]),
            str(row["seeds"]) + (f" ({row['diverged']} diverged)" if row["diverged"] else ""),
            f"{row['params']:,}" if row["params"] else "-",
            "-" if math.isnan(row["train_img_per_s"]) else f"{row['train_img_per_s']:.0f}",
            str(row["warnings"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(folder / "sweep.md", "\n".join(lines) + "\n")
    try:
        from convnn.viz.curves import plot_points
    except ImportError:  # matplotlib is optional
        return
    title = (
        f"{cfg.model.name} ({cfg.model.layer}) on {cfg.data.dataset}: sweep of {', '.join(short)}"
    )
    plot_points(
        [(row["point"], row["test_acc_all"]) for row in rows],
        folder / "sweep.png",
        xlabel="test accuracy of the validation-selected weights",
        title=title,
    )
