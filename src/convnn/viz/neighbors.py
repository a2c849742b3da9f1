"""See which neighbours ConvNN layers pick.

:func:`collect_neighbors` records, for every ConvNN layer of a model, the neighbour indices
it selects on an input; :func:`neighbor_distances` measures how far (in input pixels) the
picked neighbours lie from their query, i.e. how local or global each layer behaves;
:func:`plot_neighbors` draws the picks of a few query positions over the input image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import ConvNN2d, ConvNNAttention


@dataclass(frozen=True)
class MapLayout:
    """A layer's input map of ``size`` (H, W), zero-padded by ``padding`` and queried at
    ``stride`` (pairs): the layer's neighbour indices count row-major in the padded map."""

    size: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)

    @property
    def H(self) -> int:
        return self.size[0]

    @property
    def W(self) -> int:
        return self.size[1]

    def queries(self) -> Tensor:
        """(N_out, 2) row, col of each query (the map's positions at the stride)."""
        rows = torch.arange(0, self.H, self.stride[0])
        cols = torch.arange(0, self.W, self.stride[1])
        return torch.cartesian_prod(rows, cols)

    def positions(self, indices: Tensor) -> Tensor:
        """(..., 2) row, col on the unpadded map of padded-map ``indices`` (padding lies
        outside the map)."""
        width = self.W + 2 * self.padding[1]
        return torch.stack(
            [indices // width - self.padding[0], indices % width - self.padding[1]], -1
        )


@dataclass
class LayerNeighbors:
    """The picks of one layer: indices (B, N_out, K) into its padded map ``grid``.

    For attention layers the indices of the first head are kept and ``prefix`` counts the
    leading tokens (such as a class token) that are not on the map.
    """

    name: str
    grid: MapLayout
    indices: Tensor
    prefix: int = 0

    def query_positions(self) -> Tensor:
        """(N_out, 2) row, col of each query on the unpadded map."""
        return self.grid.queries()

    def neighbor_positions(self) -> Tensor:
        """(B, N_out, K, 2) row, col of each neighbour on the map (padding lies outside)."""
        return self.grid.positions(self.indices - self.prefix)


def _attention_grid(module: ConvNNAttention, tokens: int, hw) -> tuple[MapLayout, int]:
    if hw is not None:
        return MapLayout(tuple(hw)), tokens - hw[0] * hw[1]
    side = math.isqrt(tokens)
    prefix = (
        tokens - side * side
        if side * side != tokens and math.isqrt(tokens - 1) ** 2 == tokens - 1
        else 0
    )
    side = math.isqrt(tokens - prefix)
    if side * side == tokens - prefix:
        return MapLayout((side, side)), prefix
    return MapLayout((1, tokens)), 0


@torch.no_grad()
def collect_neighbors(model: nn.Module, x: Tensor) -> list[LayerNeighbors]:
    """Run ``model(x)`` and record the neighbours every ConvNN layer selects."""
    records: list[LayerNeighbors] = []
    hooks = []

    def conv_hook(name):
        def hook(module: ConvNN2d, args, output):
            (inp,) = args[:1]
            _, idx = module.forward(inp, return_indices=True)
            H, W = inp.shape[-2:]
            grid = MapLayout((H, W), tuple(module.padding), tuple(module.stride))
            records.append(LayerNeighbors(name, grid, idx.cpu()))

        return hook

    def attention_hook(name):
        def hook(module: ConvNNAttention, args, kwargs, output):
            if module.K is None:  # full attention: every token is a neighbour
                return
            inp, hw = args[0], kwargs.get("hw", args[1] if len(args) > 1 else None)
            _, idx = module.forward(inp, hw=hw, return_indices=True)
            grid, prefix = _attention_grid(module, inp.shape[1], hw)
            idx = idx[:, 0, prefix:] if grid.H * grid.W != inp.shape[1] else idx[:, 0]
            records.append(LayerNeighbors(name, grid, idx.cpu(), prefix))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, ConvNN2d) and module.metric != "spatial":
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, ConvNNAttention) and module.qkv is not None:
            hooks.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return records


def neighbor_distances(record: LayerNeighbors) -> Tensor:
    """Chebyshev distance of every pick from its query on the layer's map: (B, N_out, K).

    A 3x3 convolution's picks lie at distance <= 1; attention's spread over the whole map.
    """
    q = record.query_positions()[None, :, None].float()
    n = record.neighbor_positions().float()
    return (n - q).abs().amax(-1)


def neighbor_table(records: list[LayerNeighbors]) -> str:
    """One line per layer: name, input map, K, distances of the picks and where they lie."""
    width = max(len("layer"), *(len(r.name) for r in records))
    lines = [
        f"{'layer':<{width}}  {'map':>7}  {'K':>4}  {'mean dist':>9}  {'max dist':>8}  "
        f"{'beyond 3x3':>10}  {'off map':>8}"
    ]
    for rec in records:
        pos = rec.neighbor_positions()
        inside = (pos >= 0).all(-1) & (pos[..., 0] < rec.grid.H) & (pos[..., 1] < rec.grid.W)
        # A class token has no position: its picks count as off the map, not as distances.
        d = neighbor_distances(rec)[rec.indices >= rec.prefix]
        mean, top = (d.mean().item(), d.max().item()) if d.numel() else (math.nan, math.nan)
        size = f"{rec.grid.H}x{rec.grid.W}"
        lines.append(
            f"{rec.name:<{width}}  {size:>7}  {rec.indices.shape[-1]:>4}  {mean:>9.2f}"
            f"  {top:>8.0f}  {(d > 1).float().mean().item():>10.1%}"
            f"  {(~inside).float().mean().item():>8.1%}"
        )
    lines.append(
        "dist: Chebyshev distance from each query to its picks, in cells of the layer's input "
        "map; off map: picks of the zero padding or of a class token"
    )
    return "\n".join(lines)


