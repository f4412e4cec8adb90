"""Durable writes: atomic replace, and JSON lines that survive a partial last line."""

import json
import math

from arkfed.io import append_jsonl, atomic_write, json_safe, read_jsonl


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    try:
        atomic_write(path, broken)
    except RuntimeError:
        pass
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind


def test_partial_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"kind": "visit", "visit": 0})
    with path.open("a") as f:  # a crash (or a full disk) mid-line
        f.write('{"kind": "visit", "vis')
    append_jsonl(path, {"kind": "visit", "visit": 1})
    records, broken = read_jsonl(path)
    assert [r["visit"] for r in records] == [0, 1]
    assert broken == 1
    assert path.read_text().endswith('{"kind": "visit", "visit": 1}\n')


def test_json_safe_makes_strict_json():
    import numpy as np

    value = json_safe({"auc": float("nan"), "n": np.int64(3), "t": (1, math.inf)})
    assert json.loads(json.dumps(value, allow_nan=False)) == {"auc": None, "n": 3, "t": [1, None]}


def test_private_appends_are_0600_tighten_an_old_file_and_refuse_a_symlink(tmp_path):
    import os
    import stat

    import pytest

    from arkfed.io import PRIVATE, append_text

    old = os.umask(0o022)
    try:
        path = tmp_path / "outbox.jsonl"
        append_jsonl(path, {"n": 1}, PRIVATE)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o644)  # made by an older version, or copied around
        append_jsonl(path, {"n": 2}, PRIVATE)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and [r["n"] for r in read_jsonl(path)[0]] == [1, 2]
        log = tmp_path / "logs" / "site-errors.log"
        append_text(log, "one\n", PRIVATE)
        append_text(log, "two\n", PRIVATE)
        assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.read_text() == "one\ntwo\n"
        public = tmp_path / "metrics.jsonl"
        append_jsonl(public, {"n": 1})  # no mode: as before (umask)
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
    finally:
        os.umask(old)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "linked.log"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        append_text(link, "x", PRIVATE)
    with pytest.raises(OSError, match="symbolic link"):
        append_jsonl(link, {"n": 1}, PRIVATE)
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) != 0o600
