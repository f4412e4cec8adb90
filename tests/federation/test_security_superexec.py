"""Issue 22 against real processes on 127.0.0.1: other local accounts cannot act as Flower's task launcher.

One federated run on this machine (``arkfed train --federated``: one SuperLink behind its gateway,
one site's SuperNode, TLS and site keys). While it runs, two attackers run as the unprivileged
account ``nobody`` (``setpriv``), each a small client of Flower's runtime API
(``tests/runtime_attacker.py``, Flower's own ``RuntimeHttpClient``) that polls ``acquire-task``
like a SuperExec, unsigned and signed with a guessed secret, calls the task-token methods with
made-up tokens, hunts for tokens and secrets on every process's command line, and tries to read
every file under the site's ``state_dir`` and the coordinator's run folder:

- against the site's SuperNode (task type ``flwr-clientapp``);
- against the coordinator's SuperLink (task type ``flwr-serverapp``), which since issue 21 answers only the
  coordinator's own account: every call is refused 403 before Flower sees it.

The run must finish with every visit trained by arkfed's own launchers, every attacker call
refused by Flower, nothing of the run readable by ``nobody``; the SuperExec secret files are 0600
and on no process's command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arkfed.errors import ArkfedError
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.processes import LOOPBACK, wait_for_port
from arkfed.federation.site.heads import read_outbox
from arkfed.federation.superexec import check_listener, listener_uids
from arkfed.ports import free_port
from arkfed.run.folder import RunFolder
from federation_fixtures import fast_settings, make_sites, tiny_config

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 200.0
ATTACKER = Path(__file__).resolve().parents[1] / "runtime_attacker.py"
REFUSED = "refused:401:1008"  # Flower's RUNTIME_AUTHENTICATION_FAILED over HTTP
GUARDED = "refused:403:1008"  # the coordinator's SuperLink answers only its own account (issue 21), before Flower


def as_nobody(argv: list[str]) -> list[str]:
    return [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]


def start_attacker(address: str, task_type: str, ca: Path | None, read: list[Path]) -> subprocess.Popen:
    argv = [sys.executable, str(ATTACKER), "--address", address, "--task-type", task_type, "--seconds", str(RUN_TIMEOUT)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    for folder in read:
        argv += ["--read", str(folder)]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(as_nobody(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, cwd="/", text=True)


def command_lines() -> dict[int, bytes]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                pass
    return lines


class Observer:
    """What root sees of the secret files and command lines while the run goes on."""

    def __init__(self, secrets: dict[str, Path]):
        self.secrets = secrets
        self.modes: dict[str, set[int]] = {name: set() for name in secrets}
        self.owners: dict[str, set[int]] = {name: set() for name in secrets}
        self.contents: dict[str, bytes] = {}
        self.in_cmdline: dict[str, int] = {name: 0 for name in secrets}  # command lines holding the secret itself
        self.path_users: dict[str, set[str]] = {name: set() for name in secrets}  # programs given the secret's path
        self.samples = 0

    def sample(self, _status=None) -> None:
        lines = command_lines()
        self.samples += 1
        for name, path in self.secrets.items():
            try:
                info = os.lstat(path)
                self.contents.setdefault(name, path.read_bytes())
            except OSError:
                continue
            self.modes[name].add(info.st_mode)
            self.owners[name].add(info.st_uid)
            for line in lines.values():
                if self.contents[name] in line:
                    self.in_cmdline[name] += 1
                if str(path).encode() in line:
                    args = line.split(b"\0")
                    if args[1:2] == [b"-m"]:  # python -m MODULE
                        program = args[2]
                    elif Path(args[0].decode()).name.startswith("python"):  # python SCRIPT (a console script's shebang)
                        program = args[1]
                    else:
                        program = args[0]
                    self.path_users[name].add(Path(program.decode()).name)


@pytest.fixture(scope="module")
def attacked_run():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the attackers as nobody")
    root = Path(tempfile.mkdtemp(prefix="arkfed-superexec-"))
    root.chmod(0o755)  # every account can come this far: what protects the run is arkfed's own folders
    result: dict = {"root": root}
    federation = None
    attackers: dict[str, subprocess.Popen] = {}
    try:
        sites = make_sites(root)[:1]
        config = tiny_config(sites, rounds=2)
        federation = LoopbackFederation(config, root / "run", sites, fast_settings(), secure=True)
        site = federation.sites[config.sites[0]]
        public = root / "public"
        public.mkdir()
        shutil.copy(federation.certs.ca_cert, public / "ca.crt")  # not a secret: every site holds it
        (public / "ca.crt").chmod(0o644)
        federation.coordinator.start()
        site.start()
        wait_for_port(LOOPBACK, site.runtime_port, site.process, 60)  # the attackers start once both listen
        attackers["site"] = start_attacker(f"127.0.0.1:{site.runtime_port}", "flwr-clientapp", None, [site.state_dir])
        attackers["coordinator"] = start_attacker(f"127.0.0.1:{federation.coordinator.superlink_port}", "flwr-serverapp",
                                                  public / "ca.crt", [federation.out])
        observer = Observer({"site": Path(getattr(site, "secret", None) or "/nonexistent"),
                             "coordinator": Path(getattr(federation.coordinator, "secret", None) or "/nonexistent")})
        time.sleep(3)  # the attackers are polling before there is any task
        federation.coordinator.submit()
        site.wait_connected()
        try:
            result["summary"] = federation.wait(timeout=RUN_TIMEOUT, on_status=observer.sample)
            result["error"] = None
        except Exception as exc:  # the figures below are still worth reporting
            result["error"] = f"{type(exc).__name__}: {exc}"
        observer.sample()
        result["observer"] = observer
        for proc in attackers.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in attackers.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"the {name} attacker failed: {err[-2000:]}"
            result[name] = json.loads(out)
            print(f"\n{name} attacker (uid {result[name]['uid']}): " + json.dumps(result[name], indent=1)[:3000])
        result["refused_logged"] = getattr(site, "refused_since_last", lambda: [])()
        if hasattr(site, "refused_since_last"):  # what `arkfed site` prints of them
            from rich.console import Console

            from arkfed.cli.federation import _show_refused_requests

            console = Console(record=True, width=1000, highlight=False)
            site.refused_seen = site.log_start
            _show_refused_requests(site, console)
            result["site_console"] = console.export_text()
        result["outbox"] = read_outbox(site.state_dir)
        result["visits"] = [r for r in RunFolder(federation.out).read_metrics() if r["kind"] == "visit"]
        result["config"] = config
        result["state_dir"] = site.state_dir
        result["logs"] = {p: p.read_bytes() for folder in (site.state_dir, federation.out) for p in Path(folder).rglob("*.log")}
        print(f"run: {result['error'] or 'finished'}; visits {len(result['visits'])}/{config.total_visits}; "
              f"refused requests in the site's SuperNode log: {len(result['refused_logged'])}")
        federation.stop()
        result["secrets_after_stop"] = {name: path.exists() for name, path in observer.secrets.items()}
        yield result
    finally:
        for proc in attackers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if federation is not None:
            federation.stop()
        shutil.rmtree(root, ignore_errors=True)


def check_attacker(report: dict, refused: str = REFUSED) -> None:
    assert report["uid"] == 65534 and report["polls"] > 20, report
    for what in ("acquire_unsigned", "acquire_guessed_secret"):
        assert set(report[what]) == {refused}, (what, report[what])  # every acquire-task refused
        assert report[what][refused] == report["polls"]
    assert report["claimed"] == [] and report["pulled"] == []
    assert report["token_methods_made_up_token"] and all(k.endswith(refused) for k in report["token_methods_made_up_token"])
    assert not any(k.endswith(": ok") for k in report["stolen_tokens"]), report["stolen_tokens"]  # no usable token on any command line
    assert report["secret_paths_seen"] and not any(report["secret_reads"].values())  # the path is public, the secret is not
    assert report["readable_files"] == [], report["readable_files"][:10]  # nothing of the run under readable_root


def test_a_local_account_cannot_claim_the_sites_tasks_and_the_run_finishes(attacked_run):
    run = attacked_run
    assert run["error"] is None, run["error"]
    check_attacker(run["site"])
    config = run["config"]
    # every visit was trained by arkfed's own launcher: its task processes wrote each reply to the outbox
    trained = [e for e in run["outbox"] if e["message_type"] == "train.visit"]
    assert len(trained) == len(run["visits"]) == config.total_visits and all("error" not in e for e in run["outbox"])
    assert run["summary"]["skipped"] == []
    # the site saw and logged the refused attempts (Flower's lines in its SuperNode log, read by the site)
    refused = run["refused_logged"]
    assert len(refused) >= 2 * run["site"]["polls"], len(refused)
    assert all("[ApiError:1008]" in line for line in refused)
    assert any("SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask" in line for line in refused)
    assert f"the SuperNode refused {len(refused)} runtime request(s)" in run["site_console"], run["site_console"]


def test_a_local_account_cannot_claim_the_coordinators_serverapp_task(attacked_run):
    run = attacked_run
    assert run["error"] is None, run["error"]
    check_attacker(run["coordinator"], GUARDED)
    superexec_log = next(text for path, text in run["logs"].items() if path.name == "superexec.log")
    assert b"Traceback" not in superexec_log


def test_the_secret_files_are_0600_private_and_on_no_command_line(attacked_run):
    observer = attacked_run["observer"]
    assert observer.samples > 5
    for name in ("site", "coordinator"):
        assert observer.modes[name] == {stat.S_IFREG | 0o600}, (name, [oct(m) for m in observer.modes[name]])
        assert observer.owners[name] == {os.geteuid()}
        assert len(observer.contents[name]) >= 32
        assert observer.in_cmdline[name] == 0, f"the {name}'s secret appeared on a command line"
        assert not any(observer.contents[name] in text for text in attacked_run["logs"].values())  # nor in any log
        assert attacked_run["secrets_after_stop"][name] is False  # removed when the federation stops
    assert {"flower-supernode", "arkfed.federation.site.executor"} <= observer.path_users["site"]
    assert {"arkfed.federation.coordinator.superlink", "arkfed.federation.superexec"} <= observer.path_users["coordinator"]
    assert stat.S_IMODE(attacked_run["state_dir"].stat().st_mode) == 0o700


def test_the_launcher_is_not_handed_to_a_port_another_account_listens_on():
    """Another account that binds the runtime API's port first never gets the launcher's requests."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to listen as nobody")
    port = free_port()
    listen = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); "
              "print('ok', flush=True); time.sleep(60)")
    squatter = subprocess.Popen(as_nobody([sys.executable, "-c", listen, str(port)]), stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert squatter.stdout.readline().strip() == "ok"
        assert listener_uids(port) == {65534}
        with pytest.raises(ArkfedError, match="another local account may hold the port"):
            check_listener(port, "the runtime API")
    finally:
        squatter.kill()
        squatter.wait(timeout=10)
    mine = socket.socket()
    mine.bind((LOOPBACK, port))
    mine.listen()
    try:
        check_listener(port, "the runtime API")  # this account's own listener passes
    finally:
        mine.close()
