"""What the coordinator view shows: read from the run folder only, as it stands now.

Everything here is what the coordinator already holds: ``config.yaml``, ``metrics.jsonl`` (visit,
evaluation, skip and round records, read with :func:`arkfed.run.folder.read_metrics`), the
federated ServerApp's ``federation-status.json`` (:func:`arkfed.federation.coordinator.status.read_status`)
when there is one, ``provenance.json`` and ``report/``. A local run (``arkfed train``) has no
status file: its sites' states are derived from the records. Nothing reads a site's state folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from arkfed.federation.coordinator.status import read_status
from arkfed.run.folder import read_metrics

LINKS = {"config": "config.yaml", "provenance": "provenance.json", "summary": "summary.json", "report": "report/report.html"}
PRIVACY_KEYS = ("epsilon_spent", "epsilon_budget")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def auc_series(records: list[dict], sites: list[str]) -> dict:
    """Validation mean AUC per site over visits, for the student and the teacher: one x value (the
    visits done, served or skipped, when the round was evaluated) per evaluated round, ``None``
    where a site has none."""
    visits_by_round: dict[int, int] = {}  # a skipped visit counts: the run moved past it (as the progress bar does)
    for r in records:
        if r.get("kind") == "visit" or (r.get("kind") == "skip" and r.get("stage") == "visit"):
            rnd = int(r["round"])
            visits_by_round[rnd] = max(visits_by_round.get(rnd, 0), int(r["visit"]) + 1)
    evals = [r for r in records if r.get("kind") == "eval"]
    rounds = sorted({int(r["round"]) for r in evals})
    x = [visits_by_round.get(rnd, 0) for rnd in rounds]
    index = {rnd: i for i, rnd in enumerate(rounds)}
    series = {model: {site: [None] * len(rounds) for site in sites} for model in ("student", "teacher")}
    split = None
    for r in evals:
        model, site = r.get("model"), r.get("site")
        if model in series and site in series[model]:
            series[model][site][index[int(r["round"])]] = _number(r.get("mean_auc"))
            split = r.get("split", split)
    return {"x": x, "rounds": [rnd + 1 for rnd in rounds], "split": split, **series}


def _derived_state(site: str, records: list[dict], finished: bool) -> tuple[str, str]:
    """A local run's site state, from its records (no status file)."""
    last = next((r for r in reversed(records) if r.get("site") == site and r.get("kind") in ("visit", "skip")), None)
    if last is None:
        return ("done" if finished else "waiting"), ""
    if last["kind"] == "skip":
        return "skipped", f"skipped {last.get('stage')} in round {int(last.get('round', 0)) + 1}: {last.get('reason')}"
    return "done", f"visit {int(last['visit']) + 1}"


def _latest(visits: list[dict], entry) -> dict:
    """A site's latest loss, throughput and (with differential privacy) ε spent and budget."""
    latest = {k: _number(v) for k, v in (visits[-1] if visits else {}).items() if k in ("loss", "images_per_s")}
    if entry is not None:
        latest |= {k: _number(v) for k, v in entry.last_metrics.items() if k in PRIVACY_KEYS}
    for r in visits:  # the visit records carry what each reply reported (epsilon_spent with DP)
        latest |= {k: _number(r[k]) for k in PRIVACY_KEYS if k in r}
    return latest


def site_rows(sites: list[str], records: list[dict], status, finished: bool) -> list[dict]:
    """Per site: state and reason, visits, skips, latest metrics (privacy ones included when present)."""
    rows = []
    for site in sites:
        visits = [r for r in records if r.get("kind") == "visit" and r.get("site") == site]
        skips = sum(1 for r in records if r.get("kind") == "skip" and r.get("site") == site)
        entry = status.sites.get(site) if status is not None else None
        state, detail = (entry.state, entry.detail) if entry is not None else _derived_state(site, records, finished)
        latest = _latest(visits, entry)
        evals = {r["model"]: _number(r.get("mean_auc")) for r in records if r.get("kind") == "eval" and r.get("site") == site}
        rows.append({"site": site, "state": state, "detail": detail, "visits": len(visits), "skips": skips,
                     "student_auc": evals.get("student"), "teacher_auc": evals.get("teacher"),
                     "loss": latest.get("loss"), "images_per_s": latest.get("images_per_s"),
                     "epsilon_spent": latest.get("epsilon_spent"), "epsilon_budget": latest.get("epsilon_budget")})
    return rows


def timeline(records: list[dict], status) -> list[dict]:
    """Skips and refusals, oldest first (a refusal is a skip whose reason names the site's policy)."""
    events = []
    for r in records:
        if r.get("kind") == "skip":
            reason = str(r.get("reason", ""))
            kind = "refused" if "refused" in reason else "skipped"
            events.append({"time": r.get("time"), "site": r.get("site"), "round": int(r.get("round", 0)) + 1,
                           "stage": r.get("stage"), "kind": kind, "reason": reason})
    if status is not None:
        for site, entry in status.sites.items():
            if entry.state == "refused" and not any(e["site"] == site and e["kind"] == "refused" for e in events):
                events.append({"time": None, "site": site, "round": status.round + 1, "stage": "join", "kind": "refused",
                               "reason": entry.detail})
    return events


def round_grid(records: list[dict], sites: list[str], rounds: int) -> dict[str, list[dict]]:
    """Per site, per round: what happened to its visit (visited, skipped, refused, or not yet), with
    the reason: the timeline at a glance."""
    grid = {site: [{"state": "pending", "reason": ""} for _ in range(rounds)] for site in sites}
    for r in records:
        cells, rnd = grid.get(r.get("site")), int(r.get("round", -1))
        if cells is None or not 0 <= rnd < rounds:
            continue
        if r.get("kind") == "visit":
            cells[rnd] = {"state": "visited", "reason": f"visit {int(r['visit']) + 1}"}
        elif r.get("kind") == "skip":
            reason = str(r.get("reason", ""))
            cells[rnd] = {"state": "refused" if "refused" in reason else "skipped", "reason": f"{r.get('stage')}: {reason}"}
    return grid


def throughput(records: list[dict]) -> dict:
    visits = [r for r in records if r.get("kind") == "visit"]
    rates = [v for v in (_number(r.get("images_per_s")) for r in visits) if v is not None]
    seconds = sum(v for v in (_number(r.get("seconds")) for r in visits) if v is not None)
    images = sum(int(r.get("num_examples") or 0) for r in visits)
    return {"images": images, "train_seconds": seconds, "images_per_s": images / seconds if seconds > 0 else None,
            "last_images_per_s": rates[-1] if rates else None}


def _phase(status, records: list[dict], summary: bool) -> str:
    if status is not None:
        return status.phase
    if summary:
        return "finished"
    return "training" if records else "starting"


def _shape(config: dict, status) -> dict:
    """Sites, rounds and visits of the run (config.yaml first, the status file where it is missing)."""
    sites = list(config.get("sites") or (status.sites if status is not None else []))
    rounds = int(config.get("rounds") or (status.rounds if status is not None else 0))
    total = status.total_visits if status is not None and status.total_visits else rounds * len(sites)
    mode = config.get("mode") or (status.mode if status is not None else None)
    return {"sites": sites, "rounds": rounds, "total_visits": total, "mode": mode}


def _progress(records: list[dict], status, rounds: int) -> dict:
    """Visits done (skipped visits count: the run moved past them) and the current round (1-based)."""
    done = sum(1 for r in records if r.get("kind") == "visit" or (r.get("kind") == "skip" and r.get("stage") == "visit"))
    if status is not None:
        done, current = max(done, status.visits_done), status.round + 1
    else:
        current = max((int(r["round"]) for r in records if "round" in r), default=0) + 1
    evaluated = len({int(r["round"]) for r in records if r.get("kind") == "round"})
    return {"visits_done": done, "round": min(current, rounds) if rounds else current, "rounds_evaluated": evaluated}


def run_view(run_dir: str | Path) -> dict:
    """Everything the coordinator page and ``/api/run`` show, as plain JSON values."""
    run_dir = Path(run_dir)
    config, records, status = _config(run_dir), read_metrics(run_dir), read_status(run_dir)
    shape = _shape(config, status)
    phase = _phase(status, records, (run_dir / "summary.json").is_file())
    finished = phase in ("finished", "failed")
    status_fields = {"warnings": list(status.warnings), "error": status.error, "updated": status.updated} if status is not None \
        else {"warnings": [], "error": None, "updated": None}
    return {
        "run": run_dir.name, "exists": run_dir.is_dir(), "phase": phase, "finished": finished, **shape,
        "model": (config.get("model") or {}).get("model"), "recipe": config.get("recipe"),
        **_progress(records, status, shape["rounds"]),
        "sites": site_rows(shape["sites"], records, status, finished), "auc": auc_series(records, shape["sites"]),
        "timeline": timeline(records, status), "grid": round_grid(records, shape["sites"], shape["rounds"]),
        "throughput": throughput(records), "federated": status is not None,
        **status_fields, "links": {name: path for name, path in LINKS.items() if (run_dir / path).is_file()},
    }
