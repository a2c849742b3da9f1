"""ConvNNAttention: multi-head attention as ConvNN (timm-compatible names and call signature),
and the adapter that gives it ``nn.MultiheadAttention``'s attributes and call signature."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .. import functional as CF
from ..options import (
    check_choice,
    check_fraction,
    check_like,
    check_positive_int,
    check_rank,
    pair,
)
from ..spec import ConvNNSpec
from ..stages import positional as encoding
from ..stages.positional import extra_features
from .components import metric_component, positional_component, tensors
from .conv import SpecOptions


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


ATTENTION_DEFAULTS = ConvNNSpec(
    K=9, metric="scaled_dot", include_self=False, weighting="softmax", kernel="depthwise"
)


class ConvNNAttention(SpecOptions, nn.Module):
    """Each head's queries aggregate K selected keys' values.

    Parameters follow timm's ViT ``Attention``: ``qkv`` (Linear dim -> 3*dim, rows q, k, v),
    ``q_norm`` / ``k_norm`` (per-head norms when ``qk_norm``), ``norm`` (before ``proj`` when
    ``scale_norm``) and ``proj``; the ConvNN kernel adds ``weight`` ((dim, 1, K) for
    'depthwise', initialised to ones so that it starts as top-K attention; (dim, dim, K) for
    'standard'). Input (B, N, dim); ``forward(x, attn_mask=None, is_causal=False)`` is the call
    timm's ``Block`` makes.

    With K=None (every token), metric 'scaled_dot', weighting 'softmax' and kernel 'none'
    this is exactly multi-head self-attention; with K < N it is top-k (KVT) attention and
    with candidates 'window' it is neighbourhood attention.

    Token map: 'window', 'grid' and the 'spatial' metric need to know where each token lies.
    ``grid_size=(h, w)`` (or ``hw=`` in forward) lays the last h * w tokens out row-major;
    the first ``num_prefix_tokens`` (class / register tokens) have no position. A prefix
    token is a candidate of every query, and its own candidates are every token (with
    'grid', the lattice and the prefix tokens), so that a window covering the whole map is
    exactly multi-head attention. The map is never guessed from the token count.

    Args (the operator's options, a :class:`convnn.ConvNNSpec` kept as ``layer.spec``):
        K: neighbours per query; None = every candidate (kernel 'none').
        metric: a similarity of ``convnn.metrics.metric_names()`` (default 'scaled_dot').
        p: the exponent of metric 'minkowski' (>= 1; math.inf: Chebyshev). Learnable metrics
            keep one tensor per head in ``layer.metric_params``.
        candidates: 'all' | 'random' | 'grid' | 'window', as for :class:`ConvNN2d`.
        num_candidates: size of the 'random' / 'grid' candidate set; 'ann': the budget of
            candidates each query's index proposes (see ``convnn.ann``).
        ann_method, ann_tables, ann_projection, ann_seed: the 'ann' index: 'grid' (multiprobe
            grid) or 'lsh', its hash tables (None: 8), its projection ('random', or for 'grid'
            'pca': the features' principal axes, better on a network's features) and the seed
            of its fixed projections.
        window: odd side of the 'window' neighbourhood (needs the token map).
        include_self: the query's own token fills slot 0.
        weighting: 'softmax' (attention) | 'none'.
        kernel: 'depthwise' | 'standard' | 'none' over the K slots.
        positional: 'none' | 'coords' | 'fourier' | 'relative_bias' (per head) | 'cpe' (on
            the input tokens) | 'rope' on the token map (``grid_size``, 2-D) or the sequence
            (1-D); prefix tokens have none. Tensors: ``layer.positional_params``.
        lam: the weight of the coordinates for positional='coords', in [0, 1].
        num_frequencies, sigma: 'fourier': m random frequencies of std sigma.
        max_offset: 'relative_bias': offsets clamp to +-max_offset grid steps.
        cpe_kernel: 'cpe': odd side of its depthwise convolution.
        selection_dtype: rank similarities in this dtype (e.g. torch.bfloat16).
    """

    _spec_defaults = ATTENTION_DEFAULTS

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
        p: float = 2.0,
        candidates: str = "all",
        num_candidates: int | None = None,
        ann_method: str = "grid",
        ann_tables: int | None = None,
        ann_projection: str = "random",
        ann_seed: int = 0,
        window: int | None = None,
        include_self: bool = False,
        weighting: str = "softmax",
        kernel: str = "depthwise",
        positional: str = "none",
        lam: float = 0.5,
        num_frequencies: int = 8,
        sigma: float = 1.0,
        max_offset: int = 8,
        cpe_kernel: int = 3,
        selection_dtype: torch.dtype | None = None,
        proj_bias: bool = True,
        qk_norm: bool = False,
        scale_norm: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_heads(dim, num_heads, attn_drop, proj_drop)
        check_choice("kernel", kernel, ("depthwise", "standard", "none"))
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads ({num_heads}), got dim={dim}")
        if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < 1):
            raise ValueError(f"K must be an integer >= 1 or None, got {K!r}")
        self.spec = ConvNNSpec.take(locals())
        check_positive_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        if grid_size is not None:
            grid_size = pair("grid_size", grid_size, minimum=1)
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.grid_size, self.num_prefix_tokens = grid_size, num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        norm = lambda width, on: norm_layer(width, **factory) if on else nn.Identity()
        self.q_norm, self.k_norm = norm(self.head_dim, qk_norm), norm(self.head_dim, qk_norm)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm(dim, scale_norm)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        if kernel == "none":
            self.register_parameter("weight", None)
        else:
            shape = (dim, 1, K) if kernel == "depthwise" else (dim, dim, K)
            self.weight = nn.Parameter(torch.empty(shape, **factory))
        dim_sel = self.head_dim + extra_features(self.spec)  # per head, what selection compares
        self.metric_params = metric_component(
            self.spec, dim_sel, num_heads, type(self).__name__, factory
        )
        self._pos_ndim = 1 if grid_size is None or grid_size[0] == 1 else 2
        self.positional_params = positional_component(
            self.spec, self._pos_ndim, num_heads, dim, type(self).__name__, factory
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections and norms as their modules initialise them; the kernel: ones
        ('depthwise': top-K attention) or ``nn.Conv1d``'s initialisation ('standard')."""
        for module in (self.qkv, self.q_norm, self.k_norm, self.norm, self.proj):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for component in (self.metric_params, self.positional_params):
            if component is not None:
                component.reset_parameters()
        if self.weight is None:
            return
        if self.kernel == "depthwise":
            nn.init.ones_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    # ----------------------------------------------------------------- token map

    def _needs_map(self) -> bool:
        return self.candidates in ("window", "grid") or self.metric == "spatial"

    def token_layout(self, N: int, hw: tuple[int, int] | None = None):
        """(hw, num_prefix_tokens) for N tokens: ``hw`` or ``grid_size``, or (None, P) when
        the configuration needs no map. A map that does not fit N is a ValueError."""
        P = self.num_prefix_tokens
        hw = self.grid_size if hw is None else pair("hw", hw, minimum=1)
        if hw is None:
            if self._needs_map():
                raise ValueError(
                    f"grid_size is required for candidates={self.candidates!r} / metric="
                    f"{self.metric!r}: pass grid_size=(h, w) and num_prefix_tokens to the layer "
                    f"(or hw=(h, w) to forward); the map is never guessed from the {N} tokens"
                )
            return None, P
        if P + hw[0] * hw[1] != N:
            raise ValueError(
                f"hw (or grid_size) must lay out the {N} tokens of x as num_prefix_tokens + "
                f"h * w = {N}, got {P} + {hw[0]} * {hw[1]} = {P + hw[0] * hw[1]}"
            )
        return hw, P

    # ----------------------------------------------------------------- the operator

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        hw: tuple[int, int] | None = None,
        prefix: int = 0,
        return_indices: bool = False,
        probabilities: bool = False,
    ):
        """The ConvNN step on split heads: (B, heads, N, d) each -> (B, N, dim).

        ``hw`` / ``prefix``: the token map (see :meth:`token_layout`). With
        ``probabilities`` it returns the dense weights (B, heads, N, N) each query gives each
        token instead (the operator run on one-hot values, kernel 'none').
        """
        kernel, weight = self.kernel, self.weight
        if probabilities:
            B, G, N, _ = q.shape
            v = torch.eye(N, dtype=q.dtype, device=q.device).expand(B, G, N, N)
            kernel, weight = "none", None
        out = self._run(q, k, v, hw, prefix, return_indices, kernel, weight)
        if probabilities:
            return out.view(B, N, G, N).transpose(1, 2)
        return out

    def _run(self, q, k, v, hw, prefix, return_indices, kernel, weight):
        if hw is None and not prefix:
            hw = (1, q.shape[2])  # a sequence: never a map guessed from the token count
        if self.positional not in ("none", "cpe") and hw is not None:
            if (1 if hw[0] == 1 else 2) != self._pos_ndim:  # its tensors are 1-D or 2-D
                raise ValueError(
                    f"positional={self.positional!r} of a layer built for {self._pos_ndim}-D "
                    f"tokens (grid_size={self.grid_size}) needs the same form, got a "
                    f"{hw[0]} x {hw[1]} map: pass grid_size=(h, w) to the layer"
                )
        spec = self.spec if kernel == self.kernel else self.spec.replace(kernel=kernel)
        return CF.attention_call(
            q,
            k,
            v,
            spec,
            hw=hw,
            num_prefix_tokens=prefix,
            weight=weight,
            metric_params=tensors(self.metric_params),
            positional_params=tensors(self.positional_params),
            ndim=self._pos_ndim,
            dropout_p=self.attn_drop.p,
            training=self.training,
            return_indices=return_indices,
        )

    # ----------------------------------------------------------------- forward

    def _heads(self, x: Tensor):
        check_tokens(x, self.dim, self.qkv.weight)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        hw: tuple[int, int] | None = None,
        return_indices: bool = False,
    ):
        """x (B, N, dim) -> (B, N, dim). ``attn_mask`` / ``is_causal`` (timm's ``Block``
        passes them) must be None / False: ConvNN selects each query's keys itself.
        ``hw`` lays the tokens out as a map (see the class docstring).

        With ``return_indices`` also returns (B, heads, N, K) neighbour indices.
        """
        _check_no_mask(attn_mask, is_causal)
        check_tokens(x, self.dim, self.qkv.weight)
        layout = self.token_layout(x.shape[1], hw)
        q, k, v = self._heads(self._cpe(x, *layout))
        out = self.attend(q, k, v, *layout, return_indices=return_indices)
        y, idx = out if return_indices else (out, None)
        y = self.proj_drop(self.proj(self.norm(y)))
        return (y, idx) if return_indices else y

    def attention_probabilities(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """The weights each query gives each token, dense: (B, heads, N, N)."""
        check_tokens(x, self.dim, self.qkv.weight)
        layout = self.token_layout(x.shape[1], hw)
        q, k, v = self._heads(self._cpe(x, *layout))
        return self.attend(q, k, v, *layout, probabilities=True)

    def _cpe(self, x: Tensor, hw, prefix: int) -> Tensor:
        """positional='cpe': the map tokens of x (B, N, dim) plus their depthwise conv (on
        the (h, w) map, or the 1 x L sequence); prefix tokens unchanged."""
        if self.positional != "cpe":
            return x
        B, N, C = x.shape
        h, w = hw or (1, N - prefix)
        params = self.positional_params.tensors()
        if params["weight"].shape[2] != (1 if h == 1 else params["weight"].shape[3]):
            raise ValueError(
                f"positional='cpe' of a layer built for {self._pos_ndim}-D tokens (grid_size="
                f"{self.grid_size}) needs the same form, got a {h} x {w} map"
            )
        maps = x[:, prefix:].transpose(1, 2).reshape(B, C, h, w)
        maps = encoding.conditional(maps, params).reshape(B, C, h * w).transpose(1, 2)
        return torch.cat([x[:, :prefix], maps], 1)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, K={self.K}" + self.options_repr()
        if self.grid_size is not None or self.num_prefix_tokens:
            s += f", grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}"
        return s

    # ----------------------------------------------------------------- from existing layers

    @classmethod
    def from_attention(cls, attention: nn.Module, **overrides):
        """Exact ConvNN equivalent of a batch-first ``nn.MultiheadAttention`` or a timm
        ``Attention`` (every weight, bias, norm and dropout copied).

        ``overrides`` change the ConvNN configuration (e.g. ``K=16, kernel='depthwise'``),
        turning the copy into a ConvNN attention initialised from ``attention``; on
        :class:`BranchingAttention` they are its options (``ratio``, ``split``, ...).
        """
        if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first:
            raise ValueError("mha.batch_first must be True, got False")
        return _from_attention(cls, attention, overrides)


def _check_no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None:
        raise ValueError(
            "attn_mask must be None: ConvNN attention selects each query's keys itself, "
            f"got a tensor of shape {tuple(attn_mask.shape)}"
        )
    if is_causal:
        raise ValueError("is_causal must be False: ConvNN attention has no causal form")


def attention_source(module: nn.Module) -> dict:
    """What a ConvNN attention copies from ``module``: ``nn.MultiheadAttention`` or a timm-style
    ``Attention`` (``qkv``, ``proj``, ``num_heads``). Anything it cannot represent is a
    ValueError naming the attribute."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise ValueError(
                f"mha.kdim and mha.vdim must equal embed_dim ({module.embed_dim}), got "
                f"kdim={module.kdim}, vdim={module.vdim}"
            )
        if module.bias_k is not None:
            raise ValueError("mha.bias_k must be None (add_bias_kv=False), got a tensor")
        if module.add_zero_attn:
            raise ValueError("mha.add_zero_attn must be False, got True")
        w, b = module.in_proj_weight, module.in_proj_bias
        return dict(
            dim=module.embed_dim,
            num_heads=module.num_heads,
            qkv=(w, b),
            proj=(module.out_proj.weight, module.out_proj.bias),
            attn_drop=module.dropout,
            proj_drop=0.0,
            norms={},
        )
    name = type(module).__name__
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise ValueError(f"attention {name} must have Linear qkv and proj (timm's Attention)")
    dim, heads = qkv.in_features, module.num_heads
    if getattr(module, "gate", None) is not None:
        raise ValueError(f"attention.gate must be None ({name} is gated), got a Linear")
    for attr in ("q_proj", "kv", "rope", "rel_pos", "relative_position_bias_table"):
        if getattr(module, attr, None) is not None:
            raise ValueError(f"attention.{attr} must be None ({name} is not timm's Attention)")
    if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
        raise ValueError(
            f"attention.qkv / proj must map dim {dim} -> 3 * {dim} and {dim} -> {dim} "
            f"(attn_head_dim / dim_out unchanged), got qkv {qkv.out_features}, proj "
            f"{proj.in_features} -> {proj.out_features}"
        )
    if getattr(module, "head_dim", dim // heads) * heads != dim:
        raise ValueError(f"attention.head_dim must be dim / num_heads = {dim // heads}")
    scale = getattr(module, "scale", None)
    if scale is not None and not math.isclose(scale, (dim // heads) ** -0.5, rel_tol=1e-6):
        raise ValueError(f"attention.scale must be head_dim ** -0.5, got {scale}")
    norms = {n: getattr(module, n) for n in ("q_norm", "k_norm", "norm") if hasattr(module, n)}
    drop = lambda m: m.p if isinstance(m, nn.Dropout) else 0.0
    return dict(
        dim=dim,
        num_heads=heads,
        qkv=(qkv.weight, qkv.bias),
        proj=(proj.weight, proj.bias),
        attn_drop=drop(getattr(module, "attn_drop", None)),
        proj_drop=drop(getattr(module, "proj_drop", None)),
        norms={n: m for n, m in norms.items() if not isinstance(m, nn.Identity)},
    )


def _from_attention(cls, attention: nn.Module, overrides: dict):
    src = attention_source(attention)
    (qkv_w, qkv_b), proj_b = src["qkv"], src["proj"][1]
    options = dict(K=None, kernel="none", weighting="softmax", metric="scaled_dot")
    options.update(overrides)
    layer = cls(
        src["dim"],
        src["num_heads"],
        qkv_bias=qkv_b is not None,
        attn_drop=src["attn_drop"],
        proj_drop=src["proj_drop"],
        proj_bias=proj_b is not None,
        device=qkv_w.device,
        dtype=qkv_w.dtype,
        **options,
    )
    with torch.no_grad():
        for target, (w, b) in ((layer.qkv, src["qkv"]), (layer.proj, src["proj"])):
            target.weight.copy_(w)
            if b is not None:
                target.bias.copy_(b)
    for name, norm in src["norms"].items():  # qk_norm / scale_norm: the same norms, copied
        setattr(layer, name, copy.deepcopy(norm))
    return layer


class MultiheadAttentionAdapter(nn.Module):
    """A ConvNN attention with ``nn.MultiheadAttention``'s attributes and call signature, for
    self-attention: ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` with ``key is value is
    query``; batch-first or not, batched or not, as ``batch_first`` says.

    ``key_padding_mask`` / ``attn_mask`` / ``is_causal`` are refused (ConvNN selects each
    query's keys itself). ``need_weights`` returns the dense weights of each query over the
    tokens (for ConvNN kernels, the softmax weights before the per-slot kernel), averaged
    over heads unless ``average_attn_weights=False``.
    """

    # nn.TransformerEncoder(Layer) run a fused C++ layer from in_proj_weight when this is True:
    # that would bypass the ConvNN attention, so the adapter reports no packed projection.
    _qkv_same_embed_dim = False

    def __init__(self, attention: ConvNNAttention, batch_first: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.batch_first = batch_first
        self.embed_dim = self.kdim = self.vdim = attention.dim
        self.num_heads, self.head_dim = attention.num_heads, attention.dim // attention.num_heads
        self.dropout = attention.attn_drop.p
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

    def reset_parameters(self) -> None:
        self.attention.reset_parameters()

    @property
    def in_proj_weight(self) -> Tensor:
        return self.attention.qkv.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.attention.qkv.bias

    @property
    def out_proj(self) -> nn.Linear:
        return self.attention.proj

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if not (_same_tensor(key, query) and _same_tensor(value, query)):
            raise ValueError(
                "key and value must be query: a ConvNN attention is self-attention only"
            )
        if query.is_nested:
            raise ValueError("query must be a dense tensor, got a nested tensor")
        if key_padding_mask is not None:
            raise ValueError(
                "key_padding_mask must be None: ConvNN attention selects each query's keys "
                "itself (pad with tokens it may select, or use unconverted attention)"
            )
        _check_no_mask(attn_mask, is_causal)
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D or 3-D, got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        x = query if batched else query.unsqueeze(0 if self.batch_first else 1)
        x = x if self.batch_first else x.transpose(0, 1)
        y = self.attention(x)
        weights = None
        if need_weights:
            random = self.attention.training and (
                self.dropout > 0 or "random" in _candidate_modes(self.attention)
            )
            if random:
                raise ValueError(
                    "need_weights must be False in training with attention dropout or random "
                    "candidates: the weights would come from another draw than the output"
                )
            weights = self.attention.attention_probabilities(x)
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return (y if batched else y[0] if self.batch_first else y[:, 0]), weights

    def extra_repr(self) -> str:
        return f"batch_first={self.batch_first}"


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """a is b, or a view of the same memory with the same layout (x[0] taken twice)."""
    return a is b or (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _candidate_modes(attention: nn.Module) -> set[str]:
    return {m.candidates for m in attention.modules() if isinstance(m, ConvNNAttention)}
