"""Issue 21, the parts that need no Flower process: a signed claim means one run.

The claim covers the whole configuration and carries a nonce and an expiry; every visit and
evaluation request carries the coordinator's authorization over its fields and weights, made by
the coordinator's signing service (which holds the key; the ServerApp asks it over a 0600 Unix
socket); a site records the runs and visits it served and refuses replays; the ServerApp's task
process cannot read the key files (Landlock); the SuperLink's guard tells whose a connection is.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, RecordDict

from arkfed.config import TrainConfig, TrainSettings
from arkfed.federation import messages as m
from arkfed.federation.certs import init_certificates
from arkfed.federation.coordinator.launcher import prepare_run
from arkfed.federation.coordinator.signer import RequestAuthorizer, SignerRefused, SigningService, call
from arkfed.federation.signing import (
    AUTH_KEY,
    CLAIM_KEY,
    TICKET_KEY,
    RunRefused,
    check_request,
    claim_of,
    make_claim,
    sign_claim,
    verify_authorization,
    verify_run,
)
from arkfed.federation.site.served import ServedRecords, served_item
from arkfed.run.plan import plan_groups
from arkfed.spec import ModelSpec
from federation_fixtures import fast_settings

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def _config(**changes) -> TrainConfig:
    base = dict(sites=["a", "b"], rounds=1, seed=3, model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16),
                settings=TrainSettings(batch_size=8, max_steps_per_visit=2))
    return TrainConfig(**(base | changes))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1"])


def _visit(config: TrainConfig, index: int = 0, run_uid: str = "run1") -> RecordDict:
    """A visit request as FlowerSites builds it (weights included)."""
    import torch

    plan = [p for g in plan_groups(config) for p in g][index]
    request = m.json_record(run_uid=run_uid, spec=config.model, settings=config.settings, head_from=m.NO_HEAD, schemas={},
                            pending=1.0, plan=plan)
    weights = torch.nn.Linear(3, 2)
    return m.request_content(request, student=m.model_record(weights), teacher=m.model_record(weights))


def _fields(content: RecordDict) -> ConfigRecord:
    return content.config_records[m.REQUEST]


def test_the_claim_covers_the_whole_run_and_expires(certs):
    config = _config(recipe="demo", init="random", eval_split="val")
    claim = make_claim(config, "run1", lifetime=3600)
    assert {"nonce", "signed_at", "expires_at"} <= set(claim) and len(claim["nonce"]) == 32
    for key in ("rounds", "seed", "mode", "order", "init", "eval_split", "recipe", "sites", "settings", "model"):
        assert key in claim["config"], key
    entries = sign_claim(claim, certs.coordinator_key, certs.coordinator_cert)
    assert verify_run(entries, certs.ca_cert) == claim and claim_of(entries) == claim
    assert make_claim(config, "run1")["nonce"] != claim["nonce"]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    with pytest.raises(RunRefused, match="expired at"):
        verify_run(entries, certs.ca_cert, now=later)
    expired = sign_claim(make_claim(config, "run1", lifetime=-1), certs.coordinator_key, certs.coordinator_cert)
    with pytest.raises(RunRefused, match="expired at"):
        verify_run(expired, certs.ca_cert)
    future = make_claim(config, "run1", now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    with pytest.raises(RunRefused, match="signed in the future"):
        verify_run(sign_claim(future, certs.coordinator_key, certs.coordinator_cert), certs.ca_cert)
    old_format = {k: v for k, v in claim.items() if k != "nonce"} | {"format": 1}
    with pytest.raises(RunRefused, match="unknown format"):
        verify_run(sign_claim(old_format, certs.coordinator_key, certs.coordinator_cert), certs.ca_cert)


@pytest.mark.parametrize("change", [{"rounds": 2}, {"seed": 5}, {"mode": "parallel"}, {"order": "shuffle", "rounds": 3}])
def test_a_replayed_claim_with_another_configuration_is_refused(change):
    """The plans a changed run sends (more rounds, another seed or mode) are not the signed run's."""
    claim = make_claim(_config(), "run1")
    changed = _config(**change)
    refused = []
    for index in range(changed.total_visits):
        try:
            check_request(claim, _fields(_visit(changed, index)))
        except RunRefused as exc:
            refused.append(str(exc))
    assert refused and all("visit plan differs" in r or "outside the signed run" in r for r in refused), refused
    assert "visit plan differs" in refused[0]  # already its first visit differs (lr, momentum, seed, ...)
    check_request(claim, _fields(_visit(_config(), 1)))  # the signed run's own plans pass


