"""Federated Ark over real Flower processes on 127.0.0.1 (one SuperLink, one SuperNode per site).

- parity: the same seed and config give the same teacher (and the same metrics) in local and
  federated mode, 3 sites x 2 rounds, insecure and with TLS + SuperNode authentication;
- audit: every message the sites sent (their outbox logs, and the coordinator's inbox log) holds
  only model arrays and scalar metrics;
- an unregistered site key is refused with a clear message;
- a killed coordinator (its ServerApp) resumes from the last finished visit and still matches local mode;
- a site killed mid-run is retried, then skipped, and the run still finishes and reports it.

Every process is started by :class:`LoopbackFederation`/:class:`SiteNode` and stopped on exit;
every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import yaml

from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.certs import CertificateFolder, write_site_key_pair
from arkfed.federation.loopback import LoopbackFederation
from arkfed.federation.site.heads import read_outbox
from arkfed.federation.site.node import SiteNode
from arkfed.model.ark import ArkModel
from arkfed.model.weights import load_ark_model
from arkfed.run.folder import RunFolder
from arkfed.run.local import train_local
from arkfed.site.load import load_site
from federation_fixtures import fast_settings, make_sites, max_abs_diff, site_copies, tiny_config

RUN_TIMEOUT = 300.0
PARITY_TOLERANCE = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    return make_sites(tmp_path_factory.mktemp("federation"))


@pytest.fixture(scope="module")
def local_run(sites, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    train_local(tiny_config(sites), out, site_configs=sites)
    return out


@pytest.fixture(scope="module")
def secure_federation(sites, tmp_path_factory):
    """TLS + SuperNode authentication, started with the parity run; later tests submit more runs."""
    root = tmp_path_factory.mktemp("secure")
    own_sites = site_copies(sites, root / "sites", root / "state")
    federation = LoopbackFederation(tiny_config(own_sites), root / "parity", own_sites, fast_settings(), secure=True)
    try:
        federation.start()
        yield federation
    finally:
        federation.stop()


def _check_parity(local: Path, federated: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.safetensors", "teacher.safetensors", "student.safetensors", "summary.json"):
        assert (federated / name).is_file(), name
    assert max_abs_diff(load_ark_model(local, "teacher"), load_ark_model(federated, "teacher")) < PARITY_TOLERANCE
    assert max_abs_diff(load_ark_model(local, "student"), load_ark_model(federated, "student")) < PARITY_TOLERANCE
    ours, theirs = RunFolder(local).read_metrics(), RunFolder(federated).read_metrics()
    def key(r):
        return r["kind"], r.get("round"), r.get("visit"), r.get("site"), r.get("model")

    assert [key(r) for r in ours] == [key(r) for r in theirs]  # same visits, evaluations, rounds, in order
    for a, b in zip(ours, theirs):
        for field in ("loss", "task_loss", "consistency_loss", "mean_auc"):
            if field in a and a[field] is not None:
                assert b[field] == pytest.approx(a[field], abs=1e-5), (key(a), field)
    assert not any(r["kind"] == "skip" for r in theirs)


def _forbidden_strings(sites: list[Path]) -> list[str]:
    """What must never appear in a message: data paths, file names, patient ids."""
    words = []
    for path in sites:
        site = load_site(path)
        words += [str(site.config.root), str(path)]
        for table in site.splits.values():
            words += [Path(table.images.describe(i)).name for i in range(len(table))]
            words += [str(p) for p in table.meta["patient_id"].dropna().unique()]
    return [w for w in words if len(w) >= 4]


def _check_audit(entries: list[dict], expected_sizes: dict[str, int], forbidden: list[str], origin: str) -> None:
    """Each reply holds only model arrays (packed per dtype, sized like the model) and scalar
    metrics; a hello reply adds the site's name and label schema."""
    assert entries, f"no messages logged in {origin}"
    for entry in entries:
        assert "error" not in entry, (origin, entry)
        kind = entry["message_type"]
        content = entry["content"]
        if kind == m.HELLO:
            assert set(content) == {m.SITE, m.METRICS}
            assert set(content[m.SITE]["values"]) == {"name", "schema", "member"}
        elif kind == m.VISIT:
            assert set(content) == {m.STUDENT, m.METRICS}, (origin, content.keys())
            arrays = content[m.STUDENT]["arrays"]
            assert {dtype: info["shape"][0] for dtype, info in arrays.items()} == expected_sizes
            assert all(len(info["shape"]) == 1 for info in arrays.values())  # no image-shaped tensor
        elif kind == m.EVALUATE:
            assert set(content) <= {m.STUDENT, m.TEACHER} and content, (origin, content.keys())
        else:
            pytest.fail(f"unexpected message type {kind} in {origin}")
        for name, record in content.items():
            if record["kind"] == "metrics":
                assert all(isinstance(v, (int, float)) or v is None for v in record["values"].values())
            elif record["kind"] == "config":
                assert kind == m.HELLO and name == m.SITE
        text = json.dumps(content)
        leaked = [w for w in forbidden if w in text]
        assert not leaked, f"{origin} sent {leaked[:3]}"
        assert not re.search(r"/(tmp|home|mnt|data|work)/", text), f"{origin} sent a path"


