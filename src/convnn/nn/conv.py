"""ConvNN1d / ConvNN2d: drop-in replacements for ``nn.Conv1d`` / ``nn.Conv2d``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as CF
from ..options import (
    CANDIDATES,
    COORDS,
    KERNELS,
    METRICS,
    WEIGHTINGS,
    check_choice,
    check_positive_int,
    check_rank,
    pair,
)


class _ConvNNNd(nn.Module):
    """Parameters, options and forward shared by ConvNN1d and ConvNN2d."""

    _functional = staticmethod(CF.convnn2d)
    _layout = "(B, {c}, H, W)"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        K: int = 9,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        *,
        metric: str = "cosine",
        candidates: str = "all",
        num_candidates: int | None = None,
        include_self: bool = True,
        weighting: str = "none",
        kernel: str = "standard",
        coords: str | None = None,
        lam: float = 0.5,
        window: int | None = None,
        selection_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("metric", metric, METRICS),
            ("candidates", candidates, CANDIDATES),
            ("weighting", weighting, WEIGHTINGS),
            ("kernel", kernel, KERNELS),
            ("coords", coords, COORDS),
        ):
            check_choice(name, value, choices)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("K", K)):
            check_positive_int(name, value)
        if kernel in ("depthwise", "none") and out_channels != in_channels:
            raise ValueError(
                f"out_channels must equal in_channels ({in_channels}) for kernel={kernel!r}, "
                f"got {out_channels}"
            )
        if candidates in ("random", "grid") and num_candidates is None:
            raise ValueError(f"num_candidates is required for candidates={candidates!r}, got None")
        if candidates == "window" and window is None:
            raise ValueError(
                "window is required for candidates='window' (an odd int >= 1), got None"
            )
        self.in_channels, self.out_channels, self.K = in_channels, out_channels, K
        self.stride, self.padding = self._geometry(stride, padding)
        self.metric, self.candidates, self.num_candidates = metric, candidates, num_candidates
        self.window, self.include_self, self.weighting = window, include_self, weighting
        self.kernel, self.coords, self.lam = kernel, coords, lam
        self.selection_dtype = selection_dtype
        factory = {"device": device, "dtype": dtype}
        shape = {"standard": (out_channels, in_channels, K), "none": None}
        shape.update(depthwise=(in_channels, 1, K), separable=(in_channels, 1, K))
        self.weight = (
            None if shape[kernel] is None else nn.Parameter(torch.empty(shape[kernel], **factory))
        )
        self.pointwise_weight = (
            nn.Parameter(torch.empty(out_channels, in_channels, 1, **factory))
            if kernel == "separable"
            else None
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    @staticmethod
    def _geometry(stride, padding):
        return pair("stride", stride, minimum=1), pair("padding", padding)

    def forward(self, x: Tensor, return_indices: bool = False):
        layout = self._layout.format(c=self.in_channels)
        check_rank("x", x, layout.count(",") + 1, layout)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have {self.in_channels} channels {layout}, got shape {tuple(x.shape)}"
            )
        return self._functional(
            x,
            self.weight,
            self.bias,
            self.K,
            self.stride,
            self.padding,
            return_indices=return_indices,
            **self._options(),
        )

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv1d`` with kernel K over the gathered neighbours."""
        fan_in = self.in_channels * self.K
        for w in (self.weight, self.pointwise_weight):
            if w is not None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                fan_in = w.shape[1] * w.shape[2]
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _options(self) -> dict:
        return dict(
            metric=self.metric,
            candidates=self.candidates,
            num_candidates=self.num_candidates,
            window=self.window,
            include_self=self.include_self,
            weighting=self.weighting,
            kernel=self.kernel,
            pointwise_weight=self.pointwise_weight,
            coords=self.coords,
            lam=self.lam,
            training=self.training,
            selection_dtype=self.selection_dtype,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, K={self.K}, stride={self.stride}"
        s += f", padding={self.padding}, metric={self.metric!r}, candidates={self.candidates!r}"
        if self.num_candidates is not None:
            s += f", num_candidates={self.num_candidates}"
        if self.window is not None:
            s += f", window={self.window}"
        s += f", weighting={self.weighting!r}, kernel={self.kernel!r}"
        if self.coords:
            s += f", coords={self.coords!r}, lam={self.lam}"
        return s + ("" if self.bias is not None else ", bias=False")


class ConvNN2d(_ConvNNNd):
    """Convolutional Nearest Neighbours over a (B, C, H, W) map.

    Each output position (the input positions taken at ``stride``) aggregates the K
    candidates most similar to it: ``y_i = sum_k W_k v_{n_i(k)} + b``. Output
    (B, out_channels, ceil(H/stride), ceil(W/stride)), for any input size.

    Args:
        K: neighbours per position.  padding: rings of zero candidates around the map.
        metric: 'cosine' | 'euclidean' | 'dot' | 'scaled_dot' | 'spatial' (position only:
            with K = k*k and padding (k-1)//2 this is exactly a k x k convolution).
        candidates: 'all' | 'random' (``num_candidates`` drawn per forward in training,
            a fixed draw in eval) | 'grid' (an even lattice of about ``num_candidates``) |
            'window' (the ``window`` x ``window`` neighbourhood).
        include_self: the position itself fills slot 0 (ignored by 'spatial', which is
            always in the raster order of a convolution kernel).
        weighting: 'none' | 'softmax' over the selected similarities.
        kernel: 'standard' (weight (out, in, K)) | 'depthwise' ((in, 1, K)) |
            'separable' (depthwise, then ``pointwise_weight`` (out, in, 1)) | 'none'.
        coords: 'xy' appends lam-weighted coordinates to the selection features.
        selection_dtype: rank similarities in this dtype (e.g. torch.bfloat16).

    ``layer(x, return_indices=True)`` also returns (B, H_out * W_out, K) neighbour indices
    into the row-major flattened padded map, in slot order.
    """

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> ConvNN2d:
        """The exact ConvNN equivalent of ``conv`` (metric 'spatial'), weights copied."""
        return _from_conv(cls, conv)


class ConvNN1d(_ConvNNNd):
    """Convolutional Nearest Neighbours over a (B, C, L) sequence map; see :class:`ConvNN2d`."""

    _functional = staticmethod(CF.convnn1d)
    _layout = "(B, {c}, L)"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        K: int = 3,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        **options,
    ) -> None:
        super().__init__(in_channels, out_channels, K, stride, padding, bias, **options)

    @staticmethod
    def _geometry(stride, padding):
        return check_positive_int("stride", stride), check_positive_int(
            "padding", padding, minimum=0
        )

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d) -> ConvNN1d:
        """The exact ConvNN equivalent of ``conv`` (metric 'spatial'), weights copied."""
        return _from_conv(cls, conv)


