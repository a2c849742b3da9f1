"""Seeded random configurations of every layer, functional entry point and option.

Each configuration is one of three kinds:

- *compare*: valid options and finite inputs, run on the default dispatch ('auto': chunked
  on the CPU, with its exact shortcuts) and on the reference backend; the outputs (indices
  too, where returned) and the gradients of every input and parameter must agree.
- *non-finite*: the same with NaN / +-inf written into the inputs; nothing may crash or
  hang, and the outputs must agree just as strictly: NaN and +-inf in the same places, the
  same indices, the finite values within tolerance. Gradients are compared as strictly on
  the chunked backend; the default dispatch's exact shortcuts (F.conv2d, SDPA) are torch's
  own kernels, whose backward spreads NaN its own way, so there only outputs are compared.
- *mistake*: one argument made wrong on purpose (a bad choice, number, flag, dtype, shape,
  index or type); the call must raise a clear error.

What is counted:

- crash: any exception (or a configuration running past ``TIME_LIMIT_S``) in a *compare*
  or *non-finite* configuration;
- mismatch: outputs, indices or gradients that differ beyond the dtype's tolerance, in
  shape or dtype, or that hold NaN or +-inf in different places;
- unclear error: a *mistake* that raised anything other than a ``ValueError``, raised
  nothing, or raised a ``ValueError`` whose message does not name the argument (as a whole
  word) or does not say what came (the word "got").

CI runs ``DEFAULT_CONFIGS`` configurations; ``CONVNN_FUZZ=10000`` runs more,
``CONVNN_FUZZ_SEED`` shifts the seeds, ``CONVNN_FUZZ_BACKEND`` compares another backend
than the default dispatch with the reference (e.g. 'triton', under TRITON_INTERPRET=1) and
``CONVNN_FUZZ_REPORT=path.json`` records the counts and the failing configurations. Every configuration is reproducible from its seed:
``CONVNN_FUZZ=1 CONVNN_FUZZ_SEED=<seed>``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from _helpers import on_backend

from convnn import Branching2d, BranchingAttention, ConvNN1d, ConvNN2d, ConvNNAttention
from convnn.functional import (
    Grid,
    candidate_count,
    convnn1d,
    convnn2d,
    convnn_attention,
    knn_select,
    neighbor_aggregate,
)

DEFAULT_CONFIGS = 300
TIME_LIMIT_S = 60
F32, F64 = torch.float32, torch.float64
TOLERANCE = {F32: dict(rtol=1e-4, atol=1e-5), F64: dict(rtol=1e-9, atol=1e-10)}
METRICS = ["cosine", "euclidean", "dot", "scaled_dot", "spatial"]
SELECTION_DTYPES = [None, None, None, F32, F64, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------- a configuration


@dataclass
class Case:
    """One configuration: ``call(backend, override, nonfinite)`` returns the tensors to
    compare. ``override`` replaces arguments by name (a value, or a function applied to the
    tensor built for that argument); ``mistakes`` lists (argument, override) pairs that
    are wrong for this configuration."""

    name: str
    options: dict
    call: Callable
    mistakes: list = field(default_factory=list)
    dtype: torch.dtype = F64


def _randn(gen: torch.Generator, *shape, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


APPLIED: set[str] = set()  # overrides that reached an argument (a mistake must)


def _apply(values: dict, override: dict) -> dict:
    """``values`` with the overrides for the names it holds applied."""
    out = dict(values)
    for name, new in override.items():
        if name in out:
            out[name] = new(out[name]) if callable(new) else new
            APPLIED.add(name)
    return out


def _spoil(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``t`` with NaN, +inf or -inf written at a few random places."""
    t = t.detach().clone()
    if t.numel():
        flat = t.view(-1)
        count = 1 + int(torch.randint(0, max(1, flat.numel() // 4), (1,), generator=gen))
        where = torch.randint(0, flat.numel(), (count,), generator=gen)
        kinds = torch.tensor([math.nan, math.inf, -math.inf], dtype=t.dtype)
        flat[where] = kinds[torch.randint(0, 3, (count,), generator=gen)]
    return t


def _run(fn, inputs: dict, params: list, seed: int) -> tuple[list, list]:
    """Call ``fn(**inputs)``; return its outputs (floating and index tensors) and the
    gradients of every floating input tensor and parameter."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    leaves = [t.requires_grad_() for t in leaves] + params
    torch.manual_seed(seed)  # random candidates / dropout draw alike on every backend
    out = fn(**inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    floats = [o for o in outs if o.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    grad_out = [_randn(gen, *o.shape, dtype=o.dtype) for o in floats]
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(
        floats, wrt, grad_out, allow_unused=True, materialize_grads=True
    )  # unused: e.g. q and k without softmax weighting (selection is discrete)
    return outs, list(grads)


def _run_options(backend: str, seed: int, training: bool, return_indices: bool) -> dict:
    """The functional API's options for one run: a seeded generator, the backend."""
    return dict(
        training=training,
        generator=torch.Generator().manual_seed(seed + 1),
        return_indices=return_indices,
        backend=None if backend == "auto" else backend,
    )


# --------------------------------------------------------------------------- bad arguments

BAD_INT = [0, -1, 2.5, True, "3", None]
BAD_CHOICE = ["bogus", 3]
BAD_FRACTION = [-0.25, 1.5, "half", math.nan]
BAD_FLAG = ["yes", 1, None]
BAD_SELECTION_DTYPE = [torch.int32, "float16", torch.bool]


def _bad_tensors(other_dtype: torch.dtype | None, channel_dim: int | None = None) -> list:
    """Mistakes on a floating tensor argument: rank, type, not floating (and, where other
    tensors fix them, dtype and channels)."""
    bad = [
        lambda t: t.flatten(0, 1),  # one dim too few
        lambda t: t[None],  # one too many
        lambda t: t.long(),  # not floating
        lambda t: t.tolist(),  # not a tensor
    ]
    if other_dtype is not None:  # unlike the other operands
        bad.append(lambda t: t.to(other_dtype))
    if channel_dim is not None:  # one channel too many
        bad.append(lambda t: torch.cat([t, t.narrow(channel_dim, 0, 1)], channel_dim))
    return bad


def _bad_weight(shape: tuple) -> list:
    """Mistakes on a weight: wrong shape, missing, not a tensor."""
    wrong = list(shape)
    wrong[-1] += 1
    return [lambda t, w=tuple(wrong): torch.ones(w, dtype=t.dtype), None, "weight"]


def _option_mistakes(o: dict, count: int, hw: tuple[int, int], conv_layer: bool = False) -> list:
    """Mistakes on the operator's options that every layer and function takes.

    A conv layer (ConvNN1d/2d, Branching2d) takes K=None (kernel_size squared) and runs a
    candidate subset larger than a small map on the whole map, like nn.Conv2d users expect."""
    H, W = hw
    m = [("K", v) for v in BAD_INT + [count + 1] if not (conv_layer and v is None)]
    m += [(n, v) for n in ("metric", "candidates", "weighting") for v in BAD_CHOICE]
    m += [("include_self", v) for v in BAD_FLAG]
    m += [("selection_dtype", v) for v in BAD_SELECTION_DTYPE]
    if o["candidates"] in ("random", "grid"):
        too_many = [] if conv_layer else [H * W + 1]
        m += [("num_candidates", v) for v in [0, -1, 2.5, None, *too_many]]
    if o["candidates"] == "window":
        m += [("window", v) for v in [0, 2, None, 1.0, 2 * max(H, W) + 3]]
    return m


# --------------------------------------------------------------------------- random options


def _window_choices(padded: tuple[int, int]) -> list[int]:
    Hp, Wp = padded
    return [w for w in (1, 3, 5) if (Hp == 1 or w <= Hp) and w <= Wp]


def _operator_options(rng: random.Random, grid: Grid) -> dict:
    """metric, candidates (+ num_candidates / window), include_self, weighting,
    selection_dtype and K (up to the number of candidates)."""
    o = dict(
        metric=rng.choice(METRICS),
        candidates=rng.choice(["all", "all", "random", "grid", "window"]),
        include_self=rng.random() < 0.5,
        weighting=rng.choice(["none", "softmax"]),
        selection_dtype=rng.choice(SELECTION_DTYPES),
    )
    windows = _window_choices(grid.padded)
    if o["candidates"] == "window" and not windows:
        o["candidates"] = "all"
    o["num_candidates"] = (
        rng.randint(1, grid.H * grid.W) if o["candidates"] in ("random", "grid") else None
    )
    o["window"] = rng.choice(windows) if o["candidates"] == "window" else None
    count = candidate_count(grid, o["candidates"], o["num_candidates"], o["window"])
    o["K"] = rng.randint(1, count)
    return o


def _shape(rng: random.Random) -> tuple[int, int, int]:
    """(B, H, W): empty batches, 1 x 1 maps, rows, columns and non-square maps."""
    B = rng.choice([0, 1, 1, 2, 2, 3])
    return B, rng.choice([1, 1, 2, 3, 4, 5]), rng.choice([1, 2, 3, 4, 5, 6])


# --------------------------------------------------------------------------- conv layers


def _conv_case(rng: random.Random, seed: int, dims: int, functional: bool) -> Case:
    """ConvNN1d / ConvNN2d, or convnn1d / convnn2d with explicit weights."""
    B, H, W = _shape(rng)
    if dims == 1:
        H = 1
        stride, padding = rng.randint(1, 3), rng.randint(0, 2)
        pad2, stride2 = (0, padding), (1, stride)
    else:
        stride = rng.choice([1, 2, (1, 2), (2, 1), 3])
        padding = rng.choice([0, 1, (0, 1), (2, 0)])
        stride2 = stride if isinstance(stride, tuple) else (stride, stride)
        pad2 = padding if isinstance(padding, tuple) else (padding, padding)
    grid = Grid(H, W, pad2[0], pad2[1], stride2[0], stride2[1])
    o = _operator_options(rng, grid)
    C = rng.randint(1, 4)
    kernel = rng.choice(["standard", "depthwise", "separable", "none"])
    c_out = C if kernel in ("depthwise", "none") else rng.randint(1, 4)
    o.update(kernel=kernel, coords=rng.choice([None, None, "xy"]), lam=rng.choice([0.0, 0.3, 1.0]))
    dtype = rng.choice([F32, F64])
    has_bias = rng.random() < 0.7
    training = rng.random() < 0.3
    return_indices = rng.random() < 0.3
    K = o["K"]
    shape_x = (B, C, H, W) if dims == 2 else (B, C, W)
    other = F32 if dtype == F64 else F64

    def call(backend: str, override: dict, nonfinite: bool):
        gen = torch.Generator().manual_seed(seed)
        x = _randn(gen, *shape_x, dtype=dtype)
        x = _spoil(x, gen) if nonfinite else x
        if not functional:
            ctor = dict(in_channels=C, out_channels=c_out, stride=stride, padding=padding)
            ctor.update(o, bias=has_bias)
            ctor = _apply(ctor, override)
            torch.manual_seed(seed)
            layer = (ConvNN2d if dims == 2 else ConvNN1d)(**ctor).to(dtype).train(training)
            inputs = _apply(dict(x=x), override)
            fn = lambda x: layer(x, return_indices=return_indices)  # noqa: E731
            with on_backend(backend):
                return _run(fn, inputs, list(layer.parameters()), seed)
        weight = {
            "standard": _randn(gen, c_out, C, K, dtype=dtype),
            "none": None,
        }.get(kernel, _randn(gen, C, 1, K, dtype=dtype))
        inputs = dict(
            x=x,
            weight=weight,
            bias=_randn(gen, c_out, dtype=dtype) if has_bias else None,
            pointwise_weight=(
                _randn(gen, c_out, C, 1, dtype=dtype) if kernel == "separable" else None
            ),
            stride=stride,
            padding=padding,
            **_run_options(backend, seed, training, return_indices),
            **o,
        )
        fn = convnn2d if dims == 2 else convnn1d
        return _run(fn, _apply(inputs, override), [], seed)

    count = candidate_count(grid, o["candidates"], o["num_candidates"], o["window"])
    mistakes = _option_mistakes(o, count, (H, W), conv_layer=not functional)
    # kernel 'none' without bias: no weight fixes x's dtype (nor, in functional, channels)
    fixed = kernel != "none" or has_bias
    channels = 1 if fixed or not functional else None
    mistakes += [("x", v) for v in _bad_tensors(other if fixed else None, channels)]
    mistakes += [("kernel", v) for v in BAD_CHOICE]
    mistakes += [("coords", v) for v in ["polar", 1]]
    mistakes += [("lam", v) for v in BAD_FRACTION]
    bad_stride = [0, -1, 1.5, "2"] + ([(1, 2, 3), (0, 1)] if dims == 2 else [(1, 2)])
    mistakes += [("stride", v) for v in bad_stride]
    mistakes += [("padding", v) for v in [-1, 0.5, "1"] + ([(1, -1)] if dims == 2 else [])]
    if functional:
        mistakes += [("training", v) for v in BAD_FLAG]
        mistakes += [("return_indices", v) for v in BAD_FLAG]
        mistakes += [("generator", v) for v in [0, "seed"]]
        mistakes += [("backend", v) for v in BAD_CHOICE]
        if kernel != "none":
            shape = (c_out, C, K) if kernel == "standard" else (C, 1, K)
            mistakes += [("weight", v) for v in _bad_weight(shape)]
            mistakes += [("weight", lambda t, d=other: t.to(d))]
        else:
            mistakes += [("weight", torch.ones(C, 1, K, dtype=dtype))]
        if has_bias:
            mistakes += [("bias", lambda t: torch.cat([t, t])), ("bias", lambda t: t[None])]
            mistakes += [("bias", lambda t, d=other: t.to(d))]
        if kernel == "separable":
            mistakes += [("pointwise_weight", v) for v in [None, lambda t: t[:, :, 0]]]
        else:
            mistakes += [("pointwise_weight", torch.ones(c_out, C, 1, dtype=dtype))]
    else:
        mistakes += [(n, v) for n in ("in_channels", "out_channels") for v in BAD_INT]
        if kernel in ("depthwise", "none"):
            mistakes += [("out_channels", C + 1)]
    name = ("convnn" if functional else "ConvNN") + f"{dims}d"
    options = dict(o, C=C, c_out=c_out, shape=shape_x, stride=stride, padding=padding)
    options.update(dtype=str(dtype), bias=has_bias, training=training, indices=return_indices)
    return Case(name, options, call, mistakes, dtype)


def _branching2d_case(rng: random.Random, seed: int) -> Case:
    B, H, W = _shape(rng)
    stride, padding = rng.choice([1, 2]), rng.choice([0, 1])
    grid = Grid(H, W, padding, padding, stride, stride)
    o = _operator_options(rng, grid)
    o.update(kernel=rng.choice(["standard", "separable"]), coords=rng.choice([None, "xy"]))
    C, c_out = rng.randint(1, 4), rng.randint(1, 5)
    ratio, kernel_size = rng.choice([0.0, 0.5, 1.0, rng.random()]), rng.choice([1, 3])
    dtype = rng.choice([F32, F64])
    other = F32 if dtype == F64 else F64

    def call(backend, override, nonfinite):
        gen = torch.Generator().manual_seed(seed)
        x = _randn(gen, B, C, H, W, dtype=dtype)
        x = _spoil(x, gen) if nonfinite else x
        ctor = dict(in_channels=C, out_channels=c_out, kernel_size=kernel_size, ratio=ratio)
        ctor.update(stride=stride, padding=padding, **o)
        torch.manual_seed(seed)
        layer = Branching2d(**_apply(ctor, override)).to(dtype)
        with on_backend(backend):
            return _run(layer, _apply(dict(x=x), override), list(layer.parameters()), seed)

    count = candidate_count(grid, o["candidates"], o["num_candidates"], o["window"])
    mistakes = [("x", v) for v in _bad_tensors(other, channel_dim=1)]
    mistakes += [("ratio", v) for v in BAD_FRACTION]
    mistakes += [(n, v) for n in ("in_channels", "out_channels", "kernel_size") for v in BAD_INT]
    mistakes += [("kernel_size", 2)]
    if math.floor(ratio * c_out):  # the ConvNN branch exists: its options must be right
        mistakes += _option_mistakes(o, count, (H, W), conv_layer=True)
    options = dict(o, C=C, c_out=c_out, shape=(B, C, H, W), ratio=ratio, dtype=str(dtype))
    options.update(kernel_size=kernel_size, stride=stride, padding=padding)
    return Case("Branching2d", options, call, mistakes, dtype)


# --------------------------------------------------------------------------- attention


def _attention_options(rng: random.Random, grid: Grid, kernels: list[str]) -> dict:
    o = _operator_options(rng, grid)
    o["kernel"] = rng.choice(kernels)
    if o["kernel"] == "none" and o["candidates"] == "all" and rng.random() < 0.3:
        o["K"] = None  # every token
    return o


def _attention_case(rng: random.Random, seed: int, functional: bool) -> Case:
    B, h, w = _shape(rng)
    N = h * w
    pass_hw = rng.random() < 0.8  # else the (deprecated) guess, or a 1 x N row
    hw = (h, w) if pass_hw else None
    grid = Grid(h, w) if pass_hw else Grid(*_guess(N))
    heads, d = rng.randint(1, 3), rng.randint(1, 3)
    C = heads * d
    o = _attention_options(rng, grid, ["none", "depthwise", "standard"])
    reads_map = o["candidates"] in ("window", "grid") or o["metric"] == "spatial"
    if not functional and not pass_hw and reads_map:
        # A layer never guesses a map (DESIGN 2b): without hw it refuses such options.
        hw, grid = (h, w), Grid(h, w)
        o = _attention_options(rng, grid, ["none", "depthwise", "standard"])
    dtype = rng.choice([F32, F64])
    other = F32 if dtype == F64 else F64
    training = rng.random() < 0.3
    drop = 0.0 if training else rng.choice([0.0, 0.5])  # dropout acts in training only
    return_indices = rng.random() < 0.3
    K, kernel = o["K"], o["kernel"]
    rng_out = rng.randint(1, 4)  # output channels of a 'standard' kernel

    def call(backend, override, nonfinite):
        gen = torch.Generator().manual_seed(seed)
        if not functional:
            x = _randn(gen, B, N, C, dtype=dtype)
            x = _spoil(x, gen) if nonfinite else x
            ctor = dict(dim=C, num_heads=heads, attn_drop=drop, proj_drop=0.0, qkv_bias=True)
            ctor.update(o)
            torch.manual_seed(seed)
            layer = ConvNNAttention(**_apply(ctor, override)).to(dtype).train(training)
            inputs = _apply(dict(x=x, hw=hw), override)
            fn = lambda x, hw: layer(x, hw=hw, return_indices=return_indices)  # noqa: E731
            with on_backend(backend):
                return _run(fn, inputs, list(layer.parameters()), seed)
        q, k, v = (_randn(gen, B, heads, N, d, dtype=dtype) for _ in range(3))
        if nonfinite:
            q, k, v = (_spoil(t, gen) for t in (q, k, v))
        c_out = rng_out if kernel == "standard" else C
        weight = {
            "standard": _randn(gen, c_out, C, K or 1, dtype=dtype),
            "depthwise": _randn(gen, C, 1, K or 1, dtype=dtype),
        }.get(kernel)
        inputs = dict(q=q, k=k, v=v, weight=weight, bias=_randn(gen, c_out, dtype=dtype))
        inputs.update(hw=hw, dropout_p=drop, **o)
        inputs.update(_run_options(backend, seed, training, return_indices))
        return _run(convnn_attention, _apply(inputs, override), [], seed)

    count = candidate_count(grid, o["candidates"], o["num_candidates"], o["window"])
    mistakes = _option_mistakes(o, count, grid.padded)
    mistakes += [("kernel", v) for v in BAD_CHOICE + ["separable"]]
    mistakes += [("hw", v) for v in [(h + 1, w), (0, N), "3x3", N, (h, w, 1)]]
    if functional:
        mistakes += [(n, v) for n in ("q", "k", "v") for v in _bad_tensors(other)]
        mistakes += [("k", lambda t: torch.cat([t, t], 2)), ("v", lambda t: t[:, :, :-1])]
        mistakes += [("dropout_p", v) for v in BAD_FRACTION]
        mistakes += [(n, v) for n in ("training", "return_indices") for v in BAD_FLAG]
        mistakes += [("generator", "seed"), ("backend", "bogus")]
        mistakes += [("bias", lambda t: torch.cat([t, t])), ("bias", lambda t: t.to(other))]
        if kernel != "none":
            c_out = rng_out if kernel == "standard" else C
            shape = (c_out, C, K) if kernel == "standard" else (C, 1, K)
            mistakes += [("weight", v) for v in _bad_weight(shape)]
        else:
            mistakes += [("weight", torch.ones(C, 1, 2, dtype=dtype))]
    else:
        mistakes += [("x", v) for v in _bad_tensors(other, channel_dim=2)]
        mistakes += [("dim", v) for v in BAD_INT] + [("num_heads", v) for v in BAD_INT]
        mistakes += [("num_heads", C + 1)] if C > 1 else []
        mistakes += [("attn_drop", v) for v in BAD_FRACTION]
        mistakes += [("proj_drop", v) for v in BAD_FRACTION]
    mistakes = _without_valid_k_none(mistakes, kernel)
    name = "convnn_attention" if functional else "ConvNNAttention"
    options = dict(o, B=B, N=N, hw=hw, heads=heads, d=d, dtype=str(dtype), drop=drop)
    options.update(training=training, indices=return_indices)
    return Case(name, options, call, mistakes, dtype)


def _without_valid_k_none(mistakes: list, kernel: str) -> list:
    """Attention takes K=None (every candidate) when there are no per-slot weights."""
    return [(n, v) for n, v in mistakes if not (kernel == "none" and n == "K" and v is None)]


def _guess(N: int) -> tuple[int, int]:
    """The layout hw=None gives N tokens (deprecated square guess, else a row)."""
    side = math.isqrt(N)
    return (side, side) if side * side == N and side > 1 else (1, N)


def _branching_attention_case(rng: random.Random, seed: int) -> Case:
    B, h, w = _shape(rng)
    N = h * w
    heads = rng.randint(1, 2)
    a, b = rng.randint(0, 2), rng.randint(0, 2)
    a = a or (0 if b else 1)
    dim = heads * (a + b)
    ratio = 1.0 if b == 0 else (heads * a + 0.5) / dim
    grid = Grid(h, w)
    o = _attention_options(rng, grid, ["none", "depthwise", "standard"])
    if o["K"] is None:
        o["K"] = N
    dtype = rng.choice([F32, F64])
    other = F32 if dtype == F64 else F64

    def call(backend, override, nonfinite):
        gen = torch.Generator().manual_seed(seed)
        x = _randn(gen, B, N, dim, dtype=dtype)
        x = _spoil(x, gen) if nonfinite else x
        ctor = dict(dim=dim, num_heads=heads, ratio=ratio, qkv_bias=True, attn_drop=0.0, **o)
        torch.manual_seed(seed)
        layer = BranchingAttention(**_apply(ctor, override)).to(dtype)
        inputs = _apply(dict(x=x, hw=(h, w)), override)
        with on_backend(backend):
            return _run(layer, inputs, list(layer.parameters()), seed)

    count = candidate_count(grid, o["candidates"], o["num_candidates"], o["window"])
    mistakes = [("x", v) for v in _bad_tensors(other, channel_dim=2)]
    mistakes += [("ratio", v) for v in BAD_FRACTION]
    mistakes += [("dim", v) for v in BAD_INT] + [("num_heads", v) for v in BAD_INT]
    mistakes += [("attn_drop", v) for v in BAD_FRACTION]
    mistakes += [("hw", v) for v in [(h + 1, w), (0, N), "3x3"]]
    if a:  # the ConvNN branch exists
        mistakes += _option_mistakes(o, count, (h, w))
    mistakes = _without_valid_k_none(mistakes, o["kernel"])
    options = dict(o, B=B, N=N, dim=dim, heads=heads, ratio=ratio, dtype=str(dtype))
    return Case("BranchingAttention", options, call, mistakes, dtype)


# --------------------------------------------------------------------------- selection / aggregation


def _knn_select_case(rng: random.Random, seed: int) -> Case:
    B, N, M = rng.choice([0, 1, 2, 3]), rng.randint(1, 7), rng.randint(1, 9)
    D = rng.randint(1, 4)
    kind = rng.choice(["all", "shared", "per_query"])
    include_self = rng.random() < 0.4
    if include_self and N != M and rng.random() < 0.5:
        N = M  # self_index defaults to arange(N)
    metric = rng.choice(METRICS[:-1])
    dtype = rng.choice([F32, F64])
    other = F32 if dtype == F64 else F64
    sel = rng.choice(SELECTION_DTYPES)
    g = torch.Generator().manual_seed(seed + 7)
    count = M
    cand = None
    if kind == "shared":
        count = rng.randint(1, M)
        cand = torch.randperm(M, generator=g)[:count]  # unsorted
    elif kind == "per_query":
        count = rng.randint(1, M)
        cand = torch.stack([torch.randperm(M, generator=g)[:count] for _ in range(N)])
    self_index = torch.randint(0, M, (N,), generator=g) if include_self and N != M else None
    K = rng.randint(1, count)

    def call(backend, override, nonfinite):
        gen = torch.Generator().manual_seed(seed)
        q, k = _randn(gen, B, N, D, dtype=dtype), _randn(gen, B, M, D, dtype=dtype)
        if nonfinite:
            q, k = _spoil(q, gen), _spoil(k, gen)
        inputs = dict(query=q, key=k, K=K, metric=metric, candidates=cand)
        inputs.update(include_self=include_self, self_index=self_index, selection_dtype=sel)
        inputs["backend"] = None if backend == "auto" else backend
        return _run(knn_select, _apply(inputs, override), [], seed)

    mistakes = [(n, v) for n in ("query", "key") for v in _bad_tensors(other)]
    mistakes += [("key", lambda t: torch.cat([t, t], -1))]
    mistakes += [("K", v) for v in BAD_INT + [count + 1]]
    mistakes += [("metric", v) for v in BAD_CHOICE + ["spatial"]]
    mistakes += [("include_self", v) for v in BAD_FLAG]
    mistakes += [("selection_dtype", v) for v in BAD_SELECTION_DTYPE]
    mistakes += [("backend", "bogus")]
    bad_cand = [torch.tensor([M]), torch.tensor([-1]), torch.zeros(1), [0], torch.zeros(1, 1, 1)]
    if N != 1:
        bad_cand.append(torch.zeros(N + 1, 1, dtype=torch.long))
    if M > 1:
        bad_cand.append(torch.zeros(2, dtype=torch.long))  # a repeated candidate
    mistakes += [("candidates", v) for v in bad_cand]
    if include_self:
        bad_self = [torch.full((N,), M), torch.full((N,), -1), torch.zeros(N), torch.zeros(N + 1)]
        mistakes += [("self_index", v) for v in bad_self]
        if N != M:
            mistakes += [("self_index", None)]
    options = dict(B=B, N=N, M=M, D=D, kind=kind, K=K, metric=metric, include_self=include_self)
    options.update(dtype=str(dtype), selection_dtype=str(sel))
    return Case("knn_select", options, call, mistakes, dtype)


def _aggregate_case(rng: random.Random, seed: int) -> Case:
    B, M, N, K = rng.choice([0, 1, 2, 3]), rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 4)
    groups = rng.choice([None, 1, 2])
    G = groups or 1
    C = G * rng.randint(1, 3)
    kernel = rng.choice(["standard", "depthwise", "separable", "none"])
    c_out = C if kernel in ("depthwise", "none") else rng.randint(1, 4)
    has_rho, has_bias = rng.random() < 0.5, rng.random() < 0.6
    dtype = rng.choice([F32, F64])
    other = F32 if dtype == F64 else F64
    shape_i = (B, N, K) if groups is None else (B, G, N, K)
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randint(0, M, shape_i, generator=g)
    idx = idx.int() if rng.random() < 0.2 else idx

    def call(backend, override, nonfinite):
        gen = torch.Generator().manual_seed(seed)
        values = _randn(gen, B, M, C, dtype=dtype)
        values = _spoil(values, gen) if nonfinite else values
        inputs = dict(
            values=values,
            indices=idx,
            weight={
                "standard": _randn(gen, c_out, C, K, dtype=dtype),
                "none": None,
            }.get(kernel, _randn(gen, C, 1, K, dtype=dtype)),
            bias=_randn(gen, c_out, dtype=dtype) if has_bias else None,
            weights=_randn(gen, *shape_i, dtype=dtype) if has_rho else None,
            kernel=kernel,
            pointwise_weight=(
                _randn(gen, c_out, C, 1, dtype=dtype) if kernel == "separable" else None
            ),
            backend=None if backend == "auto" else backend,
        )
        return _run(neighbor_aggregate, _apply(inputs, override), [], seed)

    mistakes = [("values", v) for v in _bad_tensors(other)]
    mistakes += [("kernel", v) for v in BAD_CHOICE]
    mistakes += [("backend", "bogus")]
    bad_idx = [lambda t: t.double(), lambda t: t.bool(), lambda t: t.tolist()]
    bad_idx += [lambda t: t.reshape(-1, t.shape[-1]), lambda t: t[None, None]]  # 2-D, 5/6-D
    if idx.numel():  # out of [0, M)
        bad_idx += [lambda t: t + M, lambda t: t - M]
    if B:
        bad_idx.append(lambda t: t[:-1])  # another batch size
    mistakes += [("indices", v) for v in bad_idx]
    if kernel != "none":
        shape = (c_out, C, K) if kernel == "standard" else (C, 1, K)
        mistakes += [("weight", v) for v in _bad_weight(shape)]
        mistakes += [("weight", lambda t: t.to(other))]
    else:
        mistakes += [("weight", torch.ones(C, 1, K, dtype=dtype))]
    if has_bias:
        mistakes += [("bias", lambda t: torch.cat([t, t])), ("bias", lambda t: t.to(other))]
        mistakes += [("bias", lambda t: t[None])]
    if has_rho:
        mistakes += [("weights", lambda t: t[..., :-1]), ("weights", lambda t: t.to(other))]
        mistakes += [("weights", lambda t: t.tolist())]
    if kernel == "separable":
        mistakes += [("pointwise_weight", v) for v in [None, lambda t: t[:, :, 0], "w"]]
    options = dict(shape=shape_i, M=M, C=C, kernel=kernel, rho=has_rho, bias=has_bias)
    options.update(dtype=str(dtype), index_dtype=str(idx.dtype))
    return Case("neighbor_aggregate", options, call, mistakes, dtype)


ENTRIES = {
    "ConvNN1d": lambda rng, s: _conv_case(rng, s, 1, False),
    "ConvNN2d": lambda rng, s: _conv_case(rng, s, 2, False),
    "convnn1d": lambda rng, s: _conv_case(rng, s, 1, True),
    "convnn2d": lambda rng, s: _conv_case(rng, s, 2, True),
    "ConvNNAttention": lambda rng, s: _attention_case(rng, s, False),
    "convnn_attention": lambda rng, s: _attention_case(rng, s, True),
    "Branching2d": _branching2d_case,
    "BranchingAttention": _branching_attention_case,
    "knn_select": _knn_select_case,
    "neighbor_aggregate": _aggregate_case,
}


def make_case(seed: int) -> tuple[Case, str]:
    """The configuration of ``seed`` and its kind ('compare', 'non-finite' or 'mistake')."""
    rng = random.Random(seed)
    case = ENTRIES[rng.choice(sorted(ENTRIES))](rng, seed)
    kind = rng.choices(["compare", "non-finite", "mistake"], weights=[6, 2, 3])[0]
    return case, kind


# --------------------------------------------------------------------------- checks


def _agree(got: list, want: list, dtype: torch.dtype) -> str | None:
    """None if two runs agree, else what differs."""
    if len(got) != len(want):
        return f"{len(got)} results vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"result {i}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"result {i}: indices differ"
            continue
        if not torch.equal(a.isnan(), b.isnan()):
            return f"result {i}: NaN in different places"
        if not (
            torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf())
        ):
            return f"result {i}: inf in different places"
        finite = a.isfinite()
        a, b = a[finite].double(), b[finite].double()
        tol = TOLERANCE[dtype]
        excess = (a - b).abs() - tol["atol"] - tol["rtol"] * b.abs()
        if excess.numel() and excess.max() > 0:
            worst = int(excess.argmax())
            return f"result {i}: {a[worst].item()!r} vs {b[worst].item()!r}"
    return None


def _clear(err: BaseException | None, name: str) -> str | None:
    """None if ``err`` is a clear error for a mistake on argument ``name``, else why not."""
    if err is None:
        return "accepted without an error"
    if not isinstance(err, ValueError):
        return f"{type(err).__name__}: {err}"
    message = str(err)
    if not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message):
        return f"ValueError not naming {name!r}: {message}"
    if "got" not in message:
        return f"ValueError not saying what came: {message}"
    return None


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in a configuration that runs too long (a hang)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(*_):
        raise TimeoutError(f"configuration ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_case(seed: int, backend: str = "auto") -> tuple[str, str, str | None]:
    """Run configuration ``seed`` on ``backend`` (and the reference): (kind, outcome,
    detail), outcome one of 'ok', 'crash', 'mismatch', 'unclear'."""
    case, kind = make_case(seed)
    try:
        with _time_limit(TIME_LIMIT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the deprecated square-map guess
            if kind == "mistake":
                i = random.Random(seed + 1).randrange(len(case.mistakes))
                name, bad = case.mistakes[i]
                err = None
                APPLIED.clear()
                try:
                    case.call(backend, {name: bad}, False)
                except Exception as e:  # noqa: BLE001 - any exception is classified
                    err = e
                assert name in APPLIED, f"seed {seed}: the mistake on {name} was never applied"
                why = _clear(err, name)
                shown = f"mistake {i}" if callable(bad) else repr(bad)
                return kind, ("unclear" if why else "ok"), why and f"{name}={shown}: {why}"
            nonfinite = kind == "non-finite"
            want = case.call("reference", {}, nonfinite)
            got, diff = case.call(backend, {}, nonfinite), None
            if nonfinite and backend == "auto":
                # The exact shortcuts are torch's kernels (F.conv2d, SDPA), whose backward
                # spreads NaN its own way: compare their outputs, and the k-NN path fully.
                diff = _agree(got[0], want[0], case.dtype)
                got = case.call("chunked", {}, nonfinite)
            diff = diff or _agree(got[0] + got[1], want[0] + want[1], case.dtype)
            return kind, ("mismatch" if diff else "ok"), diff
    except Exception as e:  # noqa: BLE001 - a crash, whatever it is
        return kind, "crash", f"{type(e).__name__}: {e}"


def test_fuzz(capsys):
    """Every configuration agrees with the reference backend and every mistake is a clear
    ValueError (counts printed; see the module docstring)."""
    count = int(os.environ.get("CONVNN_FUZZ", DEFAULT_CONFIGS))
    first = int(os.environ.get("CONVNN_FUZZ_SEED", 0))
    backend = os.environ.get("CONVNN_FUZZ_BACKEND", "auto")
    kinds, outcomes, failures = Counter(), Counter(), []
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (4x slower on 2 cores)
    try:
        for seed in range(first, first + count):
            kind, outcome, detail = run_case(seed, backend)
            kinds[kind] += 1
            outcomes[outcome] += 1
            if outcome != "ok":
                case = make_case(seed)[0]
                options = {k: str(v) for k, v in case.options.items()}
                failures.append(dict(seed=seed, entry=case.name, kind=kind, outcome=outcome))
                failures[-1].update(detail=detail, options=options)
    finally:
        torch.set_num_threads(threads)
    summary = dict(
        backend=backend,
        configurations=count,
        **{k: kinds[k] for k in ("compare", "non-finite", "mistake")},
        crashes=outcomes["crash"],
        mismatches=outcomes["mismatch"],
        unclear_errors=outcomes["unclear"],
        seconds=round(time.perf_counter() - start, 1),
    )
    with capsys.disabled():
        print("\nconvnn fuzz:", json.dumps(summary))
    if os.environ.get("CONVNN_FUZZ_REPORT"):
        with open(os.environ["CONVNN_FUZZ_REPORT"], "w") as f:
            json.dump(dict(summary, failures=failures), f, indent=1)
    assert not failures, "\n".join(
        f"seed {f['seed']} {f['entry']} ({f['kind']}): {f['outcome']}: {f['detail']}\n"
        f"    {f['options']}"
        for f in failures[:20]
    )


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_every_entry_has_mistakes(entry):
    """Every layer and function is fuzzed with mistakes on its arguments."""
    case = ENTRIES[entry](random.Random(0), 0)
    assert len({name for name, _ in case.mistakes}) >= 5, case.mistakes
