"""convnn: Convolutional Nearest Neighbors — one k-NN operator for convolution and attention."""

from . import functional
from .nn import (
    Branching2d,
    BranchingAttention,
    ConversionReport,
    ConvNN1d,
    ConvNN2d,
    ConvNNAttention,
    convert,
)

__version__ = "0.1.0"

__all__ = [
    "Branching2d",
    "BranchingAttention",
    "ConversionReport",
    "ConvNN1d",
    "ConvNN2d",
    "ConvNNAttention",
    "convert",
    "functional",
]
