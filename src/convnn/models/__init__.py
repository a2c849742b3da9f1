"""Model zoo: VGG, ResNet and ViT with ConvNN layers (torchvision / timm parameter names)."""

from __future__ import annotations

import torch
from torch import nn

from . import resnet, vgg, vit  # noqa: F401  (registers the models)
from .registry import CNN_LAYERS, VIT_LAYERS, create_model, layer_choices, list_models


def load_pretrained(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = False
) -> tuple[list[str], list[str]]:
    """Load a torchvision/timm-named state dict, skipping tensors whose shape differs.

    Returns (missing, unexpected) key lists: for a ConvNN variant, missing holds the new
    ConvNN weights (and any shape-mismatched tensors), unexpected the replaced layers'.
    """
    own = model.state_dict()
    keep = {k: v for k, v in state_dict.items() if k not in own or own[k].shape == v.shape}
    mismatched = [k for k in state_dict if k not in keep]
    result = model.load_state_dict(keep, strict=False)
    missing = sorted(set(result.missing_keys) | set(mismatched))
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"state_dict does not match: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return missing, list(result.unexpected_keys)


__all__ = [
    "CNN_LAYERS",
    "VIT_LAYERS",
    "create_model",
    "layer_choices",
    "list_models",
    "load_pretrained",
]
