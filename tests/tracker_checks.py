"""Read back what the trackers wrote, and check it against ``metrics.jsonl``.

For the tracker unit tests and for an end-to-end test of a real (tiny) training run with
``--log tensorboard,mlflow``: after the run, ``check_trackers_match_metrics(run_dir)`` asserts
that every visit and evaluation record of the run folder appears in each tracker at its step
with its value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from arkfed.io import read_jsonl
from arkfed.run.trackers import RUN_FILE, RUN_FOLDER_STORE, eval_scalars, visit_scalars


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``RUN/tensorboard`` -> [(step, value)] as TensorBoard will show it
    (after its purge of steps redone on resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tensorboard_texts(run_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text tag (config, summary, skips/<site>) -> [(step, text)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        if events and events[0].tensor_proto.string_val:
            out[tag.removesuffix("/text_summary")] = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events]
    return out


def mlflow_client(run_dir: Path):
    """An MlflowClient on the store the run logged to, and the run's id (from RUN/mlflow/run.json)."""
    from mlflow.tracking import MlflowClient

    recorded = json.loads((Path(run_dir) / "mlflow" / RUN_FILE).read_text())
    uri = recorded["tracking_uri"]
    if uri == RUN_FOLDER_STORE:
        uri = "sqlite:///" + str((Path(run_dir) / "mlflow" / "mlflow.db").resolve())
    return MlflowClient(tracking_uri=uri), recorded["run_id"]


def read_mlflow(run_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]]]:
    """The MLflow run and every metric's full history [(step, value)], in logging order."""
    client, run_id = mlflow_client(run_dir)
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return run, history


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} that the trackers must hold, derived from ``metrics.jsonl``."""
    records, _ = read_jsonl(Path(run_dir) / "metrics.jsonl")
    out: dict[str, dict[int, float]] = {}
    for record in records:
        if record.get("kind") == "visit":
            values, step = visit_scalars(record), record["visit"]
        elif record.get("kind") == "eval":
            values, step = eval_scalars(record), record["round"]
        else:
            continue
        for tag, value in values.items():
            out.setdefault(tag, {})[step] = value
    return out


def _check(name: str, got: dict[str, list[tuple[int, float]]], expected: dict[str, dict[int, float]]) -> int:
    checked = 0
    for tag, points in expected.items():
        assert tag in got, f"{name}: tag {tag!r} missing (has {sorted(got)[:8]}...)"
        last = {step: value for step, value in got[tag]}  # the last value logged at each step
        for step, value in points.items():
            assert step in last, f"{name}: {tag} has no step {step} (steps {sorted(last)})"
            assert math.isclose(last[step], value, rel_tol=1e-5, abs_tol=1e-6), (
                f"{name}: {tag}@{step} = {last[step]}, metrics.jsonl has {value}")
            checked += 1
    return checked


def check_trackers_match_metrics(run_dir: Path, trackers=("tensorboard", "mlflow")) -> dict[str, int]:
    """Assert each tracker holds every visit/eval scalar of ``metrics.jsonl`` at its step; returns
    how many points were compared per tracker (so a caller can assert it is not zero)."""
    expected = expected_scalars(run_dir)
    assert expected, f"{run_dir}/metrics.jsonl has no visit or eval records"
    counts = {}
    if "tensorboard" in trackers:
        counts["tensorboard"] = _check("tensorboard", read_tensorboard(run_dir), expected)
    if "mlflow" in trackers:
        _, history = read_mlflow(run_dir)
        counts["mlflow"] = _check("mlflow", history, expected)
    return counts
