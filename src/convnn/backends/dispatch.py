"""The dispatcher: the one place that decides what runs each call of the operator.

Every call makes up to three decisions, each with its reason:

- ``shortcut``: under the automatic choice, a configuration that *is* a convolution runs
  ``F.conv2d`` and one that *is* softmax attention over every token, or over each token's
  whole window on a map small enough (:func:`masked_sdpa_pays`), runs
  ``F.scaled_dot_product_attention`` (with a window mask) (:func:`shortcut`); a forced
  backend never takes them;
- ``selection``: the backend that ranks the candidates (:func:`select_backend`);
- ``aggregation``: the backend that gathers and combines the neighbours
  (:func:`aggregate_backend`).

The rules:

- ``backend='reference'`` / ``'chunked'`` (argument, ``backends.use`` or ``CONVNN_BACKEND``):
  that backend runs every stage; both run every configuration.
- ``backend='triton'``: the Triton kernels, which need CUDA (or ``TRITON_INTERPRET=1``) and
  the triton package (else a ``ValueError``). A stage the kernels are not designed for
  (:func:`convnn.backends.triton.no_kernel_select`: spatial selection, per-query
  candidates, metrics without a GEMM form, relative position biases, empty inputs) runs on
  chunked, and the decision says so; a call they are designed for but do not cover
  (float64, K > 128, ...) is a ``ValueError`` from the kernels' wrapper.
- automatic (None / ``'auto'``): on CUDA with triton installed, the kernels for the calls
  they are designed for and cover, each configuration after its one-time check on the
  device (:func:`convnn.backends.triton.first_use_check`; a failure warns once and runs
  chunked); chunked for everything else and on every other device.

No backend hands work to another by itself: they run what they are given or refuse it.
:func:`explain` runs a call and returns the decisions; each is also a DEBUG line on the
``logging.getLogger("convnn")`` logger.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .. import native
from ..metrics import BlockScores
from ..options import check_choice
from . import chunked, reference

BACKENDS = ("reference", "chunked", "triton")
_log = logging.getLogger("convnn")
# A context variable: each thread (and asyncio task) sees its own choice; traceable by
# torch.compile, which guards on its value.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "convnn_backend", default=None
)
_recording: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "convnn_decisions", default=None
)


@dataclass(frozen=True)
class Decision:
    """What ran one stage of a call (``stage``: 'shortcut', 'selection' or 'aggregation';
    ``backend``: 'reference', 'chunked', 'triton', 'F.conv2d', 'SDPA' or 'ann index') and
    why."""

    stage: str
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.backend} ({self.reason})"


class Explanation(list):
    """The decisions of one call, in order (a list of :class:`Decision`)."""

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self) or "(no ConvNN operator ran)"


def explain(fn: Callable, *args, **kwargs) -> Explanation:
    """Run ``fn(*args, **kwargs)`` (a layer, a model or a function of :mod:`convnn.functional`)
    without gradients and return what the dispatcher chose for each stage of each operator
    call, with its reason: ``print(convnn.explain(layer, x))``."""
    record: list[Decision] = []
    token = _recording.set(record)
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    finally:
        _recording.reset(token)
    return Explanation(record)


def ann_index() -> None:
    """Record that an 'ann' index ranked a call's candidates itself (the selection stage)."""
    _decide(
        "selection",
        "ann index",
        lambda: (
            "candidates='ann': the index's tiles rank its candidates, the same on every backend"
        ),
    )


def _decide(stage: str, backend: str, why: Callable[[], str]) -> None:
    """Record and log a decision (never inside a traced graph: the decisions are the eager
    calls', and building their text would only slow tracing down)."""
    if torch.compiler.is_compiling():
        return
    record = _recording.get()
    if record is None and not _log.isEnabledFor(logging.DEBUG):
        return
    decision = Decision(stage, backend, why())
    if record is not None:
        record.append(decision)
    _log.debug("%s", decision)


# --------------------------------------------------------------------------- the request


