"""The publishers' own file layouts (ChestX-ray14, CheXpert-v1.0-small, Shenzhen, VinDr-CXR on
PhysioNet), written from a site's plan so that the real plugins read the demo as they read the
real datasets."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from arkfed.data.findings import CHEXPERT_CLASSES
from arkfed.demo.sites import DemoImage, DemoSite, ImageWriter, _unit

CHEXPERT_OPACITIES = ("Atelectasis", "Consolidation", "Edema")  # children of "Lung Opacity"


CHEXPERT_FOLDER = "CheXpert-v1.0-small"


CHEXPERT_VALID_FIRST_PATIENT = 64541  # valid.csv patients are numbered after train's, as in the original


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
