"""A foundation-model release's lineage record, and the content hash that seals the release.

A release folder (written by ``arkfed release``, :mod:`arkfed.evaluation.release`) is an export
folder (plain timm ``model.safetensors``, ``config.json``, ``projector.safetensors``, the teacher's
heads in ``heads/``) plus the student heads in ``student-heads/`` and ``lineage.json``::

    {"format": 1, "id": "rel-<12 hex>", "version": N, "parents": [...], "ancestors": [...],
     "sites": {site: {dataset fingerprint, visits, visits_total, val_auc, head}}, "schedule": {"steps": S},
     "normalisation": {...}, "files": {relative path: sha256}, "content_hash": "<sha256>"}

``content_hash`` is the SHA-256 of the canonical JSON of everything else in ``lineage.json``, which
includes the SHA-256 of every other file of the release: a release whose lineage (or any of its
weights) was changed after it was written no longer matches and is refused when it is read
(:func:`read_release`), with one line naming the file. ``schedule.steps`` counts the teacher
schedule steps (visits in cyclic mode, rounds in parallel mode) of the whole lineage, so a run
continued from the release (``--from``) can carry the teacher's EMA momentum and the consistency
weight on from where it stopped (:attr:`arkfed.config.TrainConfig.schedule_offset`).

This module only reads and seals; it imports nothing above :mod:`arkfed.model`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from arkfed.errors import ArkfedError

LINEAGE_FILE = "lineage.json"
STUDENT_HEADS_DIR = "student-heads"
LINEAGE_FORMAT = 1


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(lineage: dict) -> str:
    """SHA-256 of the lineage record without its own ``content_hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in lineage.items() if k != "content_hash"})).hexdigest()


def release_files(folder: Path) -> dict[str, str]:
    """Every file of the release but ``lineage.json``, relative path -> sha256."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LINEAGE_FILE and ".tmp" not in p.name}


def seal(folder: Path, lineage: dict) -> dict:
    """``lineage`` with its id (kept if it has one), the release's file hashes and its content hash."""
    folder = Path(folder)
    record = {k: v for k, v in lineage.items() if k not in ("files", "content_hash")}
    record["format"] = LINEAGE_FORMAT
    if "id" not in record:
        model = folder / "model.safetensors"
        record["id"] = "rel-" + content_hash(dict(record, model=file_sha256(model) if model.is_file() else None))[:12]
    record["files"] = release_files(folder)
    record["content_hash"] = content_hash(record)
    return record


def is_release(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / LINEAGE_FILE).is_file()


def read_release(folder: str | Path) -> dict:
    """The verified lineage of a release folder; :class:`ArkfedError` (one line) when it was changed."""
    folder = Path(folder)
    path = folder / LINEAGE_FILE
    try:
        lineage = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArkfedError(f"{path}: cannot read the release's lineage: {' '.join(str(exc).split())}") from None
    if not isinstance(lineage, dict) or not isinstance(lineage.get("content_hash"), str):
        raise ArkfedError(f"{path}: not a release lineage (no content_hash)")
    if content_hash(lineage) != lineage["content_hash"]:
        raise ArkfedError(f"{path}: content hash mismatch: the lineage was edited after the release was written; "
                          "refusing this release (write a new one with `arkfed release`)")
    files = release_files(folder)
    changed = sorted(name for name in set(files) | set(lineage.get("files") or {}) if files.get(name) != lineage["files"].get(name))
    if changed:
        raise ArkfedError(f"{path}: content hash mismatch: {', '.join(changed[:3])} changed after the release was written; "
                          "refusing this release")
    return lineage


def schedule_steps(source: str | Path) -> int:
    """The teacher schedule steps behind ``source``: a release's lineage count, 0 for anything else."""
    if not is_release(source):
        return 0
    return int((read_release(source).get("schedule") or {}).get("steps", 0))


def parent_record(source: str | Path) -> dict | None:
    """How a release names the model it continued from (``init`` of its run): a release by id and
    hash, a released Ark checkpoint or other weights file by name and sha256; None for random or
    ImageNet starts."""
    text = str(source)
    if text in ("random", "imagenet") or text.startswith("imagenet:"):
        return None
    path = Path(source)
    if is_release(path):
        lineage = read_release(path)
        return {"kind": "release", "id": lineage["id"], "version": lineage.get("version", 1),
                "content_hash": lineage["content_hash"], "path": str(path.resolve())}
    if path.is_file():
        kind = "ark-checkpoint" if path.name.endswith((".pth.tar", ".pth", ".pt")) else "weights"
        return {"kind": kind, "file": path.name, "sha256": file_sha256(path), "path": str(path.resolve())}
    return {"kind": "run" if (path / "config.yaml").is_file() else "folder", "path": str(path.resolve())}


def release_run_uid(source: str | Path) -> str | None:
    """The federated run id of the run a release was made from (its sites keep their heads under
    it in their ``state_dir``); None for anything else."""
    if not is_release(source):
        return None
    uid = (read_release(source).get("run") or {}).get("run_uid")
    return uid if isinstance(uid, str) else None
