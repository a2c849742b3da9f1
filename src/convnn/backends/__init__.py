"""Backends behind one dispatch.

A backend is a module with ``name``, ``select(query, key, K, *, spatial_grid, exclude,
window) -> (B, N, K) indices`` and ``aggregate(values, indices, rho, weight, bias, kernel)
-> (B, N, C_out)`` (contracts in :mod:`convnn.backends.reference`). Backends trust their
arguments: the public functions (:func:`convnn.functional.neighbor_aggregate`,
``knn_select``, the layers) check them once, indices included, before dispatching.

- ``reference``: dense and readable, the oracle for tests (O(N^2) memory);
- ``chunked``: streaming pure PyTorch, the default on every device (O(N*K) memory);
- ``triton``: fused kernels for CUDA (also runs on the CPU under ``TRITON_INTERPRET=1``).

Choose one per call (``backend=`` on the functional API), for a block of code
(``with convnn.backends.use("reference"):``), for the rest of the current thread
(``convnn.backends.use("reference")`` called bare, like ``torch.set_grad_enabled``) or for a
process (``CONVNN_BACKEND``). ``use`` is per thread (and per asyncio task): a thread inside
``use("reference")`` never changes another thread's backend.
``None``/``"auto"`` picks triton on CUDA when it is installed (only for the calls its
compiled table covers, after a one-time check: :mod:`convnn.backends.triton`), else chunked,
and lets the operator take exact shortcuts (convolution for spatial layers, SDPA for full
attention).
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
from types import ModuleType

from ..options import check_choice
from . import chunked, reference

BACKENDS = ("reference", "chunked", "triton")
# A context variable: each thread (and asyncio task) sees its own choice; traceable by
# torch.compile, which guards on its value.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "convnn_backend", default=None
)


def _triton_usable(device_type: str) -> bool:
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def requested(backend: str | None = None) -> str | None:
    """The backend asked for (argument, then ``use()``, then CONVNN_BACKEND), or None for auto."""
    name = backend or _override.get() or os.environ.get("CONVNN_BACKEND")
    if name in (None, "", "auto"):
        return None
    check_choice("backend", name, BACKENDS + ("auto",))
    return name


def get(backend: str | None, device_type: str) -> ModuleType:
    """The backend module to run on ``device_type`` ('cpu', 'cuda', ...)."""
    name = requested(backend)
    if name is None:
        if device_type == "cuda" and _triton_usable("cuda"):
            from . import triton

            return triton.auto  # the kernels where covered and checked, else chunked
        name = "chunked"
    if name == "triton" and not _triton_usable(device_type):
        raise ValueError(
            f"backend 'triton' needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 "
            f"on the CPU), got device '{device_type}'"
        )
    if name == "triton":
        from . import triton

        return triton
    return chunked if name == "chunked" else reference


class use:
    """Run on ``backend`` ('reference', 'chunked', 'triton' or 'auto'), in this thread only.

    Like ``torch.set_grad_enabled``, it takes effect when called: as a context manager
    (``with use("reference"): ...``) the previous choice comes back at the end of the block;
    called bare (``use("chunked")``) it stays for the rest of the thread.
    """

    def __init__(self, backend: str) -> None:
        check_choice("backend", backend, BACKENDS + ("auto",))
        self._token = _override.set(backend)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        _override.reset(self._token)
