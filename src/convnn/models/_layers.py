"""What a replaceable convolution becomes in the CNNs of the zoo."""

from __future__ import annotations

from torch import nn

from ..nn import make_conv_layer


def conv3x3(
    in_ch: int, out_ch: int, stride: int, layer: str, layer_kwargs: dict, bias: bool
) -> nn.Module:
    """A 3x3 'same' convolution, or its ConvNN replacement when ``layer`` is not 'conv'."""
    conv = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=bias)
    return conv if layer == "conv" else make_conv_layer(conv, layer, **layer_kwargs)
