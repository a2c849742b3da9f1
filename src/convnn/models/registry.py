"""Model registry: ``create_model(name, ...)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..options import check_choice

CNN_LAYERS = ("conv", "convnn", "branching")
VIT_LAYERS = ("attention", "convnn_attention", "kvt", "branching_attention", "local")

_MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {}


def register(name: str, layers: tuple[str, ...]):
    """Register ``fn(num_classes, in_chans, img_size, layer, **kwargs)`` as model ``name``."""

    def wrap(fn):
        _MODELS[name] = (fn, layers)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def layer_choices(name: str) -> list[str]:
    """The ``layer`` values model ``name`` accepts (its first is the default)."""
    check_choice("name", name, list_models())
    return list(_MODELS[name][1])


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    img_size: int = 224,
    layer: str | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Build model ``name`` whose replaceable layers are ``layer``.

    CNNs (VGG, ResNet): 'conv' | 'convnn' | 'branching'; ViTs: 'attention' |
    'convnn_attention' | 'kvt' | 'branching_attention' | 'local'. ``layer_kwargs`` go to
    the ConvNN layers (e.g. ``K=9, ratio=0.5, metric='cosine'``); ViTs also take
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``.
    """
    check_choice("name", name, list_models())
    fn, layers = _MODELS[name]
    layer = layer or layers[0]
    check_choice("layer", layer, layers)
    return fn(
        num_classes=num_classes, in_chans=in_chans, img_size=img_size, layer=layer, **layer_kwargs
    )
