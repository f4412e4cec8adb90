"""What a run records: one ``metrics.jsonl`` line per visit, evaluation, skip and round, the
resume trim, and ``summary.json`` (written by :class:`MetricsLog`, a loop callback)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping

from arkfed.ark.visit import VisitResult
from arkfed.config import TrainConfig, VisitPlan
from arkfed.data.schema import LabelSchema
from arkfed.io import json_safe
from arkfed.run.callbacks import LoopCallback
from arkfed.run.folder import RunFolder


# -- records (metrics.jsonl lines) ----------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def visit_record(plan: VisitPlan, result: VisitResult, **extra) -> dict:
    return {"kind": "visit", "round": plan.round, "visit": plan.visit, "site": plan.site, "time": now(),
            **result.model_dump(exclude={"site", "round", "visit"}, exclude_none=True), **extra}


def eval_record(rnd: int, site: str, model: str, split: str, result: dict) -> dict:
    """One evaluation line; absent AUCs (one-valued classes) are ``null``."""
    return {"kind": "eval", "round": rnd, "site": site, "model": model, "split": split, "time": now(), **json_safe(result)}


def skip_record(stage: str, rnd: int, visit: int, site: str, reason: str, **extra) -> dict:
    """A skipped visit or evaluation; ``away: true`` marks a turn the site missed by not being there
    (reason ``absent``, ``dropped``, offline or no reply), which ``max_absent`` counts."""
    return {"kind": "skip", "stage": stage, "round": rnd, "visit": visit, "site": site, "time": now(), "reason": reason, **extra}


def round_record(rnd: int, seconds: float) -> dict:
    """Marks round ``rnd``'s evaluation as complete (what resume trusts)."""
    return {"kind": "round", "round": rnd, "time": now(), "seconds": seconds}


def trim_metrics(records: list[dict], visits_done: int) -> tuple[list[dict], set[int]]:
    """Keep what the checkpoint covers: visits (and skipped visits) before it, and rounds whose
    evaluation completed (marked by a ``"kind": "round"`` line); returns them and those rounds."""
    complete = {r["round"] for r in records if r.get("kind") == "round"}

    def covered(r: dict) -> bool:
        kind = r.get("kind")
        if kind == "visit" or (kind == "skip" and r.get("stage") == "visit"):
            return r["visit"] < visits_done
        return kind in ("eval", "round", "skip") and r["round"] in complete

    return [r for r in records if covered(r)], complete


def round_val_losses(records: list[dict], split: str) -> dict[int, float]:
    """Per evaluated round, the mean over sites (equal weights, as Ark's engine.py averages its datasets'
    validation losses) of the student's loss on ``split``; sites without a finite loss are left out,
    rounds without any are absent. What ``lr_schedule="ark-as-run"`` steps its scheduler with."""
    import math

    losses: dict[int, list[float]] = {}
    for r in records:
        loss = r.get("loss")
        if r.get("kind") == "eval" and r.get("model") == "student" and r.get("split") == split \
                and isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.setdefault(int(r["round"]), []).append(float(loss))
    return {rnd: sum(values) / len(values) for rnd, values in losses.items()}


def build_summary(config: TrainConfig, records: list[dict], seconds: float, schemas: Mapping[str, LabelSchema]) -> dict:
    """Final (last evaluated round) metrics per site, skips, and the run's size and time."""
    evals = [r for r in records if r.get("kind") == "eval"]
    last = max((r["round"] for r in evals), default=None)
    sites: dict[str, dict] = {name: {"task": schemas[name].task} if name in schemas else {} for name in config.sites}
    for r in evals:
        if r["round"] == last:
            sites[r["site"]][r["model"]] = {k: r[k] for k in ("loss", "mean_auc", "auc", "num_examples", "accuracy") if k in r}
    return {"rounds": config.rounds, "visits": config.total_visits, "mode": config.mode, "evaluated_round": last,
            "split": config.eval_split, "seconds": seconds, "sites": sites,
            "skipped": [r for r in records if r.get("kind") == "skip"]}


class MetricsLog(LoopCallback):
    """Writes the records to ``RUN/metrics.jsonl`` (fsynced line by line): what resume trims and
    what every report reads."""

    def __init__(self, run: RunFolder):
        self.run = run

    def on_visit_end(self, plan: VisitPlan, record: dict) -> None:
        self.run.append_metrics(record)

    def on_skip(self, record: dict) -> None:
        self.run.append_metrics(record)

    def on_round_end(self, rnd: int, records: list[dict]) -> None:
        for record in records:
            self.run.append_metrics(record)