def test_an_evaluation_must_be_the_signed_split_and_round():
    claim = make_claim(_config(eval_split="val"), "run1")
    base = {"run_uid": json.dumps("run1")}
    check_request(claim, base | {"split": json.dumps("val"), "round": json.dumps(0)})
    with pytest.raises(RunRefused, match="evaluation split differs"):
        check_request(claim, base | {"split": json.dumps("test"), "round": json.dumps(0)})
    with pytest.raises(RunRefused, match="evaluation round is outside"):
        check_request(claim, base | {"split": json.dumps("val"), "round": json.dumps(1)})


def _service(tmp_path, certs, config=None):
    out = tmp_path / "run"
    prepare_run(out, config or _config(), fast_settings(), resume=False)
    service = SigningService(out / "flower", certs).start()
    return service, out


def test_the_signing_service_admits_one_serverapp_and_signs_only_the_runs_requests(tmp_path, certs):
    service, out = _service(tmp_path, certs)
    try:
        entries = service.submit(out, 3600)
        claim = verify_run(entries, certs.ca_cert)
        assert entries[TICKET_KEY] == claim["nonce"]
        assert oct(os.stat(service.path).st_mode & 0o777) == "0o600"
        ticket, path = entries[TICKET_KEY], service.path
        with pytest.raises(SignerRefused, match="unknown or outdated ticket"):
            call(path, "start", ticket="0" * 32, run_dir=str(out), claim=entries[CLAIM_KEY])
        with pytest.raises(SignerRefused, match="not the one this coordinator signed"):
            call(path, "start", ticket=ticket, run_dir=str(out), claim="other")
        with pytest.raises(SignerRefused, match="has not started"):
            RequestAuthorizer(path, ticket).authorize(m.VISIT, _visit(_config()))
        call(path, "start", ticket=ticket, run_dir=str(out), claim=entries[CLAIM_KEY])
        with pytest.raises(SignerRefused, match="already has its ServerApp"):
            call(path, "start", ticket=ticket, run_dir=str(out), claim=entries[CLAIM_KEY])

        content = _visit(_config(), 1, run_uid=claim["run_uid"])
        RequestAuthorizer(path, ticket).authorize(m.VISIT, content)
        assert AUTH_KEY in _fields(content)
        verify_authorization(entries, certs.ca_cert, claim, m.VISIT, content)
        with pytest.raises(RunRefused, match="does not match its plan and weights"):
            verify_authorization(entries, certs.ca_cert, claim, m.EVALUATE, content)  # not what was signed
        tampered = _visit(_config(), 1, run_uid=claim["run_uid"])
        tampered.config_records[m.REQUEST][AUTH_KEY] = _fields(content)[AUTH_KEY]
        tampered.array_records[m.STUDENT] = m.model_record(__import__("torch").nn.Linear(3, 2))  # other weights
        with pytest.raises(RunRefused, match="does not match its plan and weights"):
            verify_authorization(entries, certs.ca_cert, claim, m.VISIT, tampered)
        with pytest.raises(RunRefused, match="carries no coordinator authorization"):
            verify_authorization(entries, certs.ca_cert, claim, m.VISIT, _visit(_config(), 1, run_uid=claim["run_uid"]))
        with pytest.raises(SignerRefused, match="not a request of the signed run"):  # a plan the claim does not schedule
            RequestAuthorizer(path, ticket).authorize(m.VISIT, _visit(_config(seed=5), 0, run_uid=claim["run_uid"]))

        entries2 = service.submit(out, 3600)  # a new submission: the old ticket is dead
        with pytest.raises(SignerRefused, match="unknown or outdated ticket"):
            RequestAuthorizer(path, ticket).authorize(m.VISIT, _visit(_config(), 1, run_uid=claim["run_uid"]))
        (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("rounds: 1", "rounds: 2"))
        with pytest.raises(SignerRefused, match="configuration changed since it was signed"):
            call(path, "start", ticket=entries2[TICKET_KEY], run_dir=str(out), claim=entries2[CLAIM_KEY])
    finally:
        service.stop()
    assert not service.path.exists()


