"""convnn: Convolutional Nearest Neighbors — one k-NN operator for convolution and attention."""

from . import functional
from .backends import explain
from .metrics import Metric, metric_names, register_metric, unregister_metric
from .nn import (
    Branching2d,
    BranchingAttention,
    ConversionReport,
    ConvNN1d,
    ConvNN2d,
    ConvNNAttention,
    convert,
)
from .spec import ConvNNSpec

__version__ = "0.1.0"

__all__ = [
    "Branching2d",
    "BranchingAttention",
    "ConversionReport",
    "ConvNN1d",
    "ConvNN2d",
    "ConvNNAttention",
    "ConvNNSpec",
    "Metric",
    "convert",
    "explain",
    "functional",
    "metric_names",
    "register_metric",
    "unregister_metric",
]
