"""What the site view shows: read from the site's own YAML and state folder, by the site's own process.

The runs waiting for the operator's approval (:func:`arkfed.site.policy.pending_runs`, with their
full settings and fingerprint), the site's policy, and the outbox: every message the site sent
(:func:`arkfed.federation.site.heads.read_outbox`): when, for which run, what kind, how many bytes,
and the names and values of every metric and setting it carried. An outbox line never holds an
image or a weight (only array names, shapes and byte counts), so neither does this page.
"""

from __future__ import annotations

from pathlib import Path

from arkfed.federation.site.heads import read_outbox
from arkfed.site.config import SiteConfig, load_site_config
from arkfed.site.policy import approved_runs, pending_runs, refused_runs

PRIVACY_KEYS = ("epsilon_spent", "epsilon_budget")


def outbox_row(entry: dict) -> dict:
    """One sent message, flattened for a table: its records' kinds, total bytes, metric values."""
    content = entry.get("content") or {}
    records, values, arrays, total = [], {}, 0, 0
    for name, record in content.items():
        kind = record.get("kind", "?")
        records.append(f"{name} ({kind})")
        if kind == "arrays":
            arrays += len(record.get("arrays") or {})
            total += int(record.get("bytes") or 0)
        elif kind in ("metrics", "config"):
            for key, value in (record.get("values") or {}).items():
                values[f"{name}.{key}" if len(content) > 1 else key] = value
    error = entry.get("error") or {}
    return {"time": entry.get("time"), "run": entry.get("run_id"), "kind": entry.get("message_type"),
            "round": entry.get("group"), "records": records, "arrays": arrays, "bytes": total, "values": values,
            "error": f"{error.get('code')}: {error.get('reason')}" if error else None}


def epsilon_spent(rows: list[dict]) -> dict[str, dict]:
    """Per run, the latest ε spent (and budget) this site reported, where its replies carry them."""
    spent: dict[str, dict] = {}
    for row in rows:
        found = {key.split(".")[-1]: value for key, value in row["values"].items() if key.split(".")[-1] in PRIVACY_KEYS}
        if found:
            spent[str(row["run"])] = {**spent.get(str(row["run"]), {}), **found, "time": row["time"]}
    return spent


def site_view(config: SiteConfig | str | Path, outbox_limit: int = 500) -> dict:
    """Everything the site page and ``/api/site`` show, as plain JSON values (newest messages first)."""
    if not isinstance(config, SiteConfig):
        config = load_site_config(config)
    state_dir = config.local_state_dir
    rows = [outbox_row(entry) for entry in read_outbox(state_dir)]
    return {
        "site": config.name, "dataset": config.dataset, "state_dir": str(state_dir),
        "policy": config.policy.model_dump(mode="json"), "pending": pending_runs(state_dir),
        "approved": sorted(approved_runs(state_dir)), "refused": sorted(refused_runs(state_dir)),
        "outbox": list(reversed(rows))[:outbox_limit], "messages": len(rows), "bytes_sent": sum(r["bytes"] for r in rows),
        "epsilon": epsilon_spent(rows),
    }
