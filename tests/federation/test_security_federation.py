"""Issue 8 against real Flower processes on 127.0.0.1: what an attacker can and cannot do.

One coordinator (SuperLink on loopback + the Fleet-only gateway on its public address) and two
sites whose keys were made at the sites (`certs site-key`) and registered by the coordinator
(`certs add-site`). After one signed run finishes end to end:

- an outsider holding ca.crt and a fresh key, pointed at the public address with the real `flwr`
  CLI and with raw HTTP, cannot list runs, submit a run, register or unregister a SuperNode, and
  the SuperLink's node and run lists are unchanged afterwards;
- a run submitted straight to the loopback Control API with another app bundle (its ClientApp
  would write a marker file) is refused by every site and none of its site code runs;
- an arkfed run signed by another CA's coordinator is refused by every site;
- an unregistered site key is refused.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from arkfed.errors import ArkfedError
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
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("secure"))
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()


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
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

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


def test_a_run_with_another_bundle_submitted_on_loopback_is_refused_by_every_site(federation, tmp_path):
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    marker, report = tmp_path / "marker.txt", tmp_path / "report.json"
    app_dir = tmp_path / "evil"
    (app_dir / "evilapp").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(EVIL_PYPROJECT.format(report=json.dumps(str(report))))
    (app_dir / "evilapp" / "__init__.py").write_text("")
    (app_dir / "evilapp" / "server_app.py").write_text(EVIL_SERVER)
    (app_dir / "evilapp" / "client_app.py").write_text(EVIL_CLIENT.format(marker=repr(str(marker))))
    errors_before = {name: len(federation.outbox_errors(name)) for name in federation.names}

    done = federation.flwr("run", str(app_dir), CONNECTION)  # straight to the loopback Control API
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(_wait_for(lambda: report.is_file() and report.read_text(), 120, "the other app's ServerApp"))
    assert len(result["nodes"]) == 2 and len(result["replies"]) == 2
    for reply in result["replies"]:
        assert reply["error"] and "refused" in reply["error"] and "evilapp" in reply["error"], reply
    for name in federation.names:
        new = federation.outbox_errors(name)[errors_before[name]:]
        assert len(new) == 1 and "holds files besides pyproject.toml" in new[0], (name, new)
    assert not marker.exists(), "the other bundle's ClientApp code ran at a site"


def test_an_arkfed_run_signed_by_another_coordinator_is_refused_by_every_site(federation, tmp_path):
    federation.coordinator.wait(timeout=RUN_TIMEOUT)
    rogue = init_certificates(tmp_path / "rogue-certs", ["127.0.0.1"])  # another CA, another coordinator key
    out = tmp_path / "rogue-run"
    prepare_run(out, tiny_config(federation.site_yamls, rounds=1), fast_settings(join_timeout=60.0), resume=False)
    app_dir = write_flower_app(out, rogue)
    done = federation.flwr("run", str(app_dir), CONNECTION)
    assert done.returncode == 0, done.stdout + done.stderr
    status = _wait_for(lambda: (s := read_status(out)) is not None and s.finished and s, 120, "the rogue run to end")
    assert status.phase == "failed" and "not issued by this site's federation CA" in status.error, status.error
    assert not (out / "checkpoint.safetensors").exists()
    for name in federation.names:
        assert any("not issued by this site's federation CA" in e for e in federation.outbox_errors(name))


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
