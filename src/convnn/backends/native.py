"""The native CPU top-K: :func:`convnn.backends._common.topk_low_ties` in compiled code.

``_rank.c`` (plain C and the CPython API, built with the package when a C compiler is at
hand) ranks each row in one pass: a heap of the K best scores, and a vectorised test that
rejects whole chunks of scores below the worst of them. It compares the same ordered keys as
the torch path (:func:`~convnn.backends._common._tie_free_keys`), so it picks the same
positions in the same order, ties, signed zeros and infinities included.

It serves every eager top-K of float32, bfloat16 and float16 scores on the CPU (float32
scores ranked by their bfloat16 or float16 rounding too). Compiled graphs, float64 scores
and other devices take the torch path. ``CONVNN_NATIVE=0`` turns it off (to compare the two
paths); :func:`status` says whether it runs and why not.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from . import _rank
except ImportError as exc:  # not built: no C compiler at install time
    _rank, _MISSING = None, f"not built ({exc})"
else:
    _MISSING = None

_KIND = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 2}
_HALF = (torch.bfloat16, torch.float16)


def status() -> str:
    """Whether the native top-K runs here, and if not, why."""
    if _MISSING:
        return f"native top-K: off, {_MISSING}; the torch path ranks"
    if os.environ.get("CONVNN_NATIVE", "1") == "0":
        return "native top-K: off, CONVNN_NATIVE=0; the torch path ranks"
    return "native top-K: on (eager CPU ranking of float32, bfloat16 and float16 scores)"


def usable(scores: Tensor, K: int, rounding: torch.dtype | None) -> bool:
    """Whether :func:`topk` ranks the K best of ``scores`` (..., M) (ranked as their
    ``rounding`` when given)."""
    return (
        _rank is not None
        and 1 <= K <= scores.shape[-1]
        and scores.device.type == "cpu"
        and scores.dtype in _KIND
        and (
            rounding in (None, scores.dtype)
            or (scores.dtype == torch.float32 and rounding in _HALF)
        )
        and scores.shape[-1] < 1 << 31
        and not torch.compiler.is_compiling()
        and os.environ.get("CONVNN_NATIVE", "1") != "0"
    )


def topk(rows: Tensor, K: int, rounding: torch.dtype | None = None) -> Tensor:
    """Positions (R, K) of the K best of each row of ``rows`` (R, M), ranked as their
    ``rounding`` when given, in canonical order: descending score, equal scores by lower
    position. Only where :func:`usable`."""
    R, M = rows.shape
    if rounding == rows.dtype:
        rounding = None
    if rounding == torch.float16 and rows.dtype == torch.float32:
        rows = rows.to(rounding)  # float16's rounding (subnormals, range) is torch's to do
    kind = _KIND[rows.dtype]
    if rows.dtype == torch.float32 and rounding == torch.bfloat16:
        kind = 1  # rounded as each score is read
    if M > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(R, K, dtype=torch.int64)
    if R:
        _rank.topk(rows.data_ptr(), kind, R, M, rows.stride(0), K, out.data_ptr(), K)
    return out
