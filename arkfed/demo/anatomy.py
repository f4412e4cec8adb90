"""The cartoon anatomy the demo's chest radiographs are drawn on: a patient's body proportions
(:class:`Anatomy`, sampled per patient so follow-ups share them), the lung fields, heart, torso, ribs
and clavicles as soft masks in normalised image coordinates, and the density canvas that
:mod:`arkfed.demo.draw` paints findings onto. Not real anatomy: chest-like enough to learn from."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

SOFT_TISSUE = 0.56


LUNG_AIR = 0.42


@dataclass(frozen=True)
class Anatomy:
    """One patient's body: the same for all of that patient's images (follow-ups)."""

    sex: str
    cx: float
    body_hw: float
    lung_top: float
    base_right: float
    base_left: float
    lung_rx: float
    medial_gap: float
    dome: float
    heart_hw: float
    heart_hh: float
    rib_spacing: float
    rib_first: float
    bone: float


def sample_anatomy(rng: np.random.Generator, sex: str) -> Anatomy:
    male = sex == "M"
    base_right = rng.uniform(0.70, 0.76)
    return Anatomy(
        sex=sex,
        cx=rng.uniform(0.485, 0.515),
        body_hw=rng.uniform(0.42, 0.47) if male else rng.uniform(0.38, 0.43),
        lung_top=rng.uniform(0.13, 0.18),
        base_right=base_right,
        base_left=base_right + rng.uniform(0.005, 0.03),
        lung_rx=rng.uniform(0.150, 0.175) if male else rng.uniform(0.135, 0.160),
        medial_gap=rng.uniform(0.045, 0.06),
        dome=rng.uniform(0.04, 0.07),
        heart_hw=rng.uniform(0.135, 0.15),
        heart_hh=rng.uniform(0.10, 0.115),
        rib_spacing=rng.uniform(0.052, 0.06),
        rib_first=rng.uniform(0.10, 0.13),
        bone=rng.uniform(0.04, 0.07),
    )


@lru_cache(maxsize=8)
def base_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(c, c, indexing="xy")
    return xx, yy


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish, spatially smooth noise (a coarse random grid, bicubically enlarged)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def inside(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``d <= 0`` with a linear edge ``edge`` wide (in normalised units)."""
    return np.clip(0.5 - d / edge, 0.0, 1.0)


def blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, edge: float) -> np.ndarray:
    return inside(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r, edge)


def gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


@dataclass
class Lung:
    """One lung field: where it is, and its masks (filled in by :func:`lung`)."""

    side: str  # "right" (image left) or "left" (image right)
    lx: float
    ly: float
    rx: float
    ry: float
    base: float
    medial: float
    lateral: float
    shape: np.ndarray  # soft mask of the lung outline before the heart is cut out
    u: np.ndarray  # normalised ellipse coordinates, for peripheral bands
    v: np.ndarray


def lung_field(x: np.ndarray, y: np.ndarray, a: Anatomy, side: str, base_shift: float = 0.0) -> Lung:
    sign = -1.0 if side == "right" else 1.0
    base = (a.base_right if side == "right" else a.base_left) - base_shift
    medial = a.cx + sign * a.medial_gap
    lx = medial + sign * a.lung_rx
    lateral = lx + sign * a.lung_rx
    ly = base - 0.14
    ry = ly - a.lung_top
    u = (x - lx) / a.lung_rx
    v = (y - ly) / ry
    ellipse = inside((np.sqrt(u * u + v * v) - 1.0) * a.lung_rx, 0.012)
    dome_y = base - a.dome * np.clip(1.0 - ((x - lx) / (a.lung_rx * 1.05)) ** 2, 0.0, 1.0)
    below_dome = inside(y - dome_y, 0.01)
    med = inside(sign * (medial - x), 0.01)
    return Lung(side, lx, ly, a.lung_rx, ry, base, medial, lateral, ellipse * below_dome * med, u, v)


def heart_mask(x: np.ndarray, y: np.ndarray, a: Anatomy, scale: float) -> np.ndarray:
    hcx = a.cx + 0.04 + 0.6 * (scale - 1.0) * a.heart_hw
    hcy = a.base_right - 0.1 - 0.25 * (scale - 1.0) * a.heart_hh
    dx, dy = x - hcx, y - hcy
    c, s = np.cos(0.35), np.sin(0.35)
    u = (c * dx + s * dy) / (a.heart_hw * scale)
    v = (-s * dx + c * dy) / (a.heart_hh * (0.5 + 0.5 * scale))
    return inside((np.sqrt(u * u + v * v) - 1.0) * a.heart_hw, 0.012)


def torso_mask(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    shoulder = np.clip((y - 0.02) / 0.16, 0.0, 1.0) ** 0.5
    hw = 0.09 + (a.body_hw + 0.04 - 0.09) * shoulder
    return inside(np.abs(x - a.cx) - hw, 0.02)


def rib_mask(x: np.ndarray, y: np.ndarray, a: Anatomy, thorax: np.ndarray) -> np.ndarray:
    t = np.abs(x - a.cx)
    phase = (y - a.rib_first + 0.25 * t - 1.9 * t * t) / a.rib_spacing
    frac = np.abs(phase - np.round(phase)) * a.rib_spacing
    band = inside(frac - 0.009, 0.007) * (phase > -0.5) * (phase < 10.5)
    lateral = inside(t - (a.body_hw - 0.02), 0.02) * (t > 0.03)
    return band * lateral * thorax


def clavicle_mask(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    t = np.abs(x - a.cx)
    line = 0.20 - 0.18 * t + 0.2 * (t - 0.18) ** 2
    return inside(np.abs(y - line) - 0.012, 0.008) * (t > 0.03) * (t < a.body_hw * 0.95)


@dataclass
class Canvas:
    """The density map being drawn and the masks findings need."""

    x: np.ndarray
    y: np.ndarray
    density: np.ndarray
    air: np.ndarray
    markings: np.ndarray
    lungs: dict[str, Lung]
    anatomy: Anatomy
