"""The offline demo federation: SYNTHETIC chest-X-ray sites in the publishers' own layouts.

No public chest X-ray dataset can be downloaded on an offline machine, so arkfed draws one
(:mod:`arkfed.demo.draw`) and writes it exactly as NIH, Stanford and the Shenzhen hospital
distribute theirs, so that the real plugins (``chestxray14``, ``chexpert``, ``shenzhen``) read it
and everything downstream runs as on real data:

- ``demo-nih``       ChestX-ray14 layout, PNG, PA films, 8 of the 14 findings drawn;
- ``demo-chexpert``  CheXpert-v1.0-small layout, JPEG, portable AP films, -1 (uncertain) and blank
                      labels, the 5 evaluation observations plus Pneumothorax and Support Devices;
- ``demo-shenzhen``  Shenzhen layout, PNG with collimation borders, tuberculosis yes/no;
- ``demo-vindr``     (opt-in: ``sites=ALL_DEMO_SITES``) VinDr-CXR PhysioNet layout, PNG, three
                      readers per training image, findings of all three others under its own style.

``make demo`` / ``arkfed train`` use the first three (:data:`DEMO_SITES`); ``demo-vindr`` is
for the accrual benchmark (``arkfed benchmark accrual``), where a held-out site must share
findings with several sources for accrual to have anything to show.

The generator's assumptions (what the benchmarks on this data can and cannot tell you):

- A finding looks the same at every site (one drawer per canonical finding); sites differ only in
  acquisition style, demographics, prevalence, label vocabulary and label noise. Real sites also
  differ in how findings look and are defined, so transfer here is easier than between hospitals.
- Findings are drawn independently of one another (apart from persistence across a patient's
  follow-ups) and of age and sex; real findings co-occur (effusion with cardiomegaly, ...).
- What a site can teach another is exactly the findings they share: demo-nih shares 6 of
  demo-chexpert's 7 and none of demo-shenzhen's; demo-vindr shares Cardiomegaly, Pleural effusion
  and Consolidation with demo-nih and demo-chexpert, Nodule/Mass with demo-nih only and
  Tuberculosis with demo-shenzhen only, as VinDr-CXR shares findings with ChestX-ray14, CheXpert
  and the TB collections. No single other site covers demo-vindr's findings.
- Label noise: CheXpert-style uncertain (-1) labels on subtly drawn findings; demo-vindr's three
  readers each miss a finding with p = 0.1 (0.4 when subtle) and the plugin's majority vote
  decides, while its test labels are the truth (its official test file is a consensus).
- Nothing here was tuned to make a method win: the demo-vindr parameters were set once, before
  any benchmark ran on it (generator version 2).

Findings are drawn by canonical name (:mod:`arkfed.data.findings`) so the same disease looks the same
at every site, while each site has its own acquisition style, age/sex mix and label vocabulary.
Patients have follow-up images sharing their anatomy, so splitting by patient matters.
Everything is a pure function of the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from arkfed.demo.layouts import LAYOUT_WRITERS
from arkfed.demo.sites import ALL_DEMO_SITES, DEMO_SITES, DemoImage, DemoSite, plan_site, render, site_classes
from arkfed.errors import ArkfedError

GENERATOR_VERSION = 2  # 2: the opt-in demo-vindr site, sites recorded in the marker
MARKER_FILE = ".arkfed-demo.json"
SYNTHETIC_NOTICE = "SYNTHETIC DATA: drawn by a program, not images of real patients; for demos and tests only."


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=92)
    else:
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# --- the three publishers' layouts -----------------------------------------------------------


# --- the federation on disk ------------------------------------------------------------------


def _site_yaml(site: DemoSite, root: str) -> str:
    lines = [
        f"# {SYNTHETIC_NOTICE}",
        f"# Demo site in the official {site.dataset} layout, written by `arkfed demo-data`.",
        f"name: {site.name}",
        f"dataset: {site.dataset}",
        f"root: {root}",
    ]
    if site.options:
        lines.append("options:")
        lines += [f"  {key}: {value}" for key, value in site.options.items()]
    if site.split:
        lines.append("split:")
        lines += [f"  {key}: {value}" for key, value in site.split.items()]
    lines += DEMO_POLICY
    return "\n".join(lines) + "\n"


DEMO_POLICY = [
    "# Federated runs: synthetic images, nothing to protect, so small trial runs (a few dozen images,",
    "# --max-steps-per-visit 2) are accepted. A real site keeps the defaults (arkfed/policy.py).",
    "# Metrics leave at 6 decimals, so a federated demo run reports what a local one does.",
    "policy:",
    "  min_batch_size: 2",
    "  min_steps_per_visit: 1",
    "  metric_decimals: 6",
]


def _readme(sites: list[tuple[DemoSite, int]], seed: int, size: int) -> str:
    lines = [
        "arkfed demo federation",
        "======================",
        "",
        SYNTHETIC_NOTICE,
        "Every image was drawn by arkfed/demo_draw.py (cartoon anatomy with findings painted on);",
        "no pixel or label comes from a real person. Do not use it for anything clinical.",
        "",
        f"Generator version {GENERATOR_VERSION}, seed {seed}, {size} x {size} px.",
        "Regenerate with: arkfed demo-data <OUT> --seed <S>",
        "",
        "Sites (each in the publisher's official layout, read by the named arkfed plugin):",
    ]
    for site, count in sites:
        lines.append(f"  {site.name}: {count} images, plugin {site.dataset}, findings drawn: {', '.join(site_classes(site))}")
    lines += ["", "Site configs: sites/<name>.yaml (paths relative to the YAML file)."]
    return "\n".join(lines) + "\n"


def _site_counts(counts: Mapping[str, int] | None, sites: Sequence[str] | None = None) -> list[tuple[DemoSite, int]]:
    """(site, images) for the chosen sites (default: :data:`DEMO_SITES`), in ALL_DEMO_SITES order."""
    known = [s.name for s in ALL_DEMO_SITES]
    chosen = list(sites) if sites is not None else [s.name for s in DEMO_SITES]
    counts = dict(counts or {})
    unknown = (set(counts) | set(chosen)) - set(known)
    if unknown:
        raise ArkfedError(f"unknown demo site(s) {sorted(unknown)}; the demo sites are {known}")
    counts = {name: count for name, count in counts.items() if name in chosen}
    return [(site, int(counts.get(site.name, site.images))) for site in ALL_DEMO_SITES if site.name in chosen]


def _write_site(out: Path, site: DemoSite, index: int, count: int, seed: int, size: int) -> None:
    """Write one site into a temporary folder, then move it into place (no half-written site)."""
    final = out / site.name
    tmp = out / f".{site.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def save(image: DemoImage, path: Path, fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(render(site, image, size), fmt))

    LAYOUT_WRITERS[site.dataset](tmp, site, plan_site(site, index, seed, count), save, seed)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def generate_demo_federation(
    out: Path, seed: int = 0, size: int = 128, counts: Mapping[str, int] | None = None, sites: Sequence[str] | None = None
) -> list[Path]:
    """Write the synthetic demo federation into ``out``; return the site YAML paths.

    ``counts`` overrides the number of images per site (tests use a few dozen); ``sites`` picks
    sites by name (default: the three of :data:`DEMO_SITES`; add ``demo-vindr`` to opt in). Files
    are byte-identical for the same (seed, size, counts), whichever other sites are chosen.
    """
    if size < 32:
        raise ArkfedError(f"demo image size must be at least 32 px, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)
    chosen = _site_counts(counts, sites)
    for site, count in chosen:
        _write_site(out, site, ALL_DEMO_SITES.index(site), count, seed, size)
    (out / "sites").mkdir(exist_ok=True)
    yamls = []
    for site, _ in chosen:
        path = out / "sites" / f"{site.name}.yaml"
        path.write_text(_site_yaml(site, f"../{site.name}"))
        yamls.append(path)
    (out / "README.txt").write_text(_readme(chosen, seed, size))
    marker = {"generator": "arkfed.demo", "version": GENERATOR_VERSION, "seed": seed, "size": size,
              "counts": {site.name: count for site, count in chosen}}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return yamls


def demo_is_complete(
    out: Path, seed: int = 0, size: int = 128, counts: Mapping[str, int] | None = None, sites: Sequence[str] | None = None
) -> bool:
    """True when ``out`` holds a finished federation from this generator version with these settings."""
    out = Path(out)
    try:
        info = json.loads((out / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    wanted = {site.name: count for site, count in _site_counts(counts, sites)}
    same = (info.get("version"), info.get("seed"), info.get("size"), info.get("counts")) == (GENERATOR_VERSION, seed, size, wanted)
    return same and all((out / "sites" / f"{name}.yaml").is_file() and (out / name).is_dir() for name in wanted)


def ensure_demo_federation(
    out: Path = Path("demo-data"), seed: int = 0, size: int = 128, counts: Mapping[str, int] | None = None,
    sites: Sequence[str] | None = None,
) -> list[Path]:
    """The demo federation's site YAMLs, generating it first if absent, incomplete or outdated.

    Completeness is judged by the marker file written last by :func:`generate_demo_federation`
    (generator version, seed, size, counts), so an interrupted generation is redone.
    """
    out = Path(out)
    if not demo_is_complete(out, seed, size, counts, sites):
        generate_demo_federation(out, seed=seed, size=size, counts=counts, sites=sites)
    return [out / "sites" / f"{site.name}.yaml" for site, _ in _site_counts(counts, sites)]
