"""Two views with shared geometry: Ark (student jitter only), Ark+ (teacher whole image), independent."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from arkfed.data.loaders import seeded_torch
from arkfed.data.transforms import (
    IntensityJitter,
    ShiftScaleRotate,
    ViewPair,
    affine_matrix,
    brightness_contrast,
    gamma,
    shift_scale_rotate,
)


def sample_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(30, 90, (1, 48, 48), dtype=torch.uint8, generator=g)
    image[:, 8:20, 10:30] = 230  # a bright structure to follow through the geometry
    return image


def views(pair: ViewPair, image: torch.Tensor, seed: int):
    with seeded_torch(seed):
        return pair(image)


def test_ark_views_share_geometry_and_only_student_is_jittered():
    image = sample_image()
    pair = ViewPair(32, crop_scale=(0.3, 1.0), views="ark", jitter_p=1.0)
    jittered = visible = 0
    for seed in range(12):
        student, teacher = views(pair, image, seed)
        assert student.dtype == teacher.dtype == torch.uint8 and student.shape == teacher.shape == (1, 32, 32)
        with seeded_torch(seed):
            geometry_only = pair.geometry(image)
        assert torch.equal(teacher, geometry_only.as_subclass(torch.Tensor))
        bright_s, bright_t = student > 160, teacher > 160
        assert (bright_s == bright_t).float().mean() > 0.9  # same geometry: the structure sits in the same place
        jittered += int(not torch.equal(student, teacher))
        visible += int(bright_t.float().mean() > 0.02)
    assert jittered >= 10 and visible >= 6
    no_jitter = ViewPair(32, views="ark", jitter_p=0.0)
    s, t = views(no_jitter, image, 3)
    assert torch.equal(s, t)


def test_ark_plus_teacher_sees_the_whole_image():
    image = sample_image()
    pair = ViewPair(48, crop_scale=(0.1, 0.3), views="ark+", jitter_p=0.0)
    student, teacher = views(pair, image, 1)
    assert torch.equal(teacher, image)
    assert not torch.equal(student, image)


def test_independent_jitter_on_both_views():
    image = sample_image()
    pair = ViewPair(32, views="independent", jitter_p=1.0)
    differ = 0
    for seed in range(10):
        student, teacher = views(pair, image, seed)
        with seeded_torch(seed):
            geometry_only = pair.geometry(image).as_subclass(torch.Tensor)
        differ += int(not torch.equal(teacher, geometry_only) and not torch.equal(student, teacher))
    assert differ >= 7


def test_crop_scale_controls_how_much_of_the_image_a_view_keeps():
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[:, :, 32:] = 255  # left half black, right half white
    def both_halves_visible(scale) -> float:
        pair = ViewPair(32, crop_scale=scale, jitter_p=0.0)
        hits = 0
        for seed in range(20):
            s, _ = views(pair, image, seed)
            hits += int((s < 50).float().mean() > 0.2 and (s > 200).float().mean() > 0.2)
        return hits / 20
    assert both_halves_visible((0.9, 1.0)) >= 0.9
    assert both_halves_visible((0.02, 0.04)) <= 0.3


def test_same_seed_same_views():
    image = sample_image()
    pair = ViewPair(32)
    a, b = views(pair, image, 7), views(pair, image, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = views(pair, image, 8)
    assert not torch.equal(a[1], c[1])


# -- Ark's albumentations steps, checked against OpenCV / the last MIT albumentations release --------------
def smooth_image(height: int = 40, width: int = 52) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(base)[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return big[0, 0].round().clamp(0, 255).numpy().astype(np.uint8)


@pytest.mark.parametrize("angle,scale,dx,dy", [(7.3, 1.07, 0.05, -0.03), (-9.9, 0.91, -0.06, 0.0625)])
def test_shift_scale_rotate_matches_opencv_warp_of_albumentations(angle, scale, dx, dy):
    """albumentations of the reference's era (<= 1.3; 2.0 rebuilt it on Affine with zero fill) warps with
    getRotationMatrix2D((w/2, h/2)) + shift, bilinear, reflect-101: the same OpenCV call is the oracle."""
    cv2 = pytest.importorskip("cv2")
    image = smooth_image()
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    matrix[0, 2] += dx * w
    matrix[1, 2] += dy * h
    assert np.allclose(affine_matrix(angle, scale, dx, dy, h, w).numpy(), matrix)
    expected = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    ours = shift_scale_rotate(torch.from_numpy(image)[None], angle, scale, dx, dy)[0].numpy()
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert (ours != expected).mean() < 0.01
    zero_fill = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    assert (ours != zero_fill).mean() > 0.02  # the border really is reflected, not zero-filled


def test_intensity_jitter_matches_albumentations_tables():
    pytest.importorskip("albumentations")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import albumentations as A
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    bc, rg = A.RandomBrightnessContrast(), A.RandomGamma()
    for alpha, beta in [(1.13, 0.07), (0.85, -0.19), (1.0, 0.2)]:
        expected = bc.apply(image.copy(), alpha=alpha, beta=beta * 255)  # 2.0 takes beta in pixel units (brightness_by_max)
        assert np.array_equal(brightness_contrast(torch.from_numpy(image), alpha, beta).numpy(), expected)
    # additive brightness: a dark pixel moves by 255 * beta, not by a factor
    assert int(brightness_contrast(torch.tensor([10], dtype=torch.uint8), 1.0, 0.1)) == 35
    for g in (0.83, 1.17):
        assert np.array_equal(gamma(torch.from_numpy(image), g).numpy(), rg.apply(image.copy(), gamma=g))


def test_shift_scale_rotate_applies_with_probability_half_and_jitter_with_p():
    image = tv_tensors.Image(torch.from_numpy(smooth_image(32, 32))[None])
    ssr, jitter = ShiftScaleRotate(), IntensityJitter(0.3)
    moved = changed = 0
    with seeded_torch(0):
        for _ in range(400):
            moved += int(not torch.equal(ssr(image), image))
            changed += int(not torch.equal(jitter(image), image))
    assert 160 <= moved <= 240  # p = 0.5
    assert 80 <= changed <= 160  # p = 0.3 (a few draws are identities)
