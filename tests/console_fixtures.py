"""Run folders, sites and waiting runs for the console tests (tests/console/)."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from arkfed.config import TrainConfig, TrainSettings
from arkfed.federation.coordinator.status import FederationStatus, SiteStatus, write_status
from arkfed.run.folder import RunFolder
from arkfed.run.records import eval_record, round_record, skip_record
from arkfed.site.policy import run_fingerprint, wait_for_approval
from arkfed.spec import ModelSpec

SITES = ("north", "south", "east")
SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def federated_run(path: Path) -> Path:
    """A federated run folder mid-run, as the coordinator's writers leave it: config, status file
    (east refused, south with differential privacy), metrics.jsonl with visits, evaluations, a skip."""
    run = RunFolder(path)
    config = TrainConfig(sites=list(SITES), rounds=2, model=SPEC)
    run.write_config(config)
    visit = 0
    for rnd in range(2):
        for site in SITES[:2]:
            extra = {"epsilon_spent": 0.4 * (rnd + 1), "epsilon_budget": 3.0} if site == "south" else {}
            run.append_metrics({"kind": "visit", "round": rnd, "visit": visit, "site": site, "time": "2026-01-01T00:00:00+00:00",
                                "loss": 0.5 - 0.1 * rnd, "num_examples": 16, "seconds": 0.5, "images_per_s": 32.0, **extra})
            visit += 1
        run.append_metrics(skip_record("visit", rnd, visit, "east", "policy_refused: min_batch_size: batch size 8 < 16"))
        visit += 1
        if rnd == 0:
            for site in SITES[:2]:
                for model, auc in (("student", 0.61), ("teacher", 0.66)):
                    run.append_metrics(eval_record(rnd, site, model, "val", {"loss": 0.6, "mean_auc": auc, "num_examples": 8}))
            run.append_metrics(round_record(rnd, 1.0))
    status = FederationStatus(phase="training", round=1, rounds=2, visits_done=visit, total_visits=6, sites={
        "north": SiteStatus(state="training", visits=2),
        "south": SiteStatus(state="done", detail="visit 5", visits=2, last_metrics={"epsilon_spent": 0.8, "epsilon_budget": 3.0}),
        "east": SiteStatus(state="refused", detail="policy_refused: min_batch_size: batch size 8 < 16", skips=2)})
    write_status(path, status)
    return path


def site_yaml(folder: Path, name: str = "north", approval: str = "manual") -> Path:
    """A site YAML whose state lives in ``folder/state`` (the console reads nothing else of it)."""
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": name, "dataset": "csv", "root": str(folder / "data"), "state_dir": str(folder / "state"),
                                    "policy": {"approval": approval, "min_batch_size": 8}}))
    return path


class WaitingRun(threading.Thread):
    """A run's first request waiting for the operator, exactly as the site's ClientApp waits
    (:func:`arkfed.site.policy.wait_for_approval`); ``result`` is what it returned."""

    def __init__(self, state_dir: Path, run_uid: str = "run42", lr: float = 0.001, timeout: float = 60.0):
        super().__init__(daemon=True)
        settings = TrainSettings(batch_size=16, max_steps_per_visit=12, lr=lr)
        self.state_dir, self.timeout = state_dir, timeout
        self.fingerprint = run_fingerprint(run_uid, SPEC, settings)
        self.details = {"site": "north", "run_uid": run_uid, "request": "visit", "split": None,
                        "model": SPEC.model_dump(mode="json"), "settings": settings.model_dump(mode="json")}
        self.result = "waiting"

    def run(self) -> None:
        self.result = wait_for_approval(self.state_dir, self.fingerprint, self.details, self.timeout, poll=0.05)

    def start_waiting(self) -> "WaitingRun":
        """Start, and return once the run shows as pending."""
        import time

        self.start()
        pending = self.state_dir / "pending-runs" / f"{self.fingerprint}.json"
        deadline = time.monotonic() + 10
        while not pending.is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self
