"""``arkfed console``'s pages and JSON endpoints (starlette's TestClient): what each view shows,
what it never serves, and its defences (login off loopback, CSRF, hosts, headers)."""

from __future__ import annotations

import re
import ssl
import time

import httpx
import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from starlette.testclient import TestClient
from typer.testing import CliRunner

from arkfed.console.app import ConsoleTarget, create_app
from arkfed.console.security import Guard, check_binding, hash_password
from arkfed.console.serve import ConsoleSettings, make_guard, start_console
from arkfed.errors import ArkfedError
from arkfed.federation.describe import describe_content
from arkfed.federation.site.heads import append_outbox
from arkfed.site.config import load_site_config
from arkfed.site.policy import approved_runs, pending_runs, refused_runs
from console_fixtures import WaitingRun, federated_run, site_yaml

LOCAL = "http://127.0.0.1"


def client(kind: str, path, guard: Guard | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(ConsoleTarget(kind, path), guard), base_url=base_url, follow_redirects=False)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


@pytest.fixture
def run_dir(tmp_path):
    return federated_run(tmp_path / "run")


@pytest.fixture
def site(tmp_path):
    path = site_yaml(tmp_path)
    state = load_site_config(path).local_state_dir
    content = RecordDict({"student": ArrayRecord([np.zeros((4, 8), np.float32)]),
                          "metrics": MetricRecord({"loss": 0.52, "epsilon_spent": 1.25, "epsilon_budget": 3.0})})
    append_outbox(state, {"message_type": "train", "run_id": 7, "group": "3", "content": describe_content(content)})
    return path, state


def test_coordinator_view_shows_states_progress_auc_skips_privacy_and_links(run_dir):
    c = client("run", run_dir)
    page = c.get("/")
    assert page.status_code == 200
    text = page.text
    assert 'id="visits-done">6<' in text and 'id="total-visits">6<' in text and '<progress id="visit-progress" max="6" value="6"' in text
    assert "state-refused" in text and "policy_refused: min_batch_size: batch size 8 &lt; 16" in text  # escaped, with its reason
    assert "0.80 of 3.00" in text  # south's ε spent, of its budget
    assert text.count("event-refused") == 2  # the refusals timeline
    assert text.count('class="cell cell-refused" title="visit: policy_refused: min_batch_size') == 2  # east, both rounds
    assert '<a href="/files/config.yaml">config</a>' in text
    state = c.get("/api/run").json()
    assert state["visits_done"] == 6 and state["rounds_evaluated"] == 1 and state["federated"]
    assert state["auc"]["x"] == [3] and state["auc"]["student"] == {"north": [0.61], "south": [0.61], "east": [None]}
    assert state["auc"]["teacher"]["north"] == [0.66]
    rows = {row["site"]: row for row in state["sites"]}
    assert rows["east"]["state"] == "refused" and rows["east"]["skips"] == 2 and rows["south"]["epsilon_spent"] == 0.8
    assert [c["state"] for c in state["grid"]["north"]] == ["visited", "visited"]
    assert state["throughput"]["images"] == 64 and state["throughput"]["images_per_s"] == pytest.approx(32.0)
    assert c.get("/files/config.yaml").text.startswith("sites:")


def test_coordinator_view_serves_the_runs_files_and_nothing_else(run_dir):
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.html").write_text("<html><style>body{}</style>report</html>")
    (run_dir / "checkpoint.safetensors").write_bytes(b"weights")
    c = client("run", run_dir)
    report = c.get("/files/report/report.html")
    assert report.status_code == 200 and "script-src 'self'" in report.headers["content-security-policy"]
    for path in ("/files/checkpoint.safetensors", "/files/../run/config.yaml", "/files/report/..%2Fcheckpoint.safetensors",
                 "/files/federation-status.json", "/files/metrics.jsonl", "/static/../app.py"):
        assert c.get(path).status_code == 404, path
    assert "Leon Sorokin" in c.get("/static/vendor/uplot/LICENSE").text  # the vendored chart library, with its licence
    assert c.get("/static/vendor/uplot/uPlot.iife.min.js").text.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32)")


