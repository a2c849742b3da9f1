"""convnn: Convolutional Nearest Neighbors — one k-NN operator for convolution and attention.

The names below load on first use, so ``import convnn`` (and the ``convnn`` command's
``--help``) does not import torch until a layer or function is asked for.
"""

from typing import TYPE_CHECKING

from .utils import lazy_exports

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

__getattr__, __dir__ = lazy_exports(
    __name__, {"functional": "", **{name: ".nn" for name in __all__ if name != "functional"}}
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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
