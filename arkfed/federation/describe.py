"""What a message carries, in words, for the audit logs (the site's ``outbox.jsonl``, the
coordinator's ``inbox.jsonl``): array keys, dtypes, shapes and sizes, every metric and config value,
bytes by their size; and error text with local paths removed before it leaves a site."""

from __future__ import annotations

import re
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

_ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:\\|/)[^\s'\"<>|:,;)]+")


def redact_paths(text: str) -> str:
    """Error text that leaves a site: local paths replaced (the site's log keeps the full message)."""
    return _ABSOLUTE_PATH.sub("<local path>", text)


def _described(value: Any) -> Any:
    """A config value for the audit logs: bytes (keys, ciphertexts, masked vectors) by their size."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list) and any(isinstance(v, bytes) for v in value):
        return f"<{len(value)} byte strings, {sum(len(v) for v in value if isinstance(v, bytes))} bytes>"
    return value


def describe_content(content: RecordDict) -> dict[str, dict]:
    """What a message carries, for the site's outbox audit log: per record its kind and, for
    arrays, keys/dtypes/shapes/bytes; for metrics and config records, every value."""
    out: dict[str, dict] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {
                "kind": "arrays",
                "arrays": {k: {"dtype": a.dtype, "shape": list(a.shape), "bytes": len(a.data)} for k, a in record.items()},
                "bytes": record.count_bytes(),
            }
        elif isinstance(record, MetricRecord):
            out[name] = {"kind": "metrics", "values": {k: v for k, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            values = {k: _described(v) for k, v in record.items()}
            out[name] = {"kind": "config", "values": values}
        else:  # pragma: no cover - Flower has no other record types today
            out[name] = {"kind": type(record).__name__}
    return out
