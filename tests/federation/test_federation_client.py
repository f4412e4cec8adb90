"""The site's ClientApp, called in-process with real Flower messages: identification, schema refusal,
the visit (same result as local mode), heads that survive a SuperNode restart, metrics-only evaluation."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import yaml
from flwr.app import Context, Message, Metadata, RecordDict

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.tasks import evaluate_site_models, visit_site
from arkfed.federation import messages as m
from arkfed.federation.site.client_app import SITE_FAILED, SITE_REFUSED, app
from arkfed.federation.site.heads import read_outbox
from arkfed.run.plan import plan_visits
from arkfed.run.start import initial_state
from arkfed.schedules import ema_update
from arkfed.site.load import load_site
from federation_fixtures import make_sites, max_abs_diff, tiny_config

RUN_UID = "testrun0001"


@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedclient")
    path = make_sites(root, images=12)[0]  # the ChestX-ray14-layout demo site
    data = yaml.safe_load(path.read_text())  # evaluation parity with local mode, per-class AUCs included
    data["policy"] |= {"per_class_metrics": True, "min_class_positives": 1, "min_class_negatives": 1}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    site = load_site(path)
    config = tiny_config([path], rounds=2)
    return path, site, config


def _context(path, site, state=None) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site": site.name, "site-config": str(path)},
                   state=state if state is not None else RecordDict(), run_config={})


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="0", created_at=time.time(), ttl=600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def _request(site, state, config, head_from, schema=None, pending=1.0, **extra) -> RecordDict:
    schema = schema or site.schema
    request = m.json_record(run_uid=RUN_UID, spec=state.student.spec, settings=config.settings, head_from=head_from,
                            schemas={site.name: schema.model_dump(mode="json")}, pending=pending, **extra)
    arrays = {m.STUDENT: m.model_record(state.student), m.TEACHER: m.model_record(state.teacher)}
    if head_from == m.NO_HEAD:
        arrays[m.HEAD] = m.model_record(state.heads[site.name])
    return m.request_content(request, **arrays)


def test_hello_names_the_site_and_its_schema(site_setup):
    path, site, _ = site_setup
    request = m.json_record(run_uid=RUN_UID, sites=[site.name], schemas={})
    reply = app(_message(m.request_content(request), m.HELLO), _context(path, site))
    assert not reply.has_error()
    info = reply.content[m.SITE]
    assert m.read_json(info, "name") == site.name and m.read_json(info, "member") is True
    assert m.read_json(info, "schema") == site.schema.model_dump(mode="json")
    assert int(reply.content[m.METRICS]["train_size"]) == len(site.splits["train"])


def test_schema_differing_from_the_runs_record_is_refused_naming_both(site_setup):
    path, site, _ = site_setup
    recorded = site.schema.with_policies(uncertain="zeros", missing="ignore")
    request = m.json_record(run_uid=RUN_UID, sites=[site.name], schemas={site.name: recorded.model_dump(mode="json")})
    reply = app(_message(m.request_content(request), m.HELLO), _context(path, site))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    reason = reply.error.reason
    assert site.schema.describe() in reason and recorded.describe() in reason
    assert "refusing to join" in reason and str(site.config.root) not in reason


def test_visits_match_local_mode_and_the_head_survives_a_supernode_restart(site_setup):
    path, site, config = site_setup
    fed = initial_state(config, {site.name: site.schema})
    local = copy.deepcopy(fed)
    local_heads = SiteHeads.fresh(local.heads[site.name])
    plans = plan_visits(config)

    # visit 0: the site starts from the initial head sent along; nothing but student + metrics comes back
    context = _context(path, site)
    reply = app(_message(_request(site, fed, config, m.NO_HEAD, plan=plans[0]), m.VISIT), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {m.STUDENT, m.METRICS}
    visit_site(ArkPair(local.student, local.teacher, local_heads), site, config.settings, plans[0])
    m.load_model_record(fed.student, reply.content[m.STUDENT])
    assert max_abs_diff(fed.student, local.student) < 1e-6
    sent = read_outbox(site.config.local_state_dir)[-1]
    assert sent["message_type"] == m.VISIT and set(sent["content"]) == {m.STUDENT, m.METRICS}
    assert sent["content"][m.METRICS]["values"]["loss"] == reply.content[m.METRICS]["loss"]
    ema_update(fed.teacher, fed.student, plans[0].momentum)
    ema_update(local.teacher, local.student, plans[0].momentum)

    # the SuperNode restarts: its context state is gone, the head comes back from local_state_dir
    fresh = _context(path, site)
    reply = app(_message(_request(site, fed, config, 0, plan=plans[1]), m.VISIT), fresh)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    visit_site(ArkPair(local.student, local.teacher, local_heads), site, config.settings, plans[1])
    m.load_model_record(fed.student, reply.content[m.STUDENT])
    assert max_abs_diff(fed.student, local.student) < 1e-6
    stored = site.config.local_state_dir / "runs" / RUN_UID
    assert (stored / "head-v00001.safetensors").is_file() and (stored / "head.safetensors").is_file()
    from arkfed.model.weights import load_head

    head, teacher_head = load_head(stored / "head.safetensors"), load_head(stored / "teacher-head.safetensors")
    assert torch.allclose(head.weight, local_heads.student.weight, atol=1e-6)
    assert torch.allclose(teacher_head.weight, local_heads.teacher.weight, atol=1e-6)
    assert not torch.allclose(teacher_head.weight, head.weight)  # an EMA, not a copy
    assert "arkfed.head.head" in fresh.state  # and the node's context state holds it for the next message

    # evaluation: metrics only, equal to local evaluation with the site's head
    reply = app(_message(_request(site, fed, config, 1, split="val"), m.EVALUATE), fresh)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {m.STUDENT, m.TEACHER}
    assert all(type(r).__name__ == "MetricRecord" for r in reply.content.values())
    local_results = evaluate_site_models(ArkPair(local.student, local.teacher, local_heads), site, config.settings, "val")
    for label in (m.STUDENT, m.TEACHER):
        expected = local_results[label]
        got = m.eval_result(reply.content[label], site.schema.classes)
        assert list(got) == list(expected) and got["num_examples"] == expected["num_examples"]
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
        assert got["mean_auc"] == pytest.approx(expected["mean_auc"], abs=1e-6, nan_ok=True)
        sent = {name for name, auc in expected["auc"].items() if auc == auc}  # every class with an AUC (NaN never leaves)
        assert set(got["auc"]) == sent and sent
        assert all(got["auc"][name] == pytest.approx(expected["auc"][name], abs=1e-6) for name in sent)


def test_a_head_version_the_site_never_stored_is_refused(site_setup):
    path, site, config = site_setup
    state = initial_state(config, {site.name: site.schema})
    plan = plan_visits(config)[1]
    reply = app(_message(_request(site, state, config, 57, plan=plan), m.VISIT), _context(path, site))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert reply.error.reason.startswith("head_missing:") and "no head from visit 57" in reply.error.reason
    assert str(site.config.local_state_dir) not in reply.error.reason  # the folder stays in the site's log


def test_failures_become_error_replies_and_everything_sent_is_logged(site_setup):
    path, site, config = site_setup
    state = initial_state(config, {site.name: site.schema})
    wrong = plan_visits(config)[0].model_copy(update={"site": "someone-else"})
    before = len(read_outbox(site.config.local_state_dir))
    reply = app(_message(_request(site, state, config, m.NO_HEAD, plan=wrong), m.VISIT), _context(path, site))
    assert reply.has_error() and reply.error.code == SITE_REFUSED and "planned for site 'someone-else'" in reply.error.reason
    broken = _request(site, state, config, m.NO_HEAD, plan=plan_visits(config)[0])
    del broken[m.STUDENT]
    reply = app(_message(broken, m.VISIT), _context(path, site))
    assert reply.has_error() and reply.error.code == SITE_FAILED
    log = read_outbox(site.config.local_state_dir)
    assert len(log) == before + 2 and all("error" in entry for entry in log[-2:])
    assert (site.config.local_state_dir / "logs" / "site-errors.log").is_file()