def test_parity_insecure_and_every_message_is_only_weights_and_metrics(sites, local_run, tmp_path):
    own_sites = site_copies(sites, tmp_path / "sites", tmp_path / "state")
    config = tiny_config(own_sites)
    out = tmp_path / "fed"
    with LoopbackFederation(config, out, own_sites, fast_settings(), secure=False) as federation:
        federation.start()
        summary = federation.wait(timeout=RUN_TIMEOUT)
    _check_parity(local_run, out)
    assert set(summary["sites"]) == set(config.sites) and summary["skipped"] == []

    expected = m.layout(ArkModel(load_ark_model(out).spec))
    forbidden = _forbidden_strings(own_sites)
    sent_by_sites = []
    for path in own_sites:
        site = load_site(path)
        outbox = read_outbox(site.config.local_state_dir)
        _check_audit(outbox, expected, forbidden, f"site {site.name}")
        kinds = [e["message_type"] for e in outbox]
        assert kinds.count(m.VISIT) == config.rounds and kinds.count(m.EVALUATE) == config.rounds and m.HELLO in kinds
        sent_by_sites += outbox
    inbox = [json.loads(line) for line in (out / "logs" / "inbox.jsonl").read_text().splitlines()]
    _check_audit(inbox, expected, forbidden, "coordinator inbox")
    assert len(inbox) == len(sent_by_sites)  # everything the sites sent arrived, and nothing else
    private = [out / "logs" / "inbox.jsonl"]  # audit logs and process logs: their owner's only
    for path in own_sites:
        state = load_site(path).config.local_state_dir
        private += [state / "outbox.jsonl", state / "logs" / "supernode.log", state / "logs" / "executor.log"]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in private} == {str(p): "0o600" for p in private}


def test_parity_with_tls_and_authentication_unknown_keys_refused_and_resume_after_a_killed_coordinator(
    secure_federation, local_run, tmp_path
):
    federation = secure_federation
    rogue_keys = CertificateFolder(tmp_path / "rogue")
    key, _ = write_site_key_pair(rogue_keys, "intruder")
    first = federation.sites[federation.config.sites[0]].config_path
    intruder_yaml = tmp_path / "intruder.yaml"
    intruder_yaml.write_text(yaml.safe_dump(yaml.safe_load(first.read_text()) | {"state_dir": str(tmp_path / "intruder")}))
    intruder = SiteNode(intruder_yaml, federation.address, federation.certs.ca_cert, key, check_data=False)
    try:
        intruder.start()
        with pytest.raises(ArkfedError, match=r"refused this site's key .*intruder.key \(SHA256:.*\): it is not registered"):
            intruder.wait_connected(timeout=60)
    finally:
        intruder.stop()

    killed = []

    def kill_the_coordinator(status) -> None:  # the ServerApp dies after some finished visits
        if not killed and status is not None and status.visits_done >= 2 and status.pid:
            os.kill(status.pid, signal.SIGKILL)
            federation.coordinator.runner.stop()
            killed.append(status.visits_done)

    with pytest.raises(ArkfedError, match="ServerApp ended without finishing the run"):
        federation.wait(timeout=RUN_TIMEOUT, on_status=kill_the_coordinator)
    assert killed and killed[0] < federation.config.total_visits
    federation.resume()  # --resume RUN: continues from the last finished visit
    federation.wait(timeout=RUN_TIMEOUT)
    _check_parity(local_run, federation.out)  # same teacher and metrics as an uninterrupted local run
    assert "No SuperNode found with the given public key" in federation.coordinator.superlink.log_text()
    registered = (federation.out / "logs" / "registered-sites.log").read_text()
    assert all(name in registered for name in federation.config.sites)


def test_a_site_killed_mid_run_is_skipped_and_the_run_finishes(secure_federation, tmp_path):
    federation = secure_federation
    federation.wait(timeout=RUN_TIMEOUT)  # the parity run, if this test runs alone
    paths = [federation.sites[name].config_path for name in federation.config.sites[:2]]
    config = tiny_config(paths, rounds=2).model_copy(update={"mode": "parallel"})
    victim = config.sites[1]
    out = tmp_path / "fed-kill"
    killed = []

    def kill_in_second_round(status) -> None:
        if not killed and status is not None and status.round == 1 and status.sites[victim].state == "training":
            federation.sites[victim].kill(signal.SIGTERM)  # the site's SuperNode, executor and running task
            killed.append(status.visits_done)

    federation.submit(config, out, fast_settings())
    summary = federation.wait(timeout=RUN_TIMEOUT, on_status=kill_in_second_round)
    status = federation.coordinator.status()
    assert killed, "the victim was never seen training in round 2"
    skipped = summary["skipped"]
    assert skipped and {s["site"] for s in skipped} == {victim} and {s["round"] for s in skipped} == {1}
    assert all("offline" in s["reason"] for s in skipped if s["stage"] == "visit")  # vanished mid-visit: retried, then skipped
    assert all(s["reason"] == "absent" for s in skipped if s["stage"] == "evaluation")  # known to be gone: not even asked
    records = RunFolder(out).read_metrics()
    visits = [(r["round"], r["site"]) for r in records if r["kind"] == "visit"]
    assert (0, victim) in visits and (1, config.sites[0]) in visits
    assert [r["round"] for r in records if r["kind"] == "round"] == [0, 1]  # both rounds completed
    assert status.phase == "finished" and any(victim in w and "skipped" in w for w in status.warnings)
    load_ark_model(out)  # the teacher was written

    federation.sites[victim].start()  # the site comes back with its registered key
    federation.sites[victim].wait_connected(timeout=60)
