"""Drawing synthetic chest radiographs for the offline demo federation.

Nothing here is real anatomy or real disease: it is a cartoon that is *chest-like enough* for a
small network to learn findings from, drawn with vectorised numpy in normalised coordinates
(0..1, y down, the patient's right on the image's left as in a PA film). An image is built as a
density map (bright = dense): a torso of soft tissue, two lung fields of air cut by the heart and
the diaphragm domes, ribs, clavicles, spine and lung markings; findings change that map; then an
acquisition style (gamma, contrast, noise, blur, collimation, text marker) turns it into pixels.

All randomness comes from the ``numpy.random.Generator`` passed in, so an image is a pure
function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from arkfed.demo.anatomy import (
    LUNG_AIR,
    SOFT_TISSUE,
    Anatomy,
    Canvas,
    Lung,
    base_grid,
    blob,
    clavicle_mask,
    gauss,
    heart_mask,
    inside,
    lung_field,
    rib_mask,
    smooth_noise,
    torso_mask,
)

# Findings the drawer knows, by canonical name (arkfed.data.findings).
DRAWN_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Mass",
    "Nodule",
    "Pleural Effusion",
    "Pneumothorax",
    "Support Devices",
    "Tuberculosis",
)


@dataclass(frozen=True)
class AcquisitionStyle:
    """How a site's machines and post-processing make pixels out of the density map."""

    gamma: tuple[float, float] = (1.0, 1.0)
    contrast: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    noise: float = 0.015
    blur: tuple[float, float] = (0.0, 0.4)
    rotate_deg: float = 2.0
    scale: tuple[float, float] = (0.97, 1.03)
    shift: float = 0.015
    collimation: tuple[float, float] | None = None
    markers: tuple[str, ...] = ()
    marker_p: float = 0.0


def _random_lung_point(rng: np.random.Generator, lung: Lung, v_range=(-0.8, 0.55)) -> tuple[float, float]:
    """A point well inside a lung field (in normalised ellipse coordinates, then image coordinates)."""
    for _ in range(50):
        u = rng.uniform(-0.8, 0.8)
        v = rng.uniform(*v_range)
        if u * u + v * v < 0.7:
            break
    x = lung.lx + u * lung.rx
    y = lung.ly + v * lung.ry
    # keep away from the heart on the left and from the diaphragm
    if lung.side == "left" and y > lung.ly - 0.05:
        x = max(x, lung.lx + 0.2 * lung.rx)
    return float(x), float(min(y, lung.base - 0.09))


def _sides(rng: np.random.Generator, both_p: float) -> list[str]:
    if rng.random() < both_p:
        return ["right", "left"]
    return [str(rng.choice(["right", "left"]))]


# --- findings ------------------------------------------------------------------------------
# Each takes the canvas, a generator and a strength (1 = clearly visible, <1 = subtle) and edits
# the canvas in place. Cardiomegaly and atelectasis change the anatomy instead (see draw_chest).


def _effusion(cv: Canvas, rng: np.random.Generator, strength: float) -> None:
    for side in _sides(rng, 0.3):
        lung = cv.lungs[side]
        height = rng.uniform(0.09, 0.2) * (0.6 + 0.4 * strength)
        level = lung.base - height
        lateral_frac = np.clip((cv.x - lung.medial) / (lung.lateral - lung.medial), 0.0, 1.2)
        meniscus = level - rng.uniform(0.04, 0.09) * lateral_frac**2
        fluid = inside(meniscus - cv.y, 0.02) * lung.shape
        cv.air *= 1.0 - 0.92 * strength * fluid
        cv.markings *= 1.0 - fluid


def _pneumothorax(cv: Canvas, rng: np.random.Generator, strength: float) -> None:
    lung = cv.lungs[str(rng.choice(["right", "left"]))]
    depth = rng.uniform(0.35, 0.55) * (0.6 + 0.4 * strength)
    r = np.sqrt(lung.u**2 + lung.v**2)
    upper = inside(lung.v - rng.uniform(0.1, 0.5), 0.2)
    band = inside((1.0 - depth) - r, 0.04) * upper * lung.shape  # r > 1 - depth
    cv.markings *= 1.0 - band
    cv.air += 0.3 * strength * band
    line = inside(np.abs(r - (1.0 - depth)) - 0.015, 0.02) * upper * lung.shape
    cv.density += 0.16 * strength * line


