"""Branching hybrids: part of the width from ConvNN, the rest from the layer it generalises."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..options import check_fraction, check_like, check_positive_int, check_rank
from .attention import ConvNNAttention, check_heads, check_tokens
from .conv import ConvNN2d


def _split(name: str, ratio: float, width: int) -> int:
    return math.floor(check_fraction(name, ratio) * width)


class Branching2d(nn.Module):
    """ConvNN and convolution side by side, fused by a 1x1 convolution.

    Both branches see the whole input; floor(ratio * out_channels) output channels come from
    ``convnn`` (a :class:`ConvNN2d`), the rest from ``conv`` (a k x k convolution with 'same'
    padding); the concatenation goes through ``pointwise`` (1x1, with bias). ratio 0 is a
    pure convolution + 1x1, ratio 1 a pure ConvNN + 1x1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        ratio: float = 0.5,
        K: int = 9,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        **convnn_kwargs,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
        ):
            check_positive_int(name, value)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")
        c_nn = _split("ratio", ratio, out_channels)
        self.in_channels, self.ratio, self.out_channels = in_channels, ratio, out_channels
        self.convnn = (
            ConvNN2d(in_channels, c_nn, K, stride, padding, bias, **convnn_kwargs) if c_nn else None
        )
        c_conv = out_channels - c_nn
        self.conv = (
            nn.Conv2d(in_channels, c_conv, kernel_size, stride, kernel_size // 2, bias=bias)
            if c_conv
            else None
        )
        self.pointwise = nn.Conv2d(out_channels, out_channels, 1, bias=True)

    def forward(self, x: Tensor, return_indices: bool = False):
        c_in = self.in_channels
        check_rank("x", x, 4, f"(B, {c_in}, H, W)")
        if x.shape[1] != c_in:
            raise ValueError(f"x must have {c_in} channels (B, {c_in}, H, W), got {tuple(x.shape)}")
        if not torch.is_autocast_enabled(x.device.type):
            check_like("x", x, "the layer's parameters", self.pointwise.weight)
        parts, idx = [], None
        if self.convnn is not None:
            out = self.convnn(x, return_indices=return_indices)
            y, idx = out if return_indices else (out, None)
            parts.append(y)
        if self.conv is not None:
            parts.append(self.conv(x))
        y = self.pointwise(torch.cat(parts, 1))
        return (y, idx) if return_indices else y


class BranchingAttention(nn.Module):
    """ConvNN attention and ordinary attention side by side, fused by ``proj``.

    ``qkv`` (timm naming) projects to the full width; the first floor(ratio * dim) channels
    of q, k, v go through ConvNN attention, the rest through multi-head self-attention, each
    with ``num_heads`` heads; the concatenation goes through ``proj`` (Linear(dim, dim)).
    Both branches are the same operator: the attention branch is its K = all configuration.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ratio: float = 0.5,
        K: int = 9,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **convnn_kwargs,
    ) -> None:
        super().__init__()
        check_heads(dim, num_heads, attn_drop, proj_drop)
        d_nn = _split("ratio", ratio, dim)
        widths = (d_nn, dim - d_nn)
        if any(w % num_heads for w in widths):
            raise ValueError(
                f"num_heads must divide both branch widths {widths} (ratio {ratio} of dim {dim}), "
                f"got num_heads={num_heads}"
            )
        self.dim, self.num_heads, self.widths = dim, num_heads, widths
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        heads = {"num_heads": num_heads, "attn_drop": attn_drop}
        self.convnn = ConvNNAttention(d_nn, K=K, **heads, **convnn_kwargs) if d_nn else None
        self.attn = (
            ConvNNAttention(dim - d_nn, K=None, kernel="none", **heads) if widths[1] else None
        )
        # The branches reuse the shared qkv/proj above; drop their own projections.
        for branch in (self.convnn, self.attn):
            if branch is not None:
                branch.qkv = branch.proj = None

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        check_tokens(x, self.dim, self.qkv.weight)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.dim).unbind(2)
        outs, start = [], 0
        for branch, width in zip((self.convnn, self.attn), self.widths):
            if branch is None:
                continue
            part = (t[..., start : start + width] for t in (q, k, v))
            heads = (t.reshape(B, N, self.num_heads, width // self.num_heads) for t in part)
            outs.append(branch.attend(*(t.transpose(1, 2) for t in heads), hw=hw))
            start += width
        return self.proj_drop(self.proj(torch.cat(outs, -1)))
