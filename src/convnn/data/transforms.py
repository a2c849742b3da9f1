"""Batched augmentation on whatever device the batch lives on (no per-image Python work)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataSpec


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) draws made on the generator's device, returned on ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad (B, C, H, W) by ``padding`` on each side and take a random H x W window per image."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # Offsets in 0..2*padding for rows and columns, one pair per image.
    offsets = (_rand((2, b), generator, images) * (2 * padding + 1)).long()
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_flip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability 1/2."""
    flip = _rand((images.shape[0],), generator, images) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _each_image(transform, images: Tensor, generator: torch.Generator | None) -> Tensor:
    """``transform`` applied to every image of (B, C, H, W) with its own random draws, taken
    from torch's global CPU generator seeded from ``generator`` and restored afterwards."""
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return torch.stack([transform(image) for image in images])


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) int labels -> (B, num_classes) float32 targets, smoothed as in timm."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None].long(), 1.0 - smoothing + off)


def cutmix_box(lam: float, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of area ~(1 - lam) centred uniformly, clipped to the image."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    return int(y0), int(y1), int(x0), int(x1)


class BatchAugment:
    """Training augmentation and normalisation of whole batches.

    Train, in this order: random crop with zero padding, torchvision's ``RandomResizedCrop``
    (``random_resized_crop``: its area range, back to the image's size), horizontal flip,
    torchvision's ``RandAugment`` (``randaugment``: its magnitude, 2 ops), per-channel
    normalisation, torchvision's ``RandomErasing`` (``random_erasing``: its probability; the
    erased box is 0, the mean, after normalisation) and mixup/cutmix (timm's batch mode: each
    image mixes with the batch reversed; ``mixup``/``cutmix`` are Beta alphas, 0 = off; with
    both on, one is picked per batch with probability 1/2). Eval: normalisation only.

    The torchvision transforms (``transforms.v2``) draw a new choice for every image. They draw
    from torch's global generator; here it is seeded from ``generator`` and restored after, so
    a batch's augmentation is still a function of ``generator`` alone (exact resume) and the
    model's own randomness is untouched.

    Targets stay int64 labels unless mixing is on, in which case they are soft (B, num_classes)
    float32 with ``label_smoothing`` folded in; with hard labels, give the smoothing to the
    loss instead (see :attr:`soft_targets`).
    """

    def __init__(
        self,
        spec: DataSpec,
        *,
        crop_padding: int = 0,
        flip: bool = False,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        label_smoothing: float = 0.0,
        normalize: bool = True,
        random_resized_crop: tuple[float, float] | None = None,
        randaugment: int = 0,
        random_erasing: float = 0.0,
    ) -> None:
        if crop_padding < 0 or mixup < 0 or cutmix < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                "crop_padding, mixup and cutmix must be >= 0 and label_smoothing in [0, 1), got "
                f"{crop_padding}, {mixup}, {cutmix}, {label_smoothing}"
            )
        if not 0.0 <= random_erasing <= 1.0 or randaugment < 0:
            raise ValueError(
                "random_erasing must be a probability in [0, 1] and randaugment a magnitude "
                f">= 0, got {random_erasing} and {randaugment}"
            )
        self.num_classes = spec.num_classes
        self.crop_padding = crop_padding
        self.flip = flip
        self.mixup = mixup
        self.cutmix = cutmix
        self.label_smoothing = label_smoothing
        self.normalize = normalize
        self._mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std).view(1, -1, 1, 1)
        self._before, self._after = None, None  # torchvision, before / after normalisation
        if random_resized_crop is not None or randaugment > 0:
            from torchvision.transforms import v2

            ops = []
            if random_resized_crop is not None:
                size = (spec.img_size, spec.img_size)
                ops.append(v2.RandomResizedCrop(size, scale=tuple(random_resized_crop)))
            if randaugment > 0:
                ops.append(v2.RandAugment(num_ops=2, magnitude=randaugment))
            self._before = v2.Compose(ops)
        if random_erasing > 0:
            from torchvision.transforms import v2

            self._after = v2.RandomErasing(p=random_erasing, value=0)

    @property
    def soft_targets(self) -> bool:
        """Whether training batches come back with (B, num_classes) soft targets."""
        return self.mixup > 0 or self.cutmix > 0

    def __call__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) images in [0, 1] and (B,) labels -> (images, targets)."""
        if train:
            if self.crop_padding > 0:
                images = random_crop(images, self.crop_padding, generator)
            if self._before is not None:
                images = _each_image(self._before, images, generator)
            if self.flip:
                images = random_flip(images, generator)
        if self.normalize:
            mean = self._mean.to(images.device, images.dtype)
            std = self._std.to(images.device, images.dtype)
            images = (images - mean) / std
        if train:
            if self._after is not None:
                images = _each_image(self._after, images, generator)
            if self.soft_targets:
                images, labels = self._mix(images, labels, generator)
        return images, labels

    def _mix(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        # One seed from the torch generator drives numpy's Beta sampler (torch has no seedable
        # Beta), so the whole batch is still reproducible from ``generator`` alone.
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
        rng = np.random.default_rng(seed)
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(lam, h, w, rng)
            images = images.clone()
            images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            images = images * lam + partner * (1.0 - lam)
        one_hot = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return images, one_hot * lam + one_hot.flip(0) * (1.0 - lam)
