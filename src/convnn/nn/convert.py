"""Replace the convolutions / attentions of any model (torchvision, timm, nn.Transformer*)
with ConvNN layers, in place, and report every one it saw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from ..options import check_choice
from ..spec import ConvNNSpec
from .attention import (
    ConvNNAttention,
    MultiheadAttentionAdapter,
    _from_attention,
    attention_source,
)
from .branching import Branching2d, BranchingAttention
from .conv import ConvNN2d

CONV_LAYERS = ("exact", "convnn", "branching")
ATTENTION_LAYERS = ("exact", "convnn_attention", "kvt", "local", "branching_attention")

# The options each kind takes beyond the operator's (the fields of ConvNNSpec).
_KIND_OPTIONS = {
    "convnn": ("coords",),  # the deprecated name of positional='coords'
    "branching": ("ratio", "coords"),
    "convnn_attention": (),
    "kvt": (),
    "local": (),
    "branching_attention": ("ratio", "split"),
}
# Set from the layer a ConvNN layer replaces (channels, stride, padding, heads, the token
# map...), not options a user passes.
LAYER_FIXED = frozenset(
    {
        "self", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
        "groups", "bias", "padding_mode", "dim", "num_heads", "qkv_bias", "attn_drop",
        "proj_drop", "proj_bias", "qk_norm", "scale_norm", "norm_layer", "grid_size",
        "num_prefix_tokens", "device", "dtype",
    }
)  # fmt: skip


def layer_options(layer: str) -> set[str]:
    """The keyword options a layer kind takes: the operator's (:class:`ConvNNSpec`'s fields)
    and the kind's own (a branching layer's ``ratio``...); 'exact', 'conv' and 'attention'
    take none."""
    if layer not in _KIND_OPTIONS:
        return set()
    return set(ConvNNSpec.fields()) | set(_KIND_OPTIONS[layer])


def split_options(
    kwargs: dict,
    layers: dict[str, tuple[str, ...]],
    chosen: dict[str, str | None],
    *,
    also: frozenset[str] = frozenset(),
    what: str = "options",
) -> dict[str, dict]:
    """Options by layer type, as ``create_model`` and ``convert`` separate them.

    ``layers`` maps each type ('conv', 'attention') to its family of kinds, ``chosen`` to
    the kind in use. Each type gets the options its chosen kind takes; an option of another
    kind of a family is ignored (so a recipe's ``ratio`` does not stop a switch to
    'convnn'); one no kind takes (nor is in ``also``, the caller's own options) is a
    ValueError listing the valid ones.
    """
    family = set().union(*(layer_options(k) for kinds in layers.values() for k in kinds))
    unknown = sorted(set(kwargs) - family - also)
    if unknown:
        raise ValueError(
            f"{what} must be among {', '.join(sorted(family | also))}; got unknown "
            f"{', '.join(unknown)}"
        )
    return {
        kind: {k: v for k, v in kwargs.items() if k in layer_options(chosen[kind] or "")}
        for kind in layers
    }


# --------------------------------------------------------------------------- the report


class Replaced(NamedTuple):
    name: str
    before: str
    after: str
    kind: str
    K: int | None


class Kept(NamedTuple):
    name: str
    module: str
    reason: str


@dataclass
class ConversionReport:
    """Every convolution and attention :func:`convert` saw: ``replaced`` (name, before,
    after, kind, K), ``skipped`` (name, module, reason it was kept) and ``notes`` (rules
    applied: clamped candidate counts, disabled fast paths)."""

    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Kept] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[Kept]:
        return self.skipped

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), kept {len(self.skipped)}"]
        for r in self.replaced:
            k = "all" if r.K is None else r.K
            lines.append(f"  {r.name}: {r.before} -> {r.after} ({r.kind}, K={k})")
        lines += [f"  {k.name}: {k.module} kept ({k.reason})" for k in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- convolutions


def conv_reason(conv: nn.Module, layer: str, include_strided: bool) -> str | None:
    """Why ``conv`` is kept under ``layer``, or None when it can be replaced."""
    if type(conv) is not nn.Conv2d:  # subclasses (weight standardisation, dynamic 'same')
        what = "a subclass of nn.Conv2d with its own forward"
        return what if isinstance(conv, nn.Conv2d) else "not an nn.Conv2d"
    k = tuple(conv.kernel_size)
    if k[0] != k[1]:
        return f"kernel {k} is not square"
    if k[0] == 1:
        return "1x1 kernel: pointwise, no neighbourhood"
    if k[0] % 2 == 0:
        return f"even kernel {k} has no centre"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)}"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if conv.groups != 1 and not depthwise:
        return f"grouped (groups={conv.groups}): ConvNN kernels are dense or depthwise"
    if depthwise and layer == "branching":
        return "depthwise: Branching2d mixes channels (use conv='convnn' or 'exact')"
    if conv.padding != "same" and tuple(conv.padding) != (k[0] // 2,) * 2:
        return (
            f"padding {conv.padding!r}: a ConvNN map keeps ceil(H/stride), as 'same' padding "
            f"({k[0] // 2}) does"
        )
    if max(conv.stride) > 1 and not include_strided:
        return f"stride {tuple(conv.stride)} (pass include_strided=True)"
    return None


def make_conv_layer(conv: nn.Conv2d, layer: str, **kwargs) -> nn.Module:
    """The ConvNN replacement for ``conv``: same channels, stride (anisotropic too), 'same'
    zero padding (so K = k*k stays valid on maps as small as 1x1), bias, device and dtype;
    K defaults to the kernel's k*k. 'exact' copies the weights."""
    check_choice("layer", layer, CONV_LAYERS)
    if layer == "exact":
        return ConvNN2d.from_conv2d(conv)
    k = conv.kernel_size[0]
    common = dict(
        stride=tuple(conv.stride),
        padding=k // 2,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    size = {} if "K" in kwargs else {"kernel_size": k}
    if layer == "branching":
        return Branching2d(conv.in_channels, conv.out_channels, k, **common, **kwargs)
    return ConvNN2d(
        conv.in_channels, conv.out_channels, groups=conv.groups, **size, **common, **kwargs
    )


# --------------------------------------------------------------------------- attention


def default_window(hw: tuple[int, int], largest: int = 7) -> int:
    """The window of 'local' attention on an (h, w) token map: the largest odd size that
    fits, at most ``largest``."""
    side = min(hw)
    return min(largest, side - (side + 1) % 2)


def make_attention_layer(dim: int, num_heads: int, layer: str, **kwargs) -> nn.Module:
    """A ConvNN attention of ``layer`` kind: 'convnn_attention' | 'kvt' | 'local' | 'branching_attention'."""
    check_choice("layer", layer, ATTENTION_LAYERS[1:])
    cls, options = _attention_kind(layer, kwargs)
    if layer == "local":
        options.setdefault("window", 7)
    return cls(dim, num_heads, **options)


def _attention_kind(layer: str, kwargs: dict) -> tuple[type, dict]:
    """The class and options of an attention kind (from_attention's defaults are exact
    attention: K=None, kernel 'none', 'scaled_dot', softmax)."""
    if layer == "exact":
        return ConvNNAttention, dict(kwargs)
    if layer == "kvt":
        return ConvNNAttention, {"K": 9, **kwargs, "kernel": "none"}
    if layer == "local":
        return ConvNNAttention, {"K": None, "kernel": "none", **kwargs, "candidates": "window"}
    if layer == "branching_attention":
        return BranchingAttention, {"K": 9, "kernel": "depthwise", **kwargs}
    return ConvNNAttention, {"K": 9, "kernel": "depthwise", **kwargs}


def token_layout(model: nn.Module) -> tuple[tuple[int, int], int] | str:
    """(grid_size, num_prefix_tokens) of a vision transformer's token sequence, read from
    the model (timm, torchvision and convnn ViTs), or the reason it is unknown."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "grid_size") and hasattr(model, "num_prefix_tokens"):
        if getattr(model, "dynamic_img_size", False):
            return "the model has dynamic_img_size=True: its token map changes with the input"
        return tuple(embed.grid_size), int(model.num_prefix_tokens)
    if all(hasattr(model, a) for a in ("image_size", "patch_size", "class_token")):
        side = model.image_size // model.patch_size  # torchvision's VisionTransformer
        return (side, side), 1
    if hasattr(model, "grid_size") and hasattr(model, "class_token"):  # convnn's own ViT
        return tuple(model.grid_size), int(bool(model.class_token))
    return (
        "the token map of this model is unknown: pass grid_size=(h, w) and num_prefix_tokens "
        "(it is never guessed from the token count)"
    )


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, (nn.MultiheadAttention, ConvNNAttention, MultiheadAttentionAdapter)):
        return True
    return type(module).__name__.endswith("Attention")


def _convert_attention(module, layer, options, layout, report_notes) -> nn.Module | str:
    """The replacement of an attention module, or the reason it is kept."""
    if isinstance(module, (ConvNNAttention, MultiheadAttentionAdapter)):
        return "already a ConvNN attention"
    try:
        attention_source(module)  # representable? (the user's options are checked later)
    except ValueError as err:
        return str(err)
    cls, options = _attention_kind(layer, options)
    if cls is BranchingAttention:  # keep each pretrained head whole: K = N is the original
        options.setdefault("split", "heads")
    needs_map = (
        options.get("candidates") in ("window", "grid") or options.get("metric") == "spatial"
    )
    if needs_map and isinstance(layout, str):
        return f"attention={layer!r} needs the token map: {layout}"
    # a positional encoding reads where each token lies (the prefix tokens: nowhere); on a
    # model whose map is unknown the tokens are a sequence
    if needs_map or (options.get("positional", "none") != "none" and not isinstance(layout, str)):
        hw, prefix = layout
        options.setdefault("grid_size", hw)
        options.setdefault("num_prefix_tokens", prefix)
        if layer == "local" and "window" not in options:
            options["window"] = default_window(hw)
    if not isinstance(layout, str) and options.get("K") is not None:
        N = layout[0][0] * layout[0][1] + layout[1]
        if options["K"] > N:
            report_notes.append(f"K={options['K']} > {N} tokens: K clamped to {N}")
            options["K"] = N
    if isinstance(module, nn.MultiheadAttention):
        inner = _from_attention(cls, module, options)
        return MultiheadAttentionAdapter(inner, batch_first=module.batch_first)
    return _from_attention(cls, module, options)


# --------------------------------------------------------------------------- convert


def convert(
    model: nn.Module,
    conv: str | None = "convnn",
    attention: str | None = None,
    *,
    include_strided: bool = False,
    filter: Callable[[str, nn.Module], bool] | None = None,
    grid_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    conv_kwargs: dict | None = None,
    attention_kwargs: dict | None = None,
    **kwargs,
) -> ConversionReport:
    """Replace the convolutions and attentions of ``model`` in place and report every one.

    Args:
        conv: what each ``nn.Conv2d`` with an odd square kernel > 1 (depthwise too), 'same'
            zero padding (k // 2 or ``padding='same'``), no dilation or groups, stride 1
            unless ``include_strided`` (any stride, (2, 1) too) becomes: 'exact' (the
            equivalent spatial ConvNN, weights copied: the same outputs), 'convnn',
            'branching' or None (keep them).
        attention: what each ``nn.MultiheadAttention`` (self-attention; in
            ``nn.TransformerEncoderLayer``, torchvision's ViT, ...) and each timm
            ``Attention`` (qk_norm / scale_norm included) becomes: 'exact', 'kvt',
            'convnn_attention', 'local', 'branching_attention' or None. Every weight, bias,
            norm and dropout is copied; an MHA's replacement keeps its attributes and call
            signature (:class:`MultiheadAttentionAdapter`). With K = N every kind is the
            original attention ('local' with a window covering the map).
        grid_size, num_prefix_tokens: the token map, for 'local' (and 'grid' / 'window'
            candidates) on a model whose map convert cannot read (timm / torchvision /
            convnn ViTs are read).
        conv_kwargs, attention_kwargs: options for one layer type only.
        kwargs: options for the new layers (``K=9, metric='cosine', ratio=0.5``...), each
            going to the layer types whose chosen kind takes it; a name no kind takes is a
            ValueError.
        filter: optional ``callable(name, module) -> bool`` restricting the replacement.

    A 'random' / 'grid' candidate count larger than a deep layer's map uses the whole map
    there (see :meth:`ConvNN2d.effective_candidates`); the report notes it.
    """
    if conv is not None:
        check_choice("conv", conv, CONV_LAYERS)
    if attention is not None:
        check_choice("attention", attention, ATTENTION_LAYERS)
    families = {"conv": CONV_LAYERS, "attention": ATTENTION_LAYERS}
    opts = split_options(kwargs, families, {"conv": conv, "attention": attention})
    for kind, explicit in (("conv", conv_kwargs), ("attention", attention_kwargs)):
        if explicit:
            chosen = conv if kind == "conv" else attention
            valid = layer_options(chosen or "")
            unknown = sorted(set(explicit) - valid)
            if unknown:
                raise ValueError(
                    f"{kind}_kwargs of {kind}={chosen!r} must be among "
                    f"{', '.join(sorted(valid)) or 'nothing'}; got unknown {', '.join(unknown)}"
                )
            opts[kind] = {**opts[kind], **explicit}
    layout = (tuple(grid_size), num_prefix_tokens) if grid_size else token_layout(model)
    report = ConversionReport()
    encoders = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.TransformerEncoder):
            encoders.append(module)
        is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))
        is_attention = not is_conv and _is_attention(module) and name != ""
        if not (is_conv or is_attention) or _inside_converted(name, report):
            continue
        label = type(module).__name__
        layer = conv if is_conv else attention
        if filter is not None and not filter(name, module):
            report.skipped.append(Kept(name, label, "excluded by filter"))
            continue
        if layer is None:
            report.skipped.append(Kept(name, label, f"{'conv' if is_conv else 'attention'}=None"))
            continue
        if is_conv:
            reason = conv_reason(module, conv, include_strided)
            new = reason or make_conv_layer(module, conv, **opts["conv"])
        else:
            notes: list[str] = []
            new = _convert_attention(module, attention, dict(opts["attention"]), layout, notes)
            report.notes += [f"{name}: {n}" for n in notes]
        if isinstance(new, str):
            report.skipped.append(Kept(name, label, new))
            continue
        _set_submodule(model, name, new.train(module.training))
        report.replaced.append(Replaced(name, label, type(new).__name__, layer, _K_of(new)))
        candidates = _candidates_note(new)
        if candidates:
            report.notes.append(f"{name}: {candidates}")
    for encoder in encoders:  # its nested-tensor fast path would bypass converted layers
        if getattr(encoder, "use_nested_tensor", False) and any(
            isinstance(m, MultiheadAttentionAdapter) for m in encoder.modules()
        ):
            encoder.use_nested_tensor = False
            report.notes.append(
                "nn.TransformerEncoder.use_nested_tensor set to False (its fast path runs "
                "nn.MultiheadAttention's own kernel)"
            )
    return report


def _inside_converted(name: str, report: ConversionReport) -> bool:
    return any(name.startswith(r.name + ".") for r in report.replaced)


def _K_of(layer: nn.Module) -> int | None:
    """The neighbours each query takes (None: every token)."""
    inner = layer.attention if isinstance(layer, MultiheadAttentionAdapter) else layer
    if isinstance(inner, (BranchingAttention, Branching2d)):
        inner = inner.convnn
    K = getattr(inner, "K", None)
    if K is None and getattr(inner, "candidates", None) == "window":
        K = inner.window**2 + inner.num_prefix_tokens  # the window and the prefix tokens
    return K


def _candidates_note(layer: nn.Module) -> str | None:
    for m in layer.modules():
        if isinstance(m, ConvNN2d) and m.candidates in ("random", "grid"):
            return (
                f"candidates={m.candidates!r}, num_candidates={m.num_candidates}: on maps of "
                f"fewer positions (deep layers) every candidate of the padded map is used"
            )
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
