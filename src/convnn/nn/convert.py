"""Replace the eligible convolutions / attentions of any model with ConvNN layers, in place."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..options import check_choice
from .attention import ConvNNAttention
from .branching import Branching2d, BranchingAttention
from .conv import ConvNN2d

CONV_LAYERS = ("exact", "convnn", "branching")
ATTENTION_LAYERS = ("exact", "convnn_attention", "kvt", "local", "branching_attention")


@dataclass
class ConversionReport:
    """What :func:`convert` replaced (name, before, after) and skipped (name, reason)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {name}: {before} -> {after}" for name, before, after in self.replaced]
        lines += [f"  {name}: kept ({why})" for name, why in self.skipped]
        return "\n".join(lines)


class SelfAttentionAdapter(nn.Module):
    """Gives a ConvNN attention the call signature of ``nn.MultiheadAttention`` (self-attention)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        if key is not query or value is not query:
            raise ValueError(
                "a converted attention supports self-attention only (query is key is value)"
            )
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise ValueError("a converted attention takes no attn_mask / key_padding_mask")
        return self.attention(query), None


def _conv_reason(conv: nn.Conv2d, include_strided: bool) -> str | None:
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0 or k[0] == 1:
        return f"kernel {tuple(k)} is not an odd square > 1"
    if tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return "dilated, grouped or non-zero padding"
    if isinstance(conv.padding, str) or tuple(conv.padding) != (k[0] // 2,) * 2:
        return f"padding {conv.padding} is not 'same'"
    if max(conv.stride) > 1 and not include_strided:
        return f"stride {tuple(conv.stride)} (pass include_strided=True)"
    return None


def make_conv_layer(conv: nn.Conv2d, layer: str, **kwargs) -> nn.Module:
    """The ConvNN replacement for ``conv`` (same channels and stride)."""
    check_choice("layer", layer, CONV_LAYERS)
    if layer == "exact":
        return ConvNN2d.from_conv2d(conv)
    args = (conv.in_channels, conv.out_channels)
    # Keep the convolution's 'same' zero padding as zero candidates, so K = k*k stays valid
    # on maps as small as 1x1.
    kwargs = {
        "stride": conv.stride[0],
        "bias": conv.bias is not None,
        "padding": conv.padding[0],
        **kwargs,
    }
    if layer == "branching":
        return Branching2d(*args, kernel_size=conv.kernel_size[0], **kwargs)
    return ConvNN2d(*args, **kwargs)


def make_attention_layer(dim: int, num_heads: int, layer: str, **kwargs) -> nn.Module:
    """A ConvNN attention of ``layer`` kind: 'convnn_attention' | 'kvt' | 'local' | 'branching_attention'."""
    check_choice("layer", layer, ATTENTION_LAYERS[1:])
    if layer == "branching_attention":
        return BranchingAttention(dim, num_heads, **kwargs)
    preset = {
        "kvt": {"kernel": "none"},
        "local": {"kernel": "none", "candidates": "window", "window": 7, "K": None},
    }.get(layer, {})
    options = {**preset, **kwargs}
    if layer == "local" and options["K"] is None:
        options["K"] = options["window"] ** 2
    return ConvNNAttention(dim, num_heads, **options)


def convert(
    model: nn.Module,
    conv: str | None = "convnn",
    attention: str | None = None,
    *,
    include_strided: bool = False,
    filter=None,
    **kwargs,
) -> ConversionReport:
    """Replace eligible layers of ``model`` in place and report what changed.

    Args:
        conv: what each eligible ``nn.Conv2d`` (odd square kernel > 1, 'same' zero padding,
            no groups/dilation, stride 1 unless ``include_strided``) becomes: 'exact'
            (the equivalent spatial ConvNN, weights copied), 'convnn', 'branching' or None.
        attention: what each ``nn.MultiheadAttention`` (batch-first, self-attention) becomes:
            'exact' (weights copied), 'convnn_attention', 'kvt', 'local',
            'branching_attention' or None. Non-exact ones copy ``qkv``/``proj`` weights.
        filter: optional ``callable(name, module) -> bool`` to restrict the replacement.
        kwargs: ConvNN options for the new layers (``K=9, metric='cosine', ratio=0.5``...).
    """
    if conv is not None:
        check_choice("conv", conv, CONV_LAYERS)
    if attention is not None:
        check_choice("attention", attention, ATTENTION_LAYERS)
    report = ConversionReport()
    for name, module in list(model.named_modules()):
        if filter is not None and not filter(name, module):
            continue
        new = None
        if isinstance(module, nn.Conv2d) and conv is not None:
            reason = _conv_reason(module, include_strided)
            if reason:
                report.skipped.append((name, reason))
                continue
            new = make_conv_layer(module, conv, **kwargs)
        elif isinstance(module, nn.MultiheadAttention) and attention is not None:
            try:
                exact = ConvNNAttention.from_attention(module)
            except ValueError as err:
                report.skipped.append((name, str(err)))
                continue
            if attention == "exact":
                inner = exact
            else:
                inner = make_attention_layer(
                    module.embed_dim, module.num_heads, attention, **kwargs
                )
                inner.qkv.load_state_dict(exact.qkv.state_dict(), strict=False)
                inner.proj.load_state_dict(exact.proj.state_dict(), strict=False)
            new = SelfAttentionAdapter(inner)
        if new is not None:
            _set_submodule(model, name, new.to(next(module.parameters())))  # device and dtype
            report.replaced.append((name, type(module).__name__, type(new).__name__))
    return report


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
