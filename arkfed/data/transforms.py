"""The two views of an image that Ark's student and teacher see (torchvision.transforms.v2, uint8).

Ark's reference (``Ark_MICCAI2023/dataloader.py``, ``build_ts_transformations``) runs one
albumentations pipeline with the student view as ``image`` and the teacher view as ``mask``::

    RandomResizedCrop(224, 224)            # scale (0.08, 1), ratio (3/4, 4/3), bilinear
    ShiftScaleRotate(rotate_limit=10)      # p=0.5: shift 0.0625, scale 0.1, bilinear, reflect-101
    OneOf([RandomBrightnessContrast(), RandomGamma()], p=0.3)   # image (student) only

arkfed reproduces that with torchvision v2 (maintained, BSD; albumentations stopped being
maintained and its successor is AGPL): :class:`ShiftScaleRotate` warps with the matrix of
``cv2.getRotationMatrix2D`` that albumentations used, sampling bilinearly with reflect-101
borders, and :class:`IntensityJitter` applies albumentations' look-up tables (brightness
*additive*, ``x * alpha + beta * 255``; gamma ``(x / 255) ** g * 255``, both truncated to uint8).
The tests check both against OpenCV / albumentations on fixed inputs and parameters.

Where arkfed departs, on purpose:

- the crop is resized with antialiasing (albumentations' ``cv2.resize`` does not antialias, so a
  small crop of a 3000 px radiograph aliases);
- the teacher view is resampled bilinearly like the student's; the reference passes it as a
  *mask*, which albumentations resamples with nearest-neighbour (a side effect, not a design).

View modes: ``ark`` (the student view is jittered, the teacher view is not), ``ark+`` (the teacher
sees the whole image resized, as ``Ark_Plus/Pretraining/dataloader.py`` does) and ``independent``
(both views jittered independently). Which image the geometry starts from (the original or a
pre-resized square) is decided by the data pipeline (:mod:`arkfed.data.loaders`, ``crop_source``).

Randomness comes from torch's CPU generator; :func:`arkfed.data.loaders.seeded_torch` seeds it per sample
(and restores it), so views are reproducible and independent of DataLoader workers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from arkfed.config import ViewsMode

ROTATE_DEGREES = 10.0  # Ark: ShiftScaleRotate(rotate_limit=10)
SHIFT = 0.0625  # albumentations' default shift_limit
SCALE = 0.1  # albumentations' default scale_limit
SSR_P = 0.5  # albumentations' default p of ShiftScaleRotate
BRIGHTNESS_CONTRAST = 0.2  # albumentations' RandomBrightnessContrast default limits
GAMMA = (0.8, 1.2)  # albumentations' RandomGamma default (80, 120) / 100
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


def affine_matrix(angle: float, scale: float, dx: float, dy: float, height: int, width: int) -> torch.Tensor:
    """The 2 x 3 forward matrix albumentations' ``shift_scale_rotate`` builds (output = M @ input,
    pixel-index coordinates): ``cv2.getRotationMatrix2D((w/2, h/2), angle, scale)`` plus a shift
    of ``(dx * w, dy * h)``. ``angle`` in degrees, counter-clockwise on screen."""
    a = math.radians(angle)
    alpha, beta = scale * math.cos(a), scale * math.sin(a)
    cx, cy = width / 2, height / 2
    return torch.tensor([
        [alpha, beta, (1 - alpha) * cx - beta * cy + dx * width],
        [-beta, alpha, beta * cx + (1 - alpha) * cy + dy * height],
    ], dtype=torch.float64)


def shift_scale_rotate(image: torch.Tensor, angle: float, scale: float, dx: float, dy: float) -> torch.Tensor:
    """Warp a ``C x H x W`` (uint8 or float) image as ``cv2.warpAffine(INTER_LINEAR, BORDER_REFLECT_101)``
    does with :func:`affine_matrix`. ``grid_sample`` with ``align_corners=True`` and reflection
    padding reflects about the border pixels' centres, which is exactly reflect-101."""
    channels, height, width = image.shape[-3:]
    forward = torch.cat([affine_matrix(angle, scale, dx, dy, height, width), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    # grid_sample's normalised coordinates (align_corners=True): u = 2 x / (W - 1) - 1
    to_norm = torch.tensor([[2 / max(width - 1, 1), 0, -1], [0, 2 / max(height - 1, 1), -1], [0, 0, 1]], dtype=torch.float64)
    theta = (to_norm @ torch.linalg.inv(forward) @ torch.linalg.inv(to_norm))[:2]
    grid = torch.nn.functional.affine_grid(theta[None].float(), [1, channels, height, width], align_corners=True)
    x = image.reshape(1, channels, height, width).float()
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    out = out.reshape(image.shape)
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def brightness_contrast(image: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """albumentations' uint8 RandomBrightnessContrast (``brightness_by_max``): a table of
    ``clip(x * alpha + beta * 255)`` truncated to uint8 -- brightness is added, not multiplied."""
    table = (torch.arange(256, dtype=torch.float32) * alpha + beta * 255.0).clamp_(0, 255).to(torch.uint8)
    return table[image.long()]


def gamma(image: torch.Tensor, g: float) -> torch.Tensor:
    """albumentations' uint8 RandomGamma: a table of ``(x / 255) ** g * 255`` truncated to uint8."""
    table = ((torch.arange(256, dtype=torch.float64) / 255.0) ** g * 255.0).to(torch.uint8)
    return table[image.long()]


def _like(out: torch.Tensor, inpt: Any) -> Any:
    return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class ShiftScaleRotate(v2.Transform):
    """albumentations' ``ShiftScaleRotate`` (shift 0.0625, scale 0.1, rotate 10, p 0.5) as a v2 transform."""

    _transformed_types = (tv_tensors.Image, torch.Tensor)

    def __init__(self, shift: float = SHIFT, scale: float = SCALE, rotate: float = ROTATE_DEGREES, p: float = SSR_P):
        super().__init__()
        self.shift, self.scale, self.rotate, self.p = shift, scale, rotate, p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draws = torch.rand(5).tolist()
        return {
            "apply": draws[0] < self.p,
            "angle": (2 * draws[1] - 1) * self.rotate,
            "scale": 1 + (2 * draws[2] - 1) * self.scale,
            "dx": (2 * draws[3] - 1) * self.shift,
            "dy": (2 * draws[4] - 1) * self.shift,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        out = shift_scale_rotate(inpt.as_subclass(torch.Tensor), params["angle"], params["scale"], params["dx"], params["dy"])
        return _like(out, inpt)


class IntensityJitter(v2.Transform):
    """Ark's ``OneOf([RandomBrightnessContrast(), RandomGamma()], p=0.3)`` on uint8 images:
    with probability ``p`` one of the two (equally likely), with albumentations' default limits."""

    _transformed_types = (tv_tensors.Image, torch.Tensor)

    def __init__(self, p: float = 0.3, limit: float = BRIGHTNESS_CONTRAST, gamma_range: tuple[float, float] = GAMMA):
        super().__init__()
        self.p, self.limit, self.gamma_range = p, limit, gamma_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draws = torch.rand(4).tolist()
        low, high = self.gamma_range
        return {
            "apply": draws[0] < self.p,
            "kind": "brightness_contrast" if draws[1] < 0.5 else "gamma",
            "alpha": 1 + (2 * draws[2] - 1) * self.limit,  # contrast
            "beta": (2 * draws[3] - 1) * self.limit,  # brightness
            "gamma": low + draws[2] * (high - low),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        image = inpt.as_subclass(torch.Tensor)
        if image.dtype != torch.uint8:
            raise TypeError(f"intensity jitter works on uint8 images, got {image.dtype}")
        if params["kind"] == "brightness_contrast":
            out = brightness_contrast(image, params["alpha"], params["beta"])
        else:
            out = gamma(image, params["gamma"])
        return _like(out, inpt)


def geometry_transform(size: int, crop_scale: tuple[float, float]) -> v2.Transform:
    """The shared geometry: a random resized crop to ``size`` (from whatever image it is given),
    then albumentations' shift/scale/rotate with p=0.5."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop_scale, ratio=CROP_RATIO, antialias=True),
        ShiftScaleRotate(),
    ])


def intensity_jitter(p: float) -> v2.Transform:
    """Brightness/contrast or gamma, applied with probability ``p`` (Ark: OneOf(...), p=0.3)."""
    return IntensityJitter(p)


class ViewPair:
    """Callable: a ``1 x H x W`` uint8 image (any size) -> (student view, teacher view), both ``1 x S x S`` uint8."""

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
            whole = tuple(image.shape[-2:]) == (self.size, self.size)
            teacher = image if whole else TF.resize(image, [self.size, self.size], antialias=True)
        return student.as_subclass(torch.Tensor), teacher.as_subclass(torch.Tensor)

    def single(self, image: torch.Tensor) -> torch.Tensor:
        """One augmented view (geometry + jitter), for a plain supervised loop."""
        return self.jitter(self.geometry(tv_tensors.Image(image))).as_subclass(torch.Tensor)
