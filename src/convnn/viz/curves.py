"""Learning curves of one run and comparison plots of several (matplotlib, no GUI backend)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from ..utils import atomic_write_bytes

__all__ = ["plot_comparison", "plot_curves"]


def _figure(ncols: int):
    # Figure + Agg canvas directly: no pyplot state, no change to the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch (train and validation) from ``metrics.csv`` rows."""
    fig, (ax_loss, ax_acc) = _figure(2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-"), ("val", "--")):
            xs, ys = _series(rows, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, style, marker="o", markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_comparison(
    runs: Sequence[tuple[str, Sequence[dict]]], path: str | os.PathLike, title: str = ""
) -> None:
    """Validation accuracy and training loss per epoch of several runs, one line each."""
    fig, (ax_acc, ax_loss) = _figure(2)
    for label, rows in runs:
        for ax, key in ((ax_acc, "val_acc"), (ax_loss, "train_loss")):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_acc.set_ylabel("validation accuracy")
    ax_loss.set_ylabel("training loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path)
