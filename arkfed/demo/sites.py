"""The demo federation's sites and what each image shows: per-site acquisition style, demographics,
prevalence and label vocabulary (:class:`DemoSite`), and the seeded plan of patients, follow-ups and
findings (:func:`plan_site`) that :mod:`arkfed.demo.layouts` writes out. SYNTHETIC, not medical data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from arkfed.data.findings import CHESTXRAY14_CLASSES, CHEXPERT_CLASSES
from arkfed.demo.anatomy import sample_anatomy
from arkfed.demo.draw import AcquisitionStyle, draw_chest


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


def _unit(*key: object) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (for patient-level choices such as the split)."""
    digest = hashlib.sha1(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


ImageWriter = Callable[[DemoImage, Path, str], None]


def site_classes(site: DemoSite) -> list[str]:
    """The site's label names of the findings drawn there (the classes whose AUC means something)."""
    if site.dataset == "chexpert":
        drawn = set(site.prevalence) | {"No Finding", "Lung Opacity"}
        return [c for c in CHEXPERT_CLASSES if c in drawn]
    if site.dataset == "chestxray14":
        drawn = {site.class_names.get(f, f) for f in site.prevalence}
        return [c for c in CHESTXRAY14_CLASSES if c in drawn]
    return list(dict.fromkeys(site.class_names.get(f, f) for f in site.prevalence))
