"""What makes a benchmark resumable: a folder holds one setup (``setup.json``) and one record per
finished job (``records.jsonl``); a rerun into the same folder skips the jobs already recorded."""

from __future__ import annotations

import json
from pathlib import Path

from arkfed.errors import ArkfedError


def check_setup(setup: dict, out: Path) -> None:
    """A rerun into ``out`` resumes it, so it must be the same setup: otherwise records of two
    setups would be mixed. Writes ``out/setup.json`` the first time."""
    setup = json.loads(json.dumps(setup))
    path = out / "setup.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != setup:
            changed = sorted(k for k in set(setup) | set(previous) if previous.get(k) != setup.get(k))
            raise ArkfedError(f"{out} holds results of another setup (differs in {', '.join(changed)}); "
                              "choose another --out or delete that folder")
    else:
        path.write_text(json.dumps(setup, indent=2) + "\n")


def read_records(out: Path) -> dict[str, dict]:
    """The finished jobs of ``out/records.jsonl`` by key (a line cut short by a crash is skipped)."""
    from arkfed.io import read_jsonl

    path = out / "records.jsonl"
    return {r["key"]: r for r in read_jsonl(path)[0]} if path.exists() else {}


def add_record(out: Path, done: dict[str, dict], record: dict) -> None:
    """Append one finished job to ``out/records.jsonl`` (and to ``done``)."""
    from arkfed.io import append_jsonl

    append_jsonl(out / "records.jsonl", record)
    done[record["key"]] = record
