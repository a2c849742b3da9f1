"""Plots a person can read: titles, integer epochs, log loss axes, seed bands, neighbour grids."""

from __future__ import annotations

import math

import pytest
import torch

from convnn.viz.curves import Series, plot_comparison, plot_curves


def _rows(epochs: int, spike: float | None = None, shift: float = 0.0) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append(
            dict(
                epoch=e,
                train_loss=2.0 / e + shift,
                train_acc=0.5 + 0.1 * e + shift,
                val_loss=2.2 / e,
                val_acc=0.45 + 0.1 * e + shift,
            )
        )
    if spike is not None:
        rows[1]["val_loss"] = spike
    return rows


def _drawn(fig):
    fig.canvas.draw()
    return fig.axes


def test_curves_have_integer_epochs_a_title_and_a_log_axis_for_a_spike():
    fig = plot_curves(_rows(3), None, title="run: small_cnn conv on digits")
    ax_loss, ax_acc = _drawn(fig)
    assert fig._suptitle.get_text() == "run: small_cnn conv on digits"
    for ax in (ax_loss, ax_acc):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert ax_loss.get_yscale() == "linear"
    # One diverging validation epoch: the loss axis turns logarithmic, the others stay visible.
    ax_loss = _drawn(plot_curves(_rows(3, spike=5000.0), None))[0]
    assert ax_loss.get_yscale() == "log" and "log scale" in ax_loss.get_ylabel()


def test_comparison_draws_seeds_as_a_mean_and_a_band():
    seeds = [_rows(4, shift=0.0), _rows(4, shift=0.02), _rows(4, shift=-0.01)]
    fig = plot_comparison(
        [Series("conv", seeds), Series("convnn", [_rows(4, shift=0.05)])], None, "t on digits"
    )
    ax_acc, ax_loss = _drawn(fig)
    assert [line.get_label() for line in ax_acc.lines] == [
        "conv (mean +- std, 3 seeds)",
        "convnn",
    ]
    (band,) = ax_acc.collections  # one band: the group of seeds
    mean = ax_acc.lines[0].get_ydata()
    values = [[r["val_acc"] for r in rows] for rows in seeds]
    expected = [sum(v) / 3 for v in zip(*values)]
    assert list(mean) == pytest.approx(expected)
    top = band.get_paths()[0].vertices[:, 1].max()
    std = math.sqrt(sum((v - expected[-1]) ** 2 for v in [r[-1] for r in values]) / 2)
    assert top == pytest.approx(max(m + std for m in expected), abs=0.03)
    assert fig._suptitle.get_text() == "t on digits"


def test_neighbour_grid_outlines_off_map_picks_and_legend():
    from convnn.viz.neighbors import LayerNeighbors, MapLayout, plot_neighbors

    # Seven layers (the issue's --layers layer1 layer4 case): a grid, not a strip.
    records = []
    for i in range(7):
        side = 8 if i < 4 else 1
        pad = 1
        layout = MapLayout((side, side), (pad, pad))
        width = side + 2 * pad
        # Each query picks its 3x3 padded neighbourhood: on a 1x1 map, 8 of 9 are padding.
        idx = []
        for r in range(side):
            for c in range(side):
                idx.append([(r + dr) * width + (c + dc) for dr in range(3) for dc in range(3)])
        records.append(LayerNeighbors(f"layer{i}", layout, torch.tensor([idx])))
    image = torch.zeros(3, 8, 8)
    image[0] = 1.0  # a red image: red markers must stay visible (outlined)
    fig = plot_neighbors(image, records, queries=[(0.5, 0.5)], title="picks")
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 7
    rows = {round(ax.get_position().y0, 3) for ax in axes}
    assert len(rows) == 2  # 4 + 3 panels
    width, height = fig.get_size_inches()
    assert width <= 14 and height <= 8.5
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "query",
        "picked neighbour",
        "pick off the map",
        "3x3 window of a convolution",
    ]
    # On the 1x1 maps the 8 padding picks are drawn (as crosses), outlined in black.
    off = [c for c in axes[-1].collections if len(c.get_offsets()) == 8]
    assert off and all((c.get_edgecolor()[:, :3] == 0).all() for c in off[1::2])
    assert "picks" in fig._suptitle.get_text()
