"""Ark's two views computed on the training device, for when the CPU workers cannot keep up.

With ``settings.augment == "device"`` a DataLoader worker only reads the resized image (from the
prepared-image cache, ideally) and draws the sample's view *parameters* with the same per-sample
seed the CPU path uses (crop box, rotation/shift/scale, jitter choice and factors: a few numbers).
The batch travels as uint8 plus those numbers (:class:`RawBatch`); :class:`DeviceViews` then builds
both views of the whole batch at once on the GPU: the random-resized crop and the
shift/scale/rotate compose into one affine map per sample, applied by a single ``grid_sample``,
followed by the intensity jitter and normalisation in float.

It draws from the same distributions as :class:`arkfed.data.transforms.ViewPair` (the geometry of
``geometry_transform``: shift/scale/rotate with p=0.5, reflected borders; the additive
brightness, contrast or gamma of :class:`~arkfed.data.transforms.IntensityJitter`; the
``ark``/``ark+``/``independent`` modes), but the pixels are not bit-identical: the CPU path rounds
to uint8 after every op; this one stays in float.
The crop is cut from the image squashed to the model's input size (what travels to the device),
like the CPU path's "crop the resized image" option, not from the source resolution.
Use it where the benchmark shows the data path, not the model, bounds the visit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from arkfed.data.transforms import BRIGHTNESS_CONTRAST, GAMMA, ROTATE_DEGREES, SCALE, SHIFT, SSR_P

# one row of view parameters per sample
CROP = slice(0, 4)  # top, left, height, width of the crop, as fractions of the image side
AFFINE = slice(4, 8)  # angle (degrees, counter-clockwise), shift x, shift y (fractions of the side), scale
STUDENT_JITTER = slice(8, 13)  # applied, kind (0 brightness/contrast, 1 gamma), contrast alpha, brightness beta, gamma
TEACHER_JITTER = slice(13, 18)
TEACHER_WHOLE = 18  # 1: the teacher sees the whole image (ark+)
WIDTH = 19


class RawBatch(NamedTuple):
    """A batch before its views exist: uint8 ``B x 1 x S x S`` images and ``B x WIDTH`` parameters."""

    images: torch.Tensor
    params: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def _crop_box(scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box on a unit square: (top, left, height, width)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if 0 < w <= 1 and 0 < h <= 1:
            return _uniform(0, 1 - h), _uniform(0, 1 - w), h, w
    return 0.0, 0.0, 1.0, 1.0


def _jitter(p: float) -> list[float]:
    applied = float(torch.rand(1)) < p
    kind = int(torch.randint(0, 2, (1,)))
    alpha = _uniform(1 - BRIGHTNESS_CONTRAST, 1 + BRIGHTNESS_CONTRAST)  # contrast: multiplies
    beta = _uniform(-BRIGHTNESS_CONTRAST, BRIGHTNESS_CONTRAST)  # brightness: adds beta * 255, as albumentations
    return [float(applied), float(kind), alpha, beta, _uniform(*GAMMA)]


class ViewParams:
    """The dataset-side half: ``1 x S x S`` uint8 image -> (the image, its view parameters).

    Draws from torch's CPU generator, which :func:`arkfed.data.loaders.seeded_torch` seeds per sample,
    so parameters are reproducible and independent of the number of workers."""

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.08, 1.0), views: str = "ark", jitter_p: float = 0.3):
        self.size, self.crop_scale, self.views, self.jitter_p = size, crop_scale, views, jitter_p

    def draw(self) -> torch.Tensor:
        crop = list(_crop_box(self.crop_scale))
        affine = [_uniform(-ROTATE_DEGREES, ROTATE_DEGREES), _uniform(-SHIFT, SHIFT), _uniform(-SHIFT, SHIFT),
                  _uniform(1 - SCALE, 1 + SCALE)]
        if float(torch.rand(1)) >= SSR_P:  # shift/scale/rotate with p=0.5, as the CPU path (albumentations)
            affine = [0.0, 0.0, 0.0, 1.0]
        row = crop + affine + _jitter(self.jitter_p)
        teacher = _jitter(self.jitter_p) if self.views == "independent" else [0.0] * 5
        return torch.tensor(row + teacher + [float(self.views == "ark+")], dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-2:] != (self.size, self.size):  # a source-size image: batches need one shape
            from torchvision.transforms.v2 import functional as TF

            image = TF.resize(image, [self.size, self.size], antialias=True)
        return image, self.draw()


def affine_theta(params: torch.Tensor) -> torch.Tensor:
    """``B x 2 x 3`` maps from output to source coordinates (``affine_grid``'s normalised [-1, 1])."""
    top, left, h, w = params[:, CROP].unbind(1)
    angle, tx, ty, scale = params[:, AFFINE].unbind(1)
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # inverse of "rotate counter-clockwise by a, scale, shift" in image coordinates (y down)
    inv = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # B x 2 x 2
    shift = torch.stack([2 * tx, 2 * ty], 1).unsqueeze(2)
    crop = torch.diag_embed(torch.stack([w, h], 1))
    centre = torch.stack([2 * (left + w / 2) - 1, 2 * (top + h / 2) - 1], 1).unsqueeze(2)
    return torch.cat([crop @ inv, crop @ (-(inv @ shift)) + centre], 2)


def apply_jitter(images: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """albumentations' brightness/contrast (``x * alpha + beta * 255``), or gamma, per sample where
    applied (float 0-255 in and out; :func:`arkfed.data.transforms.brightness_contrast` in float)."""
    applied, kind, alpha, beta, g = (v.view(-1, 1, 1, 1) for v in jitter.unbind(1))
    bc = (images * alpha + beta * 255.0).clamp(0, 255)
    gamma = 255.0 * (images / 255.0).clamp(min=0).pow(g)
    jittered = torch.where(kind > 0.5, gamma, bc)
    return torch.where(applied > 0.5, jittered, images)


class DeviceViews:
    """The device-side half: :class:`RawBatch` -> (student, teacher) normalised ``B x 3 x S x S`` float."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: str = "reflection"):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.padding = padding

    def geometry(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(affine_theta(params), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.expand(-1, 3, -1, -1) - self.mean.to(images.device)) / self.std.to(images.device)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.float()
        shared = self.geometry(images, params)
        student = apply_jitter(shared, params[:, STUDENT_JITTER])
        teacher = apply_jitter(shared, params[:, TEACHER_JITTER])
        whole = params[:, TEACHER_WHOLE].view(-1, 1, 1, 1) > 0.5
        teacher = torch.where(whole, images, teacher)
        return self.normalise(student), self.normalise(teacher)


    def batch(self, raw: RawBatch, device: torch.device):
        """A :class:`RawBatch` from the loader -> the :class:`arkfed.data.batches.TrainBatch` the visit trains on, on ``device``."""
        from arkfed.data.batches import TrainBatch

        images = raw.images.to(device, non_blocking=True)
        params = raw.params.to(device, non_blocking=True)
        student, teacher = self(images, params)
        return TrainBatch(student, teacher, raw.targets, raw.mask)


class RawCollate:
    """Stacks ``(image, params, targets, mask)`` samples into a :class:`RawBatch` (uint8 stays uint8)."""

    def __call__(self, samples) -> RawBatch:
        images, params, targets, mask = zip(*samples)
        return RawBatch(torch.stack(images), torch.stack(params), torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(mask)))