def _nodules(cv: Canvas, rng: np.random.Generator, strength: float, count: tuple[int, int], radius: tuple[float, float],
             density: float) -> None:
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        lung = cv.lungs[str(rng.choice(["right", "left"]))]
        px, py = _random_lung_point(rng, lung)
        r = rng.uniform(*radius)
        wobble = 1.0 + 0.15 * np.sin(np.arctan2(cv.y - py, cv.x - px) * int(rng.integers(2, 5)) + rng.uniform(0, 6.3))
        spot = inside(np.sqrt((cv.x - px) ** 2 + (cv.y - py) ** 2) - r * wobble, 0.35 * r)
        cv.density += density * strength * rng.uniform(0.8, 1.1) * spot


def _consolidation(cv: Canvas, rng: np.random.Generator, strength: float) -> None:
    lung = cv.lungs[str(rng.choice(["right", "left"]))]
    px, py = _random_lung_point(rng, lung, (-0.55, 0.3))
    size = cv.x.shape[0]
    texture = smooth_noise(rng, size, 20)
    envelope = gauss(cv.x, cv.y, px, py, rng.uniform(0.07, 0.1), rng.uniform(0.07, 0.11))
    patch = np.clip(2.4 * envelope + 0.8 * texture - 0.7, 0.0, 1.0) * lung.shape
    cv.air *= 1.0 - 0.9 * strength * patch
    cv.markings *= 1.0 - patch


def _edema(cv: Canvas, rng: np.random.Generator, strength: float) -> None:
    haze = np.zeros_like(cv.x)
    spread = rng.uniform(0.1, 0.14)
    for lung in cv.lungs.values():
        hx = lung.medial + (lung.lx - lung.medial) * 0.3
        hy = lung.ly - 0.05
        haze += gauss(cv.x, cv.y, hx, hy, spread * 1.3, spread) * lung.shape
    texture = 1.0 + 0.25 * smooth_noise(rng, cv.x.shape[0], 24)
    cv.air *= 1.0 - np.clip(0.75 * strength * rng.uniform(0.85, 1.15) * haze * texture, 0.0, 0.9)
    # Kerley B lines: short horizontal lines at the lateral lung bases
    for lung in cv.lungs.values():
        sign = -1.0 if lung.side == "right" else 1.0
        for k in range(int(rng.integers(2, 5))):
            ly = lung.base - 0.06 - 0.02 * k
            near_edge = inside(sign * (lung.lateral - cv.x) - 0.05, 0.01) * (sign * (cv.x - lung.lx) > 0)
            cv.density += 0.08 * strength * inside(np.abs(cv.y - ly) - 0.004, 0.006) * near_edge * lung.shape


def _atelectasis_wedge(cv: Canvas, rng: np.random.Generator, lung: Lung, strength: float) -> None:
    """Lower-lobe collapse: a dense wedge against the heart/diaphragm with a sharp straight edge."""
    sign = -1.0 if lung.side == "right" else 1.0
    angle = rng.uniform(0.45, 0.8)
    start_x = lung.medial + sign * rng.uniform(0.0, 0.02)
    start_y = lung.ly - rng.uniform(0.16, 0.24)
    nx, ny = np.cos(angle), -np.sin(angle)  # edge normal
    d = sign * (cv.x - start_x) * nx + (cv.y - start_y) * ny
    wedge = inside(d, 0.01) * (cv.y > start_y) * lung.shape
    cv.air *= 1.0 - 0.95 * strength * wedge
    cv.markings *= 1.0 - wedge


