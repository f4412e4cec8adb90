"""Site policy (issue 8 item 4): check_request's rules, the YAML block, the ClientApp refusing
before it loads anything, the operator's approval, and per-class metrics kept at the site."""

from __future__ import annotations

import json
import math
import stat
import threading

import pytest
from typer.testing import CliRunner

from arkfed.config import TrainSettings
from arkfed.data.loaders import visit_draws
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.messages import SITE_REFUSED
from arkfed.federation.site.client_app import app
from arkfed.federation.site.heads import read_outbox
from arkfed.run.plan import plan_visits
from arkfed.run.start import initial_state
from arkfed.site.config import load_site_config
from arkfed.site.load import load_site
from arkfed.site.policy import SitePolicy, approve_run, approved_runs, check_request, pending_runs, planned_steps, run_fingerprint
from arkfed.spec import ModelSpec
from federation_fixtures import make_sites, tiny_config
from site_messages import RUN_UID, context, message, request, set_policy

SPEC = ModelSpec(model="test_resnet", img_size=224)


def _visit(policy=None, train_size=None, spec=SPEC, **settings):
    options = {"batch_size": 32} | settings
    return check_request(policy or SitePolicy(), "visit", TrainSettings(**options), spec=spec, train_size=train_size)


def test_defaults_refuse_what_would_leak_and_name_the_key():
    assert _visit() is None and _visit(train_size=1000) is None
    assert str(_visit(batch_size=1)) == "policy_refused: min_batch_size: batch size 1 < 16"
    assert str(_visit(max_steps_per_visit=2)) == "policy_refused: min_steps_per_visit: 2 steps per visit < 10"
    assert _visit(spec=ModelSpec(model="test_resnet", img_size=4096)).key == "max_image_size"
    assert _visit(local_epochs=50).key == "max_epochs_per_visit"
    assert _visit(batch_size=4096).key == "max_batch_size"
    # counted as the site would really train: a batch never exceeds the training split
    refusal = _visit(train_size=10)
    assert refusal.key == "min_batch_size" and "batch size 10 < 16 (the training split has 10 images)" in refusal.reason
    assert str(_visit(train_size=100)) == "policy_refused: min_steps_per_visit: 3 steps per visit < 10"
    assert _visit(train_size=100, local_epochs=4) is None

    def evaluate(split, p=None):
        return check_request(p or SitePolicy(), "evaluate", TrainSettings(batch_size=1), split=split, spec=SPEC)

    assert evaluate("val") is None  # an evaluation takes no gradient: batch size does not matter
    assert str(evaluate("test")) == "policy_refused: evaluate_splits: split 'test' is not in ['val']"
    assert evaluate("test", SitePolicy(evaluate_splits=["val", "test"])) is None


@pytest.mark.parametrize("n,batch,epochs,max_steps", [(100, 16, 1, None), (5, 8, 2, None), (100, 16, 3, 7), (33, 32, 1, 5)])
def test_planned_steps_are_the_steps_a_visit_takes(n, batch, epochs, max_steps):
    settings = TrainSettings(batch_size=batch, local_epochs=epochs, max_steps_per_visit=max_steps)
    real_batch, steps = planned_steps(settings, n)
    assert real_batch * steps == len(visit_draws(n, batch, epochs, seed=1, max_steps=max_steps))


def test_the_policy_block_of_a_site_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndataset: chestxray14\nroot: .\npolicy:\n  min_batch_size: 64\n  evaluate_splits: [val, test]\n")
    policy = load_site_config(path).policy
    assert policy.min_batch_size == 64 and policy.evaluate_splits == ["val", "test"] and policy.min_steps_per_visit == 10
    path.write_text("name: s\ndataset: chestxray14\nroot: .\npolicy:\n  min_batchsize: 64\n")
    with pytest.raises(ArkfedError, match=r"s.yaml: field 'policy.min_batchsize': unknown key"):
        load_site_config(path)
    path.write_text("name: s\ndataset: chestxray14\nroot: .\npolicy:\n  evaluate_splits: [holdout]\n")
    with pytest.raises(ArkfedError, match=r"field 'policy.evaluate_splits.0'"):
        load_site_config(path)


