"""Issue 8, the parts that need no Flower process: run signatures, the site's bundle check, run ids,
keys made where they are used, and the gateway's route list (in process, against a stand-in upstream)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import stat
import zipfile

import pytest
from flwr.app import ConfigRecord

from arkfed.config import TrainConfig, TrainSettings
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.federation.certs import (
    CertificateFolder,
    add_site,
    init_certificates,
    make_site_key,
    public_key_fingerprint,
    read_site_public_key,
)
from arkfed.federation.flower_app import CLIENT_APP, SERVER_APP, write_flower_app
from arkfed.federation.signing import CLAIM_KEY, RunRefused, check_request, claim_fingerprint, make_claim, sign_claim, verify_run
from arkfed.federation.site.executor import GatedClientApp, inspect_bundle
from arkfed.federation.site.heads import HeadStore, run_folder
from arkfed.spec import ModelSpec


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificateFolder:
    return init_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1"])


def _config() -> TrainConfig:
    return TrainConfig(sites=["a", "b"], rounds=2,
                       model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16),
                       settings=TrainSettings(batch_size=8, max_steps_per_visit=2))


def _request(config: TrainConfig, run_uid: str = "run1", **overrides) -> ConfigRecord:
    from arkfed.run.plan import plan_groups

    plan = plan_groups(config)[0][0].model_dump(mode="json")
    values = {"run_uid": json.dumps(run_uid), "spec": config.model.model_copy(update={"num_features": 64}).model_dump_json(),
              "settings": config.settings.model_dump_json(), "plan": json.dumps(plan)}
    values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()})
    return ConfigRecord(values)


def test_a_signed_run_verifies_and_its_requests_must_match_it(certs):
    config = _config()
    entries = sign_claim(make_claim(config, "run1"), certs.coordinator_key, certs.coordinator_cert)
    claim = verify_run(entries, certs.ca_cert)
    assert claim["run_uid"] == "run1" and claim["config"]["sites"] == ["a", "b"] and claim["mode"] == config.mode
    assert claim_fingerprint(claim).startswith("run-")
    check_request(claim, _request(config))  # the model's filled-in num_features is not a change
    bigger = config.settings.model_copy(update={"batch_size": 1})
    cases = {
        "is for run 'other'": _request(config, run_uid="other"),
        "visit settings differ": _request(config, settings=bigger.model_dump_json()),
        r"model \(img_size\) differs": _request(config, spec=config.model.model_copy(update={"img_size": 4096}).model_dump_json()),
        "names a site outside": _request(config, plan={"site": "mallory"}),
        r"visit plan differs from the signed run configuration \(seed\)": _request(
            config, plan=json.loads(_request(config)["plan"]) | {"seed": 5}),
        "invalid run id": _request(config, run_uid="../../x"),
    }
    for reason, request in cases.items():
        with pytest.raises(RunRefused, match=reason):
            check_request(claim, request)


def test_unsigned_forged_altered_and_foreign_runs_are_refused(certs, tmp_path):
    config = _config()
    claim = make_claim(config, "run1")
    good = sign_claim(claim, certs.coordinator_key, certs.coordinator_cert)
    with pytest.raises(RunRefused, match="not signed by a coordinator"):
        verify_run({}, certs.ca_cert)
    altered = dict(claim, config=dict(claim["config"], rounds=1000))
    with pytest.raises(RunRefused, match="does not match its settings"):
        verify_run(dict(good, **{CLAIM_KEY: base64.b64encode(json.dumps(altered).encode()).decode()}), certs.ca_cert)
    rogue = init_certificates(tmp_path / "rogue", ["127.0.0.1"])
    with pytest.raises(RunRefused, match="not issued by this site's federation CA"):
        verify_run(sign_claim(claim, rogue.coordinator_key, rogue.coordinator_cert), certs.ca_cert)
    # the rogue key with the real certificate: the certificate checks out, the signature does not
    with pytest.raises(RunRefused, match="does not match"):
        verify_run(sign_claim(claim, rogue.coordinator_key, certs.coordinator_cert), certs.ca_cert)
    with pytest.raises(RunRefused, match="expired or not yet valid"):
        verify_run(good, certs.ca_cert, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3000))
    with pytest.raises(RunRefused, match="malformed"):
        verify_run(dict(good, **{CLAIM_KEY: "%%%"}), certs.ca_cert)


def _bundle(files: dict[str, str]) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return data.getvalue()


def test_sites_accept_only_arkfeds_own_app_bundle(tmp_path):
    ours = (write_flower_app(tmp_path / "run") / "pyproject.toml").read_text()
    assert inspect_bundle(_bundle({"pyproject.toml": ours, ".info/CONTENT": ""})) is None
    other = ours.replace(CLIENT_APP, "evil.client:app")
    assert "names clientapp 'evil.client:app'" in inspect_bundle(_bundle({"pyproject.toml": other, ".info/CONTENT": ""}))
    assert "names serverapp" in inspect_bundle(_bundle({"pyproject.toml": ours.replace(SERVER_APP, "x:app")}))
    with_code = {"pyproject.toml": ours, ".info/CONTENT": "", "arkfed/federation/client_app.py": "print('shadow')"}
    assert "holds files besides pyproject.toml" in inspect_bundle(_bundle(with_code))
    assert "not a readable Flower app" in inspect_bundle(b"not a zip")
    assert "not a readable Flower app" in inspect_bundle(_bundle({"pyproject.toml": "[[["}))


def test_the_site_gate_refuses_before_arkfeds_app_runs(certs, tmp_path, monkeypatch):
    """The gated app answers a refusal itself (code SITE_REFUSED) for a foreign bundle or an unsigned run."""
    import time

    from flwr.app import Context, Message, Metadata, RecordDict

    import arkfed.federation.site.executor as executor
    from arkfed.federation.messages import SITE_REFUSED

    monkeypatch.setattr(executor, "FEDERATION_CA", str(certs.ca_cert))
    calls = []
    monkeypatch.setattr("arkfed.federation.site.client_app.app", lambda **kw: calls.append(kw))
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="0",
                        created_at=time.time(), ttl=600, message_type="query.hello")
    message = Message(content=RecordDict({"request": _request(_config())}), metadata=metadata)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for gate, reason in ((GatedClientApp("the run's app names clientapp 'x'"), "names clientapp"),
                         (GatedClientApp(None), "not signed by a coordinator")):
        reply = gate(message, context)
        assert reply.has_error() and reply.error.code == SITE_REFUSED and reason in reply.error.reason
    assert calls == []  # arkfed's ClientApp never saw the refused messages


def test_run_ids_that_leave_the_state_dir_are_refused_and_nothing_is_written(tmp_path):
    state = tmp_path / "site" / "state"
    state.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (state / "runs").mkdir()
    os.symlink(outside, state / "runs" / "linked")  # a folder planted to point outside
    schema = LabelSchema(task="multilabel", classes=("a", "b"))
    for bad in ("../../x", str(outside), "/etc", "..", "a/b", "", "x" * 65, "linked"):
        with pytest.raises(ArkfedError, match="refusing run id"):
            HeadStore(state, bad, "nih", schema)
    assert run_folder(state, "0123abcd") == (state / "runs" / "0123abcd").resolve()
    assert list(outside.iterdir()) == [] and not (tmp_path / "x").exists()
    assert sorted(p.name for p in (state / "runs").iterdir()) == ["linked"]


def test_site_key_is_private_its_mode_resets_on_overwrite_and_symlinks_are_refused(tmp_path):
    key, pub = make_site_key("nih", tmp_path / "keys")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    old = key.read_bytes()
    with pytest.raises(ArkfedError, match="already exists; pass --overwrite"):
        make_site_key("nih", tmp_path / "keys")
    key.chmod(0o644)  # e.g. copied around carelessly
    make_site_key("nih", tmp_path / "keys", overwrite=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes() != old

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link_dir = tmp_path / "linked"
    link_dir.mkdir()
    os.symlink(victim, link_dir / "nih.key")
    with pytest.raises(ArkfedError, match="symbolic link"):
        make_site_key("nih", link_dir, overwrite=True)
    assert victim.read_text() == "precious"
    with pytest.raises(ArkfedError, match="invalid site name"):
        make_site_key("../nih", tmp_path / "keys")


def test_certs_init_overwrite_resets_modes_and_refuses_symlinks(tmp_path):
    folder = init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih"])
    folder.ca_key.chmod(0o644)
    folder.site_key("nih").chmod(0o644)
    init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih"], overwrite=True)
    assert stat.S_IMODE(folder.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.site_key("nih").stat().st_mode) == 0o600
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder.coordinator_key.unlink()
    os.symlink(victim, folder.coordinator_key)
    with pytest.raises(ArkfedError, match="symbolic link"):
        init_certificates(tmp_path / "certs", ["127.0.0.1"], ["nih"])
    assert victim.read_text() == "precious"


def test_add_site_registers_a_public_key_and_refuses_private_or_duplicate_keys(tmp_path):
    folder = init_certificates(tmp_path / "certs", ["127.0.0.1"])
    key, pub = make_site_key("nih", tmp_path / "nih-keys")
    path = add_site(folder, "nih", pub)
    assert folder.registered_sites() == {"nih": path}
    assert public_key_fingerprint(path) == public_key_fingerprint(pub)
    assert read_site_public_key(path).split()[1] == pub.read_bytes().split()[1]
    with pytest.raises(ArkfedError, match="this is a private key"):
        add_site(folder, "other", key)
    with pytest.raises(ArkfedError, match="already registered for site 'nih'"):
        add_site(folder, "other", pub)
    _, new_pub = make_site_key("nih", tmp_path / "nih-new")
    with pytest.raises(ArkfedError, match="already has a different key"):
        add_site(folder, "nih", new_pub)
    add_site(folder, "nih", new_pub, overwrite=True)
    assert public_key_fingerprint(folder.site_public_key("nih")) == public_key_fingerprint(new_pub)


def test_the_gateway_forwards_only_fleet_routes(tmp_path):
    """In process: the gateway app in front of a stand-in upstream that records what reached it."""
    import asyncio

    import httpx

    from arkfed.federation.coordinator.gateway import create_app, fleet_paths

    reached = []

    async def upstream(scope, receive, send):
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        reached.append((scope["method"], scope["path"], body, dict(scope["headers"]).get(b"x-forwarded-for")))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": b"ok:" + body})

    async def scenario():
        app = create_app("http://upstream", None, supernode_auth=True, transport=httpx.ASGITransport(app=upstream))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 5000)),
                                     base_url="http://gateway") as client:
            results = {}
            for method, path in [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-object"), ("GET", "/health"),
                                 ("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/get-nodes"),
                                 ("POST", "/v1/fleet/register-node"), ("GET", "/docs"), ("POST", "/health"),
                                 ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/pull-messages/")]:
                reply = await client.request(method, path, content=b"\x01\x02" * 3 if method == "POST" else None,
                                             headers={"x-forwarded-for": "10.0.0.1", "host": "evil"})  # GET: no body
                results[(method, path)] = (reply.status_code, reply.content)
            return results

    results = asyncio.run(scenario())
    assert results[("POST", "/v1/fleet/pull-messages")] == (200, b"ok:" + b"\x01\x02" * 3)
    assert results[("POST", "/v1/fleet/push-object")][0] == 200 and results[("GET", "/health")][0] == 200
    refused = [k for k, (code, _) in results.items() if code == 404]
    assert set(refused) == {("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/get-nodes"),
                            ("POST", "/v1/fleet/register-node"), ("GET", "/docs"), ("POST", "/health"),
                            ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/pull-messages/")}
    assert [(m, p) for m, p, _, _ in reached] == [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-object"),
                                                  ("GET", "/health")]
    assert all(xff == b"203.0.113.9" for *_, xff in reached)  # the client's own X-Forwarded-For is dropped
    assert "/v1/fleet/register-node" in fleet_paths(supernode_auth=False)
    assert "/v1/fleet/register-node" not in fleet_paths(supernode_auth=True)


def test_certs_commands_make_the_key_at_the_site_and_register_it_at_the_coordinator(tmp_path):
    import re

    from typer.testing import CliRunner

    from arkfed.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["certs", "init", str(tmp_path / "fed"), "--coordinator-host", "fed.example.org"])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "fed" / "sites").exists() or not list((tmp_path / "fed" / "sites").glob("*.key"))
    done = runner.invoke(app, ["certs", "site-key", "hospital_a", "--out", str(tmp_path / "keys")])
    assert done.exit_code == 0, done.output
    at_site = re.search(r"SHA256:\S+", done.output).group()
    done = runner.invoke(app, ["certs", "add-site", "hospital_a", str(tmp_path / "keys" / "hospital_a.pub"),
                               "--certs", str(tmp_path / "fed")])
    assert done.exit_code == 0, done.output
    assert re.search(r"SHA256:\S+", done.output).group() == at_site  # what the two operators compare
    assert (tmp_path / "fed" / "sites" / "hospital_a.pub").is_file() and not (tmp_path / "fed" / "sites" / "hospital_a.key").exists()
