"""Positional encodings (``positional=``, DESIGN.md 2b). They act on the similarity
(selection and softmax weighting), never on the aggregated values, except 'cpe', which
changes the features themselves.

Positions are those of the *original* map: normalised to [-1, 1] for 'coords' and
'fourier' (padding extends past), in grid steps for 'relative_bias' and 'rope' (padding
rows are -1, -2, ...). 1-D forms (a sequence, ``ndim=1``) use the index only.

Prefix tokens (``prefix`` > 0: class / register tokens before the map, token indices
0..P-1, the map's tokens following from P) have no position and get no encoding: no
rotation (their angle is 0), no bias (their pairs add 0) and zero coordinates.

- ``coords``: selection features become [(1 - lam) x, lam p];
- ``fourier``: [x, sin(2 pi B p), cos(2 pi B p)], B (m, ndim) a fixed Gaussian (std
  ``sigma``) drawn from a generator seeded with 0;
- ``relative_bias``: s'(i, j) = s(i, j) + T[dy, dx], (dy, dx) = position of j minus that of
  i clamped to +-R (``max_offset``); T ((2R+1) x (2R+1), per head; (1, 2R+1) in 1-D) is
  learnable and starts at zero. It is added block by block (:class:`BiasScores`), never as
  an N x N tensor;
- ``cpe``: x <- x + DWConv(x) (a ``cpe_kernel`` x ``cpe_kernel`` depthwise conv, zero at
  the start) before everything (:func:`conditional`);
- ``rope``: the selection features rotated: in 2-D the first d/2 channels by the row, the
  last d/2 by the column (1-D: all d by the index); within a block of D channels, channel j
  and j + D/2 (j < D/2) turn by pos * theta_j, theta_j = 10000^(-2j/D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import BlockScores, rankable
from ..options import tensors_or_initial
from ..spec import ConvNNSpec
from .candidates import Grid

ROPE_BASE = 10000.0


def extra_features(spec: ConvNNSpec, ndim: int = 2) -> int:
    """How many features the encoding appends to each token's selection features."""
    if spec.positional == "coords":
        return 2
    if spec.positional == "fourier":
        return 2 * spec.num_frequencies
    return 0


def initial(spec: ConvNNSpec, ndim: int, groups: int, channels: int, device=None):
    """(learnable, fixed) tensors of the encoding at their initial values: a layer with
    ``groups`` heads over ``channels`` input channels (cpe). ``device="meta"``: their shapes
    only, nothing drawn."""
    if spec.positional == "fourier":
        shape = (spec.num_frequencies, ndim)
        if device == "meta":
            return {}, {"B": torch.empty(shape, device=device)}
        g = torch.Generator().manual_seed(0)
        return {}, {"B": torch.randn(shape, generator=g, device=device) * spec.sigma}
    if spec.positional == "relative_bias":
        R = spec.max_offset
        shape = (groups, 2 * R + 1 if ndim == 2 else 1, 2 * R + 1)
        return {"table": torch.zeros(shape, device=device)}, {}
    if spec.positional == "cpe":
        k = spec.cpe_kernel
        shape = (channels, 1, k if ndim == 2 else 1, k)
        return {
            "weight": torch.zeros(shape, device=device),
            "bias": torch.zeros(channels, device=device),
        }, {}
    return {}, {}


def parameters(
    spec: ConvNNSpec, given: dict | None, ndim: int, groups: int, channels: int, like: Tensor
) -> dict[str, Tensor]:
    """The encoding's tensors: ``given`` (checked against their expected shapes), or their
    initial values when None."""
    # given tensors are checked against shapes alone: drawing the initial 'fourier'
    # frequencies on every call would cost a generator (and break a traced graph)
    learn, fixed = initial(spec, ndim, groups, channels, None if given is None else "meta")
    what = f"positional={spec.positional!r} ({ndim}-D, {groups} heads)"
    return tensors_or_initial("positional_params", given, {**learn, **fixed}, like, what)


def conditional(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """'cpe': x + DWConv(x) on a map x (B, C, H, W) (a 1-D map is (B, C, 1, L))."""
    w = params["weight"]
    return x + F.conv2d(
        x, w, params["bias"], padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1]
    )


