"""Reading chest X-rays from disk into 8-bit grayscale arrays.

PNG/JPEG (8- or 16-bit) go through Pillow; DICOM through pydicom with the modality LUT
(rescale slope/intercept), the VOI LUT or window, and MONOCHROME1 inverted so that bone is bright
everywhere. Everything is returned as an ``H x W`` uint8 array; a file that cannot be read raises
:class:`ArkfedError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arkfed.errors import ArkfedError

DICOM_SUFFIXES = {".dcm", ".dicom"}


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch any numeric image to the full 0-255 range (flat images become 0)."""
    if pixels.dtype == np.uint8:
        return pixels
    arr = pixels.astype(np.float32)
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame is the radiograph
    pixels = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        pixels = apply_voi_lut(pixels, ds, prefer_lut=True)
    if pixels.ndim == 3:  # colour DICOM (rare for CXR): luminance
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    image = to_uint8(np.asarray(pixels))
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image
    return image


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return to_uint8(np.asarray(img))
        return np.asarray(img.convert("L"))


def read_image(path: str | Path) -> np.ndarray:
    """Read one X-ray as an ``H x W`` uint8 array; raise ArkfedError naming the file if impossible."""
    path = Path(path)
    if not path.is_file():
        raise ArkfedError(f"image file not found: {path}")
    try:
        image = _read_dicom(path) if path.suffix.lower() in DICOM_SUFFIXES else _read_pillow(path)
    except ArkfedError:
        raise
    except Exception as exc:  # Pillow and pydicom raise many types for corrupt files
        raise ArkfedError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if image.ndim != 2 or min(image.shape) < 2:
        raise ArkfedError(f"cannot read image {path}: expected a 2-D grayscale image, got shape {image.shape}")
    return image
