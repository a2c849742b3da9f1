"""Stage 3, selection: the K candidates of highest similarity (no gradient).

``include_self=True`` puts the query itself in slot 0 and takes the other K-1 from its
candidates; slots are in descending similarity, ties by lower index, and for the 'spatial'
metric in raster order of the offset (slot k = tap k of a flattened convolution kernel).
The dispatcher picks the backend that ranks (:mod:`convnn.backends.dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import dispatch
from ..metrics import BlockScores
from .candidates import Candidates


def select(
    scores: BlockScores,
    K: int,
    candidates: Candidates,
    self_index: Tensor | None,
    *,
    include_self: bool,
    raster: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Indices (B', N, K) into the keys of ``scores``.

    self_index (N,): each query's own key (None when the queries are not keys);
    ``raster``: slots in ascending index (the spatial metric's conv-tap order).
    """
    exclude = self_index if include_self else None
    k_sel = K - 1 if include_self else K
    if k_sel == 0:
        idx = self_index.new_empty(scores.batch, scores.num_queries, 0)
    elif candidates.shared is not None:
        cand = candidates.shared.sort().values  # ascending: ties go to the lower index
        lookup = torch.full((scores.num_keys,), -1, dtype=torch.long, device=cand.device)
        lookup[cand] = torch.arange(cand.numel(), device=cand.device)
        ex = None if exclude is None else lookup[exclude]
        subset = scores.keys(cand)
        be = dispatch.select_backend(subset, k_sel, ex, None, backend=backend)
        idx = cand[be.select_scores(subset, k_sel, exclude=ex)]
    else:
        window = candidates.per_query
        be = dispatch.select_backend(scores, k_sel, exclude, window, backend=backend)
        idx = be.select_scores(scores, k_sel, exclude=exclude, window=window)
    if include_self:
        idx = torch.cat([self_index.expand(idx.shape[0], -1)[..., None], idx], -1)
    if raster:  # raster order, so slot k is the k-th tap of a conv kernel
        idx = idx.sort(-1).values
    return idx
