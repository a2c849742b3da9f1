"""VGG (torchvision parameter names), every 3x3 convolution replaceable."""

from __future__ import annotations

from torch import Tensor, nn

from ._layers import conv3x3
from .api import TimmModelAPI
from .registry import CNN_LAYERS, register

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]
    + [512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(TimmModelAPI, nn.Module):
    """VGG: ``features`` then ``avgpool`` then ``classifier`` (indices 0/3/6 as torchvision).

    At img_size >= 224 the head is torchvision's (7x7 pool, 4096-wide); below, a 1x1 pool
    and a 512-wide head, the usual choice for CIFAR-sized inputs. Pools use ceil_mode so
    that maps as small as 8x8 (the digits set) never shrink to nothing; for even sizes
    this is the same as torchvision. timm's model API: see :class:`TimmModelAPI` (the
    pooled features are the MLP's last hidden layer, as timm's VGG).
    """

    _classifier = "classifier.6"
    _first_conv = "features.0"

    def __init__(
        self,
        cfg: list,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        layer: str = "conv",
        batch_norm: bool = False,
        dropout: float = 0.5,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            layers.append(conv3x3(c, v, 1, layer, layer_kwargs, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        pool, hidden = (7, 4096) if img_size >= 224 else (1, 512)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(512 * pool * pool, hidden),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias) if m.bias is not None else None
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self.num_classes, self.num_features = num_classes, hidden
        self._init_api(in_chans, img_size)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, 512, H / 32, W / 32)."""
        return self.features(x)

    def _pool(self, x: Tensor) -> Tensor:
        return self.classifier[:6](self.avgpool(x).flatten(1))


def _make(name: str, batch_norm: bool):
    @register(name + ("_bn" if batch_norm else ""), CNN_LAYERS, VGG)
    def build(**kwargs) -> VGG:
        return VGG(CFGS[name], batch_norm=batch_norm, **kwargs)

    return build


for _name in CFGS:
    _make(_name, False)
    _make(_name, True)