def test_another_account_cannot_reach_the_signing_service(tmp_path, certs):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    tmp_path.chmod(0o755)
    service, out = _service(tmp_path, certs)
    try:
        service.submit(out, 3600)
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n    print('refused', e.errno)")
        done = subprocess.run([*NOBODY, sys.executable, "-c", probe, str(service.path)], capture_output=True, text=True, timeout=60)
        print(f"nobody connecting to the signing service: {done.stdout.strip()}")
        assert done.stdout.startswith("refused 13"), done.stdout + done.stderr  # EACCES: the 0700 folder and 0600 socket
    finally:
        service.stop()


def test_a_site_serves_each_signed_run_and_visit_once(tmp_path):
    records = ServedRecords(tmp_path / "state")
    claim = make_claim(_config(), "run1")
    records.check_run(claim, 7)
    records.check_run(claim, 7)  # every message of that Flower run
    with pytest.raises(RunRefused, match="replay: this signed run"):
        records.check_run(claim, 8)  # the same claim submitted again
    item = served_item(m.VISIT, {"plan": {"visit": 3}})
    with records.serve(claim, item, {}):
        with pytest.raises(RunRefused, match="replay: visit 00003"):
            with records.serve(claim, item, {}):
                pass
    with pytest.raises(RunRefused, match="replay: visit"):
        with records.serve(claim, item, {}):
            pass
    records.release(claim, item)  # a failed visit is released for the coordinator's retry
    with records.serve(claim, item, {}):
        pass
    with pytest.raises(RunRefused, match="not a plain name"):
        served_item(m.EVALUATE, {"split": "../x", "round": 0})
    expired = make_claim(_config(), "run2", lifetime=-10)
    records.check_run(expired, 9)
    with records.serve(expired, "visit-00000", {}):
        pass
    assert records.prune() == 1 and not list(records.folder.glob(f"*{expired['nonce']}*"))
    assert oct(records.folder.stat().st_mode & 0o777) == "0o700"


def test_the_approval_fingerprint_covers_the_whole_claim():
    from arkfed.site.policy import run_fingerprint

    config = _config()
    claim = make_claim(config, "run1")
    same = run_fingerprint("run1", config.model, config.settings, claim)
    assert same == run_fingerprint("run1", config.model, config.settings, dict(claim))
    for other in (make_claim(config, "run1"), dict(claim, config=dict(claim["config"], rounds=2)), dict(claim, expires_at="x")):
        assert run_fingerprint("run1", config.model, config.settings, other) != same


SANDBOXED = """
import os, sys
from arkfed.federation.sandbox import hide_files
key, crt, run = sys.argv[1:4]
hide_files([key])
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as exc:
        return f"denied:{exc.errno}"
print({"read key": attempt(lambda: open(key).read()),
       "key via /proc/PARENT/root": attempt(lambda: open(f"/proc/{os.getppid()}/root{key}").read()),
       "link key": attempt(lambda: os.link(key, os.path.join(run, "k"))),
       "rename key": attempt(lambda: os.rename(key, os.path.join(run, "k"))),
       "parent's memory": attempt(lambda: open(f"/proc/{os.getppid()}/mem", "rb").read(1)),
       "read ca.crt": attempt(lambda: open(crt).read()),
       "write run": attempt(lambda: open(os.path.join(run, "new"), "w").write("x")),
       "import torch": attempt(lambda: __import__("torch"))})
"""


