"""Views made on the device: the affine map agrees with torchvision's crop and rotation, the
parameters are reproducible per sample, and a visit trains with ``augment: device``."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.visit import train_site_visit
from arkfed.config import TrainSettings, VisitPlan
from arkfed.data.device_views import WIDTH, DeviceViews, RawBatch, ViewParams, apply_jitter
from arkfed.data.loaders import TrainLoaderOptions, make_train_loader
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.site.config import ComputeSettings, SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from tests.synthetic import multilabel_schema, synthetic_table

S = 32


def _params(top=0.0, left=0.0, h=1.0, w=1.0, angle=0.0, tx=0.0, ty=0.0, scale=1.0) -> torch.Tensor:
    row = torch.zeros(1, WIDTH)
    row[0, :8] = torch.tensor([top, left, h, w, angle, tx, ty, scale])
    return row


def _image(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 1, S, S), generator=g).float()


def test_identity_parameters_give_the_image_back():
    views = DeviceViews((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    image = _image()
    student, teacher = views(image, _params())
    assert torch.allclose(student[:, :1], image, atol=1e-3) and torch.allclose(teacher, student)


def test_crop_and_rotation_match_torchvision():
    views = DeviceViews((0.0,) * 3, (1 / 255,) * 3)
    image = _image(1)
    # a crop of rows 8..24, columns 4..20, resized to S (bilinear, no antialias: it enlarges)
    ours = views.geometry(image, _params(top=8 / S, left=4 / S, h=16 / S, w=16 / S))
    ref = TF.resized_crop(image, 8, 4, 16, 16, [S, S], antialias=False)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # edge pixels differ by border handling
    assert float((ours - ref)[inner].abs().max()) < 1e-3
    # 90 degrees counter-clockwise is a permutation of pixels: exact
    assert torch.allclose(views.geometry(image, _params(angle=90.0)), TF.rotate(image, 90.0), atol=1e-3)


def test_jitter_where_applied_only_and_as_the_cpu_path_computes_it():
    from arkfed.data.transforms import brightness_contrast

    images = _image(2).repeat(4, 1, 1, 1)
    jitter = torch.tensor([[0, 0, 1.2, 0.1, 1.0], [1, 0, 1.2, 0.0, 1.0], [1, 1, 1.0, 0.0, 0.8], [1, 0, 0.9, 0.1, 1.0]])
    out = apply_jitter(images, jitter)
    assert torch.equal(out[0], images[0])
    assert torch.allclose(out[1], (images[1] * 1.2).clamp(0, 255))
    assert torch.allclose(out[2], 255 * (images[2] / 255) ** 0.8)
    # brightness is added (beta * 255), as albumentations and the CPU path do; equal up to uint8 truncation
    cpu = brightness_contrast(images[3].to(torch.uint8), 0.9, 0.1).float()
    assert (out[3] - cpu).abs().max() < 1.0 and not torch.allclose(out[3], images[3] * 0.9)


def test_device_loader_draws_reproducible_parameters_per_sample():
    schema = multilabel_schema()
    table = synthetic_table(12, schema.classes, size=S)
    spec = ModelSpec(model="test_resnet", img_size=S, projector_dim=8)
    a = [b for b in make_train_loader(table, schema, spec, TrainLoaderOptions(4, seed=3, augment="device"))]
    b = [b for b in make_train_loader(table, schema, spec, TrainLoaderOptions(2, seed=3, augment="device"))]
    assert isinstance(a[0], RawBatch) and a[0].images.dtype == torch.uint8 and a[0].params.shape == (4, WIDTH)
    draws = torch.cat([x.params for x in a])
    assert not torch.equal(draws[0], draws[1]) and torch.cat([x.params for x in b]).shape == (12, WIDTH)
    workers = TrainLoaderOptions(4, seed=3, augment="device", num_workers=2)
    again = torch.cat([x.params for x in make_train_loader(table, schema, spec, workers)])
    assert torch.equal(draws, again)  # seeded per (visit seed, draw): the same with worker processes
    p = ViewParams(S).draw()
    assert 0 < p[2] <= 1 and 0 < p[3] <= 1 and -10 <= p[4] <= 10
    image, _ = ViewParams(S)(torch.zeros(1, 50, 70, dtype=torch.uint8))  # a source-size image is squashed
    assert image.shape == (1, S, S)


def test_visit_trains_with_views_made_on_the_device():
    schema = multilabel_schema()
    table = synthetic_table(16, schema.classes, size=S)
    site = Site(SiteConfig(name="d", dataset="csv", root="/nonexistent"), None, schema, {"train": table})
    torch.manual_seed(0)
    student = ArkModel(ModelSpec(model="test_resnet", img_size=S, projector_dim=8))
    teacher, head = copy.deepcopy(student), SiteHead("d", schema, student.embed_dim)
    before = copy.deepcopy(student.state_dict())
    settings = TrainSettings(batch_size=8, max_steps_per_visit=2)
    plan = VisitPlan(round=0, visit=1, total_visits=4, site="d", consistency=0.3, momentum=0.9, lr=1e-3, seed=5)
    pair = ArkPair(student, teacher, SiteHeads.fresh(head))
    result = train_site_visit(pair, site, settings, plan, compute=ComputeSettings(augment="device"))
    assert result.steps == 2 and np.isfinite(result.loss) and result.consistency_loss > 0
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
