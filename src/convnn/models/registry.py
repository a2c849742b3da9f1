"""Model registry: ``create_model(name, ...)`` and ``list_models()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..nn.convert import split_options
from ..options import check_choice

CNN_LAYERS = ("conv", "convnn", "branching")
VIT_LAYERS = ("attention", "convnn_attention", "kvt", "branching_attention", "local")

_MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...], frozenset[str]]] = {}

_MODEL_FIXED = {"self", "cfg", "block", "layers", "num_classes", "in_chans", "img_size", "layer"}
_MODEL_FIXED |= {"batch_norm"}  # part of the VGG variant's name


def _named_params(fn: Callable) -> set[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind not in kinds}


def register(name: str, layers: tuple[str, ...], model_cls: type | None = None):
    """Register ``fn(num_classes, in_chans, img_size, layer, **kwargs)`` as model ``name``.

    The named parameters of ``model_cls.__init__`` (beyond num_classes, in_chans, img_size,
    layer) are the model's own options, e.g. a ViT's ``depth``.
    """
    own = frozenset(_named_params(model_cls.__init__) - _MODEL_FIXED) if model_cls else frozenset()

    def wrap(fn):
        _MODELS[name] = (fn, layers, own)
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
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``. Options of another layer of the
    same family are ignored (so a recipe's ``ratio`` does not stop a switch to 'conv' or
    'convnn'); a name no layer or model option has is a ``ValueError`` listing the valid ones.
    """
    check_choice("name", name, list_models())
    fn, layers, own = _MODELS[name]
    layer = layer or layers[0]
    check_choice("layer", layer, layers)
    split = split_options(
        layer_kwargs, {"layer": layers}, {"layer": layer}, also=own, what=f"layer_kwargs of {name}"
    )
    kwargs = {**{k: v for k, v in layer_kwargs.items() if k in own}, **split["layer"]}
    model = fn(num_classes=num_classes, in_chans=in_chans, img_size=img_size, layer=layer, **kwargs)
    if hasattr(model, "pretrained_cfg"):
        model.pretrained_cfg["architecture"] = name
    return model
