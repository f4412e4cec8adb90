"""Two views with shared geometry: Ark (student jitter only), Ark+ (teacher whole image), independent."""

from __future__ import annotations

import torch

from arkfed.data import seeded_torch
from arkfed.transforms import ViewPair


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
