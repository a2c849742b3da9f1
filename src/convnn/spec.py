"""ConvNNSpec: every option of the ConvNN operator in one frozen, validated object.

The layers (``ConvNN1d``, ``ConvNN2d``, ``ConvNNAttention``, the branching hybrids) build one
from their keyword options and keep it as ``layer.spec``; the functional API builds the same
one from the same keywords; ``convert`` and ``create_model`` tell operator options from the
others by its fields. Adding an option is one field here plus the code of its stage.

Each field is checked once, in ``__post_init__``, with a ``ValueError`` that names the field,
says what was expected and what came. Checks that need the input (a window that fits the
map, K no larger than the candidates) happen when the operator runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import metric_names
from .options import (
    ANN_METHODS,
    ANN_METRICS,
    ANN_PROJECTIONS,
    CANDIDATES,
    KERNELS,
    WEIGHTINGS,
    check_bool,
    check_choice,
    check_fraction,
    check_positive_int,
    check_selection_dtype,
)

POSITIONALS = ("none", "coords", "fourier", "relative_bias", "cpe", "rope")


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class ConvNNSpec:
    """The operator's options (see DESIGN.md sections 2 and 2b and the README's table).

    Defaults are ConvNN2d's; each layer passes its own (ConvNNAttention: ``metric=
    'scaled_dot'``, ``include_self=False``, ``weighting='softmax'``, ...).
    """

    K: int | None = _doc("neighbours per query; None = every candidate (kernel 'none' only)", 9)
    metric: str = _doc("similarity used to rank and weight candidates", "cosine")
    p: float = _doc("'minkowski': the exponent, >= 1 (math.inf: Chebyshev)", 2.0)
    candidates: str = _doc("which positions each query may select", "all")
    num_candidates: int | None = _doc(
        "size of the 'random' / 'grid' candidate set; 'ann': the budget per query", None
    )
    window: int | None = _doc("side of the 'window' candidate neighbourhood (odd)", None)
    ann_method: str = _doc("'ann' candidates: 'grid' (multiprobe grid) or 'lsh'", "grid")
    ann_tables: int | None = _doc("'ann': independent hash tables (None: 8)", None)
    ann_projection: str = _doc(
        "'ann': 'random' projections or, for 'grid', 'pca' (the keys' principal axes)", "random"
    )
    ann_seed: int = _doc("'ann': seed of the index's fixed projections", 0)
    include_self: bool = _doc("the query itself fills slot 0", True)
    weighting: str = _doc("weights of the K selected neighbours: 'none' or 'softmax'", "none")
    kernel: str = _doc("aggregation kernel over the K slots", "standard")
    positional: str = _doc("positional encoding of the similarity", "none")
    lam: float = _doc("'coords': weight of the coordinates, in [0, 1]", 0.5)
    num_frequencies: int = _doc("'fourier': frequencies m (2m features)", 8)
    sigma: float = _doc("'fourier': std of the random frequencies", 1.0)
    max_offset: int = _doc("'relative_bias': offsets clamp to +-max_offset grid steps", 8)
    cpe_kernel: int = _doc("'cpe': side of the depthwise convolution (odd)", 3)
    selection_dtype: torch.dtype | None = _doc("dtype similarities are ranked in", None)

    def __post_init__(self) -> None:
        if self.K is not None:
            check_positive_int("K", self.K)
        check_choice("metric", self.metric, metric_names())
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not self.p >= 1:
            raise ValueError(f"p must be a number >= 1 (math.inf for Chebyshev), got {self.p!r}")
        check_choice("candidates", self.candidates, CANDIDATES)
        if self.num_candidates is not None:
            check_positive_int("num_candidates", self.num_candidates)
        check_choice("ann_method", self.ann_method, ANN_METHODS)
        if self.ann_tables is not None:
            check_positive_int("ann_tables", self.ann_tables)
        check_positive_int("ann_seed", self.ann_seed, minimum=0)
        if self.ann_projection not in ANN_PROJECTIONS[self.ann_method]:
            raise ValueError(
                f"ann_projection must be one of {list(ANN_PROJECTIONS[self.ann_method])} for "
                f"ann_method={self.ann_method!r}, got {self.ann_projection!r}"
            )
        if self.candidates == "ann" and self.metric not in ANN_METRICS:
            raise ValueError(
                f"metric must be one of {list(ANN_METRICS)} for candidates='ann' (an index "
                f"hashes those), got {self.metric!r}"
            )
        if self.candidates in ("random", "grid", "ann") and self.num_candidates is None:
            raise ValueError(
                f"num_candidates is required for candidates={self.candidates!r}, got None"
            )
        if self.window is not None:
            check_positive_int("window", self.window)
            if self.window % 2 == 0:
                raise ValueError(f"window must be odd, got {self.window}")
        if self.candidates == "window" and self.window is None:
            raise ValueError(
                "window is required for candidates='window' (an odd int >= 1), got None"
            )
        check_bool("include_self", self.include_self)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("kernel", self.kernel, KERNELS)
        if self.K is None and self.kernel != "none":
            raise ValueError(
                f"K=None (every candidate) needs kernel='none': per-slot weights need a fixed "
                f"K, got kernel={self.kernel!r}"
            )
        check_choice("positional", self.positional, POSITIONALS)
        check_fraction("lam", self.lam)
        check_positive_int("num_frequencies", self.num_frequencies)
        if (
            isinstance(self.sigma, bool)
            or not isinstance(self.sigma, (int, float))
            or not self.sigma > 0
        ):
            raise ValueError(f"sigma must be a number > 0, got {self.sigma!r}")
        check_positive_int("max_offset", self.max_offset, minimum=0)
        check_positive_int("cpe_kernel", self.cpe_kernel)
        if self.cpe_kernel % 2 == 0:
            raise ValueError(f"cpe_kernel must be odd, got {self.cpe_kernel}")
        if self.metric == "spatial" and self.positional not in ("none", "coords"):
            raise ValueError(
                f"positional must be 'none' for metric='spatial' (it ranks positions, not "
                f"features), got {self.positional!r}"
            )
        check_selection_dtype(self.selection_dtype)

    # ----------------------------------------------------------------- views

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def docs(cls) -> dict[str, str]:
        """One line of documentation per option."""
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}

    @classmethod
    def take(cls, values: dict[str, Any]) -> ConvNNSpec:
        """The spec of the options among ``values`` (a function's keyword arguments, e.g. its
        ``locals()``); other names are ignored."""
        return cls(**{name: values[name] for name in cls.fields() if name in values})

    def replace(self, **changes) -> ConvNNSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def options(self) -> dict[str, Any]:
        """The options as keyword arguments (what the functional API and the layers take)."""
        return {name: getattr(self, name) for name in self.fields()}

    def changed(self, defaults: ConvNNSpec | None = None, skip=()) -> dict[str, Any]:
        """The options (but those in ``skip``) that differ from ``defaults`` (ConvNNSpec()
        when None)."""
        base = defaults if defaults is not None else ConvNNSpec()
        return {
            n: v
            for n, v in self.options().items()
            if n not in skip and not _same(v, getattr(base, n))
        }

    def describe(self, defaults: ConvNNSpec | None = None, skip=()) -> str:
        """``name=value`` of the options that differ from ``defaults``, for ``extra_repr``."""
        return ", ".join(f"{n}={v!r}" for n, v in self.changed(defaults, skip).items())


def legacy_coords(coords, positional: str) -> str:
    """The ``positional`` option that the deprecated ``coords`` argument stands for."""
    check_choice("coords", coords, (None, "xy"))
    if coords is None:
        return positional
    if positional not in ("none", "coords"):
        raise ValueError(
            f"coords='xy' is positional='coords'; give one of them, got coords={coords!r} and "
            f"positional={positional!r}"
        )
    return "coords"


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
