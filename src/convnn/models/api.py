"""timm's model API on convnn's models, so that timm's training utilities (data config,
optimizer factory, EMA, head swaps) treat them as timm models."""

from __future__ import annotations

from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmModelAPI:
    """Mixin: ``num_classes``, ``num_features``, ``pretrained_cfg`` (with the model's real
    input size), ``get_classifier`` / ``reset_classifier``, ``forward_features`` /
    ``forward_head`` and ``no_weight_decay``.

    A model sets ``num_classes``, ``num_features`` and calls :meth:`_init_api` at the end of
    its ``__init__``; it defines ``forward_features`` and ``_pool`` (features -> pooled
    (B, num_features)) and names its classifier with ``_classifier`` (a dotted path).
    """

    _classifier = "head"
    _first_conv = "conv1"

    def _init_api(self, in_chans: int, img_size: int) -> None:
        self.pretrained_cfg = {
            "url": "",
            "num_classes": self.num_classes,
            "input_size": (in_chans, img_size, img_size),
            "pool_size": None,
            "crop_pct": 1.0 if img_size < 224 else 0.875,
            "crop_mode": "center",
            "interpolation": "bicubic",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": self._first_conv,
            "classifier": self._classifier,
            "architecture": type(self).__name__.lower(),
        }

    @property
    def default_cfg(self) -> dict:  # the older timm name
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._classifier)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (B, num_features) -> (B, num_classes) head (Identity for 0 classes), on the
        old head's device and dtype."""
        if global_pool not in (None, "", "avg", "token"):
            raise ValueError(f"global_pool must be None (keep the model's), got {global_pool!r}")
        old = self.get_classifier()
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        new = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(old, nn.Linear):
            new = new.to(old.weight.device, old.weight.dtype)
        parent, _, child = self._classifier.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, new)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """forward_features' output -> logits (or the pooled features with ``pre_logits``)."""
        x = self._pool(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimizer factory keeps out of weight decay (besides the
        biases and norm weights it always excludes)."""
        return set()
