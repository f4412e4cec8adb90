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