MAX_PANELS = 16  # layers drawn at most (a grid of up to 4 columns)
QUERY_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4")


def plot_neighbors(
    image: Tensor,
    records: list[LayerNeighbors],
    queries: list[tuple[float, float]] | None = None,
    path: str | os.PathLike | None = None,
    sample: int = 0,
    window: int | None = 3,
    title: str = "",
):
    """Draw each layer's picks for a few query points over ``image`` (C, H, W) in [0, 1].

    One panel per layer (a grid of up to 4 columns, at most :data:`MAX_PANELS`); ``queries``
    are (row, col) fractions of the map (default: the centre and two off-centre points), one
    colour each. Every marker has a black-and-white outline, so it stays visible on any image
    colour. A query is a star, its picks are dots; picks of the zero padding (off the map) are
    crosses in the ring drawn around the image; the dashed square is the ``window`` x
    ``window`` neighbourhood a convolution would use (None: not drawn). Returns the figure;
    saved to ``path`` when given.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from .curves import _figure, save_figure

    queries = queries or [(0.5, 0.5), (0.25, 0.25), (0.75, 0.7)]
    img = image.detach().float().cpu()
    img = (img.permute(1, 2, 0).squeeze(-1) if img.shape[0] in (1, 3) else img[0]).numpy()
    H, W = img.shape[:2]
    shown = records[:MAX_PANELS]
    cols = min(4, max(1, len(shown)))
    rows = -(-max(1, len(shown)) // cols)
    fig, _ = _figure(1, width=3.3 * cols, height=3.5 * rows + 0.6)
    fig.clear()
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    outline = dict(edgecolors="black", linewidths=1.2)
    halo = dict(c="white", edgecolors="none")
    for ax, rec in zip(axes, shown):
        gh, gw = rec.grid.H, rec.grid.W
        sy, sx = H / gh, W / gw
        ph, pw = rec.grid.padding
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, W, H, 0))
        ax.add_patch(Rectangle((0, 0), W, H, fill=False, lw=1, ec="0.4", ls=":"))
        qpos = rec.query_positions()
        nbrs = rec.neighbor_positions()[sample]
        on_map = rec.indices[sample] >= rec.prefix  # a class token has no place to draw
        stars = []  # drawn last, above every pick
        for (fr, fc), color in zip(queries, QUERY_COLORS):
            target = torch.tensor([fr * (gh - 1), fc * (gw - 1)])
            qi = int((qpos.float() - target).abs().sum(-1).argmin())
            pts = nbrs[qi][on_map[qi]].float()
            inside = (pts >= 0).all(-1) & (pts[:, 0] < gh) & (pts[:, 1] < gw)
            for keep, marker, size in ((inside, "o", 36), (~inside, "X", 44)):
                ys = ((pts[keep, 0] + 0.5) * sy).numpy()
                xs = ((pts[keep, 1] + 0.5) * sx).numpy()
                ax.scatter(xs, ys, s=size * 2.2, marker=marker, **halo)
                ax.scatter(xs, ys, s=size, marker=marker, c=color, **outline)
            qy, qx = qpos[qi].float().tolist()
            if window:
                r = window // 2
                corner = ((qx - r) * sx, (qy - r) * sy)
                box = Rectangle(corner, window * sx, window * sy, fill=False, lw=1.4, ls="--")
                box.set_edgecolor(color)
                ax.add_patch(box)
            stars.append(((qx + 0.5) * sx, (qy + 0.5) * sy, color))
        for x, y, color in stars:
            ax.scatter([x], [y], s=320, marker="*", zorder=4, **halo)
            ax.scatter([x], [y], s=160, marker="*", c=color, zorder=5, **outline)
        d = neighbor_distances(rec)[sample][on_map]
        mean_d = d.float().mean().item() if d.numel() else math.nan
        ax.set_title(
            f"{rec.name}\n{gh}x{gw} map, K={rec.indices.shape[-1]}, mean dist {mean_d:.1f}",
            fontsize=8,
        )
        ax.set_xlim(-(pw + 0.5) * sx, W + (pw + 0.5) * sx)
        ax.set_ylim(H + (ph + 0.5) * sy, -(ph + 0.5) * sy)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(shown) :]:
        ax.axis("off")
    gray = "0.5"
    handles = [
        Line2D([], [], ls="", marker="*", ms=11, mfc=gray, mec="black", label="query"),
        Line2D([], [], ls="", marker="o", ms=6, mfc=gray, mec="black", label="picked neighbour"),
        Line2D([], [], ls="", marker="X", ms=7, mfc=gray, mec="black", label="pick off the map"),
    ]
    if window:
        handles.append(
            Line2D([], [], ls="--", color=gray, label=f"{window}x{window} window of a convolution")
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    more = f" (first {MAX_PANELS} of {len(records)} layers)" if len(records) > MAX_PANELS else ""
    fig.suptitle((title or "neighbours each layer picks") + more, fontsize=10)
    if path:
        save_figure(fig, path, dpi=120)
    return fig
