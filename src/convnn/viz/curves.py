"""Learning curves of one run and comparison plots of several (matplotlib, no GUI backend).

Epoch axes have integer ticks; a loss axis turns logarithmic when its values span more than
:data:`LOG_SPAN` (one diverging epoch would otherwise flatten every other point); runs that
differ only by their seed are drawn as their mean with a +- one standard deviation band.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..utils import atomic_write_bytes, mean_std

__all__ = ["Series", "plot_comparison", "plot_curves", "plot_points", "save_figure"]

LOG_SPAN = 30.0  # max / min of a loss axis beyond which it is drawn on a log scale


@dataclass
class Series:
    """One line of a comparison: a label and the ``metrics.csv`` rows of one or more runs
    (several: the seeds of one configuration, drawn as mean +- std)."""

    label: str
    runs: Sequence[Sequence[dict]]


def _figure(ncols: int, width: float = 5.0, height: float = 3.8):
    # Figure + Agg canvas directly: no pyplot state, no change to the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A figure as a PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if _finite(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _mean_std(runs: Sequence[Sequence[dict]], key: str):
    """(epochs, mean, std) over the runs at each epoch every run reached."""
    per_run = [dict(zip(*_series(rows, key))) for rows in runs]
    epochs = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    stats = [mean_std([r[e] for r in per_run]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _style_axis(ax, ylabel: str, loss: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if loss:
        values = [v for line in ax.lines for v in line.get_ydata() if _finite(v) and v > 0]
        if values and max(values) / min(values) > LOG_SPAN:
            ax.set_yscale("log")
            ax.set_ylabel(f"{ylabel} (log scale)")
    if ax.lines:
        ax.legend(fontsize="small")


def plot_curves(rows: Sequence[dict], path: str | os.PathLike | None, title: str = ""):
    """Loss and accuracy per epoch (train and validation) from ``metrics.csv`` rows; returns
    the figure, saved to ``path`` when given."""
    fig, (ax_loss, ax_acc) = _figure(2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-"), ("val", "--")):
            xs, ys = _series(rows, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, style, marker="o", markersize=3, label=split)
        _style_axis(ax, "accuracy" if metric == "acc" else "loss", loss=metric == "loss")
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_comparison(series: Sequence[Series], path: str | os.PathLike | None, title: str = ""):
    """Validation accuracy and training loss per epoch, one line per series; a series of
    several runs is their mean with a +- std band. Returns the figure, saved to ``path`` when
    given."""
    fig, (ax_acc, ax_loss) = _figure(2)
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        label = s.label if len(s.runs) == 1 else f"{s.label} (mean +- std, {len(s.runs)} seeds)"
        for ax, key in ((ax_acc, "val_acc"), (ax_loss, "train_loss")):
            xs, mean, std = _mean_std(s.runs, key)
            if not xs:
                continue
            ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
            if len(s.runs) > 1:
                low = [m - d for m, d in zip(mean, std)]
                ax.fill_between(xs, low, [m + d for m, d in zip(mean, std)], color=color, alpha=0.2)
    _style_axis(ax_acc, "validation accuracy", loss=False)
    _style_axis(ax_loss, "training loss", loss=True)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_points(
    points: Sequence[tuple[str, Sequence[float]]],
    path: str | os.PathLike | None,
    xlabel: str,
    title: str = "",
):
    """One row per labelled group of values (a configuration's seeds): a bar at their mean,
    a +- std error bar and a dot per value. Returns the figure, saved to ``path`` if given."""
    height = 1.2 + 0.45 * len(points)
    fig, (ax,) = _figure(1, width=7.5, height=height)
    for i, (_, values) in enumerate(points):
        values = [v for v in values if _finite(v)]
        if not values:
            continue
        mean, std = mean_std(values)
        ax.barh(i, mean, xerr=std, color=f"C{i % 10}", alpha=0.6, capsize=4)
        ax.scatter(values, [i] * len(values), color="black", s=14, zorder=3)
    ax.set_yticks(range(len(points)), [label for label, _ in points], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig
