"""``arkfed release``: a versioned foundation-model release of a run, with its lineage.

A release is an export of the run's teacher (:func:`arkfed.evaluation.export.export_model`: the
backbone as plain timm, the projector, the training-time normalisation in ``config.json``, the
teacher's heads in ``heads/``), plus what continuing the same foundation model needs
(``arkfed train/coordinator --from RELEASE``): the student heads (``student-heads/``) and a
lineage record (``lineage.json``, also rendered into the model card): the releases and weights it
descends from, every site that contributed with its dataset fingerprint (``provenance.json``),
its accepted visits in this run and over the whole lineage, its validation AUCs at release, and
the teacher schedule steps taken. The heads released are the heads the run folder holds: all of
them for a local run; for a federated run, only heads that came back to the coordinator. The
release is sealed with a content hash over the lineage and every file
(:mod:`arkfed.model.lineage`), so a release edited by hand is refused when it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from arkfed.errors import ArkfedError
from arkfed.evaluation.export import export_model
from arkfed.evaluation.recorded_run import RecordedRun, read_run
from arkfed.io import atomic_write
from arkfed.model.lineage import LINEAGE_FILE, STUDENT_HEADS_DIR, is_release, parent_record, read_release, seal
from arkfed.model.weights import load_heads, save_head


def _visits(run: RecordedRun) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in run.visits:
        counts[str(record.get("site"))] = counts.get(str(record.get("site")), 0) + 1
    return counts


def _val_aucs(run: RecordedRun) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for (site, model), record in run.final_metrics().items():
        value = record.get("mean_auc")
        out.setdefault(site, {})[model] = float(value) if isinstance(value, (int, float)) else None
    return out


def _fingerprints(folder: Path) -> dict[str, dict]:
    try:
        return dict(json.loads((folder / "provenance.json").read_text()).get("sites") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _federated_run_uid(folder: Path) -> str | None:
    """A federated run's id (``federation.json``): its sites keep their heads under it."""
    try:
        uid = json.loads((folder / "federation.json").read_text()).get("run_uid")
    except (OSError, ValueError, AttributeError):
        return None
    return uid if isinstance(uid, str) else None


def _schedule_steps(config: dict, visits_done: int) -> int:
    """Teacher schedule steps of the lineage up to the end of this run (visits; rounds in parallel mode)."""
    sites = max(len(config.get("sites") or []), 1)
    own = visits_done if config.get("mode", "cyclic") == "cyclic" else -(-visits_done // sites)
    return int(config.get("schedule_offset") or 0) + own


def build_lineage(run: RecordedRun, heads: set[str], student_heads: set[str]) -> dict:
    """The lineage record of a release of ``run`` (without file hashes; :func:`seal` adds them)."""
    config = run.config
    init = config.get("init", "random")
    parent = parent_record(init)
    inherited: dict = {}
    ancestors: list = []
    version = 1
    if parent is not None and parent["kind"] == "release":
        previous = read_release(init)
        inherited, version = previous.get("sites") or {}, int(previous.get("version", 1)) + 1
        ancestors = [*(previous.get("ancestors") or []), {k: parent[k] for k in ("id", "version", "content_hash")}]
    elif parent is not None:
        ancestors = [{k: v for k, v in parent.items() if k != "path"}]
    visits, aucs, fingerprints = _visits(run), _val_aucs(run), _fingerprints(run.folder)
    sites = {name: dict(record, visits=0, head={"teacher": False, "student": False}, contributed_in=record.get("contributed_in", []))
             for name, record in inherited.items()}  # earlier sites remain part of the model's lineage
    for name in run.sites:
        earlier = inherited.get(name) or {}
        sites[name] = {
            "fingerprint": fingerprints.get(name, earlier.get("fingerprint", {})),
            "visits": visits.get(name, 0),
            "visits_total": int(earlier.get("visits_total", 0)) + visits.get(name, 0),
            "val_auc": aucs.get(name, {}),
            "head": {"teacher": name in heads, "student": name in student_heads},
            "contributed_in": [*earlier.get("contributed_in", []), version],
        }
    visits_done = len(run.visits) + sum(1 for r in run.records if r.get("kind") == "skip" and r.get("stage") == "visit")
    from arkfed.run.provenance import now

    return {
        "version": version,
        "created": now(),
        "parents": [parent] if parent else [],
        "ancestors": ancestors,
        "run": {"folder": str(run.folder.resolve()), "sites": run.sites, "rounds": config.get("rounds"), "mode": config.get("mode"),
                "seed": config.get("seed"), "recipe": config.get("recipe"), "init": init,
                "eval_split": config.get("eval_split", "val"), "restart_schedules": bool(config.get("restart_schedules")),
                "run_uid": _federated_run_uid(run.folder)},
        "sites": sites,
        "schedule": {"steps": _schedule_steps(config, visits_done)},
        "normalisation": {k: (config.get("model") or {}).get(k) for k in ("img_size", "mean", "std")},
    }


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def lineage_card(lineage: dict) -> str:
    """The model card's lineage section."""
    parents = ", ".join(p.get("id") or p.get("file") or p.get("path", "?") for p in lineage["parents"]) or "none (trained from scratch)"
    lines = ["", "## Release and lineage", "",
             f"Release **{lineage['id']}**, version {lineage['version']}; parent: {parents}; teacher schedule steps so far: "
             f"{lineage['schedule']['steps']}. `lineage.json` holds the full record and is sealed by a content hash "
             "over it and every file here: a changed release is refused on load.", "",
             "| site | dataset | labels sha256 | visits (this release) | visits (lineage) | val AUC teacher | val AUC student "
             "| head released |",
             "|---|---|---|---|---|---|---|---|"]
    for name, site in sorted(lineage["sites"].items()):
        fp, auc = site.get("fingerprint") or {}, site.get("val_auc") or {}
        digest = (fp.get("labels_sha256") or fp.get("schema_sha256") or "n/a")[:12]
        lines.append(f"| {name} | {fp.get('dataset', 'n/a')} | {digest} | {site['visits']} | {site['visits_total']} | "
                     f"{_fmt(auc.get('teacher'))} | {_fmt(auc.get('student'))} | {'yes' if site['head']['teacher'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_release(run_dir: str | Path, out: str | Path) -> dict:
    """Write a release of the run in ``run_dir`` into ``out``; returns its sealed lineage."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "teacher.safetensors").is_file():
        raise ArkfedError(f"{run_dir}: not a finished-or-checkpointed run folder (needs config.yaml and teacher.safetensors)")
    if out.exists() and any(out.iterdir()):
        raise ArkfedError(f"{out}: already exists and is not empty; choose another --out")
    result = export_model(run_dir, out, "teacher")
    student_heads = load_heads(run_dir / "heads") if (run_dir / "heads").is_dir() else {}
    for site, head in student_heads.items():
        save_head(out / STUDENT_HEADS_DIR / f"{site}.safetensors", head)
    lineage = build_lineage(read_run(run_dir), set(result.heads), set(student_heads))
    card = (out / "README.md").read_text()
    lineage = seal(out, lineage)  # the id first (the card names it), then the card, then the final seal
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(card + lineage_card(lineage)))
    lineage = seal(out, lineage)
    text = json.dumps(lineage, indent=2)
    atomic_write(out / LINEAGE_FILE, lambda tmp: tmp.write_text(text))
    read_release(out)
    return lineage


__all__ = ["build_lineage", "is_release", "lineage_card", "write_release"]
