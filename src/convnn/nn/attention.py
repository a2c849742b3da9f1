"""ConvNNAttention: multi-head attention as ConvNN (timm-compatible parameter names)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as CF
from ..options import (
    CANDIDATES,
    METRICS,
    WEIGHTINGS,
    check_choice,
    check_fraction,
    check_like,
    check_positive_int,
    check_rank,
)


def check_heads(dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
    """The arguments every attention layer shares with timm's Attention."""
    check_positive_int("dim", dim)
    check_positive_int("num_heads", num_heads)
    check_fraction("attn_drop", attn_drop)
    check_fraction("proj_drop", proj_drop)


def check_tokens(x, dim: int, param: Tensor) -> None:
    """x is (B, N, dim) with the dtype and device of the layer's parameters (outside
    autocast, which casts x for the projections)."""
    check_rank("x", x, 3, f"(B, N, {dim})")
    if x.shape[-1] != dim:
        raise ValueError(f"x must be (B, N, {dim}), got shape {tuple(x.shape)}")
    if not torch.is_autocast_enabled(x.device.type):
        check_like("x", x, "the layer's parameters", param)


class ConvNNAttention(nn.Module):
    """Each head's queries aggregate K selected keys' values.

    Parameters follow timm's ViT attention: ``qkv`` (Linear dim -> 3*dim, rows q, k, v) and
    ``proj``; the ConvNN kernel adds ``weight`` ((dim, 1, K) for 'depthwise', initialised to
    ones so that it starts as top-K attention; (dim, dim, K) for 'standard'). Input (B, N, dim).

    With K=None (every token), metric 'scaled_dot', weighting 'softmax' and kernel 'none'
    this is exactly multi-head self-attention; with K < N it is top-k (KVT) attention and
    with candidates 'window' it is neighbourhood attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        K: int | None = 9,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        metric: str = "scaled_dot",
        candidates: str = "all",
        num_candidates: int | None = None,
        include_self: bool = False,
        weighting: str = "softmax",
        kernel: str = "depthwise",
        window: int | None = None,
        proj_bias: bool = True,
        selection_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_heads(dim, num_heads, attn_drop, proj_drop)
        check_choice("metric", metric, METRICS)
        check_choice("candidates", candidates, CANDIDATES)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("kernel", kernel, ("depthwise", "standard", "none"))
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads ({num_heads}), got dim={dim}")
        if K is None and kernel != "none":
            raise ValueError(f"K=None (every token) needs kernel='none', got kernel={kernel!r}")
        if K is not None and (not isinstance(K, int) or K < 1):
            raise ValueError(f"K must be an integer >= 1 or None, got {K!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim, self.K = dim, num_heads, dim // num_heads, K
        self.metric, self.candidates, self.num_candidates = metric, candidates, num_candidates
        self.include_self, self.weighting, self.kernel = include_self, weighting, kernel
        self.window, self.selection_dtype = window, selection_dtype
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        if kernel == "none":
            self.register_parameter("weight", None)
        else:
            shape = (dim, 1, K) if kernel == "depthwise" else (dim, dim, K)
            self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is None:
            return
        if self.kernel == "depthwise":
            nn.init.ones_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw=None, return_indices: bool = False):
        """The ConvNN step on split heads: (B, heads, N, d) each -> (B, N, dim)."""
        return CF.convnn_attention(
            q,
            k,
            v,
            self.K,
            metric=self.metric,
            candidates=self.candidates,
            num_candidates=self.num_candidates,
            window=self.window,
            hw=hw,
            include_self=self.include_self,
            weighting=self.weighting,
            kernel=self.kernel,
            weight=self.weight,
            dropout_p=self.attn_drop.p,
            training=self.training,
            return_indices=return_indices,
            selection_dtype=self.selection_dtype,
        )

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, return_indices: bool = False):
        """x (B, N, dim) -> (B, N, dim); ``hw`` lays tokens out as a map for 'window'/'grid'.

        With ``return_indices`` also returns (B, heads, N, K) neighbour indices.
        """
        check_tokens(x, self.dim, self.qkv.weight)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, hw, return_indices)
        y, idx = out if return_indices else (out, None)
        y = self.proj_drop(self.proj(y))
        return (y, idx) if return_indices else y

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, K={self.K}, metric={self.metric!r}"
        s += f", candidates={self.candidates!r}, weighting={self.weighting!r}"
        return s + f", kernel={self.kernel!r}"

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, **overrides) -> ConvNNAttention:
        """Exact ConvNN equivalent of a batch-first ``nn.MultiheadAttention`` (weights copied).

        ``overrides`` change the ConvNN configuration (e.g. ``K=16, kernel='depthwise'``),
        turning the copy into a ConvNN attention initialised from ``mha``.
        """
        if not mha.batch_first:
            raise ValueError("mha.batch_first must be True, got False")
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                f"mha.kdim and mha.vdim must equal embed_dim ({mha.embed_dim}), got "
                f"kdim={mha.kdim}, vdim={mha.vdim}"
            )
        if mha.bias_k is not None:
            raise ValueError("mha.bias_k must be None (add_bias_kv=False), got a tensor")
        if mha.add_zero_attn:
            raise ValueError("mha.add_zero_attn must be False, got True")
        w = mha.in_proj_weight
        options = dict(K=None, kernel="none", weighting="softmax", metric="scaled_dot")
        options.update(overrides)
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            qkv_bias=mha.in_proj_bias is not None,
            attn_drop=mha.dropout,
            proj_bias=mha.out_proj.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **options,
        )
        with torch.no_grad():
            layer.qkv.weight.copy_(w)
            layer.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                layer.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                layer.proj.bias.copy_(mha.out_proj.bias)
        return layer
