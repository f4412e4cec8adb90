"""Throughput of an Ark site visit against the compute limit: a bare timm loop on IN-MEMORY tensors.

The reference loop trains the same timm model (with a classifier) at the same batch size, memory
format and precision (channels_last + bf16 autocast on CUDA) on batches that already sit on the
device: no files, no decoding, no augmentation, no copies, no per-step synchronisation. It is what
the hardware can do. The Ark visit is the real thing: :func:`arkfed.ark.visit.train_site_visit` on a
site of PNG files (the synthetic demo generator) through the plugin, the data pipeline (optionally
the prepared-image cache, ``--cache``), DataLoader workers, the student, the teacher's extra
forward and the consistency loss. The teacher forward alone bounds the ratio near 0.75 (forward +
backward ~ 3 forwards, plus one). Target: >= 0.70.

Each repeat times ``--steps`` steps after ``--warmup-steps`` untimed ones (the visit's clock starts
at its first step after warm-up, so DataLoader start-up is not counted); the two loops alternate;
the table shows median and spread (min-max) over ``--repeats``, and ``--json`` gets every run.

    python benchmarks/throughput.py --model test_resnet --img-size 64 --batch-size 16 --steps 6    # CPU smoke
    python benchmarks/throughput.py --model resnet50 --device cuda --batch-size 128 --num-workers 16 --cache
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.visit import train_site_visit
from arkfed.config import TrainSettings, VisitPlan
from arkfed.demo.generate import generate_demo_federation
from arkfed.devices import autocast, memory_format, resolve_device
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.site.config import ComputeSettings
from arkfed.site.load import Site, load_site
from arkfed.spec import ModelSpec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model_name: str, img_size: int, classes: int, batch: int, device: torch.device, warmup: int, steps: int,
              repeats: int, compile: bool = False):
    """The compute limit: a timm training loop over batches already on the device; yields images/s per run."""
    from timm.optim import create_optimizer_v2

    from arkfed.model.ark import create_backbone

    fmt = memory_format(device)
    backbone = create_backbone(model_name, img_size)  # timm.create_model(num_classes=0), img_size where it applies
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, classes))  # timm's classifier
    model = model.to(device, memory_format=fmt).train()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    forward = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, img_size, img_size, generator=g).to(device).contiguous(memory_format=fmt),
                (torch.rand(batch, classes, generator=g) < 0.3).float().to(device)) for _ in range(4)]
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        with autocast(device):
            logits = forward(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for k in range(warmup):
        step(k)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for k in range(steps):
            step(k)
        sync(device)
        yield steps * batch / (time.perf_counter() - start)


def ark_visit(site: Site, spec: ModelSpec, settings: TrainSettings, compute: ComputeSettings, warmup: int, steps: int, seed: int) -> float:
    """One Ark visit mid-run (c > 0: teacher forward and consistency loss); images/s after warm-up steps."""
    torch.manual_seed(seed)
    student = ArkModel(spec)
    teacher = copy.deepcopy(student)
    head = SiteHead(site.name, site.schema, student.embed_dim)
    plan = VisitPlan(round=1, visit=5, total_visits=12, site=site.name, consistency=0.25, momentum=0.95, lr=settings.lr, seed=seed)
    stamps: dict[int, float] = {}
    settings = settings.model_copy(update={"max_steps_per_visit": warmup + steps})
    # progress runs after the step's loss is read back (a device sync), so the stamps are real step ends
    train_site_visit(ArkPair(student, teacher, SiteHeads.fresh(head)), site, settings, plan, compute=compute,
                     progress=lambda s, n, loss: stamps.__setitem__(s, time.perf_counter()))
    return steps * settings.batch_size * compute.gpus / (stamps[warmup + steps] - stamps[warmup])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def make_site(folder: Path, images: int, size: int, cache: bool) -> Site:
    counts = {"demo-nih": 1, "demo-chexpert": 1, "demo-shenzhen": images}
    yaml = generate_demo_federation(folder, seed=0, size=size, counts=counts)[-1]
    if cache:
        yaml.write_text(yaml.read_text() + f"cache: {{mode: on, size: {max(512, size)}, dir: ../cache}}\n")
    return load_site(yaml)  # with --cache: prepared here, before any clock starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=None, help="demo image size on disk (default: max(256, img-size))")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--cache", action="store_true", help="the visit reads the site's prepared-image cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops")
    parser.add_argument("--augment", choices=("cpu", "device"), default="cpu", help="where the visit makes its views")
    parser.add_argument("--projector-dim", type=int, default=1376)
    parser.add_argument("--max-files", type=int, default=600, help="demo files to write; the visit runs several epochs over them")
    parser.add_argument("--json", type=Path, default=Path("throughput.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = resolve_device(args.device)
    source = args.source_size or max(256, args.img_size)
    draws = (args.warmup_steps + args.steps) * args.batch_size * args.gpus
    with tempfile.TemporaryDirectory() as tmp:
        files = min(int(draws / 0.7) + 20, args.max_files)  # ~70% of a demo site's rows are train
        site = make_site(Path(tmp) / "demo", max(files, int(args.batch_size * args.gpus / 0.7) + 20), source, args.cache)
        n_train = len(site.split("train"))
        spec = ModelSpec(model=args.model, img_size=args.img_size, projector_dim=args.projector_dim)
        per_epoch = n_train // (args.batch_size * args.gpus)  # whole global batches per epoch (drop-last)
        settings = TrainSettings(batch_size=args.batch_size, local_epochs=-(-(args.warmup_steps + args.steps) // per_epoch))
        compute = ComputeSettings(device=str(device), num_workers=args.num_workers, gpus=args.gpus, compile=args.compile,
                                  augment=args.augment)
        header = (f"{args.model} at {args.img_size} px (files {source} px{', cached' if args.cache else ''}), batch "
                  f"{args.batch_size}{f' x {args.gpus} GPUs' if args.gpus > 1 else ''}, {args.steps} timed steps after "
                  f"{args.warmup_steps}, {args.repeats} repeats, {n_train} training files, device {device}, "
                  f"workers {args.num_workers}, views on {args.augment}, torch threads {torch.get_num_threads()}"
                  f"{', bf16 + channels_last' if device.type == 'cuda' else ', fp32'}")
        print(header, flush=True)
        bare_runs = bare_loop(args.model, args.img_size, site.schema.num_classes, args.batch_size * args.gpus, device,
                              args.warmup_steps, args.steps, args.repeats, args.compile)
        bare, ark, ratio = [], [], []
        for r in range(args.repeats):
            bare.append(next(bare_runs))
            ark.append(ark_visit(site, spec, settings, compute, args.warmup_steps, args.steps, r))
            ratio.append(ark[-1] / bare[-1])
            print(f"  run {r + 1}: bare (in-memory) {bare[-1]:8.1f} img/s   ark visit {ark[-1]:8.1f} img/s   "
                  f"ratio {ratio[-1]:.3f}", flush=True)
    result = {"benchmark": "throughput", "config": vars(args) | {"json": str(args.json), "device": str(device)},
              "header": header, "bare_in_memory": summary(bare), "ark_visit": summary(ark), "ratio": summary(ratio)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for label, key in (("bare timm loop, in-memory", "bare_in_memory"), ("ark site visit", "ark_visit")):
        s = result[key]
        print(f"{label:26s}: {s['median']:9.1f} images/s  median ({s['min']:.1f}-{s['max']:.1f})")
    s = result["ratio"]
    print(f"{'ratio (per repeat)':26s}: {s['median']:9.3f}  median ({s['min']:.3f}-{s['max']:.3f})   ceiling ~0.75, target >= 0.70")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
