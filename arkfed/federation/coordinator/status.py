"""The coordinator's live status: written by the ServerApp, read by ``arkfed coordinator``'s view.

The ServerApp runs in a process Flower starts, so it reports through a small JSON file in the run
folder (``RUN/federation-status.json``, replaced atomically) rather than through memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from arkfed.run.callbacks import LoopCallback

STATUS_FILE = "federation-status.json"

SiteState = Literal["waiting", "joined", "training", "evaluating", "done", "failed", "skipped", "refused", "absent", "dropped"]
"""``absent``: not joined yet, or not connected when its turn came; ``dropped``: missed ``max_absent`` turns in a row."""
AWAY = ("absent", "dropped")
Phase = Literal["starting", "joining", "training", "evaluating", "finished", "failed"]


class SiteStatus(BaseModel):
    state: SiteState = "waiting"
    node_id: int | None = None
    detail: str = ""
    last_metrics: dict[str, float | None] = Field(default_factory=dict)
    visits: int = 0
    skips: int = 0


class FederationStatus(BaseModel):
    phase: Phase = "starting"
    mode: str = "cyclic"
    round: int = 0
    rounds: int = 0
    visits_done: int = 0
    total_visits: int = 0
    sites: dict[str, SiteStatus] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    summary: dict | None = None
    pid: int | None = None  # the ServerApp's process (what a killed coordinator loses)
    flower_run_id: int | None = None
    updated: float = Field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.phase in ("finished", "failed")


def write_status(run_dir: Path, status: FederationStatus) -> None:
    from arkfed.io import atomic_write

    status.updated = time.time()
    text = status.model_dump_json(indent=1)
    atomic_write(Path(run_dir) / STATUS_FILE, lambda tmp: tmp.write_text(text))


def read_status(run_dir: Path) -> FederationStatus | None:
    path = Path(run_dir) / STATUS_FILE
    try:
        return FederationStatus.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


class StatusFile(LoopCallback):
    """The loop's callback that keeps ``RUN/federation-status.json`` current for the live view."""

    def __init__(self, run_dir: Path, config, flower_run_id: int | None = None):
        import os

        self.run_dir = Path(run_dir)
        self.status = FederationStatus(
            mode=config.mode, rounds=config.rounds, total_visits=config.total_visits,
            sites={name: SiteStatus() for name in config.sites}, pid=os.getpid(), flower_run_id=flower_run_id,
            phase="joining",
        )
        self._save()

    def _save(self) -> None:
        write_status(self.run_dir, self.status)

    def on_run_start(self, run) -> None:
        self.status.phase, self.status.visits_done = "training", run.visits_done
        self._save()

    def on_site_status(self, site: str, state: str, detail: str = "", **metrics) -> None:
        entry = self.status.sites.get(site)
        if entry is None:
            return
        entry.state, entry.detail = state, detail
        if state == "joined":
            entry.node_id = int(detail.split()[-1]) if detail.startswith("node ") else entry.node_id
        entry.last_metrics.update(metrics)
        if state == "evaluating":
            self.status.phase = "evaluating"
        self._save()

    def on_visit_start(self, plan) -> None:
        self.status.phase, self.status.round = "training", plan.round
        self._save()

    def on_visit_end(self, plan, record: dict) -> None:
        entry = self.status.sites[plan.site]
        entry.visits += 1
        entry.state, entry.detail = "done", f"visit {plan.visit + 1}"
        entry.last_metrics.update(loss=record.get("loss"), images_per_s=record.get("images_per_s"))
        if record.get("epsilon_budget") is not None:  # a DP site: its privacy budget, as the site reported it
            entry.last_metrics.update(epsilon_spent=record.get("epsilon_spent"), epsilon_budget=record.get("epsilon_budget"))
        self.status.visits_done = plan.visit + 1
        self._save()

    def on_skip(self, record: dict) -> None:
        entry = self.status.sites[record["site"]]
        entry.skips += 1
        entry.state = record["reason"] if record["reason"] in AWAY else "skipped"
        entry.detail = f"skipped {record['stage']} in round {record['round'] + 1}: {record['reason']}"
        self._save()

    def on_round_end(self, rnd: int, records: list[dict]) -> None:
        for r in records:
            if r.get("kind") == "eval":
                self.status.sites[r["site"]].last_metrics[f"{r['model']}_auc"] = r.get("mean_auc")
        self._save()

    def on_warning(self, text: str) -> None:
        self.status.warnings.append(text)
        self._save()

    def on_sites_admitted(self, config) -> None:
        for name in config.sites:
            self.status.sites.setdefault(name, SiteStatus())
        self.status.total_visits = config.total_visits
        self._save()

    def on_run_end(self, summary: dict) -> None:
        self.status.phase, self.status.summary = "finished", summary
        for entry in self.status.sites.values():
            if entry.state not in ("skipped", "failed", "refused", *AWAY):
                entry.state = "done"
        self._save()

    def fail(self, error: str) -> None:
        self.status.phase, self.status.error = "failed", error
        self._save()