def steps(grid: Grid, device, prefix: int = 0) -> Tensor:
    """(row, col) in grid steps of the original map of every token: (prefix + M, 2) int64,
    the ``prefix`` tokens first ((0, 0): no position; rope turns them by 0, the identity),
    then every padded-map token."""
    pos = grid.positions(device)[:, :2].long()
    pos = pos - torch.tensor([grid.ph, grid.pw], device=device)
    return F.pad(pos, (0, 0, prefix, 0)) if prefix else pos


def coords(grid: Grid, device, dtype, prefix: int = 0) -> Tensor:
    """Normalised coordinates of every token: (prefix + M, 2), zero for the prefix tokens."""
    p = grid.coords(device, dtype)
    return F.pad(p, (0, 0, prefix, 0)) if prefix else p


def located(grid: Grid, device, prefix: int = 0) -> Tensor | None:
    """Whether each token has a map position: (prefix + M,) bool, False for the prefix
    tokens; None when every token has one (prefix 0)."""
    if not prefix:
        return None
    M = grid.padded[0] * grid.padded[1]
    return torch.arange(prefix + M, device=device) >= prefix


def _rotate(x: Tensor, pos: Tensor) -> Tensor:
    """Rotate pairs (j, j + D/2) of x (..., D) by pos (D/2 angles broadcastable) radians."""
    D = x.shape[-1]
    theta = ROPE_BASE ** (-2 * torch.arange(D // 2, device=x.device, dtype=x.dtype) / D)
    angle = pos[..., None].to(x.dtype) * theta
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def rope(x: Tensor, pos: Tensor, ndim: int) -> Tensor:
    """x (B', n, d) rotated by the positions pos (n, 2) in grid steps."""
    d = x.shape[-1]
    if ndim == 1:
        if d % 2:
            raise ValueError(f"positional='rope' needs an even feature dim d in 1-D, got d={d}")
        return _rotate(x, pos[:, 1])
    if d % 4:
        raise ValueError(
            f"positional='rope' needs a feature dim d divisible by 4 in 2-D (half of the pairs "
            f"turn with the row, half with the column), got d={d}"
        )
    h = d // 2
    return torch.cat([_rotate(x[..., :h], pos[:, 0]), _rotate(x[..., h:], pos[:, 1])], -1)


def encode_features(
    spec: ConvNNSpec,
    grid: Grid,
    query: Tensor,
    key: Tensor,
    queries: Tensor,
    params: dict[str, Tensor],
    ndim: int = 2,
    prefix: int = 0,
) -> tuple[Tensor, Tensor]:
    """The selection features with the feature-side encoding of ``spec.positional``.

    query (B', N, d) features of the queries ``queries`` (N,) (token indices), key
    (B', M, d) features of every token (the ``prefix`` tokens, then the padded map) ->
    (B', N, d'), (B', M, d').
    """
    if spec.positional in ("coords", "fourier"):
        p = coords(grid, key.device, key.dtype, prefix)  # (M, 2), normalised
        p = p[:, 1:] if ndim == 1 else p
        if spec.positional == "coords":
            lam = spec.lam
            cat = lambda f, e: torch.cat([(1 - lam) * f, lam * e.expand(f.shape[0], -1, -1)], -1)
        else:
            proj = 2 * math.pi * p @ params["B"].T  # (M, m)
            p = torch.cat([proj.sin(), proj.cos()], -1)
            cat = lambda f, e: torch.cat([f, e.expand(f.shape[0], -1, -1)], -1)
        return cat(query, p[queries]), cat(key, p)
    if spec.positional == "rope":
        pos = steps(grid, key.device, prefix)
        return rope(query, pos[queries], ndim), rope(key, pos, ndim)
    return query, key


# --------------------------------------------------------------------------- relative bias


def _bias(
    table: Tensor,
    pq: Tensor,
    pk: Tensor,
    group: Tensor | None,
    lq: Tensor | None = None,
    lk: Tensor | None = None,
) -> Tensor:
    """T[dy, dx] of queries at pq (n, 2) and keys pk (n or 1, m, 2) or (B', n, m, 2).

    table (G, Ty, Tx). Without ``group``: (G, n, m); with group (B',) the head of each
    batch row: (B', n, m). lq (n,) / lk (pk's shape without the 2): whether each query /
    key has a map position (None: all do); a pair without one gets 0."""
    Ry, Rx = (table.shape[1] - 1) // 2, (table.shape[2] - 1) // 2
    dy = (pk[..., 0] - pq[:, None, 0]).clamp(-Ry, Ry) + Ry
    dx = (pk[..., 1] - pq[:, None, 1]).clamp(-Rx, Rx) + Rx
    if group is None:
        bias = table[:, dy, dx]
    else:
        bias = table[group.view(-1, *([1] * (dy.dim() - 1))), dy, dx]
    if lq is None:
        return bias
    # where, not a product: a prefix pair is exactly 0 and sends T no gradient
    return bias.where(lq[:, None] & lk, 0)


class BiasScores(BlockScores):
    """``inner`` scores plus the relative bias T[dy, dx], block by block (O(block) memory).

    pos_q (N, 2), pos_k (M, 2) grid-step positions; table (G, Ty, Tx) with G heads, the
    batch rows of ``inner`` being (batch, head) pairs; loc_q (N,) / loc_k (M,): whether each
    query / key has a map position (None: all do; pairs without one get no bias)."""

    why_not_gemm = "a relative position bias (added per block)"

    def __init__(
        self,
        inner: BlockScores,
        pos_q: Tensor,
        pos_k: Tensor,
        table: Tensor,
        loc_q: Tensor | None = None,
        loc_k: Tensor | None = None,
    ):
        self.inner, self.pos_q, self.pos_k, self.table = inner, pos_q, pos_k, table
        self.loc_q, self.loc_k = loc_q, loc_k
        self.batch, self.num_queries, self.num_keys = inner.batch, inner.num_queries, inner.num_keys
        self.width, self.device = inner.width, inner.device

    def _add(self, s: Tensor, bias: Tensor) -> Tensor:
        """s (B*G, n, m) + bias (G, n, m), batch rows being (batch, head) pairs."""
        G = self.table.shape[0]
        return rankable((s.unflatten(0, (-1, G)) + bias.to(s.dtype)).flatten(0, 1))

    def _locations(self, qs, ks):
        """loc_q of the queries qs and loc_k of the keys ks (None, None when all have one)."""
        if self.loc_q is None:
            return None, None
        return self.loc_q[qs], self.loc_k[ks]

    def block(self, qs, ks):
        s = self.inner.block(qs, ks)
        lq, lk = self._locations(qs, ks)
        lk = None if lk is None else lk[None]
        return self._add(s, _bias(self.table, self.pos_q[qs], self.pos_k[ks][None], None, lq, lk))

    def window(self, qs, cand):
        s = self.inner.window(qs, cand)
        pk = self.pos_k[cand]  # (n, W, 2) or (B', n, W, 2)
        lq, lk = self._locations(qs, cand)
        if cand.dim() == 2:
            return self._add(s, _bias(self.table, self.pos_q[qs], pk, None, lq, lk))
        G = self.table.shape[0]
        group = torch.arange(cand.shape[0], device=cand.device) % G
        return rankable(s + _bias(self.table, self.pos_q[qs], pk, group, lq, lk).to(s.dtype))

    def keys(self, index):
        loc_k = None if self.loc_k is None else self.loc_k[index]
        inner = self.inner.keys(index)
        return BiasScores(inner, self.pos_q, self.pos_k[index], self.table, self.loc_q, loc_k)


def bias_scores(
    scores: BlockScores, grid: Grid, queries: Tensor, table: Tensor, prefix: int = 0
) -> BiasScores:
    """Selection scores with the relative bias of ``table`` (G, Ty, Tx) (no gradient);
    queries (N,) token indices, the ``prefix`` tokens (no bias) before the map."""
    pos, loc = steps(grid, scores.device, prefix), located(grid, scores.device, prefix)
    loc_q = None if loc is None else loc[queries]
    return BiasScores(scores, pos[queries], pos, table.detach(), loc_q, loc)


def pair_bias(
    grid: Grid, queries: Tensor, indices: Tensor, table: Tensor, prefix: int = 0
) -> Tensor:
    """The differentiable bias T[dy, dx] of each query's selected keys: indices (B*G, N, K)
    -> (B*G, N, K); 0 where the query or the key is one of the ``prefix`` tokens."""
    pos, loc = steps(grid, indices.device, prefix), located(grid, indices.device, prefix)
    group = torch.arange(indices.shape[0], device=indices.device) % table.shape[0]
    lq, lk = (None, None) if loc is None else (loc[queries], loc[indices])
    return _bias(table, pos[queries], pos[indices], group, lq, lk)
