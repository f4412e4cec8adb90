"""What federation costs per site visit: bytes per hop against the model's fp32 size, and hop
overhead (federated visit time minus local visit time) for resnet18.

Runs the same cyclic Ark training twice on the synthetic demo federation: locally (one process)
and federated over real Flower processes on 127.0.0.1 (one SuperLink, one SuperNode per site,
TLS + SuperNode authentication unless --insecure). Then prints, per hop:

- bytes coordinator -> site (student + teacher arrays) and site -> coordinator (student arrays)
  against the fp32 size of backbone + projector (array payload as Flower carries it; protocol
  framing is extra and small);
- the local visit time (wall time between consecutive visits of a round in local mode: the
  visit, the teacher EMA and the checkpoint), the federated round trip measured at the
  coordinator (request pushed -> reply pulled), and their difference, the hop overhead.

    python benchmarks/federation.py                       # resnet18, 64 px, 3 sites x 2 rounds
    python benchmarks/federation.py --img-size 224 --steps 2 --insecure
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def make_sites(root: Path, images: int, size: int) -> list[Path]:
    from arkfed.demo.generate import DEMO_SITES, generate_demo_federation

    paths = []
    for src in generate_demo_federation(root / "data", seed=0, size=size, counts={s.name: images for s in DEMO_SITES}):
        data = yaml.safe_load(src.read_text())
        data["root"] = str((src.parent / data["root"]).resolve())
        data["state_dir"] = str(root / "state" / data["name"])
        path = root / "sites" / src.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        paths.append(path)
    return paths


def local_visit_seconds(config, out: Path, site_configs) -> list[float]:
    """Wall time of each visit that directly follows another visit of the same round."""
    from arkfed.run.callbacks import LoopCallback
    from arkfed.run.local import train_local

    stamps = []

    class Stamps(LoopCallback):
        def on_visit_end(self, plan, record):
            stamps.append((plan.round, time.perf_counter()))

    train_local(config, out, site_configs=site_configs, callbacks=[Stamps()])
    return [b[1] - a[1] for a, b in zip(stamps, stamps[1:]) if a[0] == b[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="batches per visit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=48, help="images per demo site")
    parser.add_argument("--insecure", action="store_true", help="no TLS / site authentication")
    args = parser.parse_args()

    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.federation import messages as m
    from arkfed.federation.loopback import run_loopback
    from arkfed.federation.protocol import FederationSettings
    from arkfed.model.ark import ArkModel
    from arkfed.run.folder import RunFolder
    from arkfed.site.config import load_site_config
    from arkfed.spec import ModelSpec

    with tempfile.TemporaryDirectory(prefix="arkfed-bench-") as tmp:
        root = Path(tmp)
        sites = make_sites(root, args.images, max(args.img_size, 32))
        config = TrainConfig(
            sites=[load_site_config(p).name for p in sites], rounds=args.rounds,
            model=ModelSpec(model=args.model, img_size=args.img_size),
            settings=TrainSettings(batch_size=args.batch_size, max_steps_per_visit=args.steps, crop_scale=(0.5, 1.0)),
        )
        fp32_bytes = 4 * m.layout(ArkModel(config.model))["float32"]

        local = local_visit_seconds(config, root / "local", sites)
        start = time.perf_counter()
        run_loopback(config, root / "fed", sites, FederationSettings(join_timeout=300, visit_timeout=600), secure=not args.insecure)
        fed_wall = time.perf_counter() - start
        visits = [r for r in RunFolder(root / "fed").read_metrics() if r["kind"] == "visit"]

    sent = statistics.median(r["bytes_sent"] for r in visits[len(config.sites):])  # after the first round: no initial heads
    received = statistics.median(r["bytes_received"] for r in visits)
    round_trip = statistics.median(r["round_trip_s"] for r in visits)
    site_train = statistics.median(r["seconds"] for r in visits)
    local_visit = statistics.median(local)
    mode = "insecure" if args.insecure else "TLS + SuperNode authentication"
    print(f"model {args.model} at {args.img_size} px, batch {args.batch_size}, {args.steps} steps per visit, "
          f"{len(config.sites)} sites x {args.rounds} rounds, {mode}")
    print(f"fp32 model (backbone + projector):      {fp32_bytes / 1e6:8.2f} MB")
    print(f"bytes per hop, coordinator -> site:     {sent / 1e6:8.2f} MB  ({sent / fp32_bytes:.3f} x fp32: student + teacher)")
    print(f"bytes per hop, site -> coordinator:     {received / 1e6:8.2f} MB  ({received / fp32_bytes:.3f} x fp32: student)")
    print(f"local visit (visit + EMA + checkpoint): {local_visit:8.2f} s   (median of {len(local)})")
    print(f"federated visit round trip:             {round_trip:8.2f} s   "
          f"(median of {len(visits)}; training loop at the site {site_train:.2f} s)")
    print(f"hop overhead (federated - local):       {round_trip - local_visit:8.2f} s   ({round_trip / local_visit:.2f} x local)")
    print(f"whole federated run incl. start-up:     {fed_wall:8.1f} s")


if __name__ == "__main__":
    main()