def requested(backend: str | None = None) -> str | None:
    """The backend asked for (argument, then ``use()``, then CONVNN_BACKEND), or None for auto."""
    name = backend or _override.get() or os.environ.get("CONVNN_BACKEND")
    if name in (None, "", "auto"):
        return None
    check_choice("backend", name, BACKENDS + ("auto",))
    return name


def check(backend: str | None, device_type: str) -> None:
    """Check a request up front (a call may end before any stage asks): a known name, and
    for 'triton' a device it runs on."""
    if requested(backend) == "triton":
        _check_triton(device_type)


def _source(backend: str | None) -> str:
    if backend not in (None, "", "auto"):
        return "backend= argument"
    if _override.get() not in (None, "", "auto"):
        return "backends.use()"
    return "CONVNN_BACKEND"


def triton_usable(device_type: str) -> bool:
    """Whether the Triton kernels can run on ``device_type`` (CUDA, or any device under
    ``TRITON_INTERPRET=1``) with the triton package installed."""
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def _check_triton(device_type: str) -> ModuleType:
    if not triton_usable(device_type):
        raise ValueError(
            f"backend 'triton' needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 "
            f"on the CPU), got device '{device_type}'"
        )
    from . import triton

    return triton


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


# --------------------------------------------------------------------------- the decisions


def shortcut(name: str, exact: str | None, backend: str | None) -> bool:
    """Whether a call runs ``name`` ('F.conv2d' or 'SDPA') instead of the k-NN path: only
    under the automatic choice, and only when ``exact`` says why the configuration is
    exactly that operation (None: it is not)."""
    if exact is None or requested(backend) is not None:
        return False
    _decide("shortcut", name, lambda: f"automatic choice; the configuration is exactly {exact}")
    return True


#: Masked SDPA scores all N x N pairs where a window holds K: it beats the k-NN path
#: (which scores N x K but gathers, ranks and scatters) while N <= this many K (CPU
#: measurements: 196 tokens, K = 49 runs 20x faster as SDPA).
MASKED_SDPA_RATIO = 16
#: The same for SDPA by blocks of queries (each against the span of keys its windows
#: reach): it beats the k-NN path while its pairs per query are at most this many K (CPU,
#: forward and backward, 3 heads of 64: 1.6x faster at 53 K pairs per query (160 x 160, K
#: = 9), 5x at 16 K (112 x 112, K = 49)).
BLOCK_SDPA_RATIO = 32


#: The native kernel attends over each query's K listed keys (:func:`convnn.native.
#: listed_attention`); SDPA scores every key of its (N, M) mask or of its blocks' spans, about
#: twice as fast per key. The kernel runs where SDPA would score more than this many K keys
#: per query, or would not pay at all (CPU, forward and backward, 3 heads of 64, K = 49:
#: SDPA took 0.77 of the kernel's time at 2.04 K (a 10 x 10 map), the kernel 0.81 of SDPA's
#: at 2.12 K (12 x 12) and 0.33 at 56 x 56; K = 9 of 65 tokens: 0.6).
LISTED_RATIO = 2.1


def listed_attention_pays(pairs: float, K: int, blocks: bool = False) -> bool:
    """Whether softmax attention over each query's K listed keys runs faster on the native
    kernel than as SDPA scoring ``pairs`` keys per query (``blocks``: by blocks of queries)
    or, where that would not pay, than on the k-NN path."""
    return pairs > LISTED_RATIO * K or not masked_sdpa_pays(pairs, K, blocks)


def masked_sdpa_pays(pairs: float, K: int, blocks: bool = False) -> bool:
    """Whether attention over each query's K-token window runs faster as SDPA with a window
    mask, scoring ``pairs`` keys per query (N for the whole (N, N) mask; fewer ``blocks``
    of queries against the keys their windows reach), than as the k-NN path."""
    return pairs <= (BLOCK_SDPA_RATIO if blocks else MASKED_SDPA_RATIO) * K