def _tuberculosis(cv: Canvas, rng: np.random.Generator, strength: float) -> None:
    for side in _sides(rng, 0.45):
        lung = cv.lungs[side]
        cx, cy = lung.lx + rng.uniform(-0.3, 0.3) * lung.rx, lung.ly - rng.uniform(0.55, 0.75) * lung.ry
        envelope = gauss(cv.x, cv.y, cx, cy, rng.uniform(0.05, 0.08), rng.uniform(0.05, 0.08))
        texture = smooth_noise(rng, cv.x.shape[0], 22)
        patch = np.clip(1.8 * envelope + 0.6 * texture - 0.75, 0.0, 1.0) * lung.shape
        cv.air *= 1.0 - 0.5 * strength * patch
        cv.markings *= 1.0 - patch
        for _ in range(int(rng.integers(2, 6))):
            px = cx + rng.normal(0, 0.04)
            py = cy + rng.normal(0, 0.035)
            cv.density += 0.15 * strength * blob(cv.x, cv.y, px, py, rng.uniform(0.008, 0.016), 0.008) * lung.shape
        if rng.random() < 0.35:  # a cavity: a dense ring with an air centre
            r = rng.uniform(0.018, 0.03)
            dist = np.sqrt((cv.x - cx) ** 2 + (cv.y - cy) ** 2)
            cv.density += 0.22 * strength * inside(np.abs(dist - r) - 0.006, 0.006) * lung.shape
            cv.air += 0.2 * strength * inside(dist - 0.7 * r, 0.005) * lung.shape


def _support_devices(cv: Canvas, rng: np.random.Generator) -> None:
    a = cv.anatomy
    x, y = cv.x, cv.y
    kind = rng.random()
    if kind < 0.6:  # an endotracheal / nasogastric tube down the midline
        tip = rng.uniform(0.3, 0.85)
        path_x = a.cx + rng.uniform(-0.01, 0.01) + 0.03 * np.clip((y - 0.45) / 0.4, 0.0, 1.0) ** 2
        tube = inside(np.abs(x - path_x) - 0.005, 0.005) * (y < tip)
        cv.density += 0.35 * tube
    if kind > 0.4:  # a pacemaker box in the upper chest with its lead to the heart
        bx, by = a.cx + rng.uniform(0.18, 0.28), rng.uniform(0.16, 0.24)
        box = inside(np.maximum(np.abs(x - bx) - 0.035, np.abs(y - by) - 0.025), 0.006)
        cv.density += 0.55 * box
        hx, hy = a.cx + 0.02, a.base_right - 0.08
        t = np.clip(((x - bx) * (hx - bx) + (y - by) * (hy - by)) / ((hx - bx) ** 2 + (hy - by) ** 2), 0.0, 1.0)
        dist = np.sqrt((x - bx - t * (hx - bx)) ** 2 + (y - by - t * (hy - by)) ** 2)
        cv.density += 0.3 * inside(dist - 0.003, 0.004)


FINDING_DRAWERS = {
    "Pleural Effusion": _effusion,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Tuberculosis": _tuberculosis,
}


def draw_chest(
    rng: np.random.Generator,
    anatomy: Anatomy,
    findings: dict[str, float],
    size: int,
    style: AcquisitionStyle,
) -> np.ndarray:
    """A ``size x size`` uint8 radiograph of ``anatomy`` with ``findings`` (name -> strength 0..1).

    Body texture, findings and acquisition draw from three independent streams spawned from
    ``rng``, so the same seed with and without a finding gives the same image apart from it.
    """
    unknown = set(findings) - set(DRAWN_FINDINGS)
    if unknown:
        raise ValueError(f"the demo drawer cannot draw {sorted(unknown)}")
    body_rng, finding_rng, acquisition_rng = rng.spawn(3)
    x, y = _geometry(acquisition_rng, size, style)
    atelectasis_side = str(finding_rng.choice(["right", "left"])) if "Atelectasis" in findings else None
    lift = finding_rng.uniform(0.04, 0.06) * findings.get("Atelectasis", 0.0)
    heart_scale = 1.0 + finding_rng.uniform(0.45, 0.6) * findings.get("Cardiomegaly", 0.0)
    cv = _draw_body(body_rng, x, y, anatomy, atelectasis_side, lift, heart_scale)

    if atelectasis_side is not None:
        _atelectasis_wedge(cv, finding_rng, cv.lungs[atelectasis_side], findings["Atelectasis"])
    for name, drawer in FINDING_DRAWERS.items():
        if name in findings:
            drawer(cv, finding_rng, findings[name])
    if "Nodule" in findings:
        _nodules(cv, finding_rng, findings["Nodule"], (2, 5), (0.024, 0.034), 0.4)
    if "Mass" in findings:
        _nodules(cv, finding_rng, findings["Mass"], (1, 1), (0.07, 0.095), 0.45)
    if "Support Devices" in findings:
        _support_devices(cv, finding_rng)

    image = cv.density - LUNG_AIR * cv.air + cv.markings + 0.015
    return _acquire(acquisition_rng, image, style)


