"""Stage 5, aggregation: y_i = sum_k W_k (rho_ik * v_{n_i(k)}) + b.

Kernels: 'standard' (W (C_out, C_in, K): a Conv1d with kernel K and stride K over the
gathered neighbours), 'depthwise' ((C, 1, K)), 'separable' (depthwise, then a 1x1
``pointwise_weight`` (C_out, C, 1)), 'none' (the plain weighted sum). The values are the
un-encoded features: positional encodings act on the similarity only. The dispatcher picks
the backend (:mod:`convnn.backends.dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import dispatch
from ..options import KERNELS, check_choice, check_tensor


def check_kernel_weights(kernel, weight, bias, pointwise_weight, channels, K, source) -> int:
    """Validate weights and bias for ``kernel`` on ``channels`` input channels (those of the
    argument named ``source``); return the output channel count."""
    c_out = _kernel_out_channels(kernel, weight, pointwise_weight, channels, K, source)
    if bias is not None:
        check_tensor("bias", bias, f"({c_out},)")
        if tuple(bias.shape) != (c_out,):
            raise ValueError(
                f"bias must have shape (C_out,) = ({c_out},) for kernel={kernel!r} with the "
                f"{channels} channels of {source}, got {tuple(bias.shape)}"
            )
    return c_out


def _kernel_out_channels(kernel, weight, pointwise_weight, channels, K, source) -> int:
    check_choice("kernel", kernel, KERNELS)
    if kernel != "separable" and pointwise_weight is not None:
        raise ValueError(
            f"pointwise_weight must be None for kernel={kernel!r}, got {_shape(pointwise_weight)}"
        )
    if kernel == "none":
        if weight is not None:
            raise ValueError(f"weight must be None for kernel='none', got {_shape(weight)}")
        return channels
    expected = {"standard": f"(C_out, {channels}, {K})", "depthwise": f"({channels}, 1, {K})"}
    expected["separable"] = expected["depthwise"]
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        raise ValueError(
            f"weight must be a 3-D tensor {expected[kernel]} for kernel={kernel!r}, got "
            f"{_shape(weight)}"
        )
    want_in = 1 if kernel != "standard" else channels
    want_out = weight.shape[0] if kernel == "standard" else channels
    if tuple(weight.shape) != (want_out, want_in, K):
        raise ValueError(
            f"weight must have shape {expected[kernel]} for kernel={kernel!r} with the {channels} "
            f"channels of {source} and K={K}, got {tuple(weight.shape)}"
        )
    if kernel == "separable":
        pw = pointwise_weight
        if not isinstance(pw, Tensor) or pw.dim() != 3 or pw.shape[1:] != (channels, 1):
            raise ValueError(
                f"pointwise_weight must have shape (C_out, {channels}, 1) for kernel='separable' "
                f"with the {channels} channels of {source}, got {_shape(pw)}"
            )
        return pw.shape[0]
    return weight.shape[0]


def _shape(t) -> object:
    """What came, for an error message: a tensor's shape, else the value itself."""
    return tuple(t.shape) if isinstance(t, Tensor) else t


def aggregate(
    values: Tensor,
    indices: Tensor,
    rho: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    kernel: str,
    pointwise_weight: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """values (B, M, C), indices / rho (B, G, N, K) -> (B, N, C_out), on tensors of one dtype
    (cast by the caller as autocast casts a convolution's inputs), so every backend returns
    that dtype."""
    with torch.autocast(values.device.type, enabled=False):
        if kernel == "separable":
            be = dispatch.aggregate_backend(
                values, indices, rho, weight, None, "depthwise", backend=backend
            )
            y = be.aggregate(values, indices, rho, weight, None, "depthwise")
            return F.linear(y, pointwise_weight[:, :, 0], bias)
        be = dispatch.aggregate_backend(values, indices, rho, weight, bias, kernel, backend=backend)
        return be.aggregate(values, indices, rho, weight, bias, kernel)


def autocast_cast(*tensors: Tensor | None, device_type: str):
    """Cast like autocast casts a convolution's inputs (the backends run with it off):
    float32/float16/bfloat16 tensors to the autocast dtype, float64 left alone."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    lower = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if t is not None and t.dtype in lower else t for t in tensors)
