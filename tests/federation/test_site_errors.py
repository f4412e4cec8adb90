"""Nothing identifying in errors (issue 8 item 6): a failing site sends a code and a fixed
category; its own log keeps the full text. Covers failures in the handlers, around them (Flower's
ClientApp routing) and in Flower's task runtime (the reply guard), and the site's own check that
the student it returns is finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Error, Message

from arkfed.errors import ArkfedError, NonFiniteError
from arkfed.federation import messages as m
from arkfed.federation.site.client_app import SITE_FAILED, SITE_REFUSED, SiteRefusal, app, guard_task_replies, public_error
from arkfed.federation.site.heads import read_outbox
from arkfed.run.plan import plan_visits
from arkfed.run.start import initial_state
from arkfed.site.load import load_site
from federation_fixtures import make_sites, tiny_config
from site_hooks import FAULTS_ENV, LEAKY_ERROR, faulty_app
from site_messages import context, message, request

LEAKS = ("Jane Doe", "p10000032", "s50414267", "C:\\", "02aa804e")


def test_every_failure_maps_to_a_code_and_a_fixed_category():
    cases = [
        (SiteRefusal(f"no head in /srv/state/{'x'}", public="head_missing: visit 3"), (SITE_REFUSED, "head_missing: visit 3")),
        (NonFiniteError("student has NaN"), (SITE_FAILED, "non_finite_update")),
        (NonFiniteError("loss became nan", category="non_finite_loss"), (SITE_FAILED, "non_finite_loss")),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), (SITE_FAILED, "out_of_memory")),
        (MemoryError(), (SITE_FAILED, "out_of_memory")),
        (ArkfedError(r"cannot read C:\Users\Jane Doe\p10000032\s50414267.jpg", site="mimic"), (SITE_FAILED, "data_error")),
        (FileNotFoundError(2, "No such file", "/data/mimic/p10000032/s50414267.dcm"), (SITE_FAILED, "data_error")),
        (KeyError("p10000032"), (SITE_FAILED, "internal_error")),
        (ValueError("patient 10000032 has no study s50414267"), (SITE_FAILED, "internal_error")),
    ]
    for exc, expected in cases:
        assert public_error(exc) == expected, exc


@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("siteerrors")
    path = make_sites(root, images=12)[1]  # the CheXpert-layout demo site
    site = load_site(path)
    config = tiny_config([path], rounds=1)
    return path, site, config, initial_state(config, {site.name: site.schema})


def _no_leaks(text: str) -> list[str]:
    return [w for w in LEAKS if w in text]


def test_an_error_with_a_windows_path_and_mimic_ids_leaves_as_a_category_only(site_setup, tmp_path, monkeypatch):
    path, site, config, state = site_setup
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({f"{site.name}:visit:0": "error"}))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    reply = faulty_app()(message(request(site, state, config.settings, plan=plan_visits(config)[0]), m.VISIT), context(path, site.name))
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (SITE_FAILED, "data_error")
    sent = read_outbox(site.config.local_state_dir)[-1]
    assert sent["error"] == {"code": SITE_FAILED, "reason": "data_error"} and not _no_leaks(json.dumps(sent))
    log = (site.config.local_state_dir / "logs" / "site-errors.log").read_text()
    assert LEAKY_ERROR in log and "Traceback" in log


def test_failures_around_the_handlers_do_not_send_flowers_text(site_setup):
    path, site, config, state = site_setup
    reply = app(message(request(site, state, config.settings, split="val"), "train.p10000032"), context(path, site.name))
    assert (reply.error.code, reply.error.reason) == (SITE_FAILED, "internal_error")  # Flower: "No train function registered..."
    assert "No train function registered with name 'p10000032'" in (site.config.local_state_dir / "logs" / "site-errors.log").read_text()
    assert read_outbox(site.config.local_state_dir)[-1]["error"]["reason"] == "internal_error"


def test_errors_built_by_flowers_task_runtime_are_replaced_before_they_leave(site_setup, monkeypatch):
    from flwr.supernode.runtime import run_clientapp as runtime

    path, site, config, state = site_setup
    pushed = []
    monkeypatch.setattr(runtime, "push_message", lambda client, msg, ctx: pushed.append(msg))
    guard_task_replies()
    guard_task_replies()  # idempotent: wrapped once
    request_msg = message(request(site, state, config.settings, split="val"), m.EVALUATE)
    flower_text = "<class 'FileNotFoundError'>:<'" + LEAKY_ERROR + "'>"  # run_clientapp's own format
    runtime.push_message(None, Message(Error(code=0, reason=flower_text), reply_to=request_msg), context(path, site.name))
    ours = Message(Error(code=SITE_REFUSED, reason="policy_refused: min_batch_size: batch size 1 < 16"), reply_to=request_msg)
    runtime.push_message(None, ours, context(path, site.name))
    assert [(p.error.code, p.error.reason) for p in pushed] == [
        (SITE_FAILED, "internal_error"), (SITE_REFUSED, "policy_refused: min_batch_size: batch size 1 < 16")]
    assert LEAKY_ERROR in (site.config.local_state_dir / "logs" / "site-errors.log").read_text()


def test_the_site_checks_its_student_is_finite_before_returning_it(site_setup):
    path, site, config, _ = site_setup
    broken = initial_state(config, {site.name: site.schema})
    # a NaN running mean: training-mode BatchNorm ignores it, so the loss stays finite and only the
    # site's final check can notice that the student it would return is not
    name = next(k for k in broken.student.state_dict() if k.endswith("running_mean"))
    broken.student.state_dict()[name].fill_(math.nan)
    reply = app(message(request(site, broken, config.settings, plan=plan_visits(config)[0]), m.VISIT), context(path, site.name))
    assert (reply.error.code, reply.error.reason) == (SITE_FAILED, "non_finite_update")
    assert "the student has non-finite values in" in (site.config.local_state_dir / "logs" / "site-errors.log").read_text()
