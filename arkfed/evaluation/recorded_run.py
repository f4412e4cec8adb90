"""Reading what a run folder records: its config, its metrics log and its summary.

The training code writes ``config.yaml`` (the resolved :class:`~arkfed.config.TrainConfig`),
``metrics.jsonl`` (one JSON object per visit and per evaluation) and ``summary.json``. The model
card and the run report read them through here, tolerating fields a given run does not have, so
a run from an older arkfed still gets a card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from arkfed.errors import ArkfedError
from arkfed.run.folder import read_metrics


@dataclass
class RecordedRun:
    """What a run folder records (read after the fact; the loop's callbacks get
    :class:`arkfed.run.callbacks.RunInfo` while it runs)."""

    folder: Path
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def visits(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "visit"]

    @property
    def sites(self) -> list[str]:
        names = self.config.get("sites") or sorted({r["site"] for r in self.evals if "site" in r})
        return list(names)

    @property
    def rounds_done(self) -> int:
        rounds = [int(r["round"]) for r in self.evals if "round" in r]
        return max(rounds) + 1 if rounds else 0

    def final_metrics(self) -> dict[tuple[str, str], dict]:
        """The last evaluation line per (site, model): the run's final metrics."""
        last: dict[tuple[str, str], dict] = {}
        for record in self.evals:
            key = (str(record.get("site")), str(record.get("model", "teacher")))
            if key not in last or int(record.get("round", 0)) >= int(last[key].get("round", 0)):
                last[key] = record
        return last

    def site_datasets(self) -> dict[str, str]:
        """Site name -> dataset plugin, from the site configs the run recorded (where readable)."""
        from arkfed.run.folder import RunFolder
        from arkfed.site.config import load_site_config

        out: dict[str, str] = {}
        for ref in RunFolder(self.folder).read_site_configs():
            try:
                site = load_site_config(ref)
            except ArkfedError:
                continue
            out[site.name] = site.dataset
        return out


def read_run(folder: str | Path) -> RecordedRun:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArkfedError(f"run folder not found: {folder}")
    config: dict = {}
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise ArkfedError(f"{folder / 'config.yaml'}: not valid YAML: {' '.join(str(exc).split())}") from None
    summary: dict = {}
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except json.JSONDecodeError:
            raise ArkfedError(f"{folder / 'summary.json'}: not valid JSON") from None
    return RecordedRun(folder=folder, config=config, summary=summary, records=read_metrics(folder))
