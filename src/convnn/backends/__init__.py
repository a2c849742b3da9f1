"""Backends behind one dispatch.

A backend is a module with ``name``, ``select(query, key, K, *, spatial_grid, exclude,
window) -> (B, N, K) indices`` and ``aggregate(values, indices, rho, weight, bias, kernel)
-> (B, N, C_out)`` (contracts in :mod:`convnn.backends.reference`).

- ``reference``: dense and readable, the oracle for tests (O(N^2) memory);
- ``chunked``: streaming pure PyTorch, the default on every device (O(N*K) memory);
- ``triton``: fused kernels for CUDA (also runs on the CPU under ``TRITON_INTERPRET=1``).

Choose one per call (``backend=`` on the functional API), for a block of code
(``with convnn.backends.use("reference"):``) or for a process (``CONVNN_BACKEND``).
``None``/``"auto"`` picks triton on CUDA when it is installed (only for the calls its
compiled table covers, after a one-time check: :mod:`convnn.backends.triton`), else chunked,
and lets the operator take exact shortcuts (convolution for spatial layers, SDPA for full
attention).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

from ..options import check_choice
from . import chunked, reference

BACKENDS = ("reference", "chunked", "triton")
_override: list[str] = []


def _triton_usable(device_type: str) -> bool:
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def requested(backend: str | None = None) -> str | None:
    """The backend asked for (argument, then ``use()``, then CONVNN_BACKEND), or None for auto."""
    name = backend or (_override[-1] if _override else None) or os.environ.get("CONVNN_BACKEND")
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


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Run the enclosed code on ``backend`` ('reference', 'chunked', 'triton' or 'auto')."""
    check_choice("backend", backend, BACKENDS + ("auto",))
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()
