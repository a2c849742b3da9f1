"""Backends behind one dispatcher.

A backend is a module with ``name``, ``select_scores(scores, K, *, exclude, window) -> (B, N,
K) indices`` (``scores``: a :class:`~convnn.metrics.BlockScores`, what to rank, in blocks),
``select(query, key, K, *, spatial_grid, exclude, window)`` (the same on GEMM operands or
spatial positions) and ``aggregate(values, indices, rho, weight, bias, kernel) -> (B, N,
C_out)`` (contracts in :mod:`convnn.backends.reference`). Backends trust their arguments:
the public functions (:func:`convnn.functional.neighbor_aggregate`, ``knn_select``, the
layers) check them once, indices included, before dispatching.

- ``reference``: dense and readable, the oracle for tests (O(N^2) memory);
- ``chunked``: streaming pure PyTorch, the default on every device (O(N*K) memory);
- ``triton``: fused kernels for CUDA (also runs on the CPU under ``TRITON_INTERPRET=1``).

Choose one per call (``backend=`` on the functional API), for a block of code
(``with convnn.backends.use("reference"):``), for the rest of the current thread
(``convnn.backends.use("reference")`` called bare, like ``torch.set_grad_enabled``) or for a
process (``CONVNN_BACKEND``). ``use`` is per thread (and per asyncio task): a thread inside
``use("reference")`` never changes another thread's backend.

What runs each stage of a call, and why, is decided in one place,
:mod:`convnn.backends.dispatch` (its docstring has the rules, the exact shortcuts to
``F.conv2d`` and SDPA included); :func:`explain` shows the decisions of a call.
"""

from __future__ import annotations

from . import chunked, reference
from .dispatch import BACKENDS, Decision, Explanation, explain, get, requested, use

__all__ = [
    "BACKENDS",
    "Decision",
    "Explanation",
    "chunked",
    "explain",
    "get",
    "reference",
    "requested",
    "use",
]
