"""Branching hybrids: part of the width from ConvNN, the rest from the layer it generalises."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..options import check_choice, check_fraction, check_like, check_positive_int, check_rank
from .attention import ConvNNAttention
from .conv import ConvNN2d, conv_geometry


def _split(name: str, ratio: float, width: int) -> int:
    return math.floor(check_fraction(name, ratio) * width)


class Branching2d(nn.Module):
    """ConvNN and convolution side by side, fused by a 1x1 convolution.

    Both branches see the whole input; floor(ratio * out_channels) output channels come from
    ``convnn`` (a :class:`ConvNN2d`), the rest from ``conv`` (a k x k convolution with 'same'
    padding); the concatenation goes through ``pointwise`` (1x1, with bias). ratio 0 is a
    pure convolution + 1x1, ratio 1 a pure ConvNN + 1x1.

    ``Branching2d(64, 64, 3, padding=1)`` reads as ``nn.Conv2d``: kernel_size is the
    convolution's and sets the ConvNN's K = kernel_size**2 unless K is given; ``padding``
    ('same', 'valid' or rings) is the ConvNN's zero candidates (the convolution always pads
    'same'); stride may be a pair.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        ratio: float = 0.5,
        K: int | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        device=None,
        dtype=None,
        **convnn_kwargs,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            check_positive_int(name, value)
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size % 2 == 0
        ):
            raise ValueError(f"kernel_size must be an odd int ('same' padding), got {kernel_size}")
        # K defaults to kernel_size**2, and padding 'same' means kernel_size // 2 rings.
        geometry = conv_geometry(
            2, in_channels, out_channels, kernel_size, K, stride, padding, 1, 1, "zeros", None,
            default_K=9, kernel_size_sets_K=K is None,
        )  # fmt: skip
        c_nn = _split("ratio", ratio, out_channels)
        self.ratio, self.in_channels, self.out_channels = ratio, in_channels, out_channels
        self.kernel_size = kernel_size
        factory = {"device": device, "dtype": dtype}
        self.convnn = (
            ConvNN2d(
                in_channels,
                c_nn,
                stride=stride,
                padding=geometry["padding"],
                bias=bias,
                K=geometry["K"],
                **factory,
                **convnn_kwargs,
            )
            if c_nn
            else None
        )
        c_conv = out_channels - c_nn
        self.conv = (
            nn.Conv2d(
                in_channels, c_conv, kernel_size, stride, kernel_size // 2, bias=bias, **factory
            )
            if c_conv
            else None
        )
        self.pointwise = nn.Conv2d(out_channels, out_channels, 1, bias=True, **factory)

    def reset_parameters(self) -> None:
        for module in (self.convnn, self.conv, self.pointwise):
            if module is not None:
                module.reset_parameters()

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

    def extra_repr(self) -> str:
        c_nn = 0 if self.convnn is None else self.convnn.out_channels
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ratio={self.ratio} ({c_nn} ConvNN + {self.out_channels - c_nn} conv channels)"
        )


