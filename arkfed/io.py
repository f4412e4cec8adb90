"""Durable small-file I/O shared by every writer: atomic replaces, JSON lines, strict JSON values.

A power loss or a full disk must never cost a finished run its checkpoint or its history:

- :func:`atomic_write` writes a temporary file in the target's folder, fsyncs it, renames it into
  place and fsyncs the folder, so after a crash the path holds either the old or the new bytes,
  never an empty or partial file;
- :func:`append_jsonl` first repairs a partial last line (left by a crash or a full disk) by
  ending it, so the next record starts on its own line; :func:`read_jsonl` skips such a broken
  line and says how many it skipped instead of losing the records after it.

Private files (a site's ``outbox.jsonl`` and ``site-errors.log``, the coordinator's
``inbox.jsonl``, process logs) are opened for appending by :func:`open_append` with an exact
``mode`` (0600: :data:`PRIVATE`): created with it, an existing file tightened to it on open, never
written through a symlink. ``atomic_write`` makes its files 0600 unless told otherwise.

No torch here: this is imported by light modules (status files, CLI).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Write through a temporary file in the same folder (``write(tmp)``), fsync it and rename it
    into place, then fsync the folder: a crash leaves the old file or the new one, never a torn one.

    The temporary file is new (``mkstemp``: ``O_EXCL``, owner-only, never through a symlink) and the
    rename replaces a symlink at ``path`` rather than following it; ``mode`` sets its permissions
    exactly (an old file's permissions never carry over)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if mode is not None:
        os.fchmod(fd, mode)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


PRIVATE = 0o600
"""The mode of a file only its owner may read or write."""


def open_append(path: str | Path, mode: int | None = None, binary: bool = False):
    """``path`` opened for appending (text, or bytes with ``binary``); the one way arkfed appends.

    With ``mode`` (e.g. :data:`PRIVATE`) the file is created with exactly that mode (umask-proof), an
    existing one is chmod-ed to it on open, and a symlink at ``path`` is refused (``O_NOFOLLOW``),
    never followed; without it the file is created as ``open(path, "a")`` would."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    if mode is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        return os.fdopen(fd, "ab" if binary else "a")
    except BaseException:
        os.close(fd)
        raise


def append_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Append ``text`` and fsync it (a new file's folder too); ``mode`` as :func:`open_append`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open_append(path, mode) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, paths -> str, numpy scalars -> Python: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            return value
    return value


def _repair_tail(path: Path) -> None:
    """End a partial last line (no trailing newline) so the next record is not glued to it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def append_jsonl(path: str | Path, record: dict, mode: int | None = None) -> None:
    """Append one JSON line and fsync it (a killed process keeps every finished line); a partial
    line left by an earlier crash is ended first. ``mode``: see :func:`open_append`."""
    path = Path(path)
    if mode is not None and path.is_symlink():
        raise OSError(f"{path} is a symbolic link; refusing to append to a private file through it")
    _repair_tail(path)
    append_text(path, json.dumps(record, allow_nan=True) + "\n", mode)


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and how many broken lines (cut short by a crash) were skipped."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, broken = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            broken += 1
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            broken += 1
    return records, broken


def rewrite_jsonl(path: str | Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
    write_text_atomic(path, text)
