"""Positional encodings (``positional=``, DESIGN.md 2b): they act on the similarity only
(selection and weighting), never on the aggregated values.

- ``coords``: selection features become [(1 - lam) x, lam p], p the (row, col) of the
  original map normalised to [-1, 1] (padding extends past).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import ConvNNSpec
from .candidates import Grid


def encode_features(
    spec: ConvNNSpec, grid: Grid, query: Tensor, key: Tensor, queries: Tensor
) -> tuple[Tensor, Tensor]:
    """The selection features with the feature-side encoding of ``spec.positional``.

    query (B', N, d) features of the queries ``queries`` (N,) (padded-map indices), key
    (B', M, d) features of every token of the padded map -> (B', N, d'), (B', M, d').
    """
    if spec.positional == "coords":
        xy = grid.coords(key.device, key.dtype)  # (M, 2)
        lam = spec.lam
        cat = lambda f, p: torch.cat([(1 - lam) * f, lam * p.expand(f.shape[0], -1, -1)], -1)
        return cat(query, xy[queries]), cat(key, xy)
    return query, key
