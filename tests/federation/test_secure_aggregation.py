"""Secure aggregation (Flower's SecAgg+) in parallel mode, over real Flower processes on 127.0.0.1.

Two demo sites, two parallel rounds, TLS and signed runs (``LoopbackFederation``'s default). Two
test-only observers, neither in the arkfed package:

- each site runs ``tests/faulty_site_executor.py`` (no fault set), whose :func:`site_hooks.record_kept`
  saves the update the site kept for the secure sum (checked and clipped, before masking): the
  reference;
- ``tests/serverapp_spy/sitecustomize.py`` records every message the coordinator's ServerApp
  pulls from the SuperLink, whole: what the coordinator actually receives.

The coordinator's student moves by the plain mean of the sites' updates (within the quantisation
tolerance), the teacher takes its EMA step from that student, and no message the ServerApp
received holds, or correlates with, any single site's update.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Key

from arkfed.config import TrainConfig
from arkfed.data.schema import LabelSchema
from arkfed.federation.coordinator.secure import quantisation_tolerance
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.secagg import CONFIGS
from arkfed.model.weights import load_ark_model
from arkfed.run.folder import RunFolder
from arkfed.run.start import initial_state
from arkfed.schedules import ema_update
from federation_fixtures import fast_settings, make_sites, tiny_config
from site_hooks import KEPT_ENV, faulty_executors, use_faulty_executors

SPY = Path(__file__).resolve().parent.parent / "serverapp_spy"
INBOX_ENV = "ARKFED_TEST_INBOX_DIR"
MAX_NORM = 2.0
ROUNDS = 2
SITES = 2  # three run the same protocol (every share needed) at 1.5 x the time
MIN_SIZE = 16  # numeric payloads shorter than this are metrics, not model tensors


def _numeric_payloads(entry: dict) -> list[np.ndarray]:
    """Every array in a received message: array records' arrays, and NumPy arrays serialised as
    bytes in config records (how SecAgg+ sends its masked vectors)."""
    found = []
    for record in entry["records"].values():
        for value in record["values"].values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, np.ndarray):
                    found.append(item)
                elif isinstance(item, bytes):
                    try:
                        found.append(np.load(io.BytesIO(item), allow_pickle=False))
                    except (ValueError, OSError, EOFError):
                        pass  # not an array (a public key, a ciphertext)
    return found


def _reveals(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """True when ``candidate`` is ``reference`` up to an affine map (a scale and an offset, e.g.
    a quantisation) or close to it: |Pearson correlation| of 0.5 or more (0.999 for fewer than 256
    values, where chance correlations of unrelated vectors reach 0.5)."""
    if candidate.size != reference.size:
        return False
    a, b = candidate.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    if np.allclose(a, b, atol=1e-6):
        return True
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return denominator > 0 and abs(float((a * b).sum()) / denominator) >= (0.5 if a.size >= 256 else 0.999)


@pytest.mark.slow
def test_coordinator_gets_the_mean_of_the_site_updates_and_never_one_of_them(tmp_path, monkeypatch):
    paths = make_sites(tmp_path / "fed")[:SITES]
    base = tiny_config(paths, rounds=ROUNDS)
    data = base.model_dump(exclude={"aggregation"})  # left to its default
    config = TrainConfig.model_validate({**data, "mode": "parallel", "weighting": "equal", "secure_aggregation": True})
    assert config.aggregation == "mean"  # the default median gives way to the mean
    kept, inbox = tmp_path / "kept", tmp_path / "inbox"
    kept.mkdir(), inbox.mkdir()
    use_faulty_executors(monkeypatch)  # no faults: only record_kept, the reference
    monkeypatch.setenv(KEPT_ENV, str(kept))
    monkeypatch.setenv(INBOX_ENV, str(inbox))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SPY), os.environ.get("PYTHONPATH", "")]))
    with LoopbackFederation(config, tmp_path / "run", paths, fast_settings(max_update_norm=MAX_NORM)) as federation:
        federation.start()
        assert faulty_executors(federation.sites.values())
        summary = federation.wait(timeout=300)
        out = federation.out
    assert [s["reason"] for s in summary["skipped"]] == []

    # the reference: each site's kept (clipped) update, per round
    visits = [r for r in RunFolder(out).read_metrics() if r["kind"] == "visit"]
    assert len(visits) == ROUNDS * len(config.sites) and all("secure_mean_norm" in r and "update_norm" not in r for r in visits)
    updates = {(r["round"], r["site"]): [a for name, a in sorted(np.load(kept / f"{r['site']}-visit-{r['visit']}.npz").items())
                                         if name != "weight"] for r in visits}
    start = initial_state(config, {s: LabelSchema(task="binary", classes=("x",)) for s in config.sites})
    teacher_model, student_model = start.teacher, start.student
    keys = [k for k, v in start.student.state_dict().items() if v.dtype.is_floating_point]
    tolerance = quantisation_tolerance(len(config.sites), MAX_NORM, float(len(config.sites)))  # equal weights: ratio 1 each
    student, teacher = start.student.state_dict(), start.teacher.state_dict()
    for rnd in range(ROUNDS):
        site_updates = [updates[rnd, s] for s in config.sites]
        for update in site_updates:
            assert np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in update)) <= MAX_NORM * (1 + 1e-5)  # clipped
        assert max(float(np.abs(site_updates[0][i] - site_updates[1][i]).max()) for i in range(len(keys))) > 1000 * tolerance
        mean = [np.mean([u[i].astype(np.float64) for u in site_updates], axis=0) for i in range(len(keys))]
        student = {k: (v.double() + torch.as_tensor(mean[keys.index(k)]).reshape(v.shape)).float() if k in keys else v
                   for k, v in student.items()}
        student_model.load_state_dict(student)
        ema_update(teacher_model, student_model, next(r["momentum"] for r in visits if r["round"] == rnd))
        teacher = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    final_student, final_teacher = load_ark_model(out, "student").state_dict(), load_ark_model(out, "teacher").state_dict()
    error = max(float((final_student[k].double() - student[k].double()).abs().max()) for k in keys)
    print(f"\nstudent vs the plain mean of the sites' updates: largest difference {error:.2e} "
          f"(quantisation tolerance {ROUNDS * tolerance:.2e}); secure mean norms {[r['secure_mean_norm'] for r in visits]}")
    for key in keys:
        scale = float(student[key].abs().max()) + 1.0
        assert float((final_student[key].double() - student[key].double()).abs().max()) <= ROUNDS * tolerance + 1e-6 * scale, key
        assert float((final_teacher[key].double() - teacher[key].double()).abs().max()) <= ROUNDS * tolerance + 1e-6 * scale, key

    # what the ServerApp received: never a model array, never anything that reveals one site's update
    entries = [pickle.loads(p.read_bytes()) for p in sorted(inbox.glob("*.pkl"))]
    masked = [e for e in entries if CONFIGS in e["records"] and Key.MASKED_PARAMETERS in e["records"][CONFIGS]["values"]]
    assert len(masked) == ROUNDS * len(config.sites)  # the spy saw every masked vector
    assert all(not rec["values"] for e in entries for rec in e["records"].values() if rec["kind"] == "arrays")
    references = [a for update in updates.values() for a in update if a.size >= MIN_SIZE]
    references += [np.concatenate([a.ravel() for a in update]) for update in updates.values()]
    assert _reveals(references[0], references[0]) and _reveals(np.round(references[0] * 1e6 + 7), references[0])  # the check works
    payloads = [p for e in entries for p in _numeric_payloads(e) if p.size >= MIN_SIZE]
    assert len(payloads) >= ROUNDS * len(config.sites) * len(keys) // 2
    leaks = [(p.shape, r.shape) for p in payloads for r in references if _reveals(p, r)]
    assert leaks == []
