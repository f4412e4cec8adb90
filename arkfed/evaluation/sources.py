"""Where a model to evaluate comes from: a run folder, an export folder or a weights file.

A run folder holds a teacher and a student (and the site heads); an export folder holds the
teacher and the heads; a weights file holds one model and no heads. Evaluation commands accept
all three, so they ask this module for "the models present" and "the heads present".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from arkfed.errors import ArkfedError
from arkfed.model import ArkModel, ModelSpec, SiteHead

SourceKind = Literal["run", "export", "file"]
MODEL_NAMES = ("teacher", "student")


def source_kind(source: str | Path) -> SourceKind:
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return "export"
        if any((path / f"{name}.safetensors").is_file() for name in MODEL_NAMES):
            return "run"
        raise ArkfedError(
            f"{path}: neither a run folder (teacher.safetensors) nor an export folder (config.json + model.safetensors)"
        )
    if not path.is_file():
        raise ArkfedError(f"model not found: {path} (give a run folder, an export folder or a weights file)")
    return "file"


def load_models(
    source: str | Path, which: tuple[str, ...] = MODEL_NAMES, spec: ModelSpec | None = None
) -> dict[str, ArkModel]:
    """The models a source holds, in eval mode, keyed ``teacher``/``student``.

    A run folder gives each of ``which`` that it has; an export folder or a weights file gives one
    model, reported as ``teacher`` (exports are the teacher; a bare file is whatever it is).
    """
    from arkfed.weights import load_ark_model

    kind = source_kind(source)
    if kind != "run":
        return {"teacher": load_ark_model(source, spec=spec).eval()}
    models = {name: load_ark_model(source, which=name).eval() for name in which if (Path(source) / f"{name}.safetensors").is_file()}
    if not models:
        raise ArkfedError(f"{source}: run folder has none of {list(which)} weights")
    return models


def load_source_heads(source: str | Path) -> dict[str, SiteHead]:
    """The site heads stored with a run or an export; for a weights file, the heads it carries
    (a released Ark checkpoint's omni_heads, named; none for other files)."""
    from arkfed.weights import load_file_heads, load_heads

    path = Path(source)
    if source_kind(path) == "file":
        return {site: head.eval() for site, head in load_file_heads(path).items()}
    if not (path / "heads").is_dir():
        return {}
    return {site: head.eval() for site, head in load_heads(path / "heads").items()}


def head_for_site(heads: dict[str, SiteHead], site: str, source: str | Path) -> SiteHead:
    """The head trained for ``site``; a clear error when the model never saw that site."""
    if site not in heads:
        known = ", ".join(sorted(heads)) or "none"
        raise ArkfedError(
            f"{source}: no head for site {site!r} (heads: {known}); to evaluate on a new site use `arkfed linear-probe` or `arkfed finetune`"
        )
    return heads[site]


def export_metadata(source: str | Path) -> dict:
    """The ``arkfed`` section of an export's config.json (empty for other sources)."""
    path = Path(source)
    if source_kind(path) != "export":
        return {}
    return json.loads((path / "config.json").read_text()).get("arkfed", {})


def load_one(source: str | Path, which: str = "teacher", spec: ModelSpec | None = None) -> ArkModel:
    """One model: ``which`` of a run folder, or the single model of an export or weights file."""
    models = load_models(source, which=(which,), spec=spec)
    return models.get(which) or next(iter(models.values()))


def write_results(out: str | Path, result: dict) -> Path:
    """``OUT/results.json``, written atomically."""
    from arkfed.io import atomic_write, json_safe

    path = Path(out) / "results.json"
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