def test_a_finished_or_not_yet_started_run_folder_renders(tmp_path):
    empty = client("run", tmp_path / "not-yet").get("/")
    assert empty.status_code == 200 and "does not exist yet" in empty.text and 'http-equiv="refresh"' in empty.text
    state = client("run", tmp_path / "not-yet").get("/api/run").json()
    assert state["phase"] == "starting" and state["visits_done"] == 0 and not state["finished"]


def test_every_response_carries_the_security_headers_and_unknown_hosts_are_refused(run_dir):
    c = client("run", run_dir)
    cookie = c.get("/").headers["set-cookie"].lower()  # the first visit gets its session
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # (no TLS here)
    for path in ("/", "/api/run", "/login", "/static/console.js", "/files/config.yaml"):
        headers = c.get(path).headers
        assert headers["content-security-policy"].startswith("default-src 'self'"), path
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
    page = c.get("/")
    assert "script-src 'self';" in page.headers["content-security-policy"] and page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the policy to allow
    rebound = client("run", run_dir, base_url="http://attacker.example")  # DNS rebinding onto 127.0.0.1
    assert rebound.get("/api/run").status_code == 400


def test_site_view_shows_pending_runs_policy_outbox_and_epsilon(site):
    path, state = site
    waiting = WaitingRun(state).start_waiting()
    c = client("site", path)
    text = c.get("/").text
    assert waiting.fingerprint in text and 'action="/runs/approve"' in text and 'action="/runs/refuse"' in text
    assert "max_steps_per_visit" in text and "<td>12</td>" in text  # the full settings the fingerprint covers
    assert "<th>approval</th><td>manual</td>" in text  # the policy
    assert "257 B" in text and "metrics.epsilon_spent=1.25" in text and "ε 1.25 of 3.00" in text  # the outbox, ε
    state_json = c.get("/api/site").json()
    assert state_json["pending"][0]["fingerprint"] == waiting.fingerprint and state_json["bytes_sent"] == 257
    assert state_json["outbox"][0]["values"] == {"metrics.loss": 0.52, "metrics.epsilon_spent": 1.25, "metrics.epsilon_budget": 3.0}
    assert state_json["epsilon"] == {"7": {"epsilon_spent": 1.25, "epsilon_budget": 3.0, "time": state_json["outbox"][0]["time"]}}
    c.post("/runs/refuse", data={"csrf": csrf_of(text), "fingerprint": waiting.fingerprint})
    waiting.join(5)


def test_approving_writes_what_arkfed_site_approve_writes_and_the_waiting_run_proceeds(site, tmp_path):
    from arkfed.cli import app as cli

    path, state = site
    waiting = WaitingRun(state).start_waiting()
    c = client("site", path)
    page = c.get("/").text
    # without the token, with a wrong one, or from another origin: refused, nothing recorded, the run still waits
    for data, headers in (({"fingerprint": waiting.fingerprint}, {}), ({"fingerprint": waiting.fingerprint, "csrf": "0" * 64}, {}),
                          ({"fingerprint": waiting.fingerprint, "csrf": csrf_of(page)}, {"origin": "http://attacker.example"})):
        assert c.post("/runs/approve", data=data, headers=headers).status_code == 403
    time.sleep(0.2)
    assert approved_runs(state) == set() and waiting.is_alive()
    other = TestClient(create_app(ConsoleTarget("site", path)), base_url=LOCAL)  # another browser: its own session
    assert other.post("/runs/approve", data={"fingerprint": waiting.fingerprint, "csrf": csrf_of(page)}).status_code == 403

    done = c.post("/runs/approve", data={"fingerprint": waiting.fingerprint, "csrf": csrf_of(page)})
    assert done.status_code == 303 and done.headers["location"] == f"/?done=approved%20{waiting.fingerprint}"
    waiting.join(5)
    assert waiting.result is None and pending_runs(state) == []  # the run proceeds
    cli_copy = site_yaml(tmp_path / "cli", approval="manual")
    assert CliRunner().invoke(cli, ["site", "--config", str(cli_copy), "--approve", waiting.fingerprint]).exit_code == 0
    assert (state / "approvals.txt").read_bytes() == (tmp_path / "cli" / "state" / "approvals.txt").read_bytes()
    assert "Run approved" in c.get(done.headers["location"]).text
    assert c.post("/runs/approve", data={"fingerprint": "0123456789abcdef", "csrf": csrf_of(page)}).status_code == 404


