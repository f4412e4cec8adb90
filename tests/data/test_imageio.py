"""Image reading: real sample files, 16-bit PNG, generated DICOMs (MONOCHROME1, rescale), corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arkfed.data.imageio import read_image, to_uint8
from arkfed.errors import ArkfedError

RSNA_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.mark.parametrize("name", ["00000001_000.png", "16747_3_1.jpg", "tb0005.png"])
def test_real_png_and_jpeg_samples_read_as_their_grayscale_pixels(shared_data, name):
    path = shared_data / "samples" / name
    image = read_image(path)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("L"))
    assert image.dtype == np.uint8 and image.ndim == 2
    np.testing.assert_array_equal(image, expected)
    assert image.std() > 10  # a radiograph, not a blank page


def test_real_rsna_dicom_reads_as_its_stored_pixels(shared_data):
    import pydicom

    path = shared_data / "samples" / RSNA_DICOM
    image = read_image(path)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert image.dtype == np.uint8 and image.shape == ds.pixel_array.shape
    np.testing.assert_array_equal(image, ds.pixel_array)  # 8-bit MONOCHROME2: no inversion, no stretch
    assert image.std() > 10


def test_16_bit_png_is_stretched_to_8_bit(tmp_path):
    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 7 + 1000).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really written as 16-bit
    image = read_image(path)
    expected = np.round((pixels.astype(np.float64) - pixels.min()) * 255 / (pixels.max() - pixels.min()))
    np.testing.assert_allclose(image, expected, atol=1)
    assert (image.min(), image.max()) == (0, 255)


def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(h: int = 32, w: int = 48, top: int = 1000) -> np.ndarray:
    return np.round(np.linspace(0, top, h * w)).reshape(h, w).astype(np.uint16)


def test_monochrome1_dicom_comes_back_inverted(tmp_path):
    stored = gradient()
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", stored))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1"))
    np.testing.assert_array_equal(mono2, to_uint8(stored))
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
    stored = gradient(top=1000)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=400)
    image = read_image(path).astype(np.float64)
    hu = stored * 2.0 - 1024.0  # the window is in rescaled units: -200..200 HU
    expected = np.clip((hu + 200.0) / 400.0, 0.0, 1.0) * 255
    np.testing.assert_allclose(image, expected, atol=2)
    # without the rescale, the stored values 0..1000 would put most pixels above the window
    assert 0.2 < (image == 255).mean() < 0.6


def test_negative_rescale_slope_flips_intensities(tmp_path):
    stored = gradient()
    image = read_image(write_dicom(tmp_path / "neg.dcm", stored, RescaleSlope=-1, RescaleIntercept=0))
    np.testing.assert_allclose(image, 255 - to_uint8(stored).astype(int), atol=1)  # rounding of the stretch


def test_corrupt_and_missing_files_raise_one_line_errors_naming_them(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ArkfedError, match="broken.png") as err:
        read_image(broken)
    assert "\n" not in str(err.value)
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_bytes(b"DICM" * 10)
    with pytest.raises(ArkfedError, match="bad.dcm"):
        read_image(bad_dicom)
    with pytest.raises(ArkfedError, match="not found: .*absent.jpg"):
        read_image(tmp_path / "absent.jpg")


def test_colour_images_become_grayscale(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.shape == (20, 30)
    assert abs(int(image[0, 0]) - round(200 * 0.587)) <= 1
