"""Model zoo: VGG, ResNet and ViT with ConvNN layers (torchvision / timm parameter names).

Each model has a torchvision-style builder (``convnn.models.resnet18(num_classes=10,
layer="branching")``), timm's model API, and a ``convnn_<name>`` entry in timm's registry
once timm is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import ConvNN2d, ConvNNAttention, MultiheadAttentionAdapter
from . import resnet, timm_registry, vgg, vit  # noqa: F401  (registers the models)
from .registry import CNN_LAYERS, VIT_LAYERS, create_model, layer_choices, list_models
from .timm_registry import register_timm


def _builder(name: str) -> Callable[..., nn.Module]:
    def build(*, weights=None, progress: bool = True, **kwargs) -> nn.Module:
        if weights is not None:
            raise ValueError(
                f"weights must be None: convnn's {name} has no published weights (load a "
                f"torchvision / timm checkpoint with load_pretrained), got {weights!r}"
            )
        return create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"torchvision-style builder of {name}: ``{name}(weights=None, num_classes=1000, "
        f"in_chans=3, img_size=224, layer=..., **layer_kwargs)`` (see create_model)."
    )
    return build


for _name in list_models():
    globals()[_name] = _builder(_name)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: ``mapped`` (checkpoint key -> model key, for every
    tensor loaded, renamed or reshaped ones included), ``missing`` (model keys no tensor
    reached) and ``unexpected`` (checkpoint keys with no home). Unpacks as
    ``missing, unexpected``."""

    mapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.missing, self.unexpected))


_MHA_NAMES = {
    "in_proj_weight": "qkv.weight",
    "in_proj_bias": "qkv.bias",
    "out_proj.weight": "proj.weight",
    "out_proj.bias": "proj.bias",
}


def _map_key(modules: dict[str, nn.Module], key: str, value: torch.Tensor):
    """The model key and tensor a checkpoint tensor goes to (None where none can).

    Exact mappings only: an nn.MultiheadAttention's in_proj / out_proj into a ConvNN
    attention's qkv / proj (through the MHA adapter too), and a k x k convolution's weight
    (out, in, k, k) into a 'spatial' ConvNN2d's (out, in, k*k), whose slots are the kernel's
    taps in raster order. Everything else keeps its name.
    """
    for mha_name, ours in _MHA_NAMES.items():
        if key.endswith("." + mha_name) or key == mha_name:
            owner = key[: -len(mha_name)].rstrip(".")
            module = modules.get(owner)
            if isinstance(module, MultiheadAttentionAdapter):
                owner, module = f"{owner}.attention".lstrip("."), module.attention
            if isinstance(module, ConvNNAttention):
                return f"{owner}.{ours}".lstrip("."), value
    owner, _, leaf = key.rpartition(".")
    module = modules.get(owner)
    if (
        isinstance(module, ConvNN2d)
        and leaf == "weight"
        and module.metric == "spatial"
        and value.dim() == 4
        and value.shape[-1] == value.shape[-2]
        and value.flatten(2).shape == module.weight.shape
    ):
        return key, value.flatten(2)
    return key, value


def load_pretrained(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = False
) -> LoadReport:
    """Load a torchvision / timm / nn.MultiheadAttention-named state dict into ``model``.

    Tensors map by name, and exactly where the layer changed: 3x3 (k x k) convolution weights
    into 'spatial' ConvNN2d layers, MHA ``in_proj_*`` / ``out_proj.*`` into every attention
    kind's ``qkv`` / ``proj`` (timm's ``Attention`` already shares those names). A tensor
    whose shape differs (a ConvNN layer that is not 'spatial') is not loaded: its key stays
    missing. ``strict`` raises a
    ValueError unless everything maps.
    """
    own = model.state_dict()
    modules = dict(model.named_modules())
    report, load = LoadReport(), {}
    for key, value in state_dict.items():
        target, tensor = _map_key(modules, key, value)
        if target not in own:
            report.unexpected.append(key)
        elif own[target].shape == tensor.shape:
            load[target] = tensor
            report.mapped[key] = target
    model.load_state_dict(load, strict=False)
    report.missing = sorted(set(own) - set(load))
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"state_dict does not match: missing {report.missing}, unexpected {report.unexpected}"
        )
    return report


timm_registry.install()

__all__ = [
    "CNN_LAYERS",
    "VIT_LAYERS",
    "LoadReport",
    "create_model",
    "layer_choices",
    "list_models",
    "load_pretrained",
    "register_timm",
    *list_models(),
]
