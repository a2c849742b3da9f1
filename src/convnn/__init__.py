"""convnn: Convolutional Nearest Neighbors — one k-NN operator for convolution and attention.

The names below load on first use, so ``import convnn`` (and the ``convnn`` command's
``--help``) does not import torch until a layer or function is asked for.
"""

from typing import TYPE_CHECKING

from .utils import lazy_exports

__version__ = "0.1.0"

# where each public name lives ("" for a module of the package)
_WHERE = {
    "Branching2d": ".nn",
    "BranchingAttention": ".nn",
    "ConversionReport": ".nn",
    "ConvNN1d": ".nn",
    "ConvNN2d": ".nn",
    "ConvNNAttention": ".nn",
    "ConvNNSpec": ".spec",
    "Metric": ".metrics",
    "convert": ".nn",
    "explain": ".backends",
    "functional": "",
    "metric_names": ".metrics",
    "register_metric": ".metrics",
    "unregister_metric": ".metrics",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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
