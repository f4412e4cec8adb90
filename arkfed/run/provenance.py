"""What produced a run: ``RUN/provenance.json`` (versions, source commit, data fingerprints).

As nnU-Net's ``dataset_fingerprint.json`` lets one tell, months later, whether two trainings saw
the same data, a run folder says which code and which data produced it:

- versions of arkfed, torch, torchvision, timm, flwr and Python, and the platform;
- the git commit of the arkfed source tree (and whether it had uncommitted changes) when arkfed
  runs from a git checkout; nothing when it is an installed wheel or git is absent;
- when, and by which command line;
- per site a dataset fingerprint. In-process sites (:func:`dataset_fingerprint`): the reading
  protocol the site was read under (``arkfed``, or ``ark`` when its YAML sets the plugin option
  ``protocol: ark``; :mod:`arkfed.site.load`), split sizes and a SHA-256 of the label table
  (the N x K label matrix with its NaN pattern, and the order of the image ids), never image
  data or paths: the hash changes when one label or the order changes, and stays when only the
  data folder moves. ``arkfed train`` has no protocol option: each site is read as its YAML says,
  and ``--protocol ark`` of the evaluation commands applies at evaluation time. Federated sites
  (:func:`federated_fingerprint`): only what a site already sends in its hello reply (split
  sizes and label schema), because the coordinator must not learn more than the protocol gives.

A resumed run keeps the original record and appends what the resume ran with under
``"resumes"``, so a run continued with other code or other data says so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from arkfed.io import json_safe, write_text_atomic

if TYPE_CHECKING:
    from arkfed.site.load import Site

FILE = "provenance.json"
PACKAGES = ("arkfed", "torch", "torchvision", "timm", "flwr", "numpy")
GIT_TIMEOUT_S = 5.0
FEDERATED_NOTE = (
    "federated site: only what the site sends in its hello reply (split sizes, label schema); "
    "its label table never leaves the site"
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Installed versions (``None`` for a package that is not installed), and Python's."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["arkfed"] is None:  # running from a source tree that was never pip-installed
        import arkfed

        out["arkfed"] = arkfed.__version__
    out["python"] = platform.python_version()
    torch = sys.modules.get("torch")  # only when already loaded: provenance must not import torch
    if torch is not None:
        out["cuda"] = getattr(torch.version, "cuda", None)
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_dir() -> Path:
    """The folder that holds the ``arkfed`` package (a checkout's root, or site-packages)."""
    import arkfed

    return Path(arkfed.__file__).resolve().parent.parent


def git_state(folder: Path | None = None) -> dict:
    """``{"commit", "dirty"}`` of the arkfed checkout, or ``{}`` when arkfed is not run from one
    (an installed wheel inside some other repository does not count), git is missing, or it
    does not answer within :data:`GIT_TIMEOUT_S`."""
    folder = folder or source_dir()
    top = _git(["rev-parse", "--show-toplevel"], folder)
    if top is None or Path(top).resolve() != folder.resolve():
        return {}
    commit = _git(["rev-parse", "HEAD"], folder)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


# --- dataset fingerprints ----------------------------------------------------------------------

def _image_ids(table, root: Path | None) -> list[str]:
    """Image ids without the folder the data lives in: relative to the site root, or else just
    the file name (the fingerprint must not change when the data folder moves). String work
    only: a 200k-image site must not pay a path resolution per image."""
    prefixes = sorted({str(p).rstrip(os.sep) + os.sep for p in ((root, root.resolve()) if root else ())}, key=len, reverse=True)
    ids = []
    for i in range(len(table)):
        text = table.images.describe(i)
        for prefix in prefixes:
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        else:
            text = os.path.basename(text)
        ids.append(text.replace(os.sep, "/"))
    return ids


def table_digest(labels, image_ids: list[str], classes) -> str:
    """SHA-256 of a label table: classes, shape, NaN pattern, label values and image-id order."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.float64)
    nan = np.isnan(labels)
    h = hashlib.sha256()
    h.update(json.dumps([list(classes), list(labels.shape)]).encode())
    h.update(np.packbits(nan).tobytes())
    h.update(np.where(nan, 0.0, labels).astype("<f8").tobytes())
    h.update("\n".join(image_ids).encode())
    return h.hexdigest()


def dataset_fingerprint(site: "Site") -> dict:
    """Split sizes and label-table hashes of an in-process site (no image data, no paths)."""
    root = getattr(site.config, "root", None)
    splits, whole = {}, hashlib.sha256()
    for name in sorted(site.splits):
        table = site.splits[name]
        digest = table_digest(table.labels, _image_ids(table, root), table.classes)
        splits[name] = {"size": len(table), "labels_sha256": digest}
        whole.update(f"{name}:{digest}\n".encode())
    return {
        "dataset": site.config.dataset,
        "protocol": site.protocol,
        "task": site.schema.task,
        "classes": list(site.schema.classes),
        "split_sizes": {name: entry["size"] for name, entry in splits.items()},
        "splits": splits,
        "labels_sha256": whole.hexdigest(),
    }


def federated_fingerprint(split_sizes: Mapping[str, int], schema) -> dict:
    """A federated site's fingerprint from its hello reply alone (split sizes and schema)."""
    record = schema.model_dump(mode="json") if hasattr(schema, "model_dump") else json_safe(dict(schema))
    return {
        "split_sizes": {str(k): int(v) for k, v in sorted(split_sizes.items())},
        "schema": record,
        "schema_sha256": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest(),
        "note": FEDERATED_NOTE,
    }


# --- the record --------------------------------------------------------------------------------

def provenance(sites_fingerprints: Mapping[str, dict], run_dir: str | Path | None = None) -> dict:
    """What produced the run in ``run_dir``: versions, platform, git state, time, command, sites."""
    return {
        "created": now(),
        "versions": versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "python": sys.executable},
        "git": git_state(),
        "command": shlex.join(sys.argv),
        "run_dir": str(Path(run_dir).resolve()) if run_dir is not None else None,
        "sites": {name: dict(fp) for name, fp in sites_fingerprints.items()},
    }


def changed_sites(old: dict, new: dict) -> list[str]:
    """Sites whose fingerprint differs between two provenance records (for a resume warning)."""
    before, after = old.get("sites", {}), new.get("sites", {})
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))


def write_provenance(run_dir: str | Path, sites_fingerprints: Mapping[str, dict]) -> dict:
    """Write ``RUN/provenance.json`` atomically and return what was written. When the file exists
    (a resume), the first record is kept and this one is appended under ``"resumes"``."""
    path = Path(run_dir) / FILE
    record = provenance(sites_fingerprints, run_dir)
    if path.is_file():
        try:
            first = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            first = None
        if isinstance(first, dict):
            first.setdefault("resumes", []).append(record)
            record = first
    write_text_atomic(path, json.dumps(json_safe(record), indent=2) + "\n")
    return record
