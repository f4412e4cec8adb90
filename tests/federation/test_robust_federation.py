"""One bad site cannot take the model (issue 21), over real Flower processes on 127.0.0.1.

A cyclic run of the three demo sites (4 rounds) in which demo-chexpert declares a billion training
images in its hello, trains honestly at visit 1, then reverses its visit-4 update x 2.4, returns its
visit-7 student x 1e6 and claims a billion examples at visit 10, and reports an AUC of 1e9 and a
loss of -5 at every evaluation (the
faults are injected from the test: the sites run ``tests/faulty_site_executor.py``, and the
production ClientApp has no hook). The bad replies are refused and reported, the declared size is
capped, the teacher stays close to the honest run's (the same config with in-process sites) and
the run finishes truthfully. Plus: declared sizes are capped and fixed at join (no processes).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from arkfed.data.schema import LabelSchema
from arkfed.federation import messages as m
from arkfed.federation.coordinator import server_app
from arkfed.federation.coordinator.server_app import FlowerSites
from arkfed.federation.coordinator.status import read_status
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.protocol import FederationSettings
from arkfed.model.weights import load_ark_model
from arkfed.run.callbacks import LoopCallback
from arkfed.run.folder import RunFolder
from arkfed.run.local import train_local
from arkfed.run.start import initial_state
from federation_fixtures import fast_settings, make_sites, tiny_config
from site_hooks import FAULTS_ENV, faulty_executors, use_faulty_executors

RUN_TIMEOUT = 420.0
BAD = "demo-chexpert"


def _distance(a, b=None) -> float:
    """||a - b|| (||a|| without ``b``) over the floating-point state."""
    sa = a.state_dict()
    sb = b.state_dict() if b is not None else {k: torch.zeros_like(v) for k, v in sa.items()}
    return math.sqrt(sum(float((sa[k].double() - sb[k].double()).pow(2).sum()) for k in sa if sa[k].dtype.is_floating_point))


@pytest.mark.slow
def test_one_bad_site_is_refused_and_the_teacher_stays_close_to_the_honest_runs(tmp_path, monkeypatch):
    paths = make_sites(tmp_path / "fed")
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({f"{BAD}:hello": "train_size", f"{BAD}:visit:4": "flip", f"{BAD}:visit:7": "scale",
                                  f"{BAD}:visit:10": "examples", f"{BAD}:eval": "auc"}))
    use_faulty_executors(monkeypatch)
    monkeypatch.setenv(FAULTS_ENV, str(faults))  # the site processes inherit it
    config = tiny_config(paths, rounds=4, max_steps_per_visit=None)  # whole epochs: num_examples bounded by the declared size
    assert (config.mode, config.aggregation, config.update_norm_factor) == ("cyclic", "median", 4.0)  # the defaults
    honest_out = tmp_path / "honest"
    train_local(config, honest_out, site_configs=paths)
    with LoopbackFederation(config, tmp_path / "attacked", paths, fast_settings(), secure=False) as federation:
        federation.start()
        assert faulty_executors(federation.sites.values())
        summary = federation.wait(timeout=RUN_TIMEOUT)
        out = federation.out

    skipped = {(s["stage"], s["visit"] if s["stage"] == "visit" else s["round"]): s["reason"] for s in summary["skipped"]}
    print("\nrefused:\n  " + "\n  ".join(f"{stage} {index}: {reason}" for (stage, index), reason in sorted(skipped.items())))
    assert all(s["site"] == BAD for s in summary["skipped"])
    assert set(skipped) == {("visit", 4), ("visit", 7), ("visit", 10)} | {("evaluation", r) for r in range(4)}
    assert "its update points against the site's accepted updates" in skipped["visit", 4]
    assert skipped["visit", 7].startswith("rejected reply: returned student: update norm") and "exceeds the bound" in skipped["visit", 7]
    assert "num_examples 1000000000 exceeds what the site declared (at most 1000000)" in skipped["visit", 10]
    for rnd in (0, 1, 2):  # in round 3 the site no longer has the head of its one accepted visit (it keeps 3 versions)
        assert skipped["evaluation", rnd] == "rejected reply: evaluation of the student: mean_auc 1000000000.0 is outside [0, 1]"
    fed = FederationSettings.read(out)
    assert fed.sizes[BAD]["train"] == fed.max_split_size == 1_000_000  # the hello's billion, capped at join
    status = read_status(out)
    assert status.phase == "finished" and any("capped at max_split_size" in w for w in status.warnings)
    records = RunFolder(out).read_metrics()
    assert [r["visit"] for r in records if r["kind"] == "visit"] == [0, 1, 2, 3, 5, 6, 8, 9, 11]
    assert [r["round"] for r in records if r["kind"] == "round"] == [0, 1, 2, 3]  # the run finished, truthfully
    assert BAD not in {r["site"] for r in records if r["kind"] == "eval"}
    assert "student" not in summary["sites"][BAD] and all(summary["sites"][s]["student"]["mean_auc"] is None or
                                                          0 <= summary["sites"][s]["student"]["mean_auc"] <= 1
                                                          for s in summary["sites"] if s != BAD)

    teacher, honest = load_ark_model(out, "teacher"), load_ark_model(honest_out, "teacher")
    start = initial_state(config, {s: LabelSchema(task="binary", classes=("x",)) for s in config.sites}).teacher
    distance, travelled = _distance(teacher, honest), _distance(honest, start)
    norms = (_distance(honest), _distance(teacher))
    print(f"teacher norm: honest run {norms[0]:.2f}, attacked run {norms[1]:.2f}; distance between them {distance:.3f}; "
          f"the honest teacher moved {travelled:.3f} from its start")
    assert all(bool(torch.isfinite(v).all()) for v in teacher.state_dict().values() if v.dtype.is_floating_point)
    assert distance < travelled  # closer to the honest run than the honest run is to where it started
    assert abs(norms[1] - norms[0]) < 0.05 * norms[0]


class _Recorder(LoopCallback):
    def __init__(self):
        self.warnings = []

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)


def _hello(name: str, sizes: dict[str, int]):
    schema = LabelSchema(task="binary", classes=("x",))
    content = RecordDict({m.SITE: m.json_record(name=name, schema=schema, member=True),
                          m.METRICS: MetricRecord({f"{k}_size": v for k, v in sizes.items()})})
    return SimpleNamespace(content=content)


def test_declared_sizes_are_capped_and_fixed_at_join(tmp_path, monkeypatch):
    fed = FederationSettings(max_split_size=1000, schemas={})
    callbacks = _Recorder()
    sites = FlowerSites(None, tmp_path, fed, callbacks)
    sites.config = SimpleNamespace(sites=["a", "b"])
    answers = {}
    monkeypatch.setattr(server_app, "exchange", lambda grid, messages, *args, **kwargs: {n: answers[n] for n in messages})
    monkeypatch.setattr(server_app, "online_nodes", lambda grid: set())
    monkeypatch.setattr(server_app, "Message", lambda *args, **kwargs: None)  # the hello requests themselves go nowhere
    answers.update({1: _hello("a", {"train": 10**9, "val": 20}), 2: _hello("b", {"train": 30, "val": 10})})
    sites._identify([1, 2], {})
    assert sites.infos["a"].sizes == {"train": 1000, "val": 20} and sites.infos["b"].sizes == {"train": 30, "val": 10}
    assert callbacks.warnings == ["site 'a' declared split sizes {'train': 1000000000, 'val': 20}; capped at max_split_size 1000"]
    answers[3] = _hello("b", {"train": 10**5, "val": 10})  # b's SuperNode restarts and declares more
    sites._identify([3], {})
    assert sites.infos["b"].sizes == {"train": 30, "val": 10} and sites.nodes["b"] == 3
    assert "it keeps those it joined with" in callbacks.warnings[-1]
    fed.sizes = {"a": {"train": 1000, "val": 20}}  # a resumed run: the sizes recorded when the run started
    resumed = FlowerSites(None, tmp_path, fed, _Recorder())
    resumed.config = sites.config
    answers[4] = _hello("a", {"train": 999, "val": 20})
    resumed._identify([4], {})
    assert resumed.infos["a"].sizes == {"train": 1000, "val": 20}
