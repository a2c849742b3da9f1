"""``convnn verify``: check on random inputs that ConvNN recovers the layers it generalises.

Each case builds the PyTorch module, its ConvNN configuration with the same weights, runs
both on the same random input and reports the largest absolute difference.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import backends
from .functional import convnn_attention
from .nn import ConvNN2d, ConvNNAttention


@dataclass
class CaseResult:
    name: str
    config: str
    reference: str
    max_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance


def _config(layer) -> str:
    """The layer's repr line plus the options that make it the recovered operation, shown
    even where they are the layer's defaults (its repr shows only the changed ones)."""
    text = layer.extra_repr()
    defining = ("metric", "candidates", "weighting", "kernel")
    shown = [f"{n}={getattr(layer.spec, n)!r}" for n in defining if f"{n}=" not in text]
    return ", ".join([text, *shown])


def _conv(
    depthwise: bool, k: int, stride: int, dtype
) -> tuple[str, str, torch.Tensor, torch.Tensor]:
    c = 8
    conv = nn.Conv2d(c, c if depthwise else 16, k, stride, k // 2, groups=c if depthwise else 1)
    conv = conv.to(dtype)
    layer = ConvNN2d.from_conv2d(conv)
    x = torch.randn(2, c, 9, 13, dtype=dtype)
    ref = f"nn.Conv2d({c}, {conv.out_channels}, {k}, stride={stride}, padding={k // 2}"
    ref += f", groups={c})" if depthwise else ")"
    return _config(layer), ref, layer(x), conv(x)


def _mha(dtype):
    mha = nn.MultiheadAttention(32, 4, batch_first=True).to(dtype)
    layer = ConvNNAttention.from_attention(mha)
    x = torch.randn(2, 23, 32, dtype=dtype)
    return _config(layer), "nn.MultiheadAttention(32, 4)", layer(x), mha(x, x, x)[0]


def _masked_attention(q, k, v, mask):
    """Independent attention with a boolean (N, N) or (B, h, N, N) mask of allowed keys."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def _kvt(dtype, K: int = 5):
    q, k, v = torch.randn(3, 2, 4, 23, 8, dtype=dtype).unbind(0)
    s = q @ k.transpose(-1, -2)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(K, -1).indices, True)
    config = f"K={K}, metric='scaled_dot', candidates='all', weighting='softmax', kernel='none'"
    return (
        config,
        f"top-{K} masked softmax attention",
        convnn_attention(q, k, v, K),
        _masked_attention(q, k, v, keep),
    )


def _local(dtype, window: int = 3):
    q, k, v = torch.randn(3, 2, 4, 30, 8, dtype=dtype).unbind(0)
    hw = (5, 6)
    # Neighbourhood attention: the window x window block around each query, shifted inside
    # the map at its borders.
    r, c = torch.arange(30) // 6, torch.arange(30) % 6
    r0 = (r - window // 2).clamp(0, hw[0] - window)
    c0 = (c - window // 2).clamp(0, hw[1] - window)
    mask = (r[None] >= r0[:, None]) & (r[None] < r0[:, None] + window)
    mask &= (c[None] >= c0[:, None]) & (c[None] < c0[:, None] + window)
    y = convnn_attention(q, k, v, window * window, candidates="window", window=window, hw=hw)
    config = f"K={window * window}, candidates='window', window={window}, weighting='softmax', kernel='none'"
    return (
        config,
        f"{window}x{window} neighbourhood attention (mask)",
        y,
        _masked_attention(q, k, v, mask),
    )


CASES: dict[str, Callable] = {
    "convolution 3x3": lambda dt: _conv(False, 3, 1, dt),
    "convolution 5x5 stride 2": lambda dt: _conv(False, 5, 2, dt),
    "depthwise convolution 3x3": lambda dt: _conv(True, 3, 1, dt),
    "multi-head attention": _mha,
    "top-k (KVT) attention": _kvt,
    "local attention": _local,
}


def run_cases(backend: str = "chunked", dtype=torch.float64, seed: int = 0) -> list[CaseResult]:
    """Run every special case on ``backend`` (the k-NN path, no exact shortcuts)."""
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    results = []
    with backends.use(backend), torch.no_grad():
        for name, case in CASES.items():
            torch.manual_seed(seed)
            config, ref, ours, theirs = case(dtype)
            diff = (ours - theirs).abs().max().item()
            results.append(CaseResult(name, config, ref, diff, tolerance))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="chunked",
        choices=list(backends.BACKENDS),
        help="backend that runs the k-NN path (default: chunked)",
    )
    parser.add_argument(
        "--dtype", default="float64", choices=["float64", "float32"], help="precision of the check"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def run(args: argparse.Namespace) -> int:
    results = run_cases(args.backend, getattr(torch, args.dtype), args.seed)
    width = max(len(r.name) for r in results)
    print(f"backend={args.backend} dtype={args.dtype} seed={args.seed}\n")
    for r in results:
        status = "ok" if r.ok else "FAIL"
        print(f"{r.name:<{width}}  max|diff| = {r.max_diff:.2e}  {status}")
        print(f"{'':<{width}}  ConvNN:    {r.config}")
        print(f"{'':<{width}}  recovers:  {r.reference}")
    return 0 if all(r.ok for r in results) else 1
