"""A visit on 2 DDP processes (gloo, CPU) equals a 1-process visit with the same global batch.

test_vit has LayerNorm only: with BatchNorm each rank would normalise with its own half-batch
statistics (SyncBatchNorm, used on CUDA, has no gloo implementation). SGD, not Adam: Adam's first
step divides a gradient by its own magnitude, so a float rounding difference on a near-zero
gradient would flip a whole lr-sized step.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.tasks import train_visit
from arkfed.config import TrainSettings, VisitPlan
from arkfed.data.loaders import TrainLoaderOptions, make_train_loader
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.site.config import ComputeSettings, SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from tests.synthetic import multilabel_schema, synthetic_table

TOLERANCE = 1e-5  # max |difference| of any weight after 3 steps (float32 reduction order only)


def _site() -> Site:
    schema = multilabel_schema()
    table = synthetic_table(24, schema.classes, size=32, seed=3)
    config = SiteConfig(name="ddp", dataset="csv", root="/nonexistent")
    return Site(config=config, plugin=None, schema=schema, splits={"train": table})


def _visit(site, student, teacher, head, teacher_head, batch_size, gpus, ema):
    settings = TrainSettings(batch_size=batch_size, optimizer="sgd", lr=0.05, max_steps_per_visit=3, ema=ema)
    compute = ComputeSettings(device="cpu", gpus=gpus)
    plan = VisitPlan(round=0, visit=2, total_visits=6, site=site.name, consistency=0.3, momentum=0.9, lr=0.05, seed=11)
    steps = []
    result = train_visit(ArkPair(student, teacher, SiteHeads(head, teacher_head)), site, settings, plan, compute=compute,
                         progress=lambda s, n, loss: steps.append((s, n)))
    return result, steps


def test_rank_slices_tile_the_one_process_batches():
    site = _site()
    spec = ModelSpec(model="test_vit", img_size=32, projector_dim=16)
    table, schema = site.split("train"), site.schema
    one = [b.student for b in make_train_loader(table, schema, spec, TrainLoaderOptions(8, seed=5, max_steps=3))]
    ranks = [[b.student for b in make_train_loader(table, schema, spec, TrainLoaderOptions(4, seed=5, max_steps=3, rank=r, world_size=2))]
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    for k in range(3):
        assert torch.equal(one[k], torch.cat([ranks[0][k], ranks[1][k]]))


def test_two_process_visit_matches_one_process_visit_of_the_same_global_batch():
    site = _site()
    torch.manual_seed(0)
    student = ArkModel(ModelSpec(model="test_vit", img_size=32, projector_dim=16))
    teacher = copy.deepcopy(student)
    head = SiteHead(site.name, site.schema, student.embed_dim)
    teacher_head = copy.deepcopy(head)
    start = (student, teacher, head, teacher_head)
    one = [copy.deepcopy(m) for m in start]
    ref, _ = _visit(site, *one, batch_size=8, gpus=1, ema="iteration")
    two = [copy.deepcopy(m) for m in start]
    res, steps = _visit(site, *two, batch_size=4, gpus=2, ema="iteration")

    assert res.num_examples == ref.num_examples == 24 and res.steps == ref.steps == 3
    assert steps and steps[-1] == (3, 3)  # rank 0's progress reached the caller
    for name in ("loss", "task_loss", "consistency_loss"):
        assert abs(getattr(res, name) - getattr(ref, name)) < 1e-5, name
    moved = 0.0
    for a, b, first in zip(one, two, start):
        sa, sb, s0 = a.state_dict(), b.state_dict(), first.state_dict()
        for key in sa:
            assert float((sa[key] - sb[key]).abs().max()) < TOLERANCE, key
            moved = max(moved, float((sa[key] - s0[key]).abs().max()))
    assert moved > 1e-3  # the visits really trained (and the teacher and its head, EMA'd per step, moved too)
    assert np.isfinite(res.loss)


def test_the_files_between_ranks_hold_tensors_and_json_and_load_with_weights_only(tmp_path):
    import inspect
    import json

    from arkfed.ark import ddp
    from arkfed.ark.pair import PARTS
    from arkfed.ark.visit import VisitResult

    site = _site()
    student = ArkModel(ModelSpec(model="test_vit", img_size=32, projector_dim=16))
    teacher = copy.deepcopy(student).requires_grad_(False)
    pair = ArkPair(student, teacher, SiteHeads.fresh(SiteHead(site.name, site.schema, student.embed_dim)))
    settings = TrainSettings(batch_size=4, max_steps_per_visit=3)
    plan = VisitPlan(round=0, visit=2, total_visits=6, site=site.name, consistency=0.3, momentum=0.9, lr=0.05, seed=11)
    torch.save(pair.state_dict(), tmp_path / "job.pt")
    job = json.loads(json.dumps(ddp._job(pair, settings, plan, ComputeSettings(device="cpu"), False)))
    rebuilt = ddp._rebuild_pair(job, torch.load(tmp_path / "job.pt", map_location="cpu", weights_only=True))
    for part in PARTS:
        mine, theirs = getattr(pair, part), getattr(rebuilt, part)
        assert type(mine) is type(theirs)
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
        assert [p.requires_grad for p in mine.parameters()] == [p.requires_grad for p in theirs.parameters()]
    assert rebuilt.student.spec == student.spec and rebuilt.head.schema == site.schema and rebuilt.head.site == site.name
    result = VisitResult(site="ddp", round=0, visit=2, loss=float("nan"), task_loss=0.5, consistency_loss=0.1, num_examples=24, steps=3,
                         seconds=1.0, images_per_s=24.0, lr=0.05, consistency=0.3, momentum=0.9)
    back = VisitResult.model_validate(json.loads(json.dumps(result.model_dump(), allow_nan=True)))
    assert np.isnan(back.loss) and back.model_dump(exclude={"loss"}) == result.model_dump(exclude={"loss"})
    source = inspect.getsource(ddp)
    loads = [line for line in source.splitlines() if "torch.load(" in line and not line.lstrip().startswith(("``", "-"))]
    assert len(loads) == 2 and all("weights_only=True" in line for line in loads) and "weights_only=False" not in source