def test_refusing_ends_the_wait_at_once(site):
    path, state = site
    waiting = WaitingRun(state, timeout=60).start_waiting()
    c = client("site", path)
    started = time.monotonic()
    assert c.post("/runs/refuse", data={"fingerprint": waiting.fingerprint, "csrf": csrf_of(c.get("/").text)}).status_code == 303
    waiting.join(5)
    assert time.monotonic() - started < 5 and waiting.result.key == "approval" and "refused by the site's operator" in waiting.result.reason
    assert refused_runs(state) == {waiting.fingerprint} and pending_runs(state) == []


def test_login_is_required_off_loopback(run_dir, tmp_path):
    guard = make_guard(ConsoleSettings(address="10.1.2.3:8765"), "10.1.2.3")
    assert guard.login and guard.token and "10.1.2.3" in guard.allowed_hosts
    c = client("run", run_dir, guard, base_url="http://10.1.2.3:8765")
    assert c.get("/").status_code == 303 and c.get("/").headers["location"] == "/login"
    assert c.get("/api/run").status_code == 401 and c.get("/files/config.yaml").status_code == 303
    login = c.get("/login").text
    assert c.post("/login", data={"secret": guard.token}).status_code == 403  # no CSRF token
    assert c.post("/login", data={"secret": "guess", "csrf": csrf_of(login)}).status_code == 403
    assert c.post("/login", data={"secret": guard.token, "csrf": csrf_of(login)}).status_code == 303
    assert c.get("/api/run").status_code == 200
    c.post("/logout", data={"csrf": csrf_of(c.get("/").text)})
    assert c.get("/api/run").status_code == 401
    with pytest.raises(ArkfedError, match="needs TLS"):
        check_binding("0.0.0.0", tls=False, login=True)
    result = CliRunner().invoke(__import__("arkfed.cli", fromlist=["app"]).app, ["console", str(run_dir), "--address", "0.0.0.0:0"])
    assert isinstance(result.exception, ArkfedError) and "needs TLS" in str(result.exception)


def test_tls_with_the_federations_certificates_and_a_password_file(run_dir, tmp_path):
    from arkfed.cli.console import console_settings
    from arkfed.federation.certs import init_certificates

    certs = init_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"], []).root
    password = tmp_path / "console.pw"
    password.write_text(hash_password("correct horse battery") + "\n")
    settings = console_settings("127.0.0.1:0", certs, None, None, False, password, 2.0)
    running = start_console("run", run_dir, settings)
    try:
        assert running.url.startswith("https://127.0.0.1:") and running.guard.login and running.guard.token is None
        with httpx.Client(base_url=running.url, verify=ssl.create_default_context(cafile=str(certs / "ca.crt"))) as web:
            first = web.get("/")
            assert first.status_code == 303 and "secure" in first.headers["set-cookie"].lower()
            page = web.get("/login")
            assert page.headers["strict-transport-security"]
            assert web.post("/login", data={"secret": "wrong password!", "csrf": csrf_of(page.text)}).status_code == 403
            assert web.post("/login", data={"secret": "correct horse battery", "csrf": csrf_of(page.text)}).status_code == 303
            assert web.get("/api/run").json()["visits_done"] == 6
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # plain HTTP gets nothing
            httpx.get(running.url.replace("https", "http"), timeout=3)
    finally:
        running.stop()


def test_the_commands_serve_the_console_beside_a_coordinator_or_site_and_refuse_bad_addresses(run_dir, tmp_path):
    from arkfed.cli import app as cli
    from arkfed.cli.federation import _start_console

    lines: list[str] = []
    running = _start_console("run", run_dir, "127.0.0.1:0", None, lines.append)  # `coordinator --console 127.0.0.1:PORT`
    try:
        assert lines == [f"console: {running.url}"] and httpx.get(running.url + "api/run").json()["visits_done"] == 6
    finally:
        running.stop()
    with pytest.raises(ArkfedError, match="needs TLS"):  # --insecure (no certificates) on a public address
        _start_console("site", site_yaml(tmp_path), "0.0.0.0:0", None, lines.append)
    for args, message in ((["console"], "give a run folder"), (["console", str(run_dir), "--address", "nowhere"], "HOST:PORT")):
        result = CliRunner().invoke(cli, args)
        assert isinstance(result.exception, ArkfedError) and message in str(result.exception), result.output
