"""The data pipeline: DatasetTable rows -> normalised 3-channel batches with targets and a mask.

Every image enters through :func:`source_pixels` ("the image as the data source returns it": today
the decoded file, or a prepared-image cache in its place). What happens next follows Ark's
reference (``Ark_MICCAI2023/dataloader.py``):

- training, ``crop_source="original"`` (default, Ark's): the random-resized crop is cut from that
  image at its own resolution, then shift/scale/rotate and jitter (:mod:`arkfed.data.transforms`);
  ``crop_source="resized"``: the image is first squashed to a ``train_resize`` square (default
  ``img_size``) and the crop is cut from that. It is faster on huge images but a crop of a small
  square holds less detail (a 0.08-area crop of a 224 px square is 63 px upsampled 3.5x, where
  from a 2,500 px original it is 700 px downsampled). Ark itself does this for ChestX-ray14 and
  VinDr (resized to 224 first: per dataset, ``dataset_resize``) and Ark+ for every dataset (resized
  to 896 first);
- evaluation: ``Resize(img_size / crop_pct)`` + ``CenterCrop(img_size)`` from the source image
  (Ark: 256 -> 224, ``crop_pct`` 0.875) or, with ``crop_pct=None``, the whole image squashed to
  ``img_size``; ten-crop (Ark's test protocol) takes ``TenCrop(img_size)`` of the same resize.

Label policies are applied per access with a generator seeded from (visit seed, draw number), so
uncertain-label smoothing draws, augmentation and data order are reproducible and do not depend
on the number of DataLoader workers.

Batches are :class:`TrainBatch` (student view, teacher view, targets, mask) or :class:`EvalBatch`
(images, targets, mask); images are float, ``B x 3 x S x S`` (``B x 10 x 3 x S x S`` for
ten-crop), grayscale replicated to three channels and normalised with the model's mean/std.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from arkfed.config import CropSource
from arkfed.data.batches import EvalBatch, TrainBatch
from arkfed.data.schema import LabelSchema, label_targets
from arkfed.data.tables import DatasetTable
from arkfed.data.transforms import ViewPair
from arkfed.errors import ArkfedError
from arkfed.spec import ModelSpec


def evaluation_schema(schema: LabelSchema) -> LabelSchema:
    """Evaluation counts definite labels only: uncertain entries are left out of AUC and loss
    (smoothing or guessing them would score the model against noise); missing keeps its policy."""
    return schema.with_policies(uncertain="ignore")


DEFAULT_CROP_PCT = 224 / 256  # Ark's Resize(256) + CenterCrop / TenCrop(224)


def source_pixels(table: DatasetTable, index: int) -> np.ndarray:
    """Row ``index`` as the data source returns it: an ``H x W`` uint8 array at its own size.

    The one place an image enters the pipeline (a prepared-image cache slots in here)."""
    try:
        pixels = table.images.read(index)
    except ArkfedError:
        raise
    except Exception as exc:
        raise ArkfedError(f"cannot read image {table.images.describe(index)}: {type(exc).__name__}: {exc}") from None
    if pixels.ndim != 2:
        raise ArkfedError(f"image {table.images.describe(index)} has shape {pixels.shape}, expected H x W grayscale")
    return pixels


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).unsqueeze(0)


def squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """The whole image resized to ``size x size`` (PIL bilinear, antialiased; aspect not kept, as Ark)."""
    if pixels.shape == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def read_source(table: DatasetTable, index: int) -> torch.Tensor:
    """Row ``index`` as a ``1 x H x W`` uint8 tensor at the source's resolution."""
    return _tensor(source_pixels(table, index))


def read_resized(table: DatasetTable, index: int, size: int) -> torch.Tensor:
    """Row ``index`` as a ``1 x size x size`` uint8 tensor (the whole image, squashed to a square)."""
    return _tensor(squash(source_pixels(table, index), size))


def resize_size(size: int, crop_pct: float | None) -> int:
    """The square an evaluation image is resized to before the centre crop: ``size / crop_pct``."""
    return size if crop_pct is None else int(round(size / crop_pct))


def eval_view(pixels: np.ndarray, size: int, crop_pct: float | None) -> torch.Tensor:
    """``Resize((R, R))`` + ``CenterCrop(size)`` with ``R = size / crop_pct`` (Ark's validation
    transform), or the whole image squashed to ``size`` when ``crop_pct`` is None."""
    big = resize_size(size, crop_pct)
    image = _tensor(squash(pixels, big))
    if big == size:
        return image
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(image, [size, size])


