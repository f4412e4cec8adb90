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

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from arkfed.data.findings import CHESTXRAY14_CLASSES, CHEXPERT_CLASSES
from arkfed.demo.draw import AcquisitionStyle, draw_chest, sample_anatomy
from arkfed.errors import ArkfedError

GENERATOR_VERSION = 2  # 2: the opt-in demo-vindr site, sites recorded in the marker
MARKER_FILE = ".arkfed-demo.json"
SYNTHETIC_NOTICE = "SYNTHETIC DATA: drawn by a program, not images of real patients; for demos and tests only."


@dataclass(frozen=True)
class DemoSite:
    """One demo site: which plugin reads it, what is drawn there and how its machines look."""

    name: str
    dataset: str
    images: int
    prevalence: dict[str, float]  # canonical finding -> fraction of images showing it
    class_names: dict[str, str]  # canonical finding -> the site's label name
    style: AcquisitionStyle
    images_per_patient: float
    age: tuple[float, float]  # mean, sd
    views: dict[str, float] = field(default_factory=dict)
    uncertain_p: float = 0.0  # fraction of positives labelled -1 (drawn subtly)
    split: dict = field(default_factory=dict)  # site YAML split overrides
    options: dict = field(default_factory=dict)  # site YAML plugin options


DEMO_SITES: tuple[DemoSite, ...] = (
    DemoSite(
        name="demo-nih",
        dataset="chestxray14",
        images=1200,
        prevalence={
            "Atelectasis": 0.15, "Cardiomegaly": 0.2, "Pleural Effusion": 0.2, "Mass": 0.15,
            "Nodule": 0.15, "Pneumothorax": 0.12, "Consolidation": 0.15, "Edema": 0.12,
        },
        class_names={"Pleural Effusion": "Effusion"},
        style=AcquisitionStyle(
            gamma=(0.9, 1.1), contrast=(0.95, 1.1), offset=(-0.03, 0.03), noise=0.012, blur=(0.2, 0.6),
            rotate_deg=2.0, scale=(0.96, 1.04), markers=("R", "L"), marker_p=0.5,
        ),
        images_per_patient=1.6,
        age=(48.0, 16.0),
        views={"PA": 0.8, "AP": 0.2},
        split={"val_fraction": 0.18},
    ),
    DemoSite(
        name="demo-chexpert",
        dataset="chexpert",
        images=1000,
        prevalence={
            "Atelectasis": 0.22, "Cardiomegaly": 0.22, "Consolidation": 0.2, "Edema": 0.22,
            "Pleural Effusion": 0.25, "Pneumothorax": 0.12, "Support Devices": 0.25,
        },
        class_names={},
        style=AcquisitionStyle(
            gamma=(0.85, 1.0), contrast=(0.82, 0.92), offset=(0.0, 0.04), noise=0.025, blur=(0.3, 0.7),
            rotate_deg=5.0, scale=(0.9, 1.05), shift=0.035, markers=("PORTABLE", "AP", "UPRIGHT"), marker_p=0.7,
        ),
        images_per_patient=1.4,
        age=(62.0, 17.0),
        views={"AP": 0.8, "PA": 0.2},
        uncertain_p=0.15,
        split={"val_fraction": 0.22},
    ),
    DemoSite(
        name="demo-shenzhen",
        dataset="shenzhen",
        images=600,
        prevalence={"Tuberculosis": 0.5},
        class_names={},
        style=AcquisitionStyle(
            gamma=(1.05, 1.2), contrast=(1.1, 1.25), offset=(-0.02, 0.03), noise=0.03, blur=(0.0, 0.3),
            rotate_deg=3.0, scale=(0.92, 1.02), collimation=(0.02, 0.08), markers=("R",), marker_p=0.3,
        ),
        images_per_patient=1.0,
        age=(38.0, 13.0),
        split={"val_fraction": 0.2, "test_fraction": 0.2},
    ),
)

