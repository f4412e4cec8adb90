"""Where a model to evaluate comes from: a run folder, an export folder or a weights file.

A run folder holds a teacher and a student, the student's site heads (``heads/``) and, from runs
that EMA the heads too, the teacher's own heads (``teacher-heads/``); an export folder holds one
model and the heads that go with it; a weights file holds one model and no heads. Evaluation
commands accept all three, so they ask this module for "the models present" and "the heads of
each model" (:func:`model_heads`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from arkfed.errors import ArkfedError
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.spec import ModelSpec

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
    from arkfed.model.weights import load_ark_model

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
    from arkfed.model.weights import load_file_heads, load_heads

    path = Path(source)
    if source_kind(path) == "file":
        return {site: head.eval() for site, head in load_file_heads(path).items()}
    if not (path / "heads").is_dir():
        return {}
    return {site: head.eval() for site, head in load_heads(path / "heads").items()}


TEACHER_HEADS = "teacher-heads"


def model_heads(source: str | Path, which: str = "teacher") -> tuple[dict[str, SiteHead], str | None]:
    """The heads that belong to ``which`` model of ``source`` and a note when they are a stand-in.

    The teacher of a run is scored with ``RUN/teacher-heads/`` (the EMA of the student's heads,
    kept by the training loop) when the run has them: the student's heads were fitted to the
    student's embedding, not the teacher's. Runs from before teacher heads existed fall back to
    the student's heads, and the note says so (it goes into results.json).
    """
    path = Path(source)
    if which == "teacher" and source_kind(path) == "run":
        teacher_dir = path / TEACHER_HEADS
        if teacher_dir.is_dir() and any(teacher_dir.glob("*.safetensors")):
            from arkfed.model.weights import load_heads

            return {site: head.eval() for site, head in load_heads(teacher_dir).items()}, None
        heads = load_source_heads(path)
        note = f"{path}: no {TEACHER_HEADS}/ folder; the teacher was scored with the student's heads" if heads else None
        return heads, note
    return load_source_heads(path), None


def head_for_site(heads: dict[str, SiteHead], site: str, source: str | Path) -> SiteHead:
    """The head trained for ``site``; a clear error when the model never saw that site."""
    if site not in heads:
        known = ", ".join(sorted(heads)) or "none"
        raise ArkfedError(
            f"{source}: no head for site {site!r} (heads: {known}); "
            "to evaluate on a new site use `arkfed linear-probe` or `arkfed finetune`"
        )
    return heads[site]


def load_one(source: str | Path, which: str = "teacher", spec: ModelSpec | None = None) -> ArkModel:
    """One model: ``which`` of a run folder, or the single model of an export or weights file."""
    models = load_models(source, which=(which,), spec=spec)
    return models.get(which) or next(iter(models.values()))


def load_source(source: str | Path, which: str = "teacher", arch: str | None = None, img_size: int = 224) -> ArkModel:
    """:func:`load_one` for a command's MODEL argument: ``arch`` (with ``img_size``) names the
    architecture of a plain backbone weights file, which carries none itself."""
    from arkfed.model.weights import SPEC_KEY

    source = Path(source)
    if arch is None and source_kind(source) == "file":
        meta = {}
        if source.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(source), framework="pt") as f:
                meta = f.metadata() or {}
        if SPEC_KEY not in meta:
            raise ArkfedError(f"{source}: a plain backbone file carries no architecture; pass --arch NAME (and --img-size)")
    return load_one(source, which, ModelSpec(model=arch, img_size=img_size) if arch else None)


def write_results(out: str | Path, result: dict) -> Path:
    """``OUT/results.json``, written atomically."""
    from arkfed.io import atomic_write, json_safe

    path = Path(out) / "results.json"
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
