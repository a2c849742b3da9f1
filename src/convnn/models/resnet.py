"""ResNet (torchvision parameter names); stride-1 3x3 convolutions replaceable."""

from __future__ import annotations

from torch import Tensor, nn

from ._layers import conv3x3
from .api import TimmModelAPI
from .registry import CNN_LAYERS, register


def _conv3x3(in_ch: int, out_ch: int, stride: int, layer: str, layer_kwargs: dict) -> nn.Module:
    # As in the paper, downsampling (stride-2) convolutions stay convolutions.
    return conv3x3(
        in_ch, out_ch, stride, layer if stride == 1 else "conv", layer_kwargs, bias=False
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, layer="conv", layer_kwargs=None
    ):
        super().__init__()
        kw = layer_kwargs or {}
        self.conv1 = _conv3x3(inplanes, planes, stride, layer, kw)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, layer, kw)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, layer="conv", layer_kwargs=None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, layer, layer_kwargs or {})
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(TimmModelAPI, nn.Module):
    """torchvision's ResNet. Below 64 px input the stem is a 3x3 stride-1 ``conv1`` with no
    max-pool (the usual CIFAR stem: the 7x7/2 + pool stem would leave a 32 px image 8 px
    wide before the first block); the parameter names stay the same. ``drop_rate``: dropout
    before ``fc`` (timm's). timm's model API: see :class:`TimmModelAPI`."""

    _classifier = "fc"

    def __init__(
        self,
        block,
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        layer: str = "conv",
        drop_rate: float = 0.0,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        small = img_size < 64
        self.conv1 = nn.Conv2d(
            in_chans, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stages.append(
                self._make_layer(block, planes, blocks, 1 if i == 0 else 2, layer, layer_kwargs)
            )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.num_classes, self.num_features = num_classes, 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._init_api(in_chans, img_size)

    def _make_layer(self, block, planes, blocks, stride, layer, layer_kwargs) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, layer, layer_kwargs)]
        self.inplanes = planes * block.expansion
        mods += [
            block(self.inplanes, planes, 1, None, layer, layer_kwargs) for _ in range(1, blocks)
        ]
        return nn.Sequential(*mods)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H', W'): the last stage's map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _pool(self, x: Tensor) -> Tensor:
        return self.drop(self.avgpool(x).flatten(1))


for _name, (_block, _layers) in {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}.items():
    register(_name, CNN_LAYERS, ResNet)(lambda _b=_block, _l=_layers, **kw: ResNet(_b, _l, **kw))