def _draw_body(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, a: Anatomy, lifted_side: str | None, lift: float, heart_scale: float
) -> Canvas:
    """Torso, lungs (one lifted by volume loss), heart, bones, trachea and lung markings."""
    lungs = {side: lung_field(x, y, a, side, base_shift=lift if side == lifted_side else 0.0) for side in ("right", "left")}
    heart = heart_mask(x, y, a, heart_scale)
    torso = torso_mask(x, y, a)
    size = x.shape[0]
    air = np.maximum(lungs["right"].shape, lungs["left"].shape) * (1.0 - heart)
    vessels = sum(gauss(x, y, lg.medial + (lg.lx - lg.medial) * 0.2, lg.ly - 0.03, 0.09, 0.12) for lg in lungs.values())
    markings = (0.05 * np.abs(smooth_noise(rng, size, 32)) + 0.07 * vessels * (1 + 0.5 * smooth_noise(rng, size, 20))) * air
    cv = Canvas(x, y, SOFT_TISSUE * torso, air, markings, lungs, a)
    for lg in lungs.values():
        lg.shape = lg.shape * (1.0 - heart)

    thorax = inside(y - (max(a.base_right, a.base_left) + 0.04), 0.02)
    cv.density += a.bone * rib_mask(x, y, a, thorax) * torso + 1.3 * a.bone * clavicle_mask(x, y, a)
    spine = inside(np.abs(x - a.cx) - 0.032, 0.01) * torso
    cv.density += 0.07 * spine + 0.02 * heart
    cv.density -= 0.12 * inside(np.abs(x - a.cx) - 0.014, 0.008) * inside(y - 0.3, 0.03) * torso  # trachea
    if a.sex == "F":  # breast shadows over the lower lung fields
        for sign in (-1.0, 1.0):
            cv.density += 0.06 * gauss(x, y, a.cx + sign * a.body_hw * 0.6, a.base_right - 0.02, 0.13, 0.07) * torso
    return cv


def _geometry(rng: np.random.Generator, size: int, style: AcquisitionStyle) -> tuple[np.ndarray, np.ndarray]:
    """The sampling grid after the site's positioning jitter (rotation, scale, shift)."""
    xx, yy = base_grid(size)
    theta = np.deg2rad(rng.uniform(-style.rotate_deg, style.rotate_deg))
    scale = rng.uniform(*style.scale)
    dx, dy = rng.uniform(-style.shift, style.shift, size=2)
    c, s = np.cos(theta), np.sin(theta)
    x = 0.5 + (c * (xx - 0.5) + s * (yy - 0.5)) / scale - dx
    y = 0.5 + (-s * (xx - 0.5) + c * (yy - 0.5)) / scale - dy
    return x.astype(np.float32), y.astype(np.float32)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _acquire(rng: np.random.Generator, density: np.ndarray, style: AcquisitionStyle) -> np.ndarray:
    """Density -> pixels: the site's gamma, contrast, offset, noise, blur, collimation and marker."""
    size = density.shape[0]
    img = np.clip(density / 0.8, 0.0, 1.0) ** rng.uniform(*style.gamma)
    img = (img - 0.5) * rng.uniform(*style.contrast) + 0.5 + rng.uniform(*style.offset)
    img = img + rng.normal(0.0, style.noise, size=img.shape).astype(np.float32)
    if style.collimation is not None:
        yy, xx = np.mgrid[0:size, 0:size] / size
        w = rng.uniform(*style.collimation, size=4)
        border = (xx < w[0]) | (xx > 1 - w[1]) | (yy < w[2]) | (yy > 1 - w[3])
        img = np.where(border, 0.9 * img + 0.08, img)
    pixels = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    radius = rng.uniform(*style.blur)
    if radius > 0.05:
        pixels = pixels.filter(ImageFilter.GaussianBlur(radius * size / 128))
    if style.markers and rng.random() < style.marker_p:
        text = str(rng.choice(style.markers))
        draw = ImageDraw.Draw(pixels)
        corner = int(rng.integers(0, 2))
        left = 3 if corner == 0 else max(3, size - 6 * len(text) - 4)
        draw.text((left, 3), text, fill=int(rng.integers(215, 256)), font=_font())
    return np.asarray(pixels)