def select_backend(
    scores: BlockScores,
    K: int,
    exclude: Tensor | None,
    window: Tensor | None,
    *,
    backend: str | None = None,
    device: str | None = None,
) -> ModuleType:
    """The backend that ranks ``scores`` (see the module docstring); ``device`` is the
    device type whose rule applies (default: the scores')."""
    operands = scores.operands
    return _choose(
        "selection",
        backend,
        device or scores.device.type,
        lambda tb: tb.no_kernel_select(scores, window),
        None if operands is None else operands[0],
        lambda tb: tb.unsupported_select(*operands, K),
        lambda tb: tb.select_check(K),
    )


def aggregate_backend(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
    *,
    backend: str | None = None,
    device: str | None = None,
) -> ModuleType:
    """The backend that aggregates (see the module docstring)."""
    return _choose(
        "aggregation",
        backend,
        device or values.device.type,
        lambda tb: tb.no_kernel_aggregate(values, indices),
        values,
        lambda tb: tb.unsupported_aggregate(values, indices, rho, weight, bias, kernel),
        lambda tb: tb.aggregate_check(values.dtype, kernel),
    )


def _choose(
    stage: str,
    backend: str | None,
    device: str,
    no_kernel: Callable[[ModuleType], str | None],
    operand: Tensor | None,
    uncovered: Callable[[ModuleType], str | None],
    check: Callable[[ModuleType], tuple | None],
) -> ModuleType:
    """The rule of the module docstring for one stage. ``no_kernel(triton)``: why the
    kernels are not designed for the call; ``operand``: a tensor whose dtype and device the
    kernels would see; ``uncovered(triton)``: why their table does not cover it;
    ``check(triton)``: the first-use check of the kernels it would launch."""
    name = requested(backend)
    if name in ("reference", "chunked"):
        _decide(stage, name, lambda: f"{name!r} requested by {_source(backend)}")
        return reference if name == "reference" else chunked
    if name == "triton":
        triton = _check_triton(device)
        why = no_kernel(triton)
        if why:
            _decide(
                stage,
                "chunked",
                lambda: (
                    f"'triton' requested by {_source(backend)}, but it has no {stage} kernel "
                    f"for {why} (by design)"
                ),
            )
            return chunked
        _decide(stage, "triton", lambda: f"'triton' requested by {_source(backend)}")
        return triton
    if device == "cuda" and triton_usable("cuda"):
        from . import triton

        why = no_kernel(triton)
        if why is None:
            device_dtype = operand.device, operand.dtype
            if operand.dtype not in triton.DTYPES:
                why = f"{operand.dtype} is outside the kernels' table"
            elif not triton._kernels_ready(*device_dtype, None):
                why = f"the kernels are not checked for {operand.device}"
            else:
                why = uncovered(triton)
                why = why and f"outside the kernels' table: {why}"
            checked = check(triton) if why is None else None
            if checked is not None and not triton._kernels_ready(*device_dtype, checked):
                what = triton.describe_check(checked)
                why = f"{what} did not pass its first-use check on {operand.device}"
        if why is None:
            _decide(stage, "triton", lambda: "automatic choice on CUDA: the kernels cover it")
            return triton
        _decide(stage, "chunked", lambda: f"automatic choice on CUDA: {why}")
        return chunked
    ranks = stage == "selection" and device == "cpu"  # the reason is built only if asked for
    _decide(
        stage,
        "chunked",
        lambda: (
            f"automatic choice on {device}: kernels run on CUDA"
            + (f"; {native.status()}" if ranks else "")
        ),
    )
    return chunked


def get(backend: str | None, device_type: str) -> ModuleType:
    """The backend module a call on ``device_type`` uses for the stages the kernels are
    designed for: the requested one, else (automatic) :data:`convnn.backends.triton.auto` on
    CUDA with triton installed (its rule per call) and chunked elsewhere."""
    name = requested(backend)
    if name is None:
        if device_type == "cuda" and triton_usable("cuda"):
            from . import triton

            return triton.auto
        return chunked
    if name == "triton":
        return _check_triton(device_type)
    return chunked if name == "chunked" else reference
