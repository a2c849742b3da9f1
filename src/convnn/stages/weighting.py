"""Stage 4, weighting: rho over the K selected scores.

'none' is all ones (no tensor); 'softmax' is the softmax of the selected scores (fp32
accumulation for half inputs), with attention dropout applied here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax(scores: Tensor, dtype: torch.dtype, dropout_p: float, training: bool) -> Tensor:
    """Softmax weights of scores (..., K) in ``dtype``, with dropout in training."""
    acc = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return F.dropout(scores.softmax(-1, dtype=acc).to(dtype), dropout_p, training)