class BranchingAttention(ConvNNAttention):
    """ConvNN attention and ordinary attention side by side, fused by ``proj``.

    ``qkv`` (timm naming) projects to the full width; part of q, k, v goes through ConvNN
    attention (``convnn``), the rest through multi-head self-attention (``attn``); the
    concatenation goes through ``proj`` (Linear(dim, dim)). Both branches are the same
    operator: the attention branch is its K = all configuration. How ``ratio`` splits:

    - ``split='channels'`` (the papers'): the first floor(ratio * dim) channels go to ConvNN,
      and each branch has ``num_heads`` heads over its width;
    - ``split='heads'``: floor(ratio * num_heads) of the heads go to ConvNN, each head keeping
      its width, so that a pretrained attention's heads stay whole (what ``convert`` uses: with
      K = N the result is exactly the original attention).

    Options other than the ones below (``metric``, ``candidates``, ``kernel``...) configure the
    ConvNN branch; ``qk_norm`` / ``scale_norm`` / ``grid_size`` / ``num_prefix_tokens`` are the
    whole layer's, as in :class:`ConvNNAttention`.
    """

    _OWN = ("proj_bias", "qk_norm", "scale_norm", "norm_layer", "grid_size", "num_prefix_tokens")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ratio: float = 0.5,
        K: int | None = 9,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        split: str = "channels",
        device=None,
        dtype=None,
        **convnn_kwargs,
    ) -> None:
        own = {k: convnn_kwargs.pop(k) for k in self._OWN if k in convnn_kwargs}
        if convnn_kwargs.get("positional") == "cpe":  # it would be silently skipped
            raise ValueError(
                "positional='cpe' changes a layer's input tokens, and the ConvNN branch of "
                "BranchingAttention sees only its part of the shared q, k, v: use another "
                "positional encoding, or ConvNNAttention, got positional='cpe'"
            )
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            dim, num_heads, None, qkv_bias, attn_drop, proj_drop, kernel="none", **factory, **own
        )
        check_choice("split", split, ("channels", "heads"))
        if split == "heads":
            h_nn = _split("ratio", ratio, num_heads)
            if (h_nn == 0 and ratio > 0) or (h_nn == num_heads and ratio < 1):
                raise ValueError(
                    f"ratio {ratio} of {num_heads} head(s) leaves a branch without heads with "
                    f"split='heads': use ratio 0 or 1, more heads, or split='channels'"
                )
            heads = (h_nn, num_heads - h_nn)
            widths = tuple(h * self.head_dim for h in heads)
        else:
            d_nn = _split("ratio", ratio, dim)
            widths, heads = (d_nn, dim - d_nn), (num_heads, num_heads)
            if any(w % num_heads for w in widths):
                raise ValueError(
                    f"both branch widths {widths} (ratio {ratio} of dim {dim}) must be divisible "
                    f"by num_heads ({num_heads})"
                )
        self.ratio, self.split, self.widths, self.branch_heads = ratio, split, widths, heads
        common = {"attn_drop": attn_drop, **factory}
        layout = {k: own[k] for k in ("grid_size", "num_prefix_tokens") if k in own}
        self.convnn = (  # with the layer's token map: its encoding reads positions
            ConvNNAttention(widths[0], heads[0], K=K, **common, **layout, **convnn_kwargs)
            if widths[0]
            else None
        )
        self.attn = (
            ConvNNAttention(widths[1], heads[1], K=None, kernel="none", **common)
            if widths[1]
            else None
        )
        # The branches reuse the shared qkv/proj above; drop their own projections.
        for branch in (self.convnn, self.attn):
            if branch is not None:
                branch.qkv = branch.proj = None

    def _needs_map(self) -> bool:
        return self.convnn is not None and self.convnn._needs_map()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for branch in (getattr(self, "convnn", None), getattr(self, "attn", None)):
            if branch is not None:
                branch.reset_parameters()

    def attend(self, q, k, v, hw=None, prefix=0, return_indices=False, probabilities=False):
        """Split the heads (B, num_heads, N, head_dim) between the branches, run each."""
        B, _, N, _ = q.shape
        flat = [t.transpose(1, 2).reshape(B, N, self.dim) for t in (q, k, v)]
        outs, idx, start = [], None, 0
        for branch, width, h in zip((self.convnn, self.attn), self.widths, self.branch_heads):
            if branch is None:
                continue
            part = [
                t[..., start : start + width].reshape(B, N, h, width // h).transpose(1, 2)
                for t in flat
            ]
            want = return_indices and branch is self.convnn
            out = branch.attend(*part, hw, prefix, want, probabilities)
            out, idx = out if want else (out, idx)
            outs.append(out)
            start += width
        y = torch.cat(outs, 1 if probabilities else -1)
        return (y, idx) if return_indices else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, ratio={self.ratio}, "
            f"split={self.split!r}, widths={self.widths}"
        )
