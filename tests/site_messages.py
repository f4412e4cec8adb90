"""Real Flower messages for calling the site's ClientApp in-process (policy and error tests)."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from flwr.app import Context, Message, Metadata, RecordDict

from arkfed.federation import messages as m

RUN_UID = "policytest0001"


def set_policy(path: Path, policy: dict) -> None:
    data = yaml.safe_load(Path(path).read_text())
    data["policy"] = policy
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def context(path: Path, name: str) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site": name, "site-config": str(path)}, state=RecordDict(), run_config={})


def message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="0", created_at=time.time(), ttl=600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def request(site, state, settings, spec=None, raw: dict | None = None, **extra) -> RecordDict:
    """A request as the coordinator builds it; ``raw`` replaces fields by JSON text the
    coordinator's own validation would not let through."""
    record = m.json_record(run_uid=RUN_UID, spec=spec or state.student.spec, settings=settings, head_from=m.NO_HEAD,
                           schemas={site.name: site.schema.model_dump(mode="json")}, pending=1.0, **extra)
    for key, text in (raw or {}).items():
        record[key] = text
    arrays = {m.STUDENT: m.model_record(state.student), m.TEACHER: m.model_record(state.teacher),
              m.HEAD: m.model_record(state.heads[site.name])}
    return m.request_content(record, **arrays)