# Opt-in sites (``sites=`` in the functions below). Seeds are per position in ALL_DEMO_SITES, so
# adding a site here never changes the images of the sites before it.
EXTRA_DEMO_SITES: tuple[DemoSite, ...] = (
    DemoSite(
        name="demo-vindr",
        dataset="vindr_cxr",
        images=800,
        prevalence={
            "Cardiomegaly": 0.15, "Pleural Effusion": 0.15, "Consolidation": 0.12, "Nodule": 0.1, "Mass": 0.06,
            "Tuberculosis": 0.15,
        },
        class_names={"Pleural Effusion": "Pleural effusion", "Nodule": "Nodule/Mass", "Mass": "Nodule/Mass"},
        style=AcquisitionStyle(  # sharp digital radiography, high contrast, wider field of view, tight collimation
            gamma=(0.75, 0.9), contrast=(1.15, 1.3), offset=(-0.05, 0.0), noise=0.01, blur=(0.0, 0.2),
            rotate_deg=4.0, scale=(0.86, 0.96), shift=0.03, collimation=(0.0, 0.04), markers=("L", "PA"), marker_p=0.6,
        ),
        images_per_patient=1.0,  # VinDr-CXR ships no patient ids: one image per patient
        age=(45.0, 15.0),
        uncertain_p=0.15,  # drawn subtly: readers miss it more often (no -1 labels in VinDr)
        split={"val_fraction": 0.2},
        options={"labels": "all"},
    ),
)
ALL_DEMO_SITES: tuple[DemoSite, ...] = DEMO_SITES + EXTRA_DEMO_SITES

CHEXPERT_OPACITIES = ("Atelectasis", "Consolidation", "Edema")  # children of "Lung Opacity"
CHEXPERT_FOLDER = "CheXpert-v1.0-small"
CHEXPERT_VALID_FIRST_PATIENT = 64541  # valid.csv patients are numbered after train's, as in the original


@dataclass(frozen=True)
class DemoImage:
    """One planned image: who, what is drawn (finding -> strength) and the labels it gets."""

    patient: int
    followup: int
    sex: str
    age: int
    view: str
    findings: dict[str, float]
    uncertain: frozenset[str]
    key: tuple[int, ...]  # seeds everything random about this image

    def label(self, finding: str) -> float:
        """1 present, -1 present but labelled uncertain, 0 absent."""
        if finding not in self.findings:
            return 0.0
        return -1.0 if finding in self.uncertain else 1.0


def plan_site(site: DemoSite, site_index: int, seed: int, count: int) -> list[DemoImage]:
    """Patients, their follow-ups and findings; follow-ups keep most of a patient's findings."""
    rng = np.random.default_rng([seed, site_index, 0])
    plan: list[DemoImage] = []
    patient = 0
    while len(plan) < count:
        patient += 1
        n_images = 1 + int(rng.poisson(site.images_per_patient - 1.0)) if site.images_per_patient > 1 else 1
        sex = "M" if rng.random() < 0.5 else "F"
        age = int(np.clip(rng.normal(*site.age), 18, 90))
        state = {f for f, p in site.prevalence.items() if rng.random() < p}
        for followup in range(min(n_images, 6, count - len(plan))):
            if followup:  # each finding persists with p=0.8; onset keeps the prevalence stationary
                state = {f for f, p in site.prevalence.items() if rng.random() < (0.8 if f in state else 0.2 * p / (1 - p))}
            findings = {f: float(rng.uniform(0.75, 1.0)) for f in sorted(state)}
            uncertain = frozenset(f for f in findings if f != "Support Devices" and rng.random() < site.uncertain_p)
            for f in sorted(uncertain):  # sorted: set order varies between processes
                findings[f] = float(rng.uniform(0.55, 0.75))
            view = str(rng.choice(list(site.views), p=list(site.views.values()))) if site.views else ""
            plan.append(DemoImage(patient, followup, sex, age + followup, view, findings, uncertain, (seed, site_index, patient, followup)))
    return plan


