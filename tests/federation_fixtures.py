"""Tiny federations for the federation tests: demo sites (official layouts, 32 px) in a tmp dir."""

from __future__ import annotations

from pathlib import Path

import yaml

from arkfed.config import TrainConfig, TrainSettings
from arkfed.federation.protocol import FederationSettings
from arkfed.spec import ModelSpec

SITE_IMAGES = 16
FAST = dict(join_timeout=120.0, visit_timeout=120.0, rejoin_wait=2.0)


def make_sites(root: Path, images: int = SITE_IMAGES) -> list[Path]:
    """The three demo sites (ChestX-ray14, CheXpert and Shenzhen layouts) with their state under
    ``root/state``; returns their YAML paths."""
    from arkfed.demo.generate import DEMO_SITES, generate_demo_federation

    yamls = generate_demo_federation(root / "data", seed=0, size=32, counts={s.name: images for s in DEMO_SITES})
    return site_copies(yamls, root / "sites", root / "state")


def site_copies(yamls: list[Path], folder: Path, state: Path) -> list[Path]:
    """Copies of site YAMLs (absolute data roots) whose private state lives under ``state``:
    each federation in a test gets its own sites' state (heads, outbox, Flower home)."""
    paths = []
    for src in yamls:
        data = yaml.safe_load(Path(src).read_text())
        data["root"] = str((Path(src).parent / data["root"]).resolve())
        data["state_dir"] = str(Path(state) / data["name"])
        path = Path(folder) / Path(src).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(path)
    return paths


def site_name(path: Path) -> str:
    return yaml.safe_load(Path(path).read_text())["name"]


def tiny_config(paths: list[Path], rounds: int = 2, seed: int = 3, **settings) -> TrainConfig:
    """test_resnet at 32 px, two batches of 8 per visit: seconds per visit on a CPU."""
    options = dict(batch_size=8, max_steps_per_visit=2, crop_scale=(0.5, 1.0)) | settings
    return TrainConfig(
        sites=[site_name(p) for p in paths], rounds=rounds, seed=seed,
        model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16), settings=TrainSettings(**options),
    )


def fast_settings(**overrides) -> FederationSettings:
    return FederationSettings(**(FAST | overrides))


def max_abs_diff(a, b) -> float:
    """Largest difference between two models' floating-point state (parameters and buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].dtype.is_floating_point)
