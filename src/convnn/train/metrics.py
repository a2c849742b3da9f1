"""Accuracy, running averages, ``metrics.csv`` and mean +- std over seeds."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence

import torch

from ..utils import atomic_write_text, mean_std

__all__ = [
    "METRIC_COLUMNS",
    "Meter",
    "correct_count",
    "format_mean_std",
    "mean_std",
    "read_metrics_csv",
    "write_metrics_csv",
]

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_acc5",
    "lr",
    "epoch_time_s",
    "img_per_s",
)


def correct_count(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> int:
    """Number of top-``k`` hits (k is capped at the class count); ``labels`` may be class
    indices or soft targets."""
    if labels.ndim == 2:
        labels = labels.argmax(dim=1)
    if k == 1:
        return int((logits.argmax(dim=1) == labels).sum())
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


class Meter:
    """Sums of loss, hits and samples (kept as plain floats so they checkpoint as JSON)."""

    def __init__(self, loss: float = 0.0, correct: float = 0.0, count: float = 0.0) -> None:
        self.loss, self.correct, self.count = loss, correct, count

    def update(self, loss_sum: float, correct: float, count: float) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.count += count

    @property
    def avg_loss(self) -> float:
        return self.loss / self.count if self.count else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    def state(self) -> list[float]:
        return [self.loss, self.correct, self.count]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def write_metrics_csv(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write the whole per-epoch history atomically (rewritten each epoch, so resume is exact)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in METRIC_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of ``metrics.csv`` with numbers parsed (empty cells become NaN)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            parsed: dict = {}
            for key, value in row.items():
                if key == "epoch":
                    parsed[key] = int(value)
                else:
                    parsed[key] = float(value) if value not in ("", None) else float("nan")
            rows.append(parsed)
    return rows


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``[0.91, 0.93]`` -> ``"92.00 +- 1.41"`` (percent by default)."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} +- {std * scale:.{digits}f}"
