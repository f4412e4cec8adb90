"""The federation commands' user-facing behaviour that needs no running federation, and the live view."""

from __future__ import annotations

import re

from rich.console import Console
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.federation.coordinator.live import FederationView, render_status
from arkfed.federation.coordinator.status import FederationStatus, SiteStatus, read_status, write_status
from arkfed.federation.flower_app import split_address, write_flower_app
from arkfed.federation.site.node import explain_supernode_exit

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", " ".join(text.split()))


def test_certs_init_command_writes_the_folder_and_says_who_gets_what(tmp_path):
    result = runner.invoke(app, ["certs", "init", str(tmp_path / "c"), "--coordinator-host", "fed.example.org", "--sites", "nih,chexpert"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "sites" / "nih.key").is_file() and (tmp_path / "c" / "coordinator.crt").is_file()
    assert "site nih: give it" in _plain(result.output)


def test_coordinator_refuses_to_start_without_certificates():
    from arkfed.errors import ArkfedError

    result = runner.invoke(app, ["coordinator", "--sites", "a,b", "--rounds", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ArkfedError) and "needs --certs DIR" in str(result.exception)
    result = runner.invoke(app, ["site", "--config", "sites/x.yaml", "--coordinator", "127.0.0.1:1"])
    assert isinstance(result.exception, ArkfedError) and "--root-certificates" in str(result.exception)


def test_generated_flower_app_points_at_arkfeds_apps_and_the_run(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    app_dir = write_flower_app(tmp_path / "run")
    config, _ = load_and_validate(app_dir / "pyproject.toml")  # Flower's own validation, modules included
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "arkfed.federation.coordinator.server_app:app", "clientapp": "arkfed.federation.site.client_app:app"}
    assert config["tool"]["flwr"]["app"]["config"]["run-dir"] == str((tmp_path / "run").resolve())


def test_addresses_and_supernode_failures_are_explained():
    assert split_address("fed.example.org:9092") == ("fed.example.org", 9092)
    assert split_address(":9100") == ("0.0.0.0", 9100) and split_address("[::1]:80") == ("::1", 80)
    log = "ERROR Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode."
    assert "requires site authentication" in explain_supernode_exit(log, "h:1", None, None)
    assert "TLS handshake with h:1 failed" in explain_supernode_exit("ssl error: certificate verify failed", "h:1", None, None)


def test_live_view_shows_each_sites_state_metrics_and_progress(tmp_path):
    status = FederationStatus(phase="training", mode="cyclic", round=1, rounds=3, visits_done=4, total_visits=9, sites={
        "nih": SiteStatus(state="training", node_id=11, last_metrics={"loss": 0.4321, "student_auc": 0.81}),
        "chexpert": SiteStatus(state="skipped", node_id=12, skips=1, detail="skipped visit in round 2: site is offline"),
        "shenzhen": SiteStatus(state="waiting"),
    }, warnings=["site 'chexpert' skipped"])
    write_status(tmp_path, status)
    assert read_status(tmp_path).sites["chexpert"].skips == 1
    console = Console(record=True, width=160)
    console.print(render_status(read_status(tmp_path)))
    text = console.export_text()
    assert "round 2/3" in text and "visits 4/9" in text
    assert re.search(r"nih\W+training\W+11", text) and "loss 0.432" in text and "student AUC 0.810" in text
    assert re.search(r"chexpert\W+skipped", text) and re.search(r"shenzhen\W+waiting", text)
    quiet = Console(record=True, width=160)
    with FederationView(quiet, quiet=True) as view:
        view.update(status)
        view.update(status)  # unchanged: nothing printed twice
    lines = quiet.export_text().splitlines()
    assert sum("nih: training" in line for line in lines) == 1 and any("warning: site 'chexpert' skipped" in line for line in lines)


def test_live_view_and_status_file_say_who_is_absent_or_dropped(tmp_path):
    from arkfed.config import TrainConfig
    from arkfed.federation.coordinator.status import StatusFile

    config = TrainConfig(sites=["nih", "chexpert", "shenzhen"], rounds=2, min_sites=2, max_absent=2)
    callback = StatusFile(tmp_path, config)
    callback.on_site_status("chexpert", "absent", "not joined (2 of 3 sites are)")
    callback.on_skip({"kind": "skip", "stage": "visit", "round": 0, "visit": 1, "site": "chexpert", "reason": "absent"})
    callback.on_skip({"kind": "skip", "stage": "visit", "round": 1, "visit": 5, "site": "shenzhen", "reason": "dropped"})
    callback.on_run_end({})
    status = read_status(tmp_path)
    assert (status.sites["chexpert"].state, status.sites["shenzhen"].state, status.sites["nih"].state) == ("absent", "dropped", "done")
    console = Console(record=True, width=160)
    console.print(render_status(status))
    text = console.export_text()
    assert re.search(r"chexpert\W+absent", text) and "not here: chexpert (absent), shenzhen (dropped)" in text
    log = "INFO SuperNode ID: 17\nWARNING Connection attempt failed, retrying in 0.96 seconds\nINFO SuperNode terminated gracefully."
    assert "no longer knows its node" in explain_supernode_exit(log, "h:1", None, None)  # after a coordinator restart