def ten_crop_views(pixels: np.ndarray, size: int, crop_pct: float | None) -> torch.Tensor:
    """Ark's test-time augmentation: ``Resize((R, R))`` + ``TenCrop(size)`` (4 corners + centre and
    their mirror images) from the source image, ``10 x 1 x size x size``. ``R = size / crop_pct``,
    256/224 of ``size`` when ``crop_pct`` is None."""
    from torchvision.transforms.v2 import functional as TF

    big = resize_size(size, crop_pct if crop_pct is not None else DEFAULT_CROP_PCT)
    return torch.stack(TF.ten_crop(_tensor(squash(pixels, big)), [size, size]))


def sample_seed(seed: int, draw: int) -> int:
    return int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator (which torchvision's transforms draw from) for one sample and
    restore it afterwards. Cheaper than ``torch.manual_seed``/``fork_rng``, which also touch CUDA."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Per-image transforms are tiny ops that slow down badly when split over busy threads;
    run them on one (DataLoader workers already are), restoring the count for the model."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class EvalDataset(Dataset):
    """Rows of a table as evaluation images (:func:`eval_view` or :func:`ten_crop_views`), with
    deterministic targets (no label smoothing)."""

    def __init__(self, table: DatasetTable, schema: LabelSchema, size: int, crop_pct: float | None = None, ten_crop: bool = False):
        self.table, self.size, self.crop_pct, self.ten_crop = table, size, crop_pct, ten_crop
        self.targets, self.mask = label_targets(table.labels, evaluation_schema(schema))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        pixels = source_pixels(self.table, index)
        view = ten_crop_views if self.ten_crop else eval_view
        return view(pixels, self.size, self.crop_pct), self.targets[index], self.mask[index]

    def __getitems__(self, indices: list[int]) -> list:
        with single_threaded():
            return [self[i] for i in indices]


class TrainDataset(Dataset):
    """The draws of one visit: item ``k`` is row ``order[k]`` with its own seed (views, lsr)."""

    def __init__(
        self, table: DatasetTable, schema: LabelSchema, size: int, views: ViewPair, order: np.ndarray, seed: int,
        crop_source: CropSource = "original", train_resize: int | None = None,
    ):
        self.table, self.schema, self.size, self.views = table, schema, size, views
        self.order, self.seed = np.asarray(order, dtype=np.int64), seed
        self.crop_source, self.train_resize = crop_source, train_resize

    def image(self, row: int) -> torch.Tensor:
        """What the geometry starts from: the source image, or it squashed to ``train_resize``."""
        if self.crop_source == "original":
            return read_source(self.table, row)
        return read_resized(self.table, row, self.train_resize or self.size)

    def __len__(self) -> int:
        return len(self.order)

    def _sample(self, draw: int, views) -> tuple:
        row = int(self.order[draw])
        image = self.image(row)
        s = sample_seed(self.seed, draw)
        targets, mask = label_targets(self.table.labels[row : row + 1], self.schema, np.random.default_rng(s))
        with seeded_torch(s):
            out = views(image)
        return (*out, targets[0], mask[0]) if isinstance(out, tuple) else (out, targets[0], mask[0])

    def __getitem__(self, draw: int):
        """(student view, teacher view, targets, mask) of draw ``draw``."""
        return self._sample(draw, self.views)

    def __getitems__(self, draws: list[int]) -> list:
        with single_threaded():
            return [self._sample(d, self.views) for d in draws]

    def single_view(self, draw: int):
        """(one augmented view, targets, mask): the sample of a plain supervised loop."""
        with single_threaded():
            return self._sample(draw, self.views.single)


class Normalise:
    """uint8 ``B x 1 x S x S`` -> float ``B x 3 x S x S`` normalised with the model's mean/std
    (also ``B x N x 1 x S x S`` -> ``B x N x 3 x S x S`` for multi-crop images)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


class TrainCollate:
    def __init__(self, spec: ModelSpec):
        self.normalise = Normalise(spec.mean, spec.std)

    def __call__(self, samples) -> TrainBatch:
        student, teacher, targets, mask = zip(*samples)
        return TrainBatch(
            self.normalise(torch.stack(student)), self.normalise(torch.stack(teacher)),
            torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(mask)),
        )


class EvalCollate:
    def __init__(self, spec: ModelSpec):
        self.normalise = Normalise(spec.mean, spec.std)

    def __call__(self, samples) -> EvalBatch:
        images, targets, mask = zip(*samples)
        return EvalBatch(self.normalise(torch.stack(images)), torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(mask)))


def visit_draws(n: int, batch_size: int, epochs: int, seed: int, max_steps: int | None = None) -> np.ndarray:
    """Row indices of a visit: a fresh permutation per epoch, cut to whole batches (drop-last, so
    BatchNorm never sees a batch of one), at least one batch, at most ``max_steps`` batches."""
    if n == 0:
        raise ArkfedError("the training split is empty")
    rng = np.random.default_rng(seed)
    per_batch = min(batch_size, n)
    steps = max(1, n // per_batch)
    order = np.concatenate([rng.permutation(n)[: steps * per_batch] for _ in range(epochs)])
    if max_steps is not None:
        order = order[: max_steps * per_batch]
    return order


class RankBatches(Sampler[list[int]]):
    """Batches of one rank: positions ``[k*B + r*b, k*B + (r+1)*b)`` of draws cut into global batches."""

    def __init__(self, draws: int, per_rank: int, rank: int, world_size: int):
        self.draws, self.per_rank, self.rank, self.world_size = draws, per_rank, rank, world_size

    def __len__(self) -> int:
        return self.draws // (self.per_rank * self.world_size)

    def __iter__(self):
        step = self.per_rank * self.world_size
        for k in range(len(self)):
            start = k * step + self.rank * self.per_rank
            yield list(range(start, start + self.per_rank))


def _loader_kwargs(num_workers: int, pin_memory: bool) -> dict:
    """Pinned memory lets the visit's ``.to(device, non_blocking=True)`` overlap the copy with compute."""
    kwargs = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
        kwargs["persistent_workers"] = True
    return kwargs


@dataclass(frozen=True)
class TrainLoaderOptions:
    """How a visit's batches are drawn and loaded: everything :func:`make_train_loader` needs besides
    the table, the label schema and the model spec.

    ``crop_source``/``train_resize``: which image the crop is cut from (see the module docstring).
    With ``world_size`` > 1 (one DDP rank of N) ``batch_size`` is per rank: the draws are those of
    a one-process visit with batch ``N x batch_size`` and this rank loads its slice of each batch.
    """

    batch_size: int
    epochs: int = 1
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    views: str = "ark"
    jitter_p: float = 0.3
    max_steps: int | None = None
    crop_source: CropSource = "original"
    train_resize: int | None = None
    num_workers: int = 0
    pin_memory: bool = False
    augment: str = "cpu"
    rank: int = 0
    world_size: int = 1


def make_train_loader(table: DatasetTable, schema: LabelSchema, spec: ModelSpec, options: TrainLoaderOptions) -> DataLoader:
    """The batches of one visit, in a reproducible order with reproducible augmentation (see
    :class:`TrainLoaderOptions`)."""
    o = options
    order = visit_draws(len(table), o.batch_size * o.world_size, o.epochs, o.seed, o.max_steps)
    pair, collate = ViewPair(spec.img_size, o.crop_scale, o.views, o.jitter_p), TrainCollate(spec)
    if o.augment == "device":  # workers draw the view parameters; the visit makes the views on its device
        from arkfed.data.device_views import RawCollate, ViewParams

        pair, collate = ViewParams(spec.img_size, o.crop_scale, o.views, o.jitter_p), RawCollate()
    dataset = TrainDataset(table, schema, spec.img_size, pair, order, o.seed, o.crop_source, o.train_resize)
    if o.world_size > 1:
        per_rank = min(o.batch_size * o.world_size, len(table)) // o.world_size
        return DataLoader(dataset, batch_sampler=RankBatches(len(order), per_rank, o.rank, o.world_size),
                          collate_fn=collate, **_loader_kwargs(o.num_workers, o.pin_memory))
    return DataLoader(
        dataset, batch_size=min(o.batch_size, len(table)), shuffle=False, drop_last=False,
        collate_fn=collate, **_loader_kwargs(o.num_workers, o.pin_memory),
    )


def make_eval_loader(
    table: DatasetTable, schema: LabelSchema, spec: ModelSpec, batch_size: int, num_workers: int = 0,
    pin_memory: bool = False, ten_crop: bool = False,
) -> DataLoader:
    """Every row once, in order, as the model's evaluation view (``spec.crop_pct``, see
    :func:`eval_view`): :class:`EvalBatch` (images, targets, mask). With ``ten_crop`` the images
    are ``B x 10 x 3 x S x S`` (:func:`ten_crop_views`); average the crops' probabilities.

    Targets are hard (no smoothing); uncertain labels are masked out (see :func:`evaluation_schema`).
    """
    dataset = EvalDataset(table, schema, spec.img_size, spec.crop_pct, ten_crop)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=EvalCollate(spec),
        **_loader_kwargs(num_workers, pin_memory),
    )