@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("policysite")
    path = make_sites(root, images=24)[2]  # the Shenzhen-layout demo site
    site = load_site(path)
    config = tiny_config([path], rounds=1)
    state = initial_state(config, {site.name: site.schema})
    return path, site, config, state


def _call(path, site, content, kind=m.VISIT):
    return app(message(content, kind), context(path, site.name))


def test_the_clientapp_refuses_before_loading_anything(site_setup):
    path, site, config, state = site_setup
    set_policy(path, {})  # the defaults
    plan = plan_visits(config)[0]
    store = site.config.local_state_dir / "runs" / RUN_UID
    zero_steps = json.dumps(config.settings.model_dump(mode="json") | {"max_steps_per_visit": 0})  # arkfed would not send it
    cases = [
        (request(site, state, config.settings.model_copy(update={"batch_size": 1}), plan=plan),
         "policy_refused: min_batch_size: batch size 1 < 16"),
        (request(site, state, config.settings, raw={"settings": zero_steps}, plan=plan),
         "invalid_request: settings.max_steps_per_visit: Input should be greater than or equal to 1"),
        (request(site, state, config.settings.model_copy(update={"batch_size": 16, "max_steps_per_visit": 20}),
                 spec=state.student.spec.model_copy(update={"img_size": 100_000}), plan=plan),
         "policy_refused: max_image_size: image size 100000 > 1024"),
    ]
    for content, reason in cases:
        reply = _call(path, site, content)
        assert reply.has_error() and reply.error.code == SITE_REFUSED and reply.error.reason == reason
    reply = _call(path, site, request(site, state, config.settings, split="test"), m.EVALUATE)
    assert reply.error.reason == "policy_refused: evaluate_splits: split 'test' is not in ['val']"
    assert not store.exists()  # no head was ever stored: nothing ran
    sent = read_outbox(site.config.local_state_dir)[-4:]
    assert sent[0]["error"]["reason"].startswith("policy_refused: min_batch_size")
    log = (site.config.local_state_dir / "logs" / "site-errors.log").read_text()
    assert "refused by the site's policy: policy_refused: max_image_size" in log
    for private in ("outbox.jsonl", "logs/site-errors.log"):  # what the site logs is its own: 0600
        assert stat.S_IMODE((site.config.local_state_dir / private).stat().st_mode) == 0o600, private


def test_manual_approval_waits_for_the_operator(site_setup):
    path, site, config, state = site_setup
    set_policy(path, {"min_batch_size": 2, "min_steps_per_visit": 1, "approval": "manual", "approval_timeout": 1})
    plan = plan_visits(config)[0]
    content = request(site, state, config.settings, plan=plan)
    fingerprint = run_fingerprint(RUN_UID, state.student.spec, config.settings)
    reply = _call(path, site, content)
    assert reply.error.code == SITE_REFUSED
    assert reply.error.reason == f"policy_refused: approval: run {fingerprint} was not approved within 1 s"
    waiting = pending_runs(site.config.local_state_dir)
    assert [p["fingerprint"] for p in waiting] == [fingerprint] and waiting[0]["settings"]["batch_size"] == 8
    # the operator approves while the next request waits (as `arkfed site --approve` from another terminal)
    set_policy(path, {"min_batch_size": 2, "min_steps_per_visit": 1, "approval": "manual", "approval_timeout": 60})
    timer = threading.Timer(0.5, approve_run, (site.config.local_state_dir, fingerprint))
    timer.start()
    reply = _call(path, site, request(site, state, config.settings, plan=plan))
    timer.join()
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert m.STUDENT in reply.content and pending_runs(site.config.local_state_dir) == []
    other = run_fingerprint(RUN_UID, state.student.spec, config.settings.model_copy(update={"lr": 0.5}))
    assert other != fingerprint and other not in approved_runs(site.config.local_state_dir)


