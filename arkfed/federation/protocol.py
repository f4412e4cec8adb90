"""The federation's settings record (``RUN/federation.json``, next to config.yaml).

What to train is the run's :class:`~arkfed.config.TrainConfig` (the same as in a local run);
this file holds only what a federation adds: the run's identity, its time limits, the record of
each site's label schema (checked when a site rejoins) and split sizes (fixed when it first joins,
capped by ``max_split_size``), the bounds on returned updates and the trackers the ServerApp logs to.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from arkfed.errors import ArkfedError

FEDERATION_FILE = "federation.json"


class FederationSettings(BaseModel):
    """How the coordinator runs the federation (``RUN/federation.json``, next to config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    run_uid: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    join_timeout: float = Field(default=600.0, gt=0, description="seconds to wait for the listed sites to join")
    visit_timeout: float = Field(default=3600.0, gt=0, description="seconds one visit (or evaluation) may take")
    rejoin_wait: float = Field(default=30.0, ge=0, description="seconds a retry waits for a vanished site to come back")
    schemas: dict[str, dict] = Field(default_factory=dict, description="the run's record: each site's label schema")
    claim_lifetime: float = Field(default=7 * 24 * 3600.0, gt=0, description="seconds a signed run stays valid at the sites")
    max_update_norm: float | None = Field(default=None, gt=0, description=(
        "reject a returned student farther (L2) than this from the one sent, on top of the adaptive bound (update_norm_factor); "
        "with secure_aggregation each site clips its own update to it before masking"))
    max_split_size: int = Field(default=1_000_000, ge=1, description=(
        "cap on the split sizes a site declares when it joins (they bound its num_examples)"))
    sizes: dict[str, dict[str, int]] = Field(default_factory=dict, description="the run's record: each site's split sizes, fixed at join")
    log: list[str] = Field(default_factory=list, description="trackers the ServerApp logs to (tensorboard, mlflow)")

    def write(self, run_dir: Path) -> None:
        from arkfed.io import atomic_write

        text = self.model_dump_json(indent=2)
        atomic_write(Path(run_dir) / FEDERATION_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def read(cls, run_dir: Path) -> "FederationSettings":
        path = Path(run_dir) / FEDERATION_FILE
        if not path.is_file():
            raise ArkfedError(f"{run_dir}: not a federated run folder (no {FEDERATION_FILE})")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except Exception as exc:
            raise ArkfedError(f"{path}: invalid federation settings: {exc}") from None
