"""Issue 8 items 4-6 end to end, over real Flower processes on 127.0.0.1 (one federation, two runs).

- policy: a coordinator asking for batch size 1, a test-split evaluation or an image size above a
  site's limit is refused by that site with the policy key; the refusal is reported (not
  retried) and the run goes on with the other sites and finishes;
- bad replies: sites that return NaN weights, a wrongly sized student, no student, an absurd
  ``num_examples`` or a reserved metric name (faults injected at the site from the test: the sites
  run ``tests/faulty_site_executor.py``, see ``tests/site_hooks.py``) are skipped, the teacher stays
  finite, the run finishes;
- an error carrying a Windows path with spaces and a MIMIC-style ``p10000032\\s50414267`` id leaves
  the site as ``data_error`` only: not in the Flower reply the coordinator logged, the run folder,
  or the site's outbox; the site's own log keeps the full text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from arkfed.federation import messages as m
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.site.heads import read_outbox
from arkfed.model.weights import load_ark_model
from arkfed.run.folder import RunFolder
from arkfed.spec import ModelSpec
from federation_fixtures import fast_settings, make_sites, tiny_config
from site_hooks import FAULTS_ENV, faulty_executors, use_faulty_executors

RUN_TIMEOUT = 300.0
NIH, CHEXPERT, SHENZHEN = "demo-nih", "demo-chexpert", "demo-shenzhen"
PERMISSIVE = {"min_batch_size": 1, "min_steps_per_visit": 1, "evaluate_splits": ["val", "test"]}

pytestmark = pytest.mark.slow


def _set_policies(paths: dict[str, Path], policies: dict[str, dict]) -> None:
    """Rewrite the sites' YAML policies (each request reads its site's YAML afresh)."""
    for name, path in paths.items():
        data = yaml.safe_load(path.read_text())
        data["policy"] = policies[name]
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def _inbox(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "inbox.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("policyfed")
    paths = make_sites(root)
    faults = root / "faults.json"
    faults.write_text("{}")
    with pytest.MonkeyPatch.context() as mp:  # the site processes inherit these
        use_faulty_executors(mp)
        mp.setenv(FAULTS_ENV, str(faults))
        by_name = {yaml.safe_load(p.read_text())["name"]: p for p in paths}
        _set_policies(by_name, {
            NIH: {"min_steps_per_visit": 1},  # otherwise the defaults: batch >= 16, val only
            CHEXPERT: PERMISSIVE | {"max_image_size": 16},
            SHENZHEN: PERMISSIVE | {"release_head": True},  # its heads go to the coordinator with the last evaluation
        })
        # a ViT (no BatchNorm) so that the one site that accepts batches of one can train on them
        vit = ModelSpec(model="test_vit", img_size=32, projector_dim=16)
        config = tiny_config(paths, rounds=1, batch_size=1).model_copy(update={"eval_split": "test", "model": vit})
        fed = LoopbackFederation(config, root / "run-policy", paths, fast_settings(), secure=False)
        try:
            fed.start()
            assert faulty_executors(fed.sites.values())
            fed.paths, fed.faults = by_name, faults
            yield fed
        finally:
            fed.stop()


def test_requests_outside_a_sites_policy_are_refused_reported_and_the_run_goes_on(federation):
    summary = federation.wait(timeout=RUN_TIMEOUT)
    out = federation.out
    skipped = {(s["site"], s["stage"]): s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {(NIH, "visit"), (NIH, "evaluation"), (CHEXPERT, "visit"), (CHEXPERT, "evaluation")}
    assert skipped[NIH, "visit"] == "policy_refused: min_batch_size: batch size 1 < 16"
    assert skipped[NIH, "evaluation"] == "policy_refused: evaluate_splits: split 'test' is not in ['val']"
    assert skipped[CHEXPERT, "visit"] == skipped[CHEXPERT, "evaluation"] == "policy_refused: max_image_size: image size 32 > 16"
    records = RunFolder(out).read_metrics()
    assert [(r["site"], r["visit"]) for r in records if r["kind"] == "visit"] == [(SHENZHEN, 2)]  # the others went on
    assert {(r["site"], r["split"]) for r in records if r["kind"] == "eval"} == {(SHENZHEN, "test")}
    assert [r["round"] for r in records if r["kind"] == "round"] == [0]
    errors = [e for e in _inbox(out) if "error" in e]
    assert len(errors) == 4 and all(e["error"]["code"] == 100 for e in errors)  # refused once each: never retried
    log = (out / "logs" / "serverapp.log").read_text()  # the coordinator's warnings
    assert "visit in round 1 skipped: policy_refused: min_batch_size" in log and "policy_refused: max_image_size" in log
    for name, key in ((NIH, "min_batch_size"), (CHEXPERT, "max_image_size")):
        state = yaml.safe_load(federation.paths[name].read_text())["state_dir"]
        assert f"policy_refused: {key}" in (Path(state) / "logs" / "site-errors.log").read_text()
    # issue 17: the one site whose policy says release_head sent its heads once, at the end; they are its own
    from arkfed.federation.protocol import FederationSettings
    from arkfed.model.weights import load_heads, read_safetensors

    assert set(load_heads(out / "heads")) == set(load_heads(out / "teacher-heads")) == {SHENZHEN}
    state = Path(yaml.safe_load(federation.paths[SHENZHEN].read_text())["state_dir"])
    kept = read_safetensors(state / "runs" / FederationSettings.read(out).run_uid / "head.safetensors")[0]
    sent = read_safetensors(out / "heads" / f"{SHENZHEN}.safetensors")[0]
    assert kept.keys() == sent.keys() and all(torch.equal(kept[k], sent[k]) for k in kept)


def test_bad_replies_are_skipped_the_teacher_stays_finite_and_errors_leave_no_paths_or_ids(federation, tmp_path):
    federation.wait(timeout=RUN_TIMEOUT)  # the policy run, if this test runs alone
    paths = federation.paths
    _set_policies(paths, {name: {"min_batch_size": 2, "min_steps_per_visit": 1} for name in paths})
    # parallel mode (the average must not take a bad reply), nih, chexpert, shenzhen: visits 0-5 over
    # two rounds; only visit 2 is honest (the cyclic path checks replies in the policy run above)
    federation.faults.write_text(json.dumps({
        f"{NIH}:visit:0": "nan", f"{CHEXPERT}:visit:1": "shape", f"{NIH}:visit:3": "missing",
        f"{CHEXPERT}:visit:4": "examples", f"{SHENZHEN}:visit:5": "error", f"{NIH}:eval": "site_metric",
    }))
    # the policy run's model: the coordinator's gateway limits bodies to what its first run's model needs
    config = tiny_config(list(paths.values()), rounds=2).model_copy(
        update={"mode": "parallel", "model": ModelSpec(model="test_vit", img_size=32, projector_dim=16)})
    out = tmp_path / "run-faults"
    federation.submit(config, out, fast_settings())
    summary = federation.wait(timeout=RUN_TIMEOUT)

    skipped = {(s["site"], s["stage"], s["visit"] if s["stage"] == "visit" else s["round"]): s["reason"]
               for s in summary["skipped"]}
    assert set(skipped) == {(NIH, "visit", 0), (CHEXPERT, "visit", 1), (NIH, "visit", 3), (CHEXPERT, "visit", 4),
                            (SHENZHEN, "visit", 5), (NIH, "evaluation", 0), (NIH, "evaluation", 1)}
    assert "rejected reply: returned student: non-finite values" in skipped[NIH, "visit", 0]
    assert "rejected reply: returned student arrays do not match the model" in skipped[CHEXPERT, "visit", 1]
    assert skipped[NIH, "visit", 3] == "rejected reply: visit reply lacks 'student'"
    assert "num_examples 1000000000 exceeds what the site declared (at most 13)" in skipped[CHEXPERT, "visit", 4]
    assert skipped[SHENZHEN, "visit", 5] == "data_error"
    assert "metric 'site' is reserved" in skipped[NIH, "evaluation", 1]
    records = RunFolder(out).read_metrics()
    assert [(r["site"], r["visit"]) for r in records if r["kind"] == "visit"] == [(SHENZHEN, 2)]
    assert [r["round"] for r in records if r["kind"] == "round"] == [0, 1]  # the run finished
    assert {r["site"] for r in records if r["kind"] == "eval"} == {CHEXPERT, SHENZHEN}

    for model in (load_ark_model(out, "teacher"), load_ark_model(out, "student"), RunFolder(out).load_checkpoint().teacher):
        assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.dtype.is_floating_point)
    assert (out / "checkpoint.prev.safetensors").is_file()

    # the error with a Windows path and MIMIC ids: a category at the coordinator, the full text at the site
    leaks = ("Jane Doe", "p10000032", "s50414267", "C:\\", "02aa804e")
    errors = [e["error"] for e in _inbox(out) if "error" in e]
    assert {"code": 101, "reason": "data_error"} in errors  # the Flower reply as it arrived
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".safetensors"):
        leaked = [w for w in leaks if w.encode() in path.read_bytes()]  # inbox, logs, metrics, status, summary
        assert not leaked, f"{path.relative_to(out)} holds {leaked}"
    state = Path(yaml.safe_load(paths[SHENZHEN].read_text())["state_dir"])
    assert not [w for w in leaks if w in json.dumps(read_outbox(state))]
    local = (state / "logs" / "site-errors.log").read_text()
    assert "C:\\Users\\Jane Doe\\MIMIC CXR\\files\\p10\\p10000032\\s50414267" in local
    sent = [e for e in read_outbox(state) if e.get("error")]
    assert sent and all(e["error"] == {"code": 101, "reason": "data_error"} for e in sent)
    assert m.VISIT in {e["message_type"] for e in sent}


def test_a_spent_privacy_budget_refuses_the_visit_at_the_site_and_the_federated_run_goes_on(federation, tmp_path):
    """Issue 18: the same DP visit code over Flower: one site's budget is spent (charged by an earlier
    run on its data), another trains with DP and reports epsilon, the third has no privacy block."""
    from arkfed.site.budget import BudgetLedger
    from arkfed.site.policy import PrivacyPolicy

    federation.wait(timeout=RUN_TIMEOUT)  # the runs above, if they ran
    federation.faults.write_text("{}")  # the sites answer honestly again (the fault run above set faults)
    paths = federation.paths
    spent = {"epsilon": 1.0, "max_noise_multiplier": 1.0}
    _set_policies(paths, {NIH: PERMISSIVE | {"privacy": spent}, CHEXPERT: PERMISSIVE | {"privacy": {"epsilon": 50.0}},
                          SHENZHEN: PERMISSIVE})
    nih_state = Path(yaml.safe_load(paths[NIH].read_text())["state_dir"])
    BudgetLedger(nih_state, PrivacyPolicy(epsilon=1.0), 100).charge(0.05, 20, visits_left=1, label="an earlier run")
    config = tiny_config(list(paths.values()), rounds=1).model_copy(
        update={"model": ModelSpec(model="test_vit", img_size=32, projector_dim=16)})  # LayerNorm: no conversion needed
    out = tmp_path / "run-dp"
    federation.submit(config, out, fast_settings())
    summary = federation.wait(timeout=RUN_TIMEOUT)

    skipped = {(s["site"], s["stage"]): s["reason"] for s in summary["skipped"]}
    assert list(skipped) == [(NIH, "visit")]
    assert re.fullmatch(r"policy_refused: privacy\.epsilon: \d\.\d\d of 1\.00 spent, this visit needs \d+\.\d\d", skipped[NIH, "visit"])
    visits = {r["site"]: r for r in RunFolder(out).read_metrics() if r["kind"] == "visit"}
    assert set(visits) == {CHEXPERT, SHENZHEN}
    assert 0 < visits[CHEXPERT]["epsilon_spent"] <= visits[CHEXPERT]["epsilon_budget"] == 50.0
    assert "epsilon_spent" not in visits[SHENZHEN]
    status = json.loads((out / "federation-status.json").read_text())
    assert status["sites"][CHEXPERT]["last_metrics"]["epsilon_spent"] == visits[CHEXPERT]["epsilon_spent"]
    assert "skipped: policy_refused: privacy.epsilon" in (out / "logs" / "serverapp.log").read_text()
    assert "policy_refused: privacy.epsilon" in (nih_state / "logs" / "site-errors.log").read_text()
    assert "refused visit" in (nih_state / "logs" / "privacy.log").read_text()