def render(site: DemoSite, image: DemoImage, size: int) -> np.ndarray:
    """The pixels of one planned image (anatomy seeded by patient, the rest by image)."""
    anatomy = sample_anatomy(np.random.default_rng([*image.key[:3], 7]), image.sex)
    return draw_chest(np.random.default_rng([*image.key, 1]), anatomy, image.findings, size, site.style)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=92)
    else:
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _unit(*key: object) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (for patient-level choices such as the split)."""
    digest = hashlib.sha1(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


ImageWriter = Callable[[DemoImage, Path, str], None]


# --- the three publishers' layouts -----------------------------------------------------------


def write_chestxray14(root: Path, site: DemoSite, plan: list[DemoImage], save: ImageWriter, seed: int) -> None:
    """Data_Entry_2017_v2020.csv, train_val_list.txt / test_list.txt and images/, as NIH ships them."""
    lines = [
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    ]
    train_val, test = [], []
    for image in plan:
        name = f"{image.patient:08d}_{image.followup:03d}.png"
        save(image, root / "images" / name, "PNG")
        labels = sorted(site.class_names.get(f, f) for f in image.findings)
        size = 2500 + image.patient % 500
        lines.append(f"{name},{'|'.join(labels) or 'No Finding'},{image.followup},{image.patient},{image.age},"
                     f"{image.sex},{image.view},{size},{size},0.143,0.143")
        (test if _unit(seed, site.name, image.patient) < 0.2 else train_val).append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")


def _chexpert_row(image: DemoImage, in_valid: bool, rng: np.random.Generator) -> list[str]:
    """The 14 observations: 1.0 / -1.0 / 0.0 / blank as Stanford's labeler writes them.

    valid.csv was read by radiologists: only 1.0 and 0.0. In train.csv most negatives are
    blank (not mentioned), and "Lung Opacity" / "No Finding" follow CheXpert's hierarchy.
    """
    values = []
    pathology = [f for f in image.findings if f != "Support Devices"]
    for name in CHEXPERT_CLASSES:
        if name == "No Finding":
            value = 0.0 if pathology else 1.0
        elif name == "Lung Opacity":
            children = [image.label(f) for f in CHEXPERT_OPACITIES if f in image.findings]
            value = 1.0 if 1.0 in children else (-1.0 if children else 0.0)
        else:
            value = image.label(name)
        if in_valid:
            value = 1.0 if value != 0.0 else 0.0
        if value == 0.0 and not in_valid and rng.random() < 0.6:
            values.append("")
        else:
            values.append(f"{value:.1f}")
    return values


def write_chexpert(root: Path, site: DemoSite, plan: list[DemoImage], save: ImageWriter, seed: int) -> None:
    """CheXpert-v1.0-small/{train,valid}.csv and train|valid/patientNNNNN/studyN/view1_frontal.jpg."""
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CLASSES)
    rows: dict[str, list[str]] = {"train": [header], "valid": [header]}
    valid_patients: dict[int, int] = {}
    for image in plan:
        in_valid = _unit(seed, site.name, image.patient) < 0.15
        split = "valid" if in_valid else "train"
        number = image.patient
        if in_valid:
            number = valid_patients.setdefault(image.patient, CHEXPERT_VALID_FIRST_PATIENT + len(valid_patients))
        rel = f"{CHEXPERT_FOLDER}/{split}/patient{number:05d}/study{image.followup + 1}/view1_frontal.jpg"
        save(image, root / rel, "JPEG")
        sex = "Male" if image.sex == "M" else "Female"
        labels = _chexpert_row(image, in_valid, np.random.default_rng([*image.key, 2]))
        rows[split].append(",".join([rel, sex, str(image.age), "Frontal", image.view, *labels]))
    for split, lines in rows.items():
        (root / CHEXPERT_FOLDER / f"{split}.csv").write_text("\n".join(lines) + "\n")


SHENZHEN_READINGS = ("PTB", "secondary PTB", "PTB, upper fields", "active PTB")  # the drawer picks the side


def write_shenzhen(root: Path, site: DemoSite, plan: list[DemoImage], save: ImageWriter, seed: int) -> None:
    """CXR_png/CHNCXR_NNNN_{0,1}.png and ClinicalReadings/*.txt ('male 45yrs' + the reading)."""
    (root / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
    for number, image in enumerate(plan, start=1):
        tb = "Tuberculosis" in image.findings
        stem = f"CHNCXR_{number:04d}_{int(tb)}"
        save(image, root / "CXR_png" / f"{stem}.png", "PNG")
        reading = str(np.random.default_rng([*image.key, 3]).choice(SHENZHEN_READINGS)) if tb else "normal"
        sex = "male" if image.sex == "M" else "female"
        (root / "ClinicalReadings" / f"{stem}.txt").write_text(f"{sex} {image.age}yrs\n{reading}\n")


VINDR_READERS = ("R8", "R9", "R10")
VINDR_MISS_P = 0.1  # a reader misses a clearly drawn finding
VINDR_SUBTLE_MISS_P = 0.4  # ... or a subtly drawn one
VINDR_FALSE_P = 0.01  # a reader marks a finding of the site that is not drawn


def write_vindr(root: Path, site: DemoSite, plan: list[DemoImage], save: ImageWriter, seed: int) -> None:
    """annotations/image_labels_{train,test}.csv (PhysioNet: 28 labels; three readers per training
    image, one consensus row per test image) and train|test/<image_id>.png."""
    labels = vindr_labels()
    header = "image_id,rad_id," + ",".join(labels)
    rows: dict[str, list[str]] = {"train": [header], "test": ["image_id," + ",".join(labels)]}
    drawn_labels = sorted({site.class_names.get(f, f) for f in site.prevalence})
    for image in plan:
        image_id = vindr_image_id(seed, site, image)
        split = "test" if _unit(seed, site.name, image.patient) < 0.2 else "train"
        save(image, root / split / f"{image_id}.png", "PNG")
        truth = {site.class_names.get(f, f): f in image.uncertain for f in image.findings}  # label -> subtle
        if split == "test":
            rows["test"].append(",".join([image_id, *_vindr_values(set(truth))]))
            continue
        rng = np.random.default_rng([*image.key, 4])
        for reader in VINDR_READERS:
            seen = {label for label, subtle in truth.items() if rng.random() >= (VINDR_SUBTLE_MISS_P if subtle else VINDR_MISS_P)}
            seen |= {label for label in drawn_labels if label not in truth and rng.random() < VINDR_FALSE_P}
            rows["train"].append(",".join([image_id, reader, *_vindr_values(seen)]))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (root / "annotations" / f"image_labels_{split}.csv").write_text("\n".join(lines) + "\n")


def vindr_image_id(seed: int, site: DemoSite, image: DemoImage) -> str:
    """A VinDr-style 32-hex image id, fixed by the seed and the planned image."""
    return hashlib.sha1(f"{seed}:{site.name}:{image.patient}:{image.followup}".encode()).hexdigest()[:32]


def vindr_labels() -> tuple[str, ...]:
    """VinDr-CXR's 28 image-level labels, in the order of its files (from the vindr_cxr plugin)."""
    from arkfed.datasets._plugin import get_plugin

    return tuple(get_plugin("vindr_cxr")({"labels": "all"}).label_schema().classes)


def _vindr_values(labels: set[str]) -> list[str]:
    return ["1" if name in labels or (name == "No finding" and not labels) else "0" for name in vindr_labels()]


LAYOUT_WRITERS: dict[str, Callable[..., None]] = {
    "chestxray14": write_chestxray14,
    "chexpert": write_chexpert,
    "shenzhen": write_shenzhen,
    "vindr_cxr": write_vindr,
}


def site_classes(site: DemoSite) -> list[str]:
    """The site's label names of the findings drawn there (the classes whose AUC means something)."""
    if site.dataset == "chexpert":
        drawn = set(site.prevalence) | {"No Finding", "Lung Opacity"}
        return [c for c in CHEXPERT_CLASSES if c in drawn]
    if site.dataset == "chestxray14":
        drawn = {site.class_names.get(f, f) for f in site.prevalence}
        return [c for c in CHESTXRAY14_CLASSES if c in drawn]
    return list(dict.fromkeys(site.class_names.get(f, f) for f in site.prevalence))


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
    "policy:",
    "  min_batch_size: 2",
    "  min_steps_per_visit: 1",
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
    marker = {"generator": "arkfed.demo.generate", "version": GENERATOR_VERSION, "seed": seed, "size": size,
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
