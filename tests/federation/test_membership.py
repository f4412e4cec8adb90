"""Signed membership changes (issue 17, item 5), the parts that need no Flower process: a change
signed by the federation's coordinator admits a site from a round on, changing nothing else; a
change signed by another CA, altered, not extending the run's claim, expired or changing more than
the membership is refused; the plan keeps every visit made before the change; the loop admits the
site at the round's start and re-plans."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from arkfed.config import TrainConfig, TrainSettings
from arkfed.federation import messages as m
from arkfed.federation.certs import init_certificates, make_site_key
from arkfed.federation.membership import (
    MEMBERSHIP_FIELD,
    admitted_config,
    check_member_request,
    effective_claim,
    make_change,
    sign_change,
)
from arkfed.federation.signing import RunRefused, make_claim
from arkfed.run.plan import plan_groups, round_of_visit
from arkfed.spec import ModelSpec


def _config(**changes) -> TrainConfig:
    base = dict(sites=["a", "b"], rounds=3, seed=3, order="shuffle", model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16),
                settings=TrainSettings(batch_size=8, max_steps_per_visit=2))
    return TrainConfig(**(base | changes))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("membership")
    certs, rogue = init_certificates(root / "certs", ["127.0.0.1"]), init_certificates(root / "rogue", ["127.0.0.1"])
    _, pub = make_site_key("c", root / "c-keys")
    claim = make_claim(_config(), "run1", 3600)
    return certs, rogue, pub.read_bytes(), claim


def _request(config: TrainConfig, visit: int, chain: list | None) -> dict:
    plan = [p for g in plan_groups(config) for p in g][visit]
    fields = m.json_record(run_uid="run1", settings=config.settings, plan=plan, sites=config.sites,
                           **({MEMBERSHIP_FIELD: chain} if chain else {}))
    return dict(fields)


def test_a_signed_change_admits_the_site_from_its_round_and_keeps_every_earlier_visit(setup):
    certs, _, pub, claim = setup
    change = make_change(claim, "c", pub, from_round=1)
    chain = [sign_change(change, certs.coordinator_key, certs.coordinator_cert)]
    effective = effective_claim(claim, chain, certs.ca_cert)
    assert effective["config"]["sites"] == ["a", "b", "c"] and effective["config"]["admitted"] == {"c": 1}
    assert effective["nonce"] == claim["nonce"]  # the same run: its served visits stay served once

    old, new = _config(), TrainConfig.model_validate(effective["config"])
    old_plans, new_plans = [p for g in plan_groups(old) for p in g], [p for g in plan_groups(new) for p in g]
    assert [p.site for p in new_plans if p.round == 0] == [p.site for p in old_plans if p.round == 0]
    assert [p.visit for p in new_plans if p.round == 0] == [0, 1] and new.total_visits == 2 + 3 + 3
    assert sorted(p.site for p in new_plans if p.round == 1) == ["a", "b", "c"] and round_of_visit(new, 4) == 1
    c_visit = next(p.visit for p in new_plans if p.site == "c")
    check_member_request(claim, _request(new, c_visit, chain), certs.ca_cert)  # the admitted site's visit, as signed
    with pytest.raises(RunRefused, match="differs from the signed run|outside the signed run"):
        check_member_request(claim, _request(new, c_visit, None), certs.ca_cert)  # without the change: not the signed run

    second = make_change(effective, "d", pub.replace(b"AAAA", b"AAAB", 1), from_round=2)  # a chain of two
    chain2 = chain + [sign_change(second, certs.coordinator_key, certs.coordinator_cert)]
    assert effective_claim(claim, chain2, certs.ca_cert)["config"]["sites"] == ["a", "b", "c", "d"]
    with pytest.raises(RunRefused, match="does not extend"):
        effective_claim(claim, chain2[1:], certs.ca_cert)  # the second alone skips the first


def _resigned(change: dict, key, cert) -> list:
    return [sign_change(change, key, cert)]


def test_a_change_signed_by_another_ca_altered_or_stretched_is_refused(setup):
    certs, rogue, pub, claim = setup
    change = make_change(claim, "c", pub, from_round=1)
    with pytest.raises(RunRefused, match="membership change refused: .*not issued by this site's federation CA"):
        effective_claim(claim, _resigned(change, rogue.coordinator_key, rogue.coordinator_cert), certs.ca_cert)

    signed = sign_change(change, certs.coordinator_key, certs.coordinator_cert)
    body = json.loads(base64.b64decode(signed["change"]))
    body["from_round"] = 0  # altered after signing
    tampered = dict(signed, change=base64.b64encode(json.dumps(body).encode()).decode())
    with pytest.raises(RunRefused, match="signature does not match"):
        effective_claim(claim, [tampered], certs.ca_cert)

    more = dict(change, config=dict(change["config"], seed=99))  # signed by the right key, but more than membership
    with pytest.raises(RunRefused, match="changes more than the run's membership"):
        effective_claim(claim, _resigned(more, certs.coordinator_key, certs.coordinator_cert), certs.ca_cert)

    other = make_claim(_config(), "run2", 3600)
    with pytest.raises(RunRefused, match="for run 'run2'"):
        effective_claim(claim, _resigned(make_change(other, "c", pub, 1), certs.coordinator_key, certs.coordinator_cert), certs.ca_cert)

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired = make_change(claim, "c", pub, 1, lifetime=60, now=past)
    with pytest.raises(RunRefused, match="expired"):
        effective_claim(claim, _resigned(expired, certs.coordinator_key, certs.coordinator_cert), certs.ca_cert)

    with pytest.raises(Exception, match="already a member"):
        admitted_config(_config(), "a", 1)


def test_the_loop_admits_a_site_at_the_start_of_its_round_and_keeps_the_visits_before(tmp_path):
    from arkfed.run.folder import RunFolder
    from arkfed.run.local import InProcessSites, train_local
    from arkfed.run.loop import ArkLoop
    from run.test_train_local import synthetic_site, tiny_config

    sites = {"a": synthetic_site("a", ("x", "y"), 0), "b": synthetic_site("b", ("t",), 1), "c": synthetic_site("c", ("u",), 2)}
    config = tiny_config(["a", "b"], rounds=2)

    class Admitting(InProcessSites):  # the in-process sites, with the change a federation's ServerApp would read
        def admit(self, current, rnd):
            return admitted_config(current, "c", 1) if rnd == 1 and "c" not in current.sites else None

    ArkLoop(config, RunFolder(tmp_path / "admitted"), Admitting(sites)).run_loop()
    train_local(config, tmp_path / "plain", sites={k: sites[k] for k in "ab"})
    admitted, plain = RunFolder(tmp_path / "admitted"), RunFolder(tmp_path / "plain")
    visits = [r for r in admitted.read_metrics() if r["kind"] == "visit"]
    assert [(r["round"], r["site"]) for r in visits] == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (1, "c")]
    before = [r for r in plain.read_metrics() if r["kind"] == "visit" and r["round"] == 0]
    assert [(r["lr"], r["loss"]) for r in visits[:2]] == [(r["lr"], r["loss"]) for r in before]  # round 0 as without the change
    assert admitted.read_config().admitted == {"c": 1} and admitted.read_config().sites == ["a", "b", "c"]
    assert {r["site"] for r in admitted.read_metrics() if r["kind"] == "eval" and r["round"] == 1} == {"a", "b", "c"}
