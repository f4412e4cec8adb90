"""A federation that lives (issue 17), over real processes on 127.0.0.1 with TLS and site keys.

- quorum: 3 listed sites, ``min_sites`` 2; the third site's SuperNode starts only once the run is
  under way. The run starts without it, the late site enters at the round after it joined, and every
  visit it missed is recorded as a skip with reason ``absent``;
- chaos: ``arkfed coordinator`` and three ``arkfed site`` processes; a seeded driver SIGKILLs a
  random site process and starts it again after a random delay, several times, and SIGKILLs the
  coordinator mid-visit once and starts it again with ``--resume``; the site processes, left
  running, get back in by themselves (their supervisor restarts the SuperNode, see
  :mod:`arkfed.federation.site.node`). Every planned visit is recorded exactly once (a visit or a
  skip), every visit reported finished is there, the teacher is finite and what ``--resume`` would
  continue from is what the records say.

Every process is stopped on exit; every wait has a timeout.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from arkfed.federation.certs import init_certificates
from arkfed.federation.coordinator.status import read_status
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.processes import ManagedProcess, stop_all
from arkfed.model.weights import load_ark_model
from arkfed.ports import free_port
from arkfed.run.folder import RunFolder, config_text
from arkfed.run.records import trim_metrics
from federation_fixtures import fast_settings, make_sites, site_name, tiny_config

RUN_TIMEOUT = 600.0  # a bound for a loaded machine; on 2 idle cores each test takes a small part of it

pytestmark = pytest.mark.slow


def _visit_slots(records: list[dict]) -> list[int]:
    """The visit index of every visit and skipped-visit record, in order."""
    return [r["visit"] for r in records if r["kind"] == "visit" or (r["kind"] == "skip" and r["stage"] == "visit")]


def test_a_quorum_starts_the_run_and_a_late_site_enters_at_the_next_round(tmp_path):
    paths = make_sites(tmp_path)
    config = tiny_config(paths, rounds=3).model_copy(update={"min_sites": 2})
    late = config.sites[1]  # in the middle of the visiting order
    out = tmp_path / "run"
    federation = LoopbackFederation(config, out, paths, fast_settings(), secure=True)
    started_late = []

    def start_the_late_site(status) -> None:
        node = federation.sites[late]
        if not started_late and status is not None and status.phase == "training":
            assert status.sites[late].state == "absent"  # the live view says who is missing
            node.start()
            started_late.append(status.visits_done)
        elif started_late:
            node.connected()  # starts its task executor once connected

    try:
        federation.coordinator.start()
        early = [name for name in config.sites if name != late]
        for name in early:
            federation.sites[name].start()
        federation.coordinator.submit()
        for name in early:
            federation.sites[name].wait_connected()  # and their task executors started
        summary = federation.wait(timeout=RUN_TIMEOUT, on_status=start_the_late_site)
    finally:
        federation.stop()
    records = RunFolder(out).read_metrics()
    assert sorted(_visit_slots(records)) == list(range(config.total_visits))  # every turn once
    turns = [r for r in records if r.get("site") == late and r["kind"] in ("visit", "skip") and r.get("stage", "visit") == "visit"]
    missed = [r for r in turns if r["kind"] == "skip"]
    visited = [r for r in turns if r["kind"] == "visit"]
    print(f"\nlate site started after {started_late[0]} finished visits; its turns: {[(r['round'], r['kind']) for r in turns]}")
    assert missed and visited, "the late site must miss round 1 and still train later"
    assert missed[0]["round"] == 0 and all(r["reason"] == "absent" and r["away"] for r in missed)
    assert [r["kind"] for r in turns] == ["skip"] * len(missed) + ["visit"] * len(visited)  # from its first visit on, every turn
    assert visited[0]["round"] == missed[-1]["round"] + 1
    evaluated = {(r["round"], r["model"]) for r in records if r["kind"] == "eval" and r["site"] == late}
    assert (config.rounds - 1, "teacher") in evaluated and (0, "teacher") not in evaluated
    others = [r for r in records if r["kind"] == "visit" and r["site"] != late]
    assert len(others) == 2 * config.rounds  # the two early sites never waited for it
    status = federation.coordinator.status()
    assert status.phase == "finished" and any(f"site {late!r} joined late" in w for w in status.warnings)
    assert {s["reason"] for s in summary["skipped"]} == {"absent"}


# -- chaos ------------------------------------------------------------------------------------------
class Chaos:
    """``arkfed coordinator`` and one ``arkfed site`` process per site, each its own process."""

    def __init__(self, root: Path, paths: list[Path], config):
        self.root, self.paths, self.config = root, paths, config
        self.certs = init_certificates(root / "certs", ["127.0.0.1"], config.sites)
        self.address = f"127.0.0.1:{free_port()}"
        self.out = root / "run"
        (root / "run.yaml").write_text(config_text(config))
        self.sites: dict[str, ManagedProcess | None] = {site_name(p): None for p in paths}
        self.coordinator: ManagedProcess | None = None
        self.starts = 0

    def arkfed(self, name: str, args: list[str], log: Path) -> ManagedProcess:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        return ManagedProcess.start(name, [sys.executable, "-m", "arkfed", *args], env, log)

    def start_coordinator(self, resume: bool) -> None:
        run = ["--resume", str(self.out)] if resume else ["--config", str(self.root / "run.yaml"), "--out", str(self.out),
                                                          "--join-timeout", "120", "--visit-timeout", "60", "--rejoin-wait", "3"]
        self.starts += 1
        self.coordinator = self.arkfed("coordinator", ["coordinator", *run, "--address", self.address, "--certs",
                                                       str(self.certs.root), "--quiet"], self.root / f"coordinator-{self.starts}.log")

    def start_site(self, name: str) -> None:
        path = next(p for p in self.paths if site_name(p) == name)
        self.sites[name] = self.arkfed(f"site {name}", ["site", "--config", str(path), "--coordinator", self.address,
                                                        "--root-certificates", str(self.certs.ca_cert), "--key",
                                                        str(self.certs.site_key(name)), "--connect-timeout", "60"],
                                       self.root / f"site-{name}.log")

    def check_alive(self) -> None:
        for name, proc in self.sites.items():
            if proc is not None and not proc.alive():  # only the driver kills sites, and it restarts them
                raise AssertionError(f"site {name} process exited on its own:\n{proc.log_tail(20)}")

    def stop(self) -> None:
        stop_all([self.coordinator, *self.sites.values()])


def _pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_chaos_sites_killed_and_restarted_and_the_coordinator_killed_and_resumed(tmp_path):
    paths = make_sites(tmp_path)
    config = tiny_config(paths, rounds=2)  # cyclic, 6 visits
    chaos = Chaos(tmp_path, paths, config)
    rng = random.Random(17)
    site_kills = sorted(rng.sample(range(1, config.total_visits - 1), 3))  # after these many finished visits
    coordinator_kill = rng.randrange(2, config.total_visits - 2)
    events: list[str] = []
    survivors: set[str] = set()  # site processes alive when the coordinator was killed and never killed after
    restarts: dict[str, float] = {}  # site -> when to start it again
    coordinator_killed_at, resumed, killed_serverapp = None, False, None
    started = time.monotonic()
    try:
        chaos.start_coordinator(resume=False)
        for name in config.sites:
            chaos.start_site(name)
        while True:
            assert time.monotonic() - started < RUN_TIMEOUT, f"the run did not finish; events: {events}"
            status = read_status(chaos.out)
            if status is not None and status.phase == "finished":
                break
            if status is not None and status.phase == "failed" and status.pid != killed_serverapp:  # the killed one says it stopped
                raise AssertionError(f"the run failed: {status.error}")
            chaos.check_alive()
            now = time.monotonic()
            for name, when in list(restarts.items()):
                if now >= when:
                    chaos.start_site(name)
                    events.append(f"{now - started:.0f}s start site {name}")
                    del restarts[name]
            done = status.visits_done if status is not None else 0
            if site_kills and done >= site_kills[0]:
                victim = rng.choice([n for n in config.sites if n not in restarts])
                chaos.sites[victim].kill(signal.SIGKILL)  # the `arkfed site` process; its SuperNode follows it
                chaos.sites[victim] = None
                survivors.discard(victim)
                restarts[victim] = now + rng.uniform(0.5, 6.0)
                events.append(f"{now - started:.0f}s killed site {victim} after {done} visits")
                site_kills.pop(0)
            training = status is not None and any(s.state == "training" for s in status.sites.values())
            if coordinator_killed_at is None and done >= coordinator_kill and training:
                killed_serverapp = status.pid
                os.kill(chaos.coordinator.pid, signal.SIGKILL)  # mid-visit; its processes follow it
                chaos.coordinator.popen.wait(timeout=10)
                assert _pid_gone(killed_serverapp, 30), "the ServerApp outlived its coordinator"
                coordinator_killed_at = done
                survivors = {name for name, proc in chaos.sites.items() if proc is not None}
                events.append(f"{now - started:.0f}s killed the coordinator after {done} visits")
                chaos.start_coordinator(resume=True)
                resumed = True
            if chaos.coordinator is not None and not chaos.coordinator.alive() and resumed:
                raise AssertionError(f"the resumed coordinator stopped:\n{chaos.coordinator.log_tail(30)}")
            time.sleep(0.1)
        chaos.coordinator.popen.wait(timeout=60)
        assert chaos.coordinator.returncode == 0, chaos.coordinator.log_tail(30)
        chaos.check_alive()  # every site process still serving
    finally:
        chaos.stop()
    print(f"\nchaos events: {events}; took {time.monotonic() - started:.0f} s")
    assert coordinator_killed_at is not None and not site_kills, events

    run = RunFolder(chaos.out)
    records = run.read_metrics()
    slots = _visit_slots(records)
    assert sorted(slots) == list(range(config.total_visits)), slots  # every planned visit recorded exactly once
    visits = {r["visit"]: r["site"] for r in records if r["kind"] == "visit"}
    log = "".join((chaos.out / "logs" / "serverapp.log").read_text(errors="replace"))
    reported = {(int(v) - 1, site) for v, site in re.findall(r"visit (\d+)/\d+ (\S+): loss", log)}
    assert reported and all(visits.get(visit) == site for visit, site in reported), (reported, visits)  # none lost
    assert [r["round"] for r in records if r["kind"] == "round"] == list(range(config.rounds))
    assert "resuming after visit" in log
    teacher = load_ark_model(chaos.out)
    assert all(bool(torch.isfinite(v).all()) for v in teacher.state_dict().values() if v.dtype.is_floating_point)
    # what --resume continues from is what the records say: all visits, each site's last accepted one, nothing trimmed
    checkpoint = run.load_checkpoint()
    assert checkpoint.visits_done == config.total_visits
    last = {}
    for visit in sorted(visits):
        last[visits[visit]] = visit
    assert checkpoint.versions == last
    assert trim_metrics(records, checkpoint.visits_done) == (records, set(range(config.rounds)))
    print(f"site processes that lived through the coordinator's restart: {sorted(survivors)}")
    assert survivors
    for name in survivors:  # their SuperNodes did not reconnect by themselves: the site's supervisor started them again
        text = (tmp_path / f"site-{name}.log").read_text(errors="replace")
        assert "no longer knows its node" in text and "starting the SuperNode again" in text, text
