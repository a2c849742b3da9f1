"""ConvNN modules: drop-in layers for convolution and attention."""

from .attention import ConvNNAttention, MultiheadAttentionAdapter
from .branching import Branching2d, BranchingAttention
from .conv import ConvNN1d, ConvNN2d
from .convert import (
    ConversionReport,
    Kept,
    Replaced,
    convert,
    make_attention_layer,
    make_conv_layer,
)

__all__ = [
    "ConvNN1d",
    "ConvNN2d",
    "ConvNNAttention",
    "MultiheadAttentionAdapter",
    "Branching2d",
    "BranchingAttention",
    "ConversionReport",
    "Kept",
    "Replaced",
    "convert",
    "make_attention_layer",
    "make_conv_layer",
]
