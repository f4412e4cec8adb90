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

STATUS_FILE = "federation-status.json"

SiteState = Literal["waiting", "joined", "training", "evaluating", "done", "failed", "skipped", "refused"]
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
