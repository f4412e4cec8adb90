"""arkfed report (and the model card) on a real, tiny Ark run made by the local coordinator."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.errors import ArkfedError
from arkfed.evaluation.recorded_run import read_run
from arkfed.run.folder import read_metrics
from eval_fixtures import schemas, tiny_spec, write_site


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.run.local import train_local
    from arkfed.site.load import load_site

    root = tmp_path_factory.mktemp("report")
    paths = {name: write_site(root, name, schemas()[name], {"train": 32, "val": 24, "test": 8}, seed=i)
             for i, name in enumerate(("alpha", "gamma"))}
    sites = {name: load_site(p, [root / "plugins"]) for name, p in paths.items()}
    config = TrainConfig(sites=list(sites), rounds=2, model=tiny_spec(),
                         settings=TrainSettings(batch_size=16, max_steps_per_visit=2))
    train_local(config, root / "run", sites=sites, site_configs=list(paths.values()))
    return root / "run"


def test_report_cli_writes_plots_page_and_summary(real_run, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(real_run), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("auc_over_rounds.png", "losses.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    page = (out / "report.html").read_text()
    assert '<img src="auc_over_rounds.png"' in page and '<img src="losses.png"' in page
    assert "<td>alpha</td>" in page and "<td>gamma</td>" in page
    res = json.loads((out / "results.json").read_text())
    assert res["rounds_evaluated"] == 2 and res["visits"] == 4
    # the table's numbers are the run's last-round evaluation lines
    last = {(r["site"], r["model"]): r["mean_auc"] for r in read_metrics(real_run)
            if r.get("kind") == "eval" and r["round"] == 1}
    for row in res["sites"]:
        assert row["teacher_mean_auc"] == pytest.approx(last[(row["site"], "teacher")])
        assert row["student_mean_auc"] == pytest.approx(last[(row["site"], "student")])
        assert row["visits"] == 2
        assert f"{row['teacher_mean_auc']:.3f}" in page


def test_model_card_of_a_real_run(real_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(real_run), "--out", str(tmp_path / "export")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "export" / "README.md").read_text()
    summary = json.loads((real_run / "summary.json").read_text())
    assert "| alpha | evalnpz | multilabel | Effusion, Cardiomegaly, Nodule |" in card
    assert "| gamma | evalnpz | multiclass | Normal, Pneumonia, Tuberculosis |" in card
    assert "rounds: 2 configured, 2 evaluated" in card
    teacher_auc = summary["sites"]["alpha"]["teacher"]["mean_auc"]
    assert f"| alpha | teacher | 1 | {teacher_auc:.3f} |" in card


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ArkfedError, match="no metrics.jsonl records"):
        from arkfed.evaluation.report import write_report

        write_report(tmp_path, tmp_path / "out")
    assert read_run(tmp_path).records == []