def test_the_sandbox_hides_the_key_files_and_nothing_else(tmp_path, certs):
    from arkfed.federation.sandbox import abi_version

    if abi_version() < 1:
        pytest.skip("no Landlock in this kernel")
    certs_dir = tmp_path / "certs"
    shutil.copytree(certs.root, certs_dir)
    run = tmp_path / "run"
    run.mkdir()
    done = subprocess.run([sys.executable, "-c", SANDBOXED, str(certs_dir / "coordinator.key"), str(certs_dir / "ca.crt"), str(run)],
                          capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    result = eval(done.stdout.strip().splitlines()[-1])
    print(f"in the sandbox: {result}")
    assert result["read key"] == "denied:13" and result["key via /proc/PARENT/root"] == "denied:13"
    assert result["link key"].startswith("denied") and result["rename key"].startswith("denied")
    assert result["parent's memory"].startswith("denied")
    assert result["read ca.crt"] == result["write run"] == result["import torch"] == "ok"


def test_the_superlink_guard_tells_whose_a_connection_is():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to connect as nobody")
    from arkfed.federation.coordinator.superlink import connection_uid

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        mine = socket.create_connection(("127.0.0.1", port))
        conn, peer = server.accept()
        assert connection_uid(peer, ("127.0.0.1", port)) == os.getuid()
        hold = ("import socket, sys, time\ns = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
                "print(s.getsockname()[1], flush=True)\ntime.sleep(30)")
        other = subprocess.Popen([*NOBODY, sys.executable, "-c", hold, str(port)], stdout=subprocess.PIPE, text=True, cwd="/")
        try:
            their_port = int(other.stdout.readline())
            conn2, peer2 = server.accept()
            assert peer2[1] == their_port and connection_uid(peer2, ("127.0.0.1", port)) == 65534
        finally:
            other.kill()
            other.wait(timeout=10)
        assert connection_uid(("127.0.0.1", 1), ("127.0.0.1", port)) is None  # no such connection
        for c in (mine, conn, conn2):
            c.close()
    finally:
        server.close()


def test_a_visit_abandoned_by_a_dead_task_process_can_be_served_again(tmp_path):
    records = ServedRecords(tmp_path / "state")
    claim = make_claim(_config(), "run1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (records.folder / f"{claim['nonce']}-visit-00001.json").write_text(json.dumps({"state": "serving", "pid": int(dead)}))
    with records.serve(claim, "visit-00001", {}):  # the site was killed mid-visit; the retry is served
        pass
    with pytest.raises(RunRefused, match="replay"):
        with records.serve(claim, "visit-00001", {}):
            pass


def test_the_superlink_guard_lets_other_accounts_call_the_public_fleet_routes_only():
    """In process (the client address names no real connection, as for another account): only what
    the public gateway forwards from anyone gets through to Flower."""
    import asyncio

    import httpx

    from arkfed.federation.coordinator.superlink import SameAccountOnly, public_routes

    reached = []

    async def flower(scope, receive, send):
        reached.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        app = SameAccountOnly(flower, public=public_routes(supernode_auth=True))
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://superlink") as client:
            calls = [("POST", "/v1/fleet/pull-messages"), ("GET", "/health"), ("POST", "/v1/fleet/register-node"),
                     ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                     ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs")]
            return {call: (await client.request(*call, headers={"x-forwarded-for": "127.0.0.1"})).status_code for call in calls}

    codes = asyncio.run(scenario())
    assert reached == [("POST", "/v1/fleet/pull-messages"), ("GET", "/health")]
    assert {call for call, code in codes.items() if code == 403} == set(codes) - set(reached)
