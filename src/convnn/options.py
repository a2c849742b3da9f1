"""Option names and argument checks shared by every layer of the library.

Every check raises a ``ValueError`` that names the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("cosine", "euclidean", "dot", "scaled_dot", "spatial")
CANDIDATES = ("all", "random", "grid", "window")
WEIGHTINGS = ("none", "softmax")
KERNELS = ("standard", "depthwise", "separable", "none")
COORDS = (None, "xy")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def pair(name: str, value, *, minimum: int = 0) -> tuple[int, int]:
    """An int or a pair of ints (like ``nn.Conv2d``'s stride/padding) as a checked pair."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in items:
        check_positive_int(name, v, minimum=minimum)
    return items  # type: ignore[return-value]


def check_rank(name: str, tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must be a {rank}-D tensor {layout}, got shape {tuple(tensor.shape)}"
        )
