"""The two views of an image that Ark's student and teacher see (torchvision.transforms.v2, uint8).

Both views share one geometry: a random resized crop (``crop_scale``) followed by a small
shift/scale/rotate, as in Ark's reference augmentation. The views then differ by mode:

- ``ark`` (default, Ark's reference code): the student view gets intensity jitter
  (brightness/contrast or gamma, with probability ``jitter_p``), the teacher view none;
- ``ark+``: the teacher sees the whole resized image instead (no crop, no jitter);
- ``independent``: both views get their own independent jitter draw.

Randomness comes from torch's CPU generator; :func:`arkfed.data.seeded_torch` seeds it per sample (and
restores it), so views are reproducible and independent of DataLoader workers.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from arkfed.training import ViewsMode

ROTATE_DEGREES = 10.0  # Ark: ShiftScaleRotate(rotate_limit=10)
SHIFT = 0.0625  # albumentations' default shift_limit
SCALE = 0.1  # albumentations' default scale_limit
BRIGHTNESS_CONTRAST = 0.2  # albumentations' RandomBrightnessContrast default limits
GAMMA = (0.8, 1.2)  # albumentations' RandomGamma default (80, 120) / 100


class RandomGamma:
    """Gamma correction with a uniformly drawn gamma (torchvision has the op but no random form)."""

    def __init__(self, gamma: tuple[float, float] = GAMMA):
        self.gamma = gamma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        low, high = self.gamma
        g = float(torch.empty(1).uniform_(low, high))
        return TF.adjust_gamma(image, g)


def geometry_transform(size: int, crop_scale: tuple[float, float]) -> v2.Transform:
    """The shared geometry: random resized crop to ``size`` plus a small shift/scale/rotate."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
        v2.RandomAffine(degrees=ROTATE_DEGREES, translate=(SHIFT, SHIFT), scale=(1 - SCALE, 1 + SCALE)),
    ])


def intensity_jitter(p: float) -> v2.Transform:
    """Brightness/contrast or gamma, applied with probability ``p`` (Ark: OneOf(...), p=0.3)."""
    choice = v2.RandomChoice([
        v2.ColorJitter(brightness=BRIGHTNESS_CONTRAST, contrast=BRIGHTNESS_CONTRAST),
        RandomGamma(),
    ])
    return v2.RandomApply([choice], p=p)


class ViewPair:
    """Callable: a ``1 x S x S`` uint8 image -> (student view, teacher view), both ``1 x S x S`` uint8."""

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.08, 1.0), views: ViewsMode = "ark", jitter_p: float = 0.3):
        self.size = size
        self.views = views
        self.geometry = geometry_transform(size, crop_scale)
        self.jitter = intensity_jitter(jitter_p)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(image)
        shared = self.geometry(image)
        student = self.jitter(shared)
        if self.views == "ark":
            teacher = shared
        elif self.views == "independent":
            teacher = self.jitter(shared)
        else:  # ark+: the whole image, resized
            teacher = image if image.shape[-1] == self.size else TF.resize(image, [self.size, self.size], antialias=True)
        return student.as_subclass(torch.Tensor), teacher.as_subclass(torch.Tensor)

    def single(self, image: torch.Tensor) -> torch.Tensor:
        """One augmented view (geometry + jitter), for a plain supervised loop."""
        return self.jitter(self.geometry(tv_tensors.Image(image))).as_subclass(torch.Tensor)
