"""Option names and argument checks shared by every layer of the library.

Every check raises a ``ValueError`` that names the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CANDIDATES = ("all", "random", "grid", "window", "ann")
ANN_METHODS = ("grid", "lsh")  # convnn.ann: multiprobe grid, locality-sensitive hashing
ANN_METRICS = ("cosine", "dot", "scaled_dot", "euclidean")  # the metrics an index can hash
ANN_PROJECTIONS = {"grid": ("random", "pca"), "lsh": ("random",)}  # per ann method
WEIGHTINGS = ("none", "softmax")
KERNELS = ("standard", "depthwise", "separable", "none")


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


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_fraction(name: str, value) -> float:
    """A real number in [0, 1] (lam, a dropout probability)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def check_tensor(name: str, tensor, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor {layout}, got {type(tensor).__name__}")


def check_rank(name: str, tensor, rank: int, layout: str, *, floating: bool = True) -> None:
    """A ``rank``-D tensor (of a floating dtype unless ``floating`` is False)."""
    check_tensor(name, tensor, layout)
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must be a {rank}-D tensor {layout}, got shape {tuple(tensor.shape)}"
        )
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}")


def check_like(name: str, tensor, ref_name: str, ref) -> None:
    """``tensor`` (a tensor or None) has the dtype and device of ``ref``."""
    if tensor is None:
        return
    check_tensor(name, tensor, f"like {ref_name}")
    if tensor.dtype != ref.dtype or tensor.device != ref.device:
        raise ValueError(
            f"{name} must have the dtype and device of {ref_name} ({ref.dtype}, {ref.device}), "
            f"got {tensor.dtype}, {tensor.device}"
        )


def check_self_index(self_index, include_self: bool, N: int, M: int, device) -> torch.Tensor | None:
    """Each query's own index among the M keys, (N,) int64, checked; None given: ``arange(N)``
    when N == M, else None (an error with ``include_self``, where slot 0 needs it)."""
    if self_index is None:
        if include_self and N != M:
            raise ValueError(
                f"self_index (N,) is required with include_self when N != M ({N} != {M}), got None"
            )
        return torch.arange(N, device=device) if N == M else None
    check_rank("self_index", self_index, 1, f"(N,) = ({N},)", floating=False)
    if self_index.shape[0] != N:
        raise ValueError(f"self_index must be (N,) = ({N},), got {tuple(self_index.shape)}")
    return check_indices("self_index", self_index, M, f"(key indices, M = {M})")


def check_selection_dtype(value) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"selection_dtype must be None or a floating torch.dtype, got {value!r}")


def check_generator(value) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ValueError(f"generator must be None or a torch.Generator, got {value!r}")


def check_indices(name: str, indices, size: int, layout: str, *, distinct: bool = False):
    """Integer indices in [0, size), as int64: one min/max reduction (and, with ``distinct``,
    a sort showing that no index repeats along the last dim).

    The bound is read back to the host, so this runs at public entry points only (the layers
    build their indices themselves). In a compiled graph it becomes an asynchronous assert
    (a RuntimeError on a bad index), so the check never breaks the graph.
    """
    check_tensor(name, indices, layout)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor {layout}, got dtype {indices.dtype}")
    indices = indices.long()
    if indices.numel() == 0:
        return indices
    ordered = indices.sort(-1).values if distinct else None
    repeats = None if ordered is None else (ordered[..., 1:] == ordered[..., :-1]).any()
    if torch.compiler.is_compiling():
        inside = ((indices >= 0) & (indices < size)).all()
        torch._assert_async(inside, f"{name} must lie in [0, {size})")
        if repeats is not None:
            torch._assert_async(~repeats, f"{name} must not repeat an index")
        return indices
    lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must lie in [0, {size}) {layout}, got values from {lo} to {hi}")
    if repeats is not None and repeats:
        twice = ordered[..., 1:][ordered[..., 1:] == ordered[..., :-1]][0]
        raise ValueError(f"{name} must not repeat an index {layout}, got {int(twice)} twice")
    return indices


def tensors_or_initial(name: str, given, initial: dict, like, what: str) -> dict:
    """A component's tensors: ``given`` {name: tensor} with exactly the names and shapes of
    ``initial`` and the dtype and device of ``like``, or ``initial`` cast like it when None.
    ``what`` says whose tensors they are, for the error message."""
    if given is None:
        return {n: t.to(device=like.device, dtype=like.dtype) for n, t in initial.items()}
    if not isinstance(given, dict) or set(given) != set(initial):
        got = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise ValueError(
            f"{name} must be a dict with the tensors {sorted(initial)} of {what}, got {got}"
        )
    for n, t in initial.items():
        check_like(f"{name}[{n!r}]", given[n], "the features", like)
        if given[n].shape != t.shape:
            raise ValueError(
                f"{name}[{n!r}] must have shape {tuple(t.shape)} for {what}, got "
                f"{tuple(given[n].shape)}"
            )
    return given
