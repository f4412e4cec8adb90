"""Throughput of an Ark site visit against a bare timm supervised loop, on the same images.

Both loops train the same timm model at the same batch size on the same images, read from disk
(PNG files of the synthetic demo federation, through the real plugin and data pipeline: decode,
resize, augmentation, normalisation). The Ark visit additionally runs the teacher forward and the
consistency loss, so its ceiling is about 0.75 of the bare loop (forward + backward ~ 3 forwards,
plus one teacher forward). Prints images/s for both and the ratio.

    python benchmarks/throughput.py                      # resnet18, 224 px, batch 32
    python benchmarks/throughput.py --images 96 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from arkfed.data import TrainDataset, Normalise, visit_draws
from arkfed.demo import generate_demo_federation
from arkfed.model import ArkModel, ModelSpec, SiteHead
from arkfed.site import Site, load_site
from arkfed.training import TrainSettings, VisitPlan, resolve_device
from arkfed.transforms import ViewPair
from arkfed.visit import train_site_visit


class SingleView(Dataset):
    """The visit's draws, one augmented view each: what a plain supervised loop would load."""

    def __init__(self, inner: TrainDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, draw: int):
        return self.inner.single_view(draw)


def bare_timm_loop(site: Site, spec: ModelSpec, settings: TrainSettings, seed: int) -> float:
    """A plain timm training loop (model with classifier, one view, BCE); returns images/s."""
    import timm
    from timm.optim import create_optimizer_v2

    device = resolve_device(settings.device)
    table = site.split("train")
    model = timm.create_model(spec.model, num_classes=site.schema.num_classes).to(device).train()
    optimizer = create_optimizer_v2(model, opt=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay)
    order = visit_draws(len(table), settings.batch_size, settings.local_epochs, seed, settings.max_steps_per_visit)
    views = ViewPair(spec.img_size, settings.crop_scale, settings.views, settings.jitter_p)
    data = SingleView(TrainDataset(table, site.schema, spec.img_size, views, order, seed))
    normalise = Normalise(spec.mean, spec.std)

    def collate(samples):
        images, targets, mask = zip(*samples)
        return normalise(torch.stack(images)), torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(mask))

    loader = DataLoader(data, batch_size=settings.batch_size, collate_fn=collate, num_workers=settings.num_workers)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start, n = time.perf_counter(), 0
    for images, targets, _ in loader:
        images, targets = images.to(device), targets.to(device)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(images)
    return n / (time.perf_counter() - start)


def ark_visit(site: Site, spec: ModelSpec, settings: TrainSettings, seed: int) -> float:
    """One Ark visit mid-run (c > 0: teacher forward and consistency loss on); returns images/s."""
    torch.manual_seed(seed)
    student = ArkModel(spec)
    teacher = copy.deepcopy(student)
    head = SiteHead(site.name, site.schema, student.embed_dim)
    plan = VisitPlan(round=1, visit=5, total_visits=12, site=site.name, consistency=0.25, momentum=0.95, lr=settings.lr, seed=seed)
    start = time.perf_counter()
    result = train_site_visit(student, teacher, head, site, settings, plan)
    return result.num_examples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="images per timed loop")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loop, alternating; best kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--projector-dim", type=int, default=1376)
    parser.add_argument("--data", type=Path, default=None, help="demo folder to reuse (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "demo"
        counts = {"demo-nih": 1, "demo-chexpert": 1, "demo-shenzhen": args.images * 2 + 20}
        yamls = generate_demo_federation(folder, seed=0, size=max(256, args.img_size), counts=counts)
        site = load_site(yamls[-1])
        n_train = len(site.split("train"))
        steps = max(1, min(args.images, n_train) // args.batch_size)
        spec = ModelSpec(model=args.model, img_size=args.img_size, projector_dim=args.projector_dim)
        settings = TrainSettings(
            batch_size=args.batch_size, max_steps_per_visit=steps, device=args.device, num_workers=args.num_workers,
        )
        print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, {steps} steps "
              f"({steps * args.batch_size} images from {n_train} PNG files), device {resolve_device(args.device)}, "
              f"torch threads {torch.get_num_threads()}")
        warm = settings.model_copy(update={"max_steps_per_visit": 1})
        bare_timm_loop(site, spec, warm, 0), ark_visit(site, spec, warm, 0)  # warm-up (allocator, kernels)
        bare, ark = [], []
        for r in range(args.repeats):
            bare.append(bare_timm_loop(site, spec, settings, r))
            ark.append(ark_visit(site, spec, settings, r))
            print(f"  run {r + 1}: bare {bare[-1]:.1f} img/s, ark visit {ark[-1]:.1f} img/s")
    best_bare, best_ark = max(bare), max(ark)
    print(f"bare timm loop : {best_bare:8.1f} images/s  (median {statistics.median(bare):.1f})")
    print(f"ark site visit : {best_ark:8.1f} images/s  (median {statistics.median(ark):.1f})")
    print(f"ratio          : {best_ark / best_bare:8.3f}  (ceiling ~0.75: the teacher forward; target >= 0.70)")


if __name__ == "__main__":
    main()