def test_arkfed_site_approve_records_the_fingerprint(site_setup):
    from arkfed.cli import app as cli

    path, site, _, _ = site_setup
    result = CliRunner().invoke(cli, ["site", "--config", str(path), "--approve", "0123456789ABCDEF"])
    assert result.exit_code == 0, result.output
    assert "0123456789abcdef" in approved_runs(site.config.local_state_dir)
    result = CliRunner().invoke(cli, ["site", "--config", str(path), "--approve", "../../etc"])
    assert result.exit_code != 0 and "not a run fingerprint" in str(result.exception or result.output)


def test_per_class_metrics_stay_at_the_site_when_its_policy_says_so(site_setup):
    path, site, config, state = site_setup
    small = {"min_class_positives": 1, "min_class_negatives": 1}  # the tiny val split (3 images) has both labels once
    cases = [({}, False), ({"per_class_metrics": True} | small, True), ({"per_class_metrics": False} | small, False),
             ({"per_class_metrics": True}, False)]  # on, but fewer than the default 10 positives and negatives
    for extra, allowed in cases:
        set_policy(path, {"min_batch_size": 2, "min_steps_per_visit": 1} | extra)
        reply = _call(path, site, request(site, state, config.settings, split="val"), m.EVALUATE)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        record = reply.content[m.STUDENT]
        keys = set(record.keys())
        assert "mean_auc" in keys and "loss" in keys
        assert any(k.startswith(m.AUC_PREFIX) for k in keys) == allowed, extra
        floats = [v for v in record.values() if isinstance(v, float) and math.isfinite(v)]
        assert floats and all(round(v, 2) == v for v in floats)  # metric_decimals: 2


def test_arkfed_site_shows_each_run_waiting_for_approval_once(tmp_path):
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from arkfed.cli.federation import _show_pending_runs
    from arkfed.site.policy import wait_for_approval

    settings = TrainSettings(batch_size=32, max_steps_per_visit=50)
    fingerprint = run_fingerprint("run42", SPEC, settings)
    details = {"run_uid": "run42", "request": "visit", "split": None, "model": SPEC.model_dump(mode="json"),
               "settings": settings.model_dump(mode="json")}
    refusal = wait_for_approval(tmp_path, fingerprint, details, timeout=0.05, poll=0.01)
    assert refusal.key == "approval"
    out = io.StringIO()
    node = SimpleNamespace(name="mimic", state_dir=tmp_path, config_path=tmp_path / "mimic.yaml")
    shown: set[str] = set()
    console = Console(file=out, width=200, highlight=False)
    _show_pending_runs(node, console, shown)
    _show_pending_runs(node, console, shown)
    text = out.getvalue()
    assert text.count(f"fingerprint {fingerprint}") == 1 and "batch 32" in text and "max steps per visit 50" in text
    assert f"arkfed site --config {tmp_path / 'mimic.yaml'} --approve {fingerprint}" in text
    approve_run(tmp_path, fingerprint)
    assert pending_runs(tmp_path) == [] and wait_for_approval(tmp_path, fingerprint, details, timeout=0.05) is None


def test_the_demo_recipe_passes_the_default_policy_on_the_demo_sites_and_the_demo_yaml_allows_trial_runs():
    from arkfed.config import TrainConfig
    from arkfed.demo.generate import DEMO_POLICY, DEMO_SITES
    from arkfed.run.recipes import apply_recipe

    config = TrainConfig.model_validate(apply_recipe("demo", {"sites": ["a"]}))
    for site in DEMO_SITES:  # at least half of every demo site is its training split
        refusal = check_request(SitePolicy(), "visit", config.settings, spec=config.model, train_size=site.images // 2)
        assert refusal is None, (site.name, str(refusal))
    import yaml

    demo = SitePolicy.model_validate(yaml.safe_load("\n".join(DEMO_POLICY))["policy"])
    tiny = TrainSettings(batch_size=8, max_steps_per_visit=2)  # tests/federation_fixtures.tiny_config on 16 images
    assert check_request(demo, "visit", tiny, spec=ModelSpec(model="test_resnet", img_size=32), train_size=5) is None
    small = ModelSpec(model="test_resnet", img_size=32)
    assert check_request(SitePolicy(), "visit", tiny, spec=small, train_size=5).key == "min_batch_size"
