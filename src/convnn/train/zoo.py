"""The models a run can name: every model of :mod:`convnn.models`, and ``small_cnn``.

``small_cnn`` is a compact network sized for small, low-resolution data (the 8x8 digits of
``convnn demo``, 32 px CIFAR): a stem convolution, two stages of replaceable 3x3 convolutions
around one stride-2 convolution, global pooling and a linear head; about 66,000 parameters at
the default ``width=32``. It is built from the library's public modules
(:func:`convnn.nn.make_conv_layer`), so ``layer`` means the same as for the CNNs of the zoo.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["MODELS", "SmallCNN", "create", "layer_choices", "list_models"]

CNN_LAYERS = ("conv", "convnn", "branching")
# Application models: name -> (layers, options of the model itself).
MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "small_cnn": (CNN_LAYERS, ("width", "blocks")),
}


class SmallCNN(nn.Module):
    """stem (3x3 conv) -> ``stage1`` (``blocks`` replaceable 3x3 layers, ``width`` channels)
    -> ``down`` (3x3 conv, stride 2) -> ``stage2`` (``blocks`` replaceable layers, 2 x width)
    -> global average pool -> ``fc``. Every convolution is followed by BatchNorm and ReLU.

    The stem stays a convolution: on a grey image a pixel's one channel is all a similarity
    could compare, so the ConvNN layers start on the stem's ``width`` feature channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 8,
        layer: str = "conv",
        width: int = 32,
        blocks: int = 1,
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value in (("width", width), ("blocks", blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} of small_cnn must be an integer >= 1, got {value!r}")
        if layer not in CNN_LAYERS:
            raise ValueError(f"layer must be one of {list(CNN_LAYERS)}, got {layer!r}")
        _check_layer_options(layer_kwargs)
        if layer == "convnn":  # as the zoo: another layer's options are ignored
            layer_kwargs = {k: v for k, v in layer_kwargs.items() if k not in _BRANCHING_ONLY}
        elif layer == "conv":
            layer_kwargs = {}
        self.stem = self._unit(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), width)
        self.stage1 = nn.Sequential(
            *(self._block(width, layer, layer_kwargs) for _ in range(blocks))
        )
        down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down = self._unit(down, 2 * width)
        self.stage2 = nn.Sequential(
            *(self._block(2 * width, layer, layer_kwargs) for _ in range(blocks))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    @staticmethod
    def _unit(layer: nn.Module, channels: int) -> nn.Sequential:
        return nn.Sequential(layer, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    @classmethod
    def _block(cls, channels: int, layer: str, layer_kwargs: dict) -> nn.Sequential:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        if layer != "conv":
            from convnn.nn import make_conv_layer

            conv = make_conv_layer(conv, layer, **layer_kwargs)
        return cls._unit(conv, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_classes)."""
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


_BRANCHING_ONLY = ("ratio",)


def _check_layer_options(layer_kwargs: dict) -> None:
    """A name or value no layer of the family takes is an error, whichever layer is chosen (so
    a recipe's typo does not pass unnoticed under layer=conv): a Branching2d takes every
    option of a ConvNN2d and its own, so building one on the meta device checks them all."""
    if not layer_kwargs:
        return
    import torch

    from convnn.nn import make_conv_layer

    with torch.device("meta"):
        make_conv_layer(nn.Conv2d(8, 8, 3, padding=1), "branching", **layer_kwargs)


def list_models() -> list[str]:
    """Every model name a run accepts: the zoo's and the application's."""
    from convnn.models import list_models as zoo_models

    return sorted({*zoo_models(), *MODELS})


def layer_choices(name: str) -> list[str]:
    """The ``layer`` values of model ``name`` (its first is the default)."""
    if name in MODELS:
        return list(MODELS[name][0])
    from convnn.models import layer_choices as zoo_layers

    return zoo_layers(name)


def create(
    name: str, *, num_classes: int, in_chans: int, img_size: int, layer: str, **kwargs: Any
) -> nn.Module:
    """``convnn.models.create_model``, extended with the application's models."""
    if name not in MODELS:
        from convnn.models import create_model

        return create_model(
            name,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            layer=layer,
            **kwargs,
        )
    try:
        return SmallCNN(num_classes, in_chans, img_size, layer, **kwargs)
    except TypeError as e:  # an option no layer takes
        raise ValueError(f"layer_kwargs of {name}: {e}") from None
