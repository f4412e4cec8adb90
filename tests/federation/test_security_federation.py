"""Issue 8 against real Flower processes on 127.0.0.1: what an attacker can and cannot do.

One coordinator (SuperLink on loopback + the Fleet-only gateway on its public address) and two
sites whose keys were made at the sites (`certs site-key`) and registered by the coordinator
(`certs add-site`). After one signed run finishes end to end:

- an outsider holding ca.crt and a fresh key, pointed at the public address with the real `flwr`
  CLI and with raw HTTP, cannot list runs, submit a run, register or unregister a SuperNode, and
  the SuperLink's node and run lists are unchanged afterwards;
- a run submitted straight to the loopback Control API with another app bundle (its ServerApp and
  ClientApp would write marker files) is refused by the coordinator's ServerApp launcher: none of
  its code runs, no site hears of it;
- an arkfed run signed by another CA's coordinator is refused by the coordinator too;
- another local account (``nobody``) cannot use the SuperLink at all (Control, runtime or Fleet API:
  403 before Flower), so cannot submit a bundle, and cannot read the coordinator's keys; the
  ServerApp's own process cannot read them either (Landlock);
- a signed claim means one run: a replayed claim (with changed rounds, seed and mode), claims whose
  configuration the run does not follow (changed rounds, seed or mode), an expired claim, and visits
  whose authorization was signed with another key are each refused by every site, and nothing is
  trained or overwritten at the sites;
- an unregistered site key is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.certs import add_site, init_certificates, make_site_key
from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
from arkfed.federation.coordinator.status import read_status
from arkfed.federation.flower_app import CONNECTION, write_connection, write_flower_app
from arkfed.federation.processes import flower_env, flower_executable, stop_all
from arkfed.federation.site.heads import read_outbox
from arkfed.federation.site.node import SiteNode
from arkfed.ports import free_port
from arkfed.site.config import load_site_config
from federation_fixtures import fast_settings, make_sites, site_name, tiny_config

RUN_TIMEOUT = 240.0
pytestmark = pytest.mark.slow


class Federation:
    """The coordinator, its certificate folder, and the sites (with keys made at the sites)."""

    def __init__(self, root: Path):
        self.root = root
        self.site_yamls = make_sites(root)[:2]
        self.names = [site_name(p) for p in self.site_yamls]
        self.certs = init_certificates(root / "coordinator-certs", ["127.0.0.1"])  # no site keys here
        self.site_keys = {}
        for name in self.names:  # at each site: its own key; only the .pub travels
            key, pub = make_site_key(name, root / f"{name}-keys")
            add_site(self.certs, name, pub)
            self.site_keys[name] = key
        self.run_dir = root / "run"
        config = tiny_config(self.site_yamls, rounds=1)
        prepare_run(self.run_dir, config, fast_settings(), resume=False)
        self.coordinator = Coordinator(self.run_dir, f"127.0.0.1:{free_port()}", self.certs, config.sites)
        self.sites = {name: SiteNode(path, self.coordinator.address, self.certs.ca_cert, self.site_keys[name], check_data=False)
                      for name, path in zip(self.names, self.site_yamls)}

    def start(self) -> None:
        self.coordinator.start()
        for node in self.sites.values():
            node.start()
        self.coordinator.submit()
        for node in self.sites.values():
            node.wait_connected()

    def stop(self) -> None:
        stop_all([p for node in self.sites.values() for p in (node.executor, node.process)])
        self.coordinator.stop()

    def flwr(self, *args: str, home: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The real flwr CLI (the coordinator's own, on loopback, unless ``home`` says otherwise)."""
        env = self.coordinator.env if home is None else flower_env(home)
        return subprocess.run([flower_executable("flwr"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def superlink_lists(self) -> tuple[set[int], set[int]]:
        """Run ids and node ids, as the coordinator's own flwr CLI lists them (loopback Control API)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            runs, nodes = pool.map(lambda args: self.flwr(*args, CONNECTION, "--format", "json"), [["ls"], ["supernode", "ls"]])
        for done in (runs, nodes):
            assert done.returncode == 0, done.stdout + done.stderr
        return ({int(r["run-id"]) for r in json.loads(runs.stdout)["runs"]},
                {int(n["node-id"]) for n in json.loads(nodes.stdout)["nodes"]})

    def outbox_errors(self, name: str) -> list[str]:
        state = load_site_config(self.sites[name].config_path).local_state_dir
        return [e["error"]["reason"] for e in read_outbox(state) if "error" in e]


@pytest.fixture(scope="module")
def federation():
    root = Path(tempfile.mkdtemp(prefix="arkfed-secure-"))
    root.chmod(0o755)  # every account can come this far: what protects the run is arkfed's own folders and modes
    fed = Federation(root)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_keys_made_at_the_sites_join_and_the_signed_run_finishes(federation):
    summary = federation.coordinator.wait(timeout=RUN_TIMEOUT).summary
    assert summary["skipped"] == [] and set(summary["sites"]) == set(federation.names)
    for name, key in federation.site_keys.items():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not federation.certs.site_key(name).exists()  # the coordinator never held a site's private key
        assert federation.outbox_errors(name) == []
    registered = (federation.run_dir / "logs" / "registered-sites.log").read_text()
    assert all(name in registered for name in federation.names)
    # the SuperLink itself is not reachable on the public port, and listens on loopback only
    superlink_argv = federation.coordinator.superlink.argv
    assert superlink_argv[superlink_argv.index("--host") + 1] == "127.0.0.1"
    assert federation.coordinator.superlink_port != federation.coordinator.port


def test_an_outsider_with_ca_crt_and_a_fresh_key_cannot_control_the_superlink(federation, tmp_path):
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    runs_before, nodes_before = federation.superlink_lists()
    assert len(nodes_before) == 2 and len(runs_before) == 1

    # the outsider: the federation's ca.crt (every site has it), its own key, the public address
    home = tmp_path / "outsider"
    write_connection(home, federation.coordinator.port, federation.certs.ca_cert)
    key, pub = make_site_key("evil", tmp_path / "evil-keys")
    app_dir = write_flower_app(tmp_path / "stolen-run")  # an arkfed-looking app to submit
    attempts = {
        "list runs": ["ls", CONNECTION],
        "submit a run": ["run", str(app_dir), CONNECTION],
        "register a SuperNode": ["supernode", "register", str(pub), CONNECTION, "--name", "evil"],
        "unregister a SuperNode": ["supernode", "unregister", str(min(nodes_before)), CONNECTION],
        "list SuperNodes": ["supernode", "ls", CONNECTION],
    }
    env = flower_env(home)
    running = {what: subprocess.Popen([flower_executable("flwr"), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
               for what, args in attempts.items()}  # real processes doing the forbidden things, at once
    for what, proc in running.items():
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0, f"the outsider could {what}: {output[-300:]}"

    # raw HTTP: only Fleet routes are forwarded; Control, ServerAppIo (runtime) and docs never are
    base = f"https://127.0.0.1:{federation.coordinator.port}"
    import ssl

    with httpx.Client(verify=ssl.create_default_context(cafile=federation.certs.ca_cert), timeout=10) as client:
        assert client.get(f"{base}/health").status_code == 200  # the gateway reaches the SuperLink
        for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                             ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/get-nodes"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/fleet/register-node"),
                             ("POST", "/v1/fleet/unregister-node"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                             ("POST", "/v1/fleet/get-run/../../control/list-runs"), ("GET", "/v1/fleet/get-run")]:
            reply = client.request(method, base + path, content=b"\x00", headers={"content-type": "application/protobuf"})
            assert reply.status_code in (404, 405), (method, path, reply.status_code, reply.text[:200])
        # a Fleet call without a site signature reaches the SuperLink, which refuses it
        assert client.post(f"{base}/v1/fleet/get-run", content=b"",
                           headers={"content-type": "application/protobuf"}).status_code == 401

    assert federation.superlink_lists() == (runs_before, nodes_before)
    gateway_log = federation.coordinator.gateway.log_text()
    assert "refused POST /v1/control/list-runs" in gateway_log and "refused POST /v1/control/register-node" in gateway_log


EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evilapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evilapp.server_app:app"
clientapp = "evilapp.client_app:app"

[tool.flwr.app.config]
report = {report}
"""

EVIL_SERVER = '''\
import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

Path({marker}).write_text("coordinator code ran at import")
app = ServerApp()


@app.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    request = ConfigRecord({"run_uid": json.dumps("anything")})
    messages = [Message(RecordDict({"request": request}), node, "query.hello") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=90)
    report = [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None} for r in replies]
    with open(context.run_config["report"], "w") as f:
        json.dump({"nodes": nodes, "replies": report}, f)
'''

EVIL_CLIENT = '''\
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker}).write_text("site code ran at import")
app = ClientApp()


@app.query()
def query(msg, context):
    Path({marker}).write_text("site code ran")
    return Message(RecordDict(), reply_to=msg)
'''


def _evil_app(folder: Path, markers: Path, report: Path) -> Path:
    """Another Flower app: its ServerApp and ClientApp write marker files when imported or run."""
    app_dir = folder / "evil"
    (app_dir / "evilapp").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(EVIL_PYPROJECT.format(report=json.dumps(str(report))))
    (app_dir / "evilapp" / "__init__.py").write_text("")
    (app_dir / "evilapp" / "server_app.py").write_text(EVIL_SERVER.replace("{marker}", repr(str(markers / "server-marker.txt"))))
    (app_dir / "evilapp" / "client_app.py").write_text(EVIL_CLIENT.replace("{marker}", repr(str(markers / "client-marker.txt"))))
    return app_dir


def _launcher_log(federation) -> str:
    return federation.coordinator.launcher.log_text()


def test_a_run_with_another_bundle_submitted_on_loopback_is_refused_by_the_coordinator(federation, tmp_path):
    """Even the coordinator's own account: the ServerApp launcher runs arkfed's ServerApp or nothing."""
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    report = tmp_path / "report.json"
    app_dir = _evil_app(tmp_path, tmp_path, report)
    errors_before = {name: len(federation.outbox_errors(name)) for name in federation.names}
    runs_before, _ = federation.superlink_lists()

    done = federation.flwr("run", str(app_dir), CONNECTION)  # straight to the loopback Control API
    assert done.returncode == 0, done.stdout + done.stderr  # Flower accepts the submission ...
    reason = "the run's app bundle holds files besides pyproject.toml"
    _wait_for(lambda: reason in _launcher_log(federation), 120, "the launcher to refuse the bundle")  # ... arkfed does not run it
    time.sleep(2)
    runs, _ = federation.superlink_lists()
    listed = json.loads(federation.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
    new = [r for r in listed if int(r["run-id"]) in runs - runs_before]
    print(f"\nforeign bundle from the coordinator's account: {json.dumps(new)[:400]}")
    assert len(new) == 1 and "failed" in json.dumps(new[0]).lower(), new
    assert not (tmp_path / "server-marker.txt").exists(), "the other bundle's ServerApp code ran at the coordinator"
    assert not (tmp_path / "client-marker.txt").exists() and not report.exists()
    for name in federation.names:  # no site ever heard of it
        assert len(federation.outbox_errors(name)) == errors_before[name]


def test_an_arkfed_run_signed_by_another_coordinator_is_refused_by_the_coordinator(federation, tmp_path):
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    rogue = init_certificates(tmp_path / "rogue-certs", ["127.0.0.1"])  # another CA, another coordinator key
    out = tmp_path / "rogue-run"
    prepare_run(out, tiny_config(federation.site_yamls, rounds=1), fast_settings(join_timeout=60.0), resume=False)
    app_dir = write_flower_app(out, rogue)
    errors_before = {name: len(federation.outbox_errors(name)) for name in federation.names}
    done = federation.flwr("run", str(app_dir), CONNECTION)
    assert done.returncode == 0, done.stdout + done.stderr
    _wait_for(lambda: "unknown or outdated ticket" in _launcher_log(federation), 120, "the launcher to refuse the run")
    assert read_status(out) is None and not (out / "checkpoint.safetensors").exists()  # its ServerApp never ran
    for name in federation.names:
        assert len(federation.outbox_errors(name)) == errors_before[name]


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

RAW_HTTP = """
import json, ssl, sys, httpx
base, ca = sys.argv[1], sys.argv[2]
codes = {}
with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=20) as client:
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task",
                 "/v1/runtime/get-nodes", "/v1/fleet/activate-node", "/health"):
        method = "GET" if path == "/health" else "POST"
        reply = client.request(method, base + path, content=b"", headers={"content-type": "application/protobuf"})
        codes[path] = reply.status_code
print(json.dumps(codes))
"""

READ_FILES = """
import json, os, sys
readable, denied = [], []
paths = [p for arg in sys.argv[1:] for p in ([arg] if not os.path.isdir(arg) else
         [os.path.join(b, n) for b, _, files in os.walk(arg, onerror=lambda e: None) for n in files])]
for path in paths:
    try:
        open(path, "rb").read(1)
        readable.append(path)
    except OSError as exc:
        denied.append(f"{os.path.basename(path)}: errno {exc.errno}")
print(json.dumps({"readable": readable, "denied": denied}))
"""


def test_another_local_account_cannot_submit_to_the_superlink_nor_read_the_keys(federation):
    """As ``nobody``: the real ``flwr`` CLI against the coordinator's SuperLink, raw HTTP to every API,
    and reading every file of the certificate and run folders."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    public = Path(tempfile.mkdtemp(prefix="arkfed-nobody-"))
    try:
        public.chmod(0o777)
        shutil.copy(federation.certs.ca_cert, public / "ca.crt")  # public: every site holds it
        (public / "ca.crt").chmod(0o644)
        home = public / "flwr-home"
        write_connection(home, federation.coordinator.superlink_port, public / "ca.crt")
        app_dir = _evil_app(public, public, public / "report.json")
        for path in [home, *home.rglob("*"), *public.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)
        runs_before, nodes_before = federation.superlink_lists()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(public), "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        _, pub = make_site_key("mallory", public / "keys")
        (public / "keys").chmod(0o755)
        pub.chmod(0o644)

        def as_nobody(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run([*NOBODY, *argv], env=env, capture_output=True, text=True, timeout=120, cwd="/", stdin=subprocess.DEVNULL)

        flwr = flower_executable("flwr")
        cli = {what: as_nobody(flwr, *args) for what, args in {
            "submit a foreign bundle": ["run", str(app_dir), CONNECTION],
            "list runs": ["ls", CONNECTION],
            "register a SuperNode": ["supernode", "register", str(pub), CONNECTION, "--name", "mallory"],
            "list SuperNodes": ["supernode", "ls", CONNECTION]}.items()}
        superlink = f"https://127.0.0.1:{federation.coordinator.superlink_port}"
        raw = as_nobody(sys.executable, "-c", RAW_HTTP, superlink, str(public / "ca.crt"))
        codes = json.loads(raw.stdout)
        keys = [str(federation.certs.ca_key), str(federation.certs.coordinator_key)]
        files = json.loads(as_nobody(sys.executable, "-c", READ_FILES, str(federation.certs.root), str(federation.run_dir), *keys).stdout)
        time.sleep(5)
        print(f"\nnobody with the flwr CLI: {({k: v.returncode for k, v in cli.items()})}; raw HTTP: {codes}; "
              f"files readable: {files['readable'][:5]}, unreadable: {files['denied'][:5]}")
        for what, done in cli.items():
            assert done.returncode != 0, f"nobody could {what}: {done.stdout[-300:]}"
        guarded = {k: v for k, v in codes.items() if not k.startswith(("/v1/fleet/", "/health"))}
        assert set(guarded.values()) == {403}, codes  # Control and runtime APIs, before Flower sees the request
        # the Fleet routes the public gateway forwards reach Flower, which wants a registered site's signature
        assert codes["/v1/fleet/activate-node"] == 401 and codes["/health"] == 200, codes
        assert files["readable"] == [] and {"ca.key: errno 13", "coordinator.key: errno 13"} <= set(files["denied"])
        assert not (public / "server-marker.txt").exists() and not (public / "client-marker.txt").exists()
        assert federation.superlink_lists() == (runs_before, nodes_before)
        assert "from account 65534 (not the coordinator's)" in federation.coordinator.superlink.log_text()
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_the_serverapp_runs_with_the_key_files_hidden(federation):
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    log = _launcher_log(federation)
    assert "2 key file(s) hidden from this process (Landlock)" in log, log[-2000:]
    argv = " ".join(federation.coordinator.launcher.argv)
    assert f"--hide {federation.certs.ca_key}" in argv and f"--hide {federation.certs.coordinator_key}" in argv


# -- a signed claim means one run -------------------------------------------------------------------


def _signed_entries(federation) -> dict[str, str]:
    """The run-config entries of the federation's first (finished) run, from its app."""
    import tomllib

    project = tomllib.loads((federation.run_dir / "flower" / "app" / "pyproject.toml").read_text())
    return {k: v for k, v in project["tool"]["flwr"]["app"]["config"].items() if k.startswith("arkfed-")}


def _entries_for(federation, claim: dict) -> dict[str, str]:
    from arkfed.federation.signing import TICKET_KEY, sign_claim

    return {TICKET_KEY: claim["nonce"], **sign_claim(claim, federation.certs.coordinator_key, federation.certs.coordinator_cert)}


def _heads(federation) -> dict[str, float]:
    state = [load_site_config(p).local_state_dir for p in federation.site_yamls]
    return {str(p): p.stat().st_mtime for folder in state for p in (Path(folder) / "runs").rglob("*.safetensors")}


def _hostile_run(federation, tmp_path, monkeypatch, name: str, config, entries: dict[str, str], run_uid: str):
    """Submit ``config`` with ``entries`` (a claim and its ticket) as a coordinator whose own checks
    are off (a compromised coordinator process, or a replayer who got an old claim into a run): the
    signing service admits the run and signs whatever its ServerApp asks. What the sites answer."""
    import arkfed.federation.coordinator.signer as signer_module
    from arkfed.federation.signing import CLAIM_KEY, TICKET_KEY, claim_of

    out = tmp_path / name
    prepare_run(out, config, fast_settings(join_timeout=60.0, run_uid=run_uid), resume=False)
    service = federation.coordinator.signer
    monkeypatch.setattr(signer_module, "check_member_request", lambda claim, request, ca: None)  # signs any plan
    monkeypatch.setattr(service, "_start", lambda request: (setattr(service.current, "started", True), {"ok": True})[1])
    service.current = signer_module.Submission(str(out.resolve()), entries[TICKET_KEY], claim_of(entries), entries.get(CLAIM_KEY))
    return _run_and_collect(federation, out, write_flower_app(out, entries=entries))


def _run_and_collect(federation, out: Path, app_dir: Path):
    before = {n: len(read_outbox(load_site_config(federation.sites[n].config_path).local_state_dir)) for n in federation.names}
    done = federation.flwr("run", str(app_dir), CONNECTION)
    assert done.returncode == 0, done.stdout + done.stderr
    status = _wait_for(lambda: (s := read_status(out)) is not None and s.finished and s, 240, f"the run in {out.name} to end")
    answers = {}
    for n in federation.names:
        entries = read_outbox(load_site_config(federation.sites[n].config_path).local_state_dir)[before[n]:]
        answers[n] = [(e["message_type"], e["error"]["reason"] if "error" in e else "ok") for e in entries]
    print(f"\n{out.name}: run {status.phase}; sites answered {json.dumps(answers)[:1500]}")
    return status, answers


@pytest.mark.parametrize("change", [{"rounds": 2}, {"seed": 5}, {"mode": "parallel"}])
def test_a_replayed_claim_is_refused_by_every_site_and_overwrites_nothing(federation, tmp_path, monkeypatch, change):
    """The issue's replay: the first run's 1-round cyclic claim with seed 3, resubmitted to run
    with more rounds, another seed or in parallel mode."""
    from arkfed.federation.signing import claim_of

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    entries = _signed_entries(federation)
    claim = claim_of(entries)
    heads = _heads(federation)
    config = tiny_config(federation.site_yamls, rounds=1).model_copy(update=change)
    status, answers = _hostile_run(federation, tmp_path, monkeypatch, "replay", config, entries, claim["run_uid"])
    assert status.phase == "failed"
    for name, replies in answers.items():
        assert replies and all(reason.startswith("refused: replay: this signed run") for _, reason in replies), (name, replies)
    assert _heads(federation) == heads  # the first run's heads at the sites are untouched


@pytest.mark.parametrize("change", [{"rounds": 2, "seed": 5}, {"mode": "parallel"}])
def test_a_claim_the_run_does_not_follow_is_refused_where_it_differs(federation, tmp_path, monkeypatch, change):
    """A fresh claim for a 1-round cyclic run with seed 3, and a run of another configuration: every
    visit whose plan is not the signed one is refused (in parallel mode the first visit is the same
    operation as the signed run's first visit, and is served as signed)."""
    from arkfed.federation.signing import make_claim
    from arkfed.run.plan import plan_groups

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    signed = tiny_config(federation.site_yamls, rounds=1)
    name = "changed-" + "-".join(change)
    claim = make_claim(signed, name, 3600)
    config = signed.model_copy(update=change)
    status, answers = _hostile_run(federation, tmp_path, monkeypatch, name, config, _entries_for(federation, claim), name)
    signed_plans = {p.visit: p for group in plan_groups(signed) for p in group}
    for site, replies in answers.items():
        plans = [p for group in plan_groups(config) for p in group if p.site == site]
        differing = sum(signed_plans.get(p.visit) != p for p in plans)
        visits = [reason for kind, reason in replies if kind == m.VISIT]
        refused = [r for r in visits if r != "ok"]
        assert len(refused) == differing and len(visits) - len(refused) == len(plans) - differing, (site, replies)
        assert all("differs from the signed run configuration" in r or "outside the signed run" in r for r in refused), refused
    assert sum(len([1 for kind, r in replies if kind == m.VISIT and r != "ok"]) for replies in answers.values()) >= 1
    if "seed" in change:  # every site refused every visit
        assert all(all(r != "ok" for kind, r in replies if kind == m.VISIT) for replies in answers.values())


def test_an_expired_claim_is_refused_by_every_site(federation, tmp_path, monkeypatch):
    from arkfed.federation.signing import make_claim

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    config = tiny_config(federation.site_yamls, rounds=1)
    claim = make_claim(config, "expired", lifetime=-60)
    status, answers = _hostile_run(federation, tmp_path, monkeypatch, "expired", config, _entries_for(federation, claim), "expired")
    assert status.phase == "failed"
    for name, replies in answers.items():
        assert replies and all("refused: the signed run expired at" in reason for _, reason in replies), (name, replies)


def test_visits_authorized_with_another_key_are_refused_by_every_site(federation, tmp_path, monkeypatch):
    """A properly signed run whose visit plans are signed with a key the CA never certified."""
    from arkfed.federation.signing import load_signing_key

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    rogue = init_certificates(tmp_path / "rogue-certs", ["127.0.0.1"])
    out = tmp_path / "bad-signature"
    prepare_run(out, tiny_config(federation.site_yamls, rounds=1), fast_settings(join_timeout=60.0), resume=False)
    service = federation.coordinator.signer
    entries = service.submit(out, 3600)  # the real claim, signed with the real key
    monkeypatch.setattr(service, "_key", load_signing_key(rogue.coordinator_key))  # ... and every visit with another
    status, answers = _run_and_collect(federation, out, write_flower_app(out, entries=entries))
    for name, replies in answers.items():
        requests = [reason for kind, reason in replies if kind in (m.VISIT, m.EVALUATE)]
        assert requests and all("authorization does not match its plan and weights" in r for r in requests), (name, replies)
        assert any(kind == m.HELLO and reason == "ok" for kind, reason in replies)  # the claim itself was fine


def test_an_unregistered_site_key_is_refused(federation, tmp_path):
    key, _ = make_site_key(federation.names[0], tmp_path / "new-keys")  # made, never registered
    import yaml

    data = yaml.safe_load(federation.site_yamls[0].read_text()) | {"state_dir": str(tmp_path / "intruder-state")}
    intruder_yaml = tmp_path / "intruder.yaml"
    intruder_yaml.write_text(yaml.safe_dump(data))
    intruder = SiteNode(intruder_yaml, federation.coordinator.address, federation.certs.ca_cert, key, check_data=False)
    try:
        intruder.start()
        with pytest.raises(ArkfedError, match=r"refused this site's key .* it is not registered"):
            intruder.wait_connected(timeout=60)
    finally:
        intruder.stop()
    assert os.path.basename(str(key)) == f"{federation.names[0]}.key"


# -- signed membership changes (issue 17, item 5) ----------------------------------------------------


def _membership_run(federation, tmp_path, member: str, name: str):
    """A 1-round run of ``member`` alone, submitted and signed by the real coordinator: its folder and app."""
    out = tmp_path / name
    yaml_path = federation.site_yamls[federation.names.index(member)]
    prepare_run(out, tiny_config([yaml_path], rounds=1), fast_settings(join_timeout=60.0), resume=False)
    entries = federation.coordinator.signer.submit(out, 3600)
    return out, write_flower_app(out, entries=entries), entries


def test_a_membership_change_signed_by_another_ca_is_refused_by_every_site(federation, tmp_path):
    """An attacker with their own CA and coordinator key writes a membership change admitting a
    connected site into a real, properly signed run; the ServerApp carries it to the sites. Each
    site, presented with it, refuses it and serves nothing of the run (each site in turn is the one
    admitted, so every site is presented with the forged change)."""
    from arkfed.federation.membership import CHANGES_FILE, make_change, sign_change
    from arkfed.federation.signing import claim_of
    from arkfed.io import append_jsonl

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    rogue = init_certificates(tmp_path / "rogue-certs", ["127.0.0.1"])  # another CA, another coordinator key
    for member, admitted in (federation.names, federation.names[::-1]):
        out, app_dir, entries = _membership_run(federation, tmp_path, member, f"forged-{admitted}")
        pub = federation.certs.registered_sites()[admitted].read_bytes()
        change = make_change(claim_of(entries), admitted, pub, from_round=0)
        append_jsonl(out / CHANGES_FILE, sign_change(change, rogue.coordinator_key, rogue.coordinator_cert))
        status, answers = _run_and_collect(federation, out, app_dir)
        assert status.phase == "failed"
        refused = [r for kind, r in answers[admitted] if r != "ok"]
        assert refused and all("membership change refused" in r and "not issued by this site's federation CA" in r for r in refused)
        for replies in answers.values():  # nothing of the run was trained or evaluated anywhere
            assert not [kind for kind, _ in replies if kind in (m.VISIT, m.EVALUATE)], replies


def test_a_site_admitted_by_a_signed_membership_change_joins_the_running_federation(federation, tmp_path):
    """`arkfed admit` at the coordinator, for a run of one site: the other site joins from round 1 and trains."""
    from arkfed.federation.coordinator.admission import admit_site

    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    first, second = federation.names
    out, app_dir, _ = _membership_run(federation, tmp_path, first, "admitted")
    admit_site(out, second, federation.certs.registered_sites()[second], federation.certs, from_round=0, register=False)
    status, answers = _run_and_collect(federation, out, app_dir)
    assert status.phase == "finished", status.error
    for name in federation.names:
        assert (m.VISIT, "ok") in answers[name] and all(r == "ok" for _, r in answers[name]), (name, answers[name])
    from arkfed.run.folder import RunFolder

    config = RunFolder(out).read_config()
    assert config.sites == [first, second] and config.admitted == {second: 0}
