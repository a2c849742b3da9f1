"""Run directories: where a run goes, whether it resumes, what a resume may change, and the
files it writes.

Layout (``<output.dir>/<output.name or model-layer-dataset-timestamp>``)::

    config.yaml                       resolved configuration
    metrics.csv                       one row per epoch (see METRIC_COLUMNS)
    curves.png                        learning curves
    checkpoint.safetensors            last state (weights, optimizer, scheduler, RNG, EMA, history)
    checkpoint-epoch<E>.safetensors   the last ``output.keep_checkpoints`` epochs' states
    best.safetensors                  weights of the epoch with the best validation accuracy
    summary.json                      test accuracy of the best-validation weights, params, ...
    seeds.json                        with --seeds: every seed's result and their mean +- std
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text
from .checkpoint import CheckpointError
from .config import Config, ConfigError, save_config

__all__ = [
    "BEST",
    "CHECKPOINT",
    "RunDir",
    "check_folder",
    "config_changes",
    "default_run_name",
    "refused_changes",
    "resolve_run_dir",
]

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
HISTORY = "checkpoint-epoch{epoch}.safetensors"
_HISTORY_RE = re.compile(r"checkpoint-epoch(\d+)\.safetensors")

# What a resumed run cannot change, and why. Every other setting is applied from the resume on
# (learning rate and schedule, weight decay, augmentation, epochs, ...).
REFUSED_ON_RESUME = {
    "model.": "the checkpoint's architecture",
    "data.dataset": "the data the run trains on",
    "data.val_size": "the validation split that selected the best epoch",
    "optim.name": "the optimizer state in the checkpoint",
    "optim.decay_norm_and_bias": "the optimizer's parameter groups in the checkpoint",
    "train.seed": "the run's randomness (start a new run for another seed)",
}


def default_run_name(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.model.name}-{cfg.model.layer}-{cfg.data.dataset}-{stamp}"


def check_folder(path: Path, what: str) -> None:
    """``path`` is a folder or can be made one: the nearest existing part of it is a folder."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                which = "is a file" if part == path else f"lies inside the file {str(part)!r}"
                raise ConfigError(
                    f"{what} must be a folder (created when missing), got {str(path)!r}, "
                    f"which {which}"
                )
            return


def _new_run_dir(cfg: Config) -> Path:
    out = Path(cfg.output.dir)
    run_dir = out / (cfg.output.name or default_run_name(cfg))
    if not cfg.output.name:
        n = 1
        while run_dir.exists():
            run_dir = out / f"{default_run_name(cfg)}-{n}"
            n += 1
    return run_dir


def _latest_run(cfg: Config) -> Path | None:
    """The run ``--resume`` without a path continues: the one named by ``output.name``, else
    the newest ``model-layer-dataset-*`` run under ``output.dir``; None when there is none."""
    out = Path(cfg.output.dir)
    if cfg.output.name:
        return out / cfg.output.name if (out / cfg.output.name).exists() else None
    prefix = f"{cfg.model.name}-{cfg.model.layer}-{cfg.data.dataset}-"
    found = sorted(
        (p for p in out.glob(prefix + "*") if (p / "config.yaml").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def resolve_run_dir(cfg: Config, resume: str | None) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None).

    ``resume``: None (new run), ``"auto"`` (the run named by ``output.name``, else the newest
    ``model-layer-dataset-*`` run under ``output.dir``; a new run when there is none, so that a
    job script can always pass ``--resume``) or a run directory / checkpoint file, which must
    exist.
    """
    if resume not in (None, "auto"):
        path = Path(resume)
        if path.is_file():
            return path.parent, path
        if not path.is_dir():
            raise CheckpointError(
                f"--resume expects a run directory or checkpoint, got {resume!r}, which does "
                "not exist; pass --resume without a path to continue the latest run"
            )
        run_dir = path
    else:
        check_folder(Path(cfg.output.dir), "output.dir (--out-dir)")
        run_dir = _latest_run(cfg) if resume == "auto" else None
        if run_dir is None:
            run_dir = _new_run_dir(cfg)
            if (run_dir / CHECKPOINT).exists():
                raise ConfigError(
                    f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume "
                    "to continue it, or set output.name to start a new run"
                )
    check_folder(run_dir, "the run directory (output.dir/output.name)")
    ckpt = run_dir / CHECKPOINT
    return run_dir, (ckpt if ckpt.exists() else None)  # None: new, or killed before a checkpoint


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every setting that differs (``output.*`` aside)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "layer_kwargs":
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b and not (prefix + key).startswith("output."):
            changes.append((prefix + key, a, b))
    return changes


def refused_changes(changes: list[tuple[str, Any, Any]]) -> list[str]:
    """The changes a resume cannot apply, each with the reason."""
    refused = []
    for key, a, b in changes:
        why = next((w for k, w in REFUSED_ON_RESUME.items() if key.startswith(k)), None)
        if why is not None:
            refused.append(f"{key}: {a!r} -> {b!r} (it would change {why})")
    return refused


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes)


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (only rank 0 writes them)."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST

    def prepare(self, cfg: Config) -> None:
        """Create the folder, drop temporary files of a process killed mid-write, save the
        resolved config."""
        os.makedirs(self.path, exist_ok=True)
        for stale in self.path.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        save_config(cfg, self.path / "config.yaml")

    def write_history(self, rows: list[dict], title: str, plot: bool = True) -> None:
        """metrics.csv, and with ``plot`` curves.png titled ``title`` (when matplotlib is
        there)."""
        from .metrics import write_metrics_csv

        write_metrics_csv(self.path / "metrics.csv", rows)
        if not rows or not plot:
            return
        try:
            from convnn.viz.curves import plot_curves
        except ImportError:  # matplotlib is optional
            return
        plot_curves(rows, self.path / "curves.png", title=title)

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def keep_history(self, epoch: int, keep: int) -> None:
        """Keep the epoch's checkpoint as checkpoint-epoch<E> and only the last ``keep`` such
        files (0: none)."""
        if keep > 0:
            target = self.path / HISTORY.format(epoch=epoch)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.checkpoint, tmp)  # the same bytes, no second write
            except OSError:  # a file system without hard links
                tmp.write_bytes(self.checkpoint.read_bytes())
            os.replace(tmp, target)
        kept = sorted(
            (int(m.group(1)), p)
            for p in self.path.glob("checkpoint-epoch*.safetensors")
            if (m := _HISTORY_RE.fullmatch(p.name))
        )
        for _, old in kept[: max(0, len(kept) - keep)]:
            old.unlink(missing_ok=True)
