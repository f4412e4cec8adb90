"""``arkfed predict``: zero-shot predictions from every head the model was trained with.

Each probability is named ``site/class``. Heads that predict the same finding under different
names ("Effusion" at one site, "Pleural Effusion" at another) are aligned through the canonical
finding vocabulary (:meth:`arkfed.data.schema.LabelSchema.canonical`); for a finding shared by two or
more heads the mean of their probabilities is also given, as one combined score. Averaging
probabilities (not logits) keeps one over-confident head from dominating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arkfed.ark.metrics import scores_from_logits
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable, FileImages, make_meta
from arkfed.errors import ArkfedError
from arkfed.evaluation.embeddings import embed_table
from arkfed.model.ark import ArkModel, SiteHead

_NO_LABELS = LabelSchema(task="binary", classes=("unlabelled",))


def image_table(paths: list[Path]) -> DatasetTable:
    """Unlabelled images as a table, so they go through the same pipeline as evaluation data."""
    n = len(paths)
    return DatasetTable(FileImages(tuple(paths)), np.full((n, 1), np.nan, dtype=np.float32), make_meta(n), _NO_LABELS.classes)


def shared_findings(heads: dict[str, SiteHead]) -> dict[str, list[tuple[str, str]]]:
    """Canonical finding -> the (site, class) pairs predicting it, for findings of >= 2 heads."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for site, head in sorted(heads.items()):
        for name in head.classes:
            canonical = head.schema.canonical(name)
            if canonical is not None:
                groups.setdefault(canonical, []).append((site, name))
    return {k: v for k, v in groups.items() if len({s for s, _ in v}) >= 2}


def predict_images(model: ArkModel, heads: dict[str, SiteHead], paths: list[str | Path], batch_size: int = 32, device: str = "cpu") -> dict:
    """Per image: every head's probabilities (``site/class``) and the combined shared findings."""
    if not heads:
        raise ArkfedError("the model has no heads to predict with (a bare weights file): use an export or a run folder")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ArkfedError("no images given")
    embedding = torch.from_numpy(embed_table(model, image_table(paths), _NO_LABELS, "projector", batch_size, device).features)
    per_head = {}
    with torch.no_grad():
        for site, head in heads.items():
            logits = head.to("cpu").eval()(embedding).numpy()
            per_head[site] = scores_from_logits(logits, head.schema.task)
    shared = shared_findings(heads)
    images = []
    for i, path in enumerate(paths):
        scores = {f"{site}/{name}": float(per_head[site][i, k])
                  for site, head in sorted(heads.items()) for k, name in enumerate(head.classes)}
        combined = {
            finding: {"score": float(np.mean([scores[f"{s}/{c}"] for s, c in members])), "from": [f"{s}/{c}" for s, c in members]}
            for finding, members in sorted(shared.items())
        }
        images.append({"image": str(path), "scores": scores, "combined": combined})
    return {"heads": {site: list(h.classes) for site, h in sorted(heads.items())},
            "shared_findings": {k: [f"{s}/{c}" for s, c in v] for k, v in sorted(shared.items())}, "images": images}
