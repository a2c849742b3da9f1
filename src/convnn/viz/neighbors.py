"""See which neighbours ConvNN layers pick.

:func:`collect_neighbors` records, for every ConvNN layer of a model, the neighbour indices
it selects on an input; :func:`neighbor_distances` measures how far (in input pixels) the
picked neighbours lie from their query, i.e. how local or global each layer behaves;
:func:`plot_neighbors` draws the picks of a few query positions over the input image.
"""

from __future__ import annotations

import math
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


def plot_neighbors(
    image: Tensor,
    records: list[LayerNeighbors],
    queries: list[tuple[float, float]] | None = None,
    path: str | None = None,
    sample: int = 0,
):
    """Draw each layer's picks for a few query points over ``image`` (C, H, W) in [0, 1].

    queries are (row, col) fractions of the map (default: centre and two corners' thirds).
    Returns the matplotlib figure; saved to ``path`` when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = queries or [(0.5, 0.5), (0.25, 0.25), (0.75, 0.7)]
    colors = ["tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple"]
    img = image.detach().float().cpu()
    img = img.permute(1, 2, 0).squeeze(-1) if img.shape[0] in (1, 3) else img[0]
    img = img.numpy()  # matplotlib wants arrays, not tensors
    H, W = img.shape[:2]
    cols = max(1, len(records))
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), squeeze=False)
    for ax, rec in zip(axes[0], records):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, W, H, 0))
        gh, gw = rec.grid.H, rec.grid.W
        sy, sx = H / gh, W / gw
        qpos = rec.query_positions()
        nbrs = rec.neighbor_positions()[sample]
        for (fr, fc), color in zip(queries, colors):
            target = torch.tensor([fr * (gh - 1), fc * (gw - 1)])
            qi = int(((qpos.float() - target).abs().sum(-1)).argmin())
            pts = nbrs[qi].float().numpy()
            ax.scatter((pts[:, 1] + 0.5) * sx, (pts[:, 0] + 0.5) * sy, s=28, c=color, alpha=0.75)
            qy, qx = qpos[qi].float().tolist()
            ax.scatter(
                [(qx + 0.5) * sx], [(qy + 0.5) * sy], s=90, marker="*", c=color, edgecolors="k"
            )
        mean_d = neighbor_distances(rec)[sample].mean().item()
        ax.set_title(
            f"{rec.name}\n{gh}x{gw} map, K={rec.indices.shape[-1]}, mean dist {mean_d:.1f}",
            fontsize=8,
        )
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.axis("off")
    fig.suptitle("neighbours picked (star = query)", fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
