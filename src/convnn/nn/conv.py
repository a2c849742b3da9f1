"""ConvNN1d / ConvNN2d: drop-in replacements for ``nn.Conv1d`` / ``nn.Conv2d``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as CF
from ..options import check_choice, check_positive_int, check_rank, pair
from ..spec import ConvNNSpec, legacy_coords
from ..stages.positional import extra_features
from .components import metric_component, positional_component, tensors


def conv_geometry(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel_size,
    K: int | None,
    stride,
    padding,
    dilation,
    groups: int,
    padding_mode: str,
    kernel: str | None,
    *,
    default_K: int,
    kernel_size_sets_K: bool = True,
) -> dict:
    """Resolve ``nn.ConvNd``-style arguments into ConvNN's K, stride, padding and kernel.

    The one place where a drop-in call (``ConvNN2d(64, 64, 3, padding=1)``) becomes ConvNN
    options: kernel_size k means K = k**ndim neighbours (a k x k conv's taps), ``padding``
    'same' is k // 2 rings of zero candidates and 'valid' none, ``groups=in_channels`` is the
    'depthwise' kernel. Giving both kernel_size and a different K is ambiguous and refused
    (unless ``kernel_size_sets_K`` is False, as for Branching2d's convolution branch).
    """
    k = None
    if kernel_size is not None:
        sizes = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,)
        for v in sizes:
            check_positive_int("kernel_size", v)
        if len(set(sizes)) != 1 or len(sizes) not in (1, ndim):
            raise ValueError(
                f"kernel_size must be an int or {ndim} equal ints (ConvNN's neighbourhood is "
                f"square), got {kernel_size!r}"
            )
        k = sizes[0]
    if K is not None:
        check_positive_int("K", K)
    if kernel_size_sets_K and k is not None:
        if K is not None and K != k**ndim:
            raise ValueError(
                f"give kernel_size (K = kernel_size**{ndim}) or K, not both: got kernel_size="
                f"{kernel_size!r} (K={k**ndim}) and K={K}"
            )
        K = k**ndim
    K = default_K if K is None else K
    if k is None:  # the kernel K stands for, when K is the size of an odd window
        side = round(K ** (1 / ndim))
        k = side if side**ndim == K and side % 2 else None
    if isinstance(padding, str):
        check_choice("padding", padding, ("same", "valid"))
        if padding == "same" and (k is None or k % 2 == 0):
            raise ValueError(
                f"padding='same' needs an odd kernel_size (or K an odd k**{ndim}), got "
                f"kernel_size={kernel_size!r}, K={K}"
            )
        padding = k // 2 if padding == "same" else 0
    dilations = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,)
    if set(dilations) != {1}:
        raise ValueError(f"dilation must be 1 (ConvNN selects neighbours), got {dilation!r}")
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
    depthwise = groups == in_channels == out_channels and groups > 1
    if groups != 1 and not depthwise:
        raise ValueError(
            f"groups must be 1 or in_channels == out_channels (depthwise), got groups={groups} "
            f"for {in_channels} -> {out_channels} channels"
        )
    if kernel is None:
        kernel = "depthwise" if depthwise else "standard"
    elif depthwise and kernel != "depthwise":
        raise ValueError(f"groups={groups} is a depthwise kernel, got kernel={kernel!r}")
    return {"K": K, "kernel_size": k, "stride": stride, "padding": padding, "kernel": kernel}


class SpecOptions:
    """Read-only attributes for the options of ``self.spec`` (``layer.metric``, ``layer.K``,
    ...), and the ``extra_repr`` part that shows the options differing from the layer's
    defaults."""

    spec: ConvNNSpec
    _spec_defaults: ConvNNSpec

    def options_repr(self) -> str:
        """``, name=value`` for each option (K aside) that differs from the layer's default."""
        changed = self.spec.describe(self._spec_defaults, skip=("K",))
        return f", {changed}" if changed else ""

    @property
    def coords(self) -> str | None:
        """The deprecated name of ``positional='coords'``: 'xy' or None."""
        return "xy" if self.spec.positional == "coords" else None


for _name in ConvNNSpec.fields():
    setattr(
        SpecOptions,
        _name,
        property(lambda self, n=_name: getattr(self.spec, n), doc=f"``spec.{_name}``"),
    )


class _ConvNNNd(SpecOptions, nn.Module):
    """Parameters, options and forward shared by ConvNN1d and ConvNN2d.

    The positional arguments are ``nn.ConvNd``'s: ``ConvNN2d(64, 64, 3, padding=1)`` selects
    K = 9 neighbours and keeps the input's spatial size. K (neighbours per position) is a
    keyword: ``ConvNN2d(64, 64, K=16, metric='cosine')``.
    """

    _layout = "(B, {c}, H, W)"
    _ndim = 2
    _default_K = 9
    _spec_defaults = ConvNNSpec()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        K: int | None = None,
        metric: str = "cosine",
        p: float = 2.0,
        candidates: str = "all",
        num_candidates: int | None = None,
        ann_method: str = "grid",
        ann_tables: int | None = None,
        ann_projection: str = "random",
        ann_seed: int = 0,
        window: int | None = None,
        include_self: bool = True,
        weighting: str = "none",
        kernel: str | None = None,
        positional: str = "none",
        lam: float = 0.5,
        num_frequencies: int = 8,
        sigma: float = 1.0,
        max_offset: int = 8,
        cpe_kernel: int = 3,
        selection_dtype: torch.dtype | None = None,
        coords: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            check_positive_int(name, value)
        geometry = conv_geometry(
            self._ndim,
            in_channels,
            out_channels,
            kernel_size,
            K,
            stride,
            padding,
            dilation,
            groups,
            padding_mode,
            kernel,
            default_K=self._default_K,
        )
        K, kernel = geometry["K"], geometry["kernel"]
        positional = legacy_coords(coords, positional)
        self.spec = ConvNNSpec.take(locals())
        if kernel in ("depthwise", "none") and out_channels != in_channels:
            raise ValueError(
                f"out_channels must equal in_channels ({in_channels}) for kernel={kernel!r}, "
                f"got {out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = self._geometry(geometry["stride"], geometry["padding"])
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
        dim = in_channels + extra_features(self.spec)  # the features selection compares
        self.metric_params = metric_component(self.spec, dim, 1, type(self).__name__, factory)
        self.positional_params = positional_component(
            self.spec, self._ndim, 1, in_channels, type(self).__name__, factory
        )
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
        return CF.convnn_map(
            x,
            self.weight,
            self.bias,
            self.effective_spec(math.prod(x.shape[2:])),
            stride=self.stride if self._ndim == 2 else (1, self.stride),
            padding=self.padding if self._ndim == 2 else (0, self.padding),
            ndim=self._ndim,
            pointwise_weight=self.pointwise_weight,
            metric_params=tensors(self.metric_params),
            positional_params=tensors(self.positional_params),
            training=self.training,
            return_indices=return_indices,
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
        for component in (self.metric_params, self.positional_params):
            if component is not None:
                component.reset_parameters()

    def effective_candidates(self, positions: int) -> str:
        """The candidate mode used on a map of ``positions`` positions.

        A 'random' or 'grid' subset asking for more positions than the map has is
        the whole map: 'all' (the padded map's zero candidates included), so that a
        ``num_candidates`` chosen for the first layers still runs on the small deep maps.
        """
        sparse = self.candidates in ("random", "grid")
        return "all" if sparse and self.num_candidates > positions else self.candidates

    def effective_spec(self, positions: int) -> ConvNNSpec:
        """The spec run on a map of ``positions`` positions (see :meth:`effective_candidates`)."""
        candidates = self.effective_candidates(positions)
        return self.spec if candidates == self.candidates else self.spec.replace(candidates="all")

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, K={self.K}, stride={self.stride}"
        s += f", padding={self.padding}"
        s += self.options_repr()
        return s + ("" if self.bias is not None else ", bias=False")


class ConvNN2d(_ConvNNNd):
    """Convolutional Nearest Neighbours over a (B, C, H, W) map.

    Each output position (the input positions taken at ``stride``) aggregates the K
    candidates most similar to it: ``y_i = sum_k W_k v_{n_i(k)} + b``. Output
    (B, out_channels, ceil(H/stride), ceil(W/stride)), for any input size.

    The positional arguments are ``nn.Conv2d``'s, so ``ConvNN2d(64, 64, 3, padding=1)`` is
    what an ``nn.Conv2d`` user means: K = 3 * 3 = 9 neighbours, the input's spatial size.

    Args:
        kernel_size: k sets K = k * k (and what padding='same' means); give it or K.
        stride, padding: as ``nn.Conv2d`` (padding: rings of zero candidates around the map,
            an int, a pair, 'same' = kernel_size // 2 or 'valid' = 0). The output is
            ceil(H / stride) x ceil(W / stride) whatever the padding.
        dilation: 1 only.  groups: 1, or in_channels (= out_channels) for the 'depthwise'
            kernel.  padding_mode: 'zeros' only.
        K: neighbours per position (keyword; default kernel_size**2, else 9).
        metric: a similarity of ``convnn.metrics.metric_names()`` (README's table): 'cosine' |
            'euclidean' | 'dot' | 'scaled_dot' | 'spatial' (position only: with K = k*k and
            padding (k-1)//2 this is exactly a k x k convolution) | a registered one.
        p: the exponent of metric 'minkowski' (>= 1; math.inf: Chebyshev). Learnable metrics
            ('mahalanobis', 'bilinear') keep their tensors in ``layer.metric_params`` (in the
            state_dict); they train through softmax weighting only.
        candidates: 'all' | 'random' (``num_candidates`` drawn per forward in training,
            a fixed draw in eval) | 'grid' (an even lattice of about ``num_candidates``) |
            'window' (the ``window`` x ``window`` neighbourhood). A 'random' or 'grid'
            subset larger than the map (deep layers of a network) is the whole padded map.
        num_candidates: size of the 'random' / 'grid' candidate set; 'ann': the budget of
            candidates each query's index proposes (see ``convnn.ann``).
        ann_method, ann_tables, ann_projection, ann_seed: the 'ann' index: 'grid' (multiprobe
            grid) or 'lsh', its hash tables (None: 8), its projection ('random', or for 'grid'
            'pca': the features' principal axes, better on a network's features) and the seed
            of its fixed projections.
        window: odd side of the 'window' neighbourhood.
        include_self: the position itself fills slot 0 (ignored by 'spatial', which is
            always in the raster order of a convolution kernel).
        weighting: 'none' | 'softmax' over the selected similarities.
        kernel: 'standard' (weight (out, in, K)) | 'depthwise' ((in, 1, K)) |
            'separable' (depthwise, then ``pointwise_weight`` (out, in, 1)) | 'none'.
        positional: 'none' | 'coords' | 'fourier' | 'relative_bias' | 'cpe' | 'rope': the
            positional encoding of the similarity (README's table; DESIGN.md 2b). Its
            tensors are ``layer.positional_params`` (the relative-bias table and the CPE
            start at zero: the layer starts as the one without them).
        lam: the weight of the coordinates for positional='coords', in [0, 1].
        num_frequencies, sigma: 'fourier': m random frequencies of std sigma.
        max_offset: 'relative_bias': offsets clamp to +-max_offset grid steps.
        cpe_kernel: 'cpe': odd side of its depthwise convolution.
        selection_dtype: rank similarities in this dtype (e.g. torch.bfloat16).
        coords: deprecated; coords='xy' is positional='coords'.

    The options are a :class:`convnn.ConvNNSpec` (``layer.spec``); ``repr`` shows those that
    differ from the defaults.
    ``layer(x, return_indices=True)`` also returns (B, H_out * W_out, K) neighbour indices
    into the row-major flattened padded map, in slot order.
    """

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> ConvNN2d:
        """The exact ConvNN equivalent of ``conv`` (metric 'spatial'), weights copied.

        Any stride, including an anisotropic one such as (2, 1); depthwise convolutions
        (groups = in_channels = out_channels) become the 'depthwise' kernel.
        """
        return _from_conv(cls, conv)


class ConvNN1d(_ConvNNNd):
    """Convolutional Nearest Neighbours over a (B, C, L) sequence map; see :class:`ConvNN2d`."""

    _layout = "(B, {c}, L)"
    _ndim = 1
    _default_K = 3

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
    # 'same' on an odd kernel (stride 1, which nn.Conv2d enforces) is k // 2 on every side.
    if conv.padding != "same" and (isinstance(conv.padding, str) or set(conv.padding) != {k // 2}):
        raise ValueError(
            f"conv.padding must be {k // 2} or 'same' for kernel {ks}, got {conv.padding!r}"
        )
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
