"""``arkfed zero-shot``: score a site the model never trained on, with no training at all.

Ark+'s headline: the heads a model was trained with already predict the findings of other
datasets. Each class of the site is mapped through the canonical findings vocabulary
(:meth:`arkfed.data.schema.LabelSchema.canonical`, :mod:`arkfed.data.findings`) to every head class
that stands for the same finding ("Pleural Effusion" at the site is served by a head's
"Effusion"). The result names, per class, the canonical finding and the heads and classes that
served it; classes that no head knows (or that the vocabulary does not know) are listed in
``unknown_classes`` and not scored, never guessed from a related finding.

- **Combination.** A class served by several heads is scored with the mean of their
  probabilities, as ``arkfed predict`` combines shared findings (:data:`COMBINE`): averaging
  probabilities, not logits, keeps one over-confident head from dominating, and no weights are
  fitted (that would need labels of the site).
- **Multiclass heads** (e.g. RSNA's Normal / Lung Opacity / Not Normal) serve a finding with
  that class's softmax probability; multilabel and binary heads with its sigmoid.
- **The site's own head** (a head named like the site: the model trained on it) is left out and
  a note says so: that is ``arkfed evaluate``'s number, not a zero-shot one.
- **Scores**: per-class AUC (:func:`arkfed.ark.metrics.roc_auc`) with the bootstrap 95% CIs of
  ``arkfed evaluate`` (:func:`arkfed.evaluation.evaluate.evaluate_predictions`: over patients
  when the split records them), on the site's labels as evaluation reads them (uncertain labels
  left out unless the reading protocol makes them positive). Each mapped class is scored one
  against the rest, also for a multiclass site (no accuracy: the unmapped classes have no score).
  ``mean_auc`` is over the site's reported classes that were mapped (``mean_auc_classes``; all
  mapped classes when none of the reported ones is).
- **No adaptation** by default: the model's own BatchNorm statistics and a single crop unless the
  model's spec asks for ten crops on the test split (as ``evaluate``); ``recalibrate_bn``
  re-estimates BatchNorm on the site's training images (their pixels, never their labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from arkfed.ark.metrics import Predictions, infer
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.evaluation.evaluate import MIN_POSITIVES, evaluate_predictions
from arkfed.model.ark import ArkModel, SiteHead

if TYPE_CHECKING:
    from arkfed.data.tables import DatasetTable
    from arkfed.site.load import Site

COMBINE = ("mean of the serving heads' probabilities (sigmoid of a multilabel or binary head's class, "
           "softmax probability of a multiclass head's class), as `arkfed predict` combines shared findings")
EPS = 1e-7


@dataclass
class ZeroShotSettings:
    split: str = "test"
    ten_crop: bool | None = None  # None: ten crops on the test split when the model's spec asks for them
    recalibrate_bn: bool = False
    n_boot: int = 1000
    seed: int = 0
    min_positives: int = MIN_POSITIVES
    batch_size: int = 64
    device: str = "cpu"


def class_sources(heads: dict[str, SiteHead], schema: LabelSchema) -> dict[str, dict]:
    """Per class of ``schema``: ``{"canonical": finding or None, "from": ["site/class", ...]}``, the
    head classes standing for the same canonical finding (heads in name order)."""
    out = {}
    for name in schema.classes:
        canonical = schema.canonical(name)
        served = [f"{site}/{c}" for site, head in sorted(heads.items()) for c in head.classes
                  if canonical is not None and head.schema.canonical(c) == canonical]
        out[name] = {"canonical": canonical, "from": served}
    return out


def unknown_reason(entry: dict) -> str:
    return "not in the findings vocabulary" if entry["canonical"] is None else f"no head predicts {entry['canonical']}"


def source_probabilities(model: ArkModel, heads: dict[str, SiteHead], columns: list[str], table: "DatasetTable", schema: LabelSchema,
                         ten_crop: bool = False, batch_size: int = 64, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a split: the probability of each ``site/class`` of ``columns`` (N x C; ten
    crops' probabilities averaged), with the split's evaluation targets and mask under ``schema``."""
    from arkfed.data.loaders import make_eval_loader

    used = sorted({c.split("/", 1)[0] for c in columns})
    where = [(site, heads[site].classes.index(name)) for site, name in (c.split("/", 1) for c in columns)]
    model = model.to(device)
    for site in used:
        heads[site].to(device)

    def probabilities(embedding: torch.Tensor) -> torch.Tensor:
        per = {}
        for site in used:
            logits = heads[site](embedding).float()
            per[site] = logits.softmax(-1) if heads[site].schema.task == "multiclass" else logits.sigmoid()
        return torch.stack([per[site][:, k] for site, k in where], dim=1)

    def forward(images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 4:
            return probabilities(model(images))
        b, n = images.shape[:2]
        return probabilities(model(images.flatten(0, 1))).view(b, n, -1).mean(1)

    loader = make_eval_loader(table, schema, model.spec, batch_size, ten_crop=ten_crop)
    return infer(forward, (model, *(heads[s] for s in used)), loader, device)


def mapped_schema(schema: LabelSchema, mapped: list[str]) -> LabelSchema:
    """The mapped classes as a multilabel (binary for one) schema: each scored one against the rest;
    the mean over the site's reported classes among them (all of them when none is)."""
    reported = tuple(c for c in schema.reported_classes if c in mapped)
    return LabelSchema(task="binary" if len(mapped) == 1 else "multilabel", classes=tuple(mapped),
                       eval_classes=reported if reported and len(mapped) > 1 else None)


def serving_heads(heads: dict[str, SiteHead], site: "Site") -> tuple[dict[str, SiteHead], list[str]]:
    """The heads that may serve ``site``: all but the site's own (and a note when it is left out)."""
    if site.name not in heads:
        return heads, []
    note = f"the model has a head for {site.name} (it trained on this site): left out; `arkfed evaluate` scores it"
    return {k: v for k, v in heads.items() if k != site.name}, [note]


def combined_predictions(probs: np.ndarray, columns: list[str], targets: np.ndarray, mask: np.ndarray, sources: dict[str, dict],
                         schema: LabelSchema, mapped: list[str]) -> Predictions:
    """Per mapped class the mean probability of its serving columns, as logits whose sigmoid it is,
    with the class's targets and mask."""
    combined = np.stack([probs[:, [columns.index(c) for c in sources[name]["from"]]].mean(1) for name in mapped], axis=1)
    p = np.clip(combined, EPS, 1 - EPS)
    index = [schema.classes.index(c) for c in mapped]
    return Predictions(np.log(p) - np.log1p(-p), targets[:, index], mask[:, index])


def zero_shot(model: ArkModel, heads: dict[str, SiteHead], site: "Site", settings: ZeroShotSettings | None = None) -> dict:
    """Score ``site`` with the heads of other sites (module docstring); raises when no class maps."""
    from arkfed.ark.metrics import calibrated_model

    settings = settings or ZeroShotSettings()
    heads, notes = serving_heads(heads, site)
    sources = class_sources(heads, site.schema)
    mapped = [c for c, e in sources.items() if e["from"]]
    unknown = {c: unknown_reason(e) for c, e in sources.items() if not e["from"]}
    if not mapped:
        known = ", ".join(sorted(heads)) or "none"
        raise ArkfedError(f"no class of site {site.name} is predicted by a head of the model (heads: {known}); "
                          "use `arkfed linear-probe` or `arkfed finetune`")
    ten_crop = settings.ten_crop if settings.ten_crop is not None else settings.split == "test" and model.spec.test_ten_crop
    recalibrated = False
    if settings.recalibrate_bn:
        model, recalibrated = calibrated_model(model.to(settings.device), site.schema, site.splits.get("train"), settings.device)
    table = site.split(settings.split)
    columns = list(dict.fromkeys(c for name in mapped for c in sources[name]["from"]))
    probs, targets, mask = source_probabilities(model, heads, columns, table, site.schema, ten_crop, settings.batch_size, settings.device)
    schema = mapped_schema(site.schema, mapped)
    pred = combined_predictions(probs, columns, targets, mask, sources, site.schema, mapped)
    scores = evaluate_predictions(pred, schema, settings.n_boot, settings.seed, table, settings.min_positives)
    return {"site": site.name, "split": settings.split, "protocol": getattr(site, "protocol", "arkfed"), "ten_crop": bool(ten_crop),
            "bn_recalibrated": recalibrated, "combine": COMBINE, "classes": sources, "mapped_classes": mapped,
            "unknown_classes": list(unknown), "unknown_reasons": unknown, "mean_auc_classes": list(schema.reported_classes),
            "heads_used": sorted({c.split("/", 1)[0] for c in columns}), "scores": scores, "notes": notes}


def zero_shot_source(source: str | Path, site: "Site", settings: ZeroShotSettings | None = None, which: str = "teacher") -> dict:
    """:func:`zero_shot` of ``which`` model of a run folder (with its own heads: the teacher's
    ``teacher-heads/`` when the run has them), or of an export or a released Ark checkpoint."""
    from arkfed.evaluation.sources import load_one, model_heads

    heads, note = model_heads(source, which)
    if not heads:
        raise ArkfedError(f"{source}: the model has no heads to predict with (a bare weights file): use an export or a run folder")
    result = zero_shot(load_one(source, which), heads, site, settings)
    result["notes"] += [note] if note else []
    return {"source": str(source), "model": which, **result}