def _from_conv(cls, conv: nn.Conv1d | nn.Conv2d):
    """Check that ``conv`` is representable, then build the equivalent spatial ConvNN."""
    ks = tuple(conv.kernel_size)
    k = ks[0]
    if len(set(ks)) != 1 or k % 2 == 0:
        raise ValueError(f"conv.kernel_size must be odd and square, got {ks}")
    if set(conv.dilation) != {1}:
        raise ValueError(f"conv.dilation must be 1, got {tuple(conv.dilation)}")
    if isinstance(conv.padding, str) or set(conv.padding) != {k // 2}:
        raise ValueError(f"conv.padding must be {k // 2} for kernel {ks}, got {conv.padding!r}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if conv.groups != 1 and not depthwise:
        raise ValueError(
            f"conv.groups must be 1 or in_channels == out_channels (depthwise), got "
            f"groups={conv.groups} for {conv.in_channels} -> {conv.out_channels} channels"
        )
    stride = tuple(conv.stride)
    layer = cls(
        conv.in_channels,
        conv.out_channels,
        K=k ** len(ks),
        stride=stride if len(ks) == 2 else stride[0],
        padding=k // 2,
        bias=conv.bias is not None,
        metric="spatial",
        kernel="depthwise" if depthwise else "standard",
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(conv.weight.reshape(layer.weight.shape))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    return layer
