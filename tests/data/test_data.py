"""The data pipeline: normalised 3-channel batches, masks, seeded reproducibility, worker independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from arkfed.data.loaders import TrainLoaderOptions, make_eval_loader, make_train_loader, read_resized, visit_draws
from arkfed.data.tables import ArrayImages, DatasetTable, make_meta
from arkfed.errors import ArkfedError
from arkfed.spec import ModelSpec
from synthetic import multilabel_schema, synthetic_table

SPEC = ModelSpec(model="test_resnet", img_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def test_eval_loader_normalises_and_replicates_gray():
    table = synthetic_table(10, ("a", "b", "c"), size=24)
    batches = list(make_eval_loader(table, multilabel_schema(), SPEC, batch_size=4))
    assert [len(b.images) for b in batches] == [4, 4, 2]
    images = batches[0].images
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    raw = torch.from_numpy(table.images.read(0)).float() / 255
    for c in range(3):
        expected = (raw - SPEC.mean[c]) / SPEC.std[c]
        assert torch.allclose(images[0, c], expected, atol=1e-5)
    targets = torch.cat([b.targets for b in batches])
    assert torch.equal(targets, torch.from_numpy(np.nan_to_num(table.labels)))


def test_eval_loader_masks_uncertain_and_resizes():
    table = synthetic_table(12, ("a", "b", "c"), size=40, uncertain=0.3, seed=1)
    batch = next(iter(make_eval_loader(table, multilabel_schema(uncertain="lsr-ones"), SPEC, batch_size=12)))
    assert batch.images.shape[-2:] == (24, 24)
    uncertain = torch.from_numpy(table.labels == -1)
    assert uncertain.any()
    assert torch.equal(batch.mask == 0, uncertain)


def test_train_loader_reproducible_and_worker_independent():
    table = synthetic_table(20, ("a", "b", "c"), size=32, uncertain=0.3)
    schema = multilabel_schema(uncertain="lsr-ones")
    def run(seed, workers):
        return list(make_train_loader(table, schema, SPEC, TrainLoaderOptions(batch_size=8, epochs=2, seed=seed, num_workers=workers)))
    a, b, c = run(5, 0), run(5, 2), run(6, 0)
    assert len(a) == 4  # 20 // 8 = 2 full batches per epoch, drop-last
    for x, y in zip(a, b):
        for tx, ty in zip(x, y):
            assert torch.equal(tx, ty)
    assert not torch.equal(a[0].student, c[0].student)
    first = a[0]
    assert first.student.shape == first.teacher.shape == (8, 3, 24, 24)
    soft = first.targets[(first.targets > 0) & (first.targets < 1)]
    assert len(soft) and soft.min() >= 0.55 and soft.max() <= 0.85  # lsr-ones draws


def test_views_share_geometry_and_teacher_is_unjittered():
    table = synthetic_table(16, ("a", "b", "c"), size=32)
    loader = make_train_loader(table, multilabel_schema(), SPEC, TrainLoaderOptions(batch_size=16, seed=3, jitter_p=0.0))
    batch = next(iter(loader))
    assert torch.equal(batch.student, batch.teacher)
    batch = next(iter(make_train_loader(table, multilabel_schema(), SPEC, TrainLoaderOptions(batch_size=16, seed=3, jitter_p=1.0))))
    assert not torch.equal(batch.student, batch.teacher)


def test_visit_draws_whole_batches_and_max_steps():
    order = visit_draws(10, 4, epochs=3, seed=0)
    assert len(order) == 24
    for e in range(3):
        assert len(set(order[e * 8 : (e + 1) * 8])) == 8
    assert len(visit_draws(3, 8, epochs=2, seed=0)) == 6  # smaller than a batch: one batch of all rows
    assert len(visit_draws(100, 4, epochs=1, seed=0, max_steps=2)) == 8


def test_unreadable_image_names_its_source():
    class Broken(ArrayImages):
        def read(self, index):
            raise OSError("truncated file")
    table = DatasetTable(Broken(np.zeros((2, 8, 8), np.uint8), "broken"), np.zeros((2, 1), np.float32), make_meta(2), ("x",))
    with pytest.raises(ArkfedError, match=r"broken\[1\].*truncated"):
        read_resized(table, 1, 8)


# -- which image the geometry and the evaluation views start from --------------------------------------
def quadrant_table(size: int = 96) -> DatasetTable:
    """One image whose four quadrants have different grey levels, plus a fine checkerboard band on top."""
    image = np.zeros((size, size), dtype=np.uint8)
    h = size // 2
    image[:h, :h], image[:h, h:], image[h:, :h], image[h:, h:] = 40, 90, 160, 220
    image[:4, :] = (np.indices((4, size)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    return DatasetTable(ArrayImages(image[None], "quadrants"), np.zeros((1, 3), np.float32), make_meta(1), ("a", "b", "c"))


def test_every_image_enters_through_source_pixels_and_crops_start_from_the_chosen_image(monkeypatch):
    import arkfed.data.loaders

    table = quadrant_table()
    spec = ModelSpec(model="test_resnet", img_size=24)
    seen = []
    real = arkfed.data.loaders.source_pixels
    monkeypatch.setattr(arkfed.data.loaders, "source_pixels", lambda t, i: seen.append(i) or real(t, i))  # a cache slots in here
    def student(crop_source: str) -> torch.Tensor:
        options = TrainLoaderOptions(batch_size=1, seed=5, crop_scale=(0.05, 0.05), jitter_p=0.0, crop_source=crop_source)
        loader = make_train_loader(table, multilabel_schema(), spec, options)
        return next(iter(loader)).student
    # same seed, same crop box in relative terms; from the 96 px source it holds 4x the pixels of the 24 px square
    assert not torch.equal(student("original"), student("resized"))
    next(iter(make_eval_loader(table, multilabel_schema(), spec, batch_size=1)))
    assert seen == [0, 0, 0]
    from arkfed.data.loaders import TrainDataset
    from arkfed.data.transforms import ViewPair

    pair = ViewPair(24)
    assert TrainDataset(table, multilabel_schema(), 24, pair, np.zeros(1), 0, "original").image(0).shape == (1, 96, 96)
    assert TrainDataset(table, multilabel_schema(), 24, pair, np.zeros(1), 0, "resized").image(0).shape == (1, 24, 24)
    assert TrainDataset(table, multilabel_schema(), 24, pair, np.zeros(1), 0, "resized", 48).image(0).shape == (1, 48, 48)


def test_eval_resize_then_centre_crop_and_ten_crop_from_the_source():
    from torchvision.transforms.v2 import functional as TF

    from arkfed.data.loaders import eval_view, source_pixels, ten_crop_views

    table = quadrant_table(96)
    pixels = source_pixels(table, 0)
    whole = eval_view(pixels, 24, None)
    assert whole.shape == (1, 24, 24)
    ark = eval_view(pixels, 28, 28 / 32)  # Resize(32) + CenterCrop(28), Ark's 256/224 ratio
    resized = torch.from_numpy(np.array(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)))[None]
    assert torch.equal(ark, resized[:, 2:30, 2:30])
    crops = ten_crop_views(pixels, 28, 28 / 32)
    assert crops.shape == (10, 1, 28, 28)
    assert torch.equal(crops[0], resized[:, :28, :28]) and torch.equal(crops[4], ark)
    assert torch.equal(crops[5], TF.horizontal_flip(crops[1]))  # the mirror image's top-left = flipped top-right
    spec = ModelSpec(model="test_resnet", img_size=28, crop_pct=28 / 32)
    batch = next(iter(make_eval_loader(table, multilabel_schema(), spec, batch_size=1, ten_crop=True)))
    assert batch.images.shape == (1, 10, 3, 28, 28)
    single = next(iter(make_eval_loader(table, multilabel_schema(), spec, batch_size=1)))
    assert torch.allclose(single.images[0], batch.images[0, 4])
