"""The run folder: everything needed to inspect, reuse or resume a training run.

::

    RUN/config.yaml               the resolved TrainConfig
    RUN/metrics.jsonl             one JSON object per visit ("kind": "visit") and per evaluation ("kind": "eval")
    RUN/checkpoint.safetensors    student, teacher, every head, the visit counter (and a carried optimizer state),
                                  written atomically after every visit
    RUN/checkpoint.prev.safetensors  the checkpoint before it (read, with a warning, when the latest cannot be)
    RUN/teacher.safetensors       the teacher (backbone + projector): the foundation model
    RUN/student.safetensors
    RUN/heads/<site>.safetensors  each site's (student) head, with its class names and schema
    RUN/teacher-heads/<site>.safetensors  the teacher's head for each site (an EMA of the student's)
    RUN/sites.yaml                the site YAMLs of a local run (what --resume reloads)
    RUN/summary.json              final metrics per site

The checkpoint is one file so that it is always consistent (weights and counter from the same
moment); ``metrics.jsonl`` is trimmed back to the checkpoint on resume, so a crash between a
checkpoint and a metrics line never leaves duplicates or holes.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from arkfed.ark.pair import SiteHeads
from arkfed.config import TeacherClock, TrainConfig
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.io import append_jsonl, atomic_write, read_jsonl, rewrite_jsonl
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.model.weights import read_safetensors, save_ark_model, save_head, save_safetensors
from arkfed.spec import ModelSpec

CHECKPOINT_KEY = "arkfed_checkpoint"


@dataclass
class RunState:
    """The weights of a run between two visits, and how many visits they include.

    Heads are here only for in-process sites; in federated runs they stay at the sites.
    """

    student: ArkModel
    teacher: ArkModel
    heads: dict[str, SiteHead]
    visits_done: int = 0
    teacher_heads: dict[str, SiteHead] = field(default_factory=dict)
    clock: TeacherClock = field(default_factory=TeacherClock)
    versions: dict[str, int] = field(default_factory=dict)  # per site, its last accepted visit
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # optimizer_state "carry": arkfed.ark.visit.OptimizerState


def config_text(config: TrainConfig) -> str:
    """What ``RUN/config.yaml`` holds for ``config`` (also what ``--dry-run`` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (the one reader; a line cut short by a crash is
    skipped, and the records after it are kept)."""
    records, _ = read_jsonl(Path(run_dir) / "metrics.jsonl")
    return records


class RunFolder:
    """Reads and writes one run folder (local or federated coordinator)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoint_path = property(lambda self: self.path / "checkpoint.safetensors")
    previous_checkpoint_path = property(lambda self: self.path / "checkpoint.prev.safetensors")
    summary_path = property(lambda self: self.path / "summary.json")
    heads_dir = property(lambda self: self.path / "heads")
    teacher_heads_dir = property(lambda self: self.path / "teacher-heads")
    sites_path = property(lambda self: self.path / "sites.yaml")

    def has_run(self) -> bool:
        return self.config_path.is_file()

    # -- config ---------------------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        text = config_text(config)
        atomic_write(self.config_path, lambda tmp: tmp.write_text(text))

    def read_config(self) -> TrainConfig:
        if not self.config_path.is_file():
            raise ArkfedError(f"{self.path}: not a run folder (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_text())
            data.pop("site_configs", None)  # run folders before arkfed 0.2 kept them here
            data.get("settings", {}).pop("device", None)  # ... and the sites' hardware
            data.get("settings", {}).pop("num_workers", None)
            return TrainConfig.model_validate(data)
        except Exception as exc:
            raise ArkfedError(f"{self.config_path}: invalid run config: {' '.join(str(exc).split())}") from None

    def write_site_configs(self, paths: list[str]) -> None:
        """Where a local run's sites are described (not part of the run's configuration)."""
        text = yaml.safe_dump({"site_configs": [str(p) for p in paths]}, sort_keys=False)
        atomic_write(self.sites_path, lambda tmp: tmp.write_text(text))

    def read_site_configs(self) -> list[str]:
        if self.sites_path.is_file():
            return list(yaml.safe_load(self.sites_path.read_text()).get("site_configs") or [])
        if self.config_path.is_file():  # an older run folder
            return list((yaml.safe_load(self.config_path.read_text()) or {}).get("site_configs") or [])
        return []

    # -- metrics --------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        """Append one JSON line, fsynced (a killed run keeps every finished line)."""
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def rewrite_metrics(self, records: list[dict]) -> None:
        rewrite_jsonl(self.metrics_path, records)

    # -- checkpoint -----------------------------------------------------------------------
    def save_checkpoint(self, state: RunState) -> None:
        tensors = {f"student.{k}": v for k, v in state.student.state_dict().items()}
        tensors |= {f"teacher.{k}": v for k, v in state.teacher.state_dict().items()}
        for site, head in state.heads.items():
            tensors |= {f"heads.{site}.{k}": v for k, v in head.state_dict().items()}
        for site, head in state.teacher_heads.items():
            tensors |= {f"teacher_heads.{site}.{k}": v for k, v in head.state_dict().items()}
        tensors |= {f"optimizer.{k}": v for k, v in state.optimizer.items()}
        meta = {
            "visits_done": state.visits_done,
            "spec": state.student.spec.model_dump(mode="json"),
            "heads": {site: head.schema.model_dump(mode="json") for site, head in state.heads.items()},
            "clock": state.clock.model_dump(mode="json"),
            "versions": state.versions,
        }
        if self.checkpoint_path.is_file():  # keep the previous one (issue 8): a fallback if the new one is unreadable
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        save_safetensors(self.checkpoint_path, tensors, {CHECKPOINT_KEY: json.dumps(meta)})

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file() or self.previous_checkpoint_path.is_file()

    def load_checkpoint(self) -> RunState:
        """The latest checkpoint; when it cannot be read (cut short, corrupted, missing after a
        crash mid-rotation), the previous one, with a warning (resume then redoes one visit)."""
        try:
            return self._read_checkpoint(self.checkpoint_path)
        except Exception as exc:
            if not self.previous_checkpoint_path.is_file():
                raise
            warnings.warn(f"{self.checkpoint_path} cannot be read ({' '.join(str(exc).split())[:200]}); "
                          f"using the previous checkpoint {self.previous_checkpoint_path.name}", RuntimeWarning, stacklevel=2)
            return self._read_checkpoint(self.previous_checkpoint_path)

    def _read_checkpoint(self, path: Path) -> RunState:
        if not path.is_file():
            raise ArkfedError(f"{path}: no checkpoint")
        tensors, metadata = read_safetensors(path)
        if CHECKPOINT_KEY not in metadata:
            raise ArkfedError(f"{path}: not an arkfed checkpoint")
        meta = json.loads(metadata[CHECKPOINT_KEY])
        spec = ModelSpec.model_validate(meta["spec"])

        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        student, teacher = ArkModel(spec), ArkModel(spec)
        student.load_state_dict(part("student."))
        teacher.load_state_dict(part("teacher."))
        heads, teacher_heads = {}, {}
        for site, schema in meta["heads"].items():
            for store, prefix in ((heads, "heads"), (teacher_heads, "teacher_heads")):
                state = part(f"{prefix}.{site}.")
                if state:
                    head = SiteHead(site, LabelSchema.model_validate(schema), spec.projector_dim)
                    head.load_state_dict(state)
                    store[site] = head
        clock = TeacherClock.model_validate(meta.get("clock", {}))
        versions = {str(k): int(v) for k, v in meta.get("versions", {}).items()}
        return RunState(student, teacher, heads, int(meta["visits_done"]), teacher_heads, clock, versions, part("optimizer."))

    # -- weights and summary --------------------------------------------------------------
    def save_weights(self, state: RunState) -> None:
        """teacher/student ArkModel files and one head file per site (loadable by arkfed.model.weights)."""
        save_ark_model(self.path / "teacher.safetensors", state.teacher)
        save_ark_model(self.path / "student.safetensors", state.student)
        for site, head in state.heads.items():
            save_head(self.heads_dir / f"{site}.safetensors", head)
        for site, head in state.teacher_heads.items():  # caught up with the teacher steps since the site's visit
            if site in state.heads:
                head = SiteHeads(state.heads[site], head).caught_up(state.clock.pending(site)).teacher
            save_head(self.teacher_heads_dir / f"{site}.safetensors", head)

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(summary, indent=2, allow_nan=True)
        atomic_write(self.summary_path, lambda tmp: tmp.write_text(text))
