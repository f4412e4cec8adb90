"""What a site keeps for itself in a federated run: its private heads, versioned by visit.

The head lives in two places: the SuperNode's persistent context state (fast, survives between
messages of a run) and the site's ``local_state_dir`` (survives a SuperNode restart)::

    <local_state_dir>/runs/<run uid>/head-v00007.safetensors   the head after visit 7 (with its schema)
    <local_state_dir>/runs/<run uid>/head.safetensors          the latest head (the site's result)
    <local_state_dir>/runs/<run uid>/teacher-head-v00007.safetensors, teacher-head.safetensors
                                                              the teacher's head (an EMA of the student's)
    <local_state_dir>/outbox.jsonl                            audit log of every reply the site sent (0600)

Versions matter: the coordinator says which visit's head a visit starts from (the last visit it
accepted). A retried visit, or a visit after the coordinator resumed from a checkpoint, therefore
starts from the same head as in an uninterrupted run, even if the site had already trained once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.io import PRIVATE, append_jsonl, read_jsonl

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from arkfed.model.ark import SiteHead

KEEP_VERSIONS = 3
STATE_HEAD = "arkfed.head"
STATE_HEAD_META = "arkfed.head_meta"


def run_folder(state_dir: Path, run_uid: object, site: str | None = None) -> Path:
    """``<state_dir>/runs/<run_uid>``, for a run id the coordinator sent: refused unless it is a plain
    name (1-64 letters, digits, '-', '_') whose folder stays inside ``state_dir`` (no ``..``, no
    absolute path, no symlink out), so nothing is ever written or pruned outside it."""
    from arkfed.federation.signing import RUN_UID_PATTERN

    if not isinstance(run_uid, str) or not RUN_UID_PATTERN.fullmatch(run_uid):
        raise ArkfedError(f"refusing run id {repr(run_uid)[:40]}: expected 1-64 letters, digits, '-' or '_'", site=site)
    root = (Path(state_dir) / "runs").resolve()
    folder = (root / run_uid).resolve()
    if folder.parent != root:
        raise ArkfedError(f"refusing run id {run_uid!r}: its folder resolves outside the site's state_dir", site=site)
    return folder


def schema_mismatch(site: str, have: LabelSchema, record: LabelSchema, where: str) -> ArkfedError:
    return ArkfedError(
        f"refusing to join: this site's dataset schema {have.describe()} differs from {where} "
        f"{record.describe()}; fix the site config (labels/plugin) or start a new run", site=site,
    )


class HeadStore:
    """The versions of one site's head in one run (context state first, then disk)."""

    def __init__(self, state_dir: Path, run_uid: str, site: str, schema: LabelSchema, context_state: "RecordDict | None" = None,
                 kind: str = "head"):
        self.folder = run_folder(state_dir, run_uid, site)
        self.run_uid, self.site, self.schema = run_uid, site, schema
        self.context_state = context_state
        self.kind = kind  # "head" (the student's) or "teacher-head"
        self.state_key, self.meta_key = f"{STATE_HEAD}.{kind}", f"{STATE_HEAD_META}.{kind}"

    def version_path(self, visit: int) -> Path:
        return self.folder / f"{self.kind}-v{visit:05d}.safetensors"

    @property
    def latest_path(self) -> Path:
        return self.folder / f"{self.kind}.safetensors"

    def check_recorded_schema(self) -> None:
        """Refuse when this run's stored head was trained on a different label schema."""
        from arkfed.model.weights import read_safetensors

        if not self.latest_path.is_file():
            return
        _, meta = read_safetensors(self.latest_path)
        if "schema" not in meta:
            return
        recorded = LabelSchema.model_validate_json(meta["schema"])
        if recorded != self.schema:
            raise schema_mismatch(self.site, self.schema, recorded, f"the schema of its stored head ({self.latest_path.name})")

    def _from_context(self, visit: int) -> "SiteHead | None":
        from arkfed.federation.messages import load_model_record
        from arkfed.model.ark import SiteHead

        state = self.context_state
        if state is None or self.state_key not in state or self.meta_key not in state:
            return None
        meta = state[self.meta_key]
        if str(meta["run"]) != self.run_uid or int(meta["visit"]) != visit:
            return None
        head = SiteHead(self.site, self.schema, int(meta["embed_dim"]))
        load_model_record(head, state[self.state_key], "stored head")
        return head

    def load(self, visit: int) -> "SiteHead | None":
        """The head as it was after ``visit`` (None if this site never stored that version)."""
        from arkfed.model.weights import load_head

        head = self._from_context(visit)
        if head is not None:
            return head
        path = self.version_path(visit)
        if not path.is_file():
            return None
        head = load_head(path)
        if head.schema != self.schema:
            raise schema_mismatch(self.site, self.schema, head.schema, f"the schema of its stored head ({path.name})")
        return head

    def latest(self) -> "SiteHead | None":
        """The run's last stored head (a finished run's result), None when there is none or it was
        trained on another label schema."""
        from arkfed.model.weights import load_head

        if not self.latest_path.is_file():
            return None
        head = load_head(self.latest_path)
        return head if head.schema == self.schema else None

    def save(self, visit: int, head: "SiteHead") -> None:
        """Store the head after ``visit`` (atomically on disk, and in the context state)."""
        from flwr.app import ConfigRecord

        from arkfed.federation.messages import model_record
        from arkfed.model.weights import save_head

        save_head(self.version_path(visit), head)
        save_head(self.latest_path, head)
        if self.context_state is not None:
            self.context_state[self.state_key] = model_record(head)
            self.context_state[self.meta_key] = ConfigRecord({"run": self.run_uid, "visit": visit, "embed_dim": head.in_features})
        versions = sorted(self.folder.glob(f"{self.kind}-v*.safetensors"))
        for old in versions[:-KEEP_VERSIONS]:
            old.unlink(missing_ok=True)


def append_outbox(state_dir: Path, entry: dict) -> None:
    """One line per message this site sent (what left the site, for its own audit); the file is 0600."""
    append_jsonl(Path(state_dir) / "outbox.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}, PRIVATE)


def read_outbox(state_dir: Path) -> list[dict]:
    return read_jsonl(Path(state_dir) / "outbox.jsonl")[0]
