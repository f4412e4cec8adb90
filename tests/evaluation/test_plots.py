"""Every figure survives an interval that excludes its estimate and missing (NaN / None) numbers,
draws the interval as it is, and never costs a command its results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from arkfed.evaluation.plots import draw_intervals, interval_bounds

NAN = float("nan")
PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5_000, path


def test_matplotlib_refuses_negative_error_bars_and_draw_intervals_draws_the_interval_itself():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="negative"):  # the bug: estimate - lower < 0 when the interval excludes the estimate
        ax.bar([0], [0.7], yerr=[[0.7 - 0.8], [0.9 - 0.7]])
    lower, upper = interval_bounds([[0.8, 0.9], None, [NAN, 0.6], [0.4, 0.2], [None, None]])
    assert lower[0] == 0.8 and upper[0] == 0.9 and (lower[3], upper[3]) == (0.2, 0.4)  # a reversed pair is put in order
    assert np.isnan(lower[[1, 2, 4]]).all()
    bars = draw_intervals(ax, [0, 1, 2, 3, 4], lower, upper)
    segments = np.array(bars.lines[2][0].get_segments())
    assert segments == pytest.approx(np.array([[[0, 0.8], [0, 0.9]], [[3, 0.2], [3, 0.4]]]))  # exactly [lower, upper]; no missing one
    horizontal = draw_intervals(ax, [5], [0.3], [0.5], horizontal=True)
    assert np.array(horizontal.lines[2][0].get_segments()) == pytest.approx(np.array([[[0.3, 5], [0.5, 5]]]))
    assert draw_intervals(ax, [0, 1], [NAN, None], [0.5, 0.6]) is None
    plt.close(fig)


# -- arkfed bias ----------------------------------------------------------------------------------
def bias_result() -> dict:
    """The shape bias_analysis returns: an interval above its AUC, NaN AUCs and intervals, a
    finding nothing can score, a JSON-style None."""
    def finding(values, cis, too_few=False, significant=False):
        e = {}
        for sex in ("M", "F"):
            e.update({f"too_few_on_{sex}": too_few, f"significant_on_{sex}": significant, f"positives_on_{sex}": 3})
        for key, v in values.items():
            e[key] = v
            e[f"{key}_ci"] = cis.get(key)
        return e

    return {
        "correction": "holm", "alpha": 0.05, "min_positives": 10, "bootstrap": {"unit": "patient"},
        "findings": {
            "Effusion": finding({"M->M": 0.70, "F->M": 0.55, "F->F": 0.9, "M->F": 0.6},
                                {"M->M": [0.74, 0.88], "F->M": [0.40, 0.52], "F->F": [0.8, 0.95]}, significant=True),
            "Nodule": finding({"M->M": NAN, "F->M": NAN, "F->F": 0.5, "M->F": None},
                              {"M->M": [NAN, NAN], "F->F": [None, 0.6]}, too_few=True),
            "Hernia": finding({"M->M": NAN, "F->M": NAN, "F->F": NAN, "M->F": NAN}, {}),
        },
    }


def test_plot_bias_draws_intervals_that_exclude_their_auc_and_survives_nans(tmp_path, monkeypatch):
    import arkfed.evaluation.bias as bias

    drawn, real = [], bias.draw_intervals

    def spy(ax, at, low, high, **style):
        drawn.append((low, high))
        return real(ax, at, low, high, **style)

    monkeypatch.setattr(bias, "draw_intervals", spy)
    path = bias.plot_bias(bias_result(), tmp_path / "bias.png")
    assert_png(path)
    low, high = drawn[0]  # M->M over the scored findings (Hernia left out)
    assert len(low) == 2 and (low[0], high[0]) == (0.74, 0.88) and np.isnan(low[1])


# -- curves and compare ---------------------------------------------------------------------------
def curve_summary() -> dict:
    from arkfed.evaluation.curves import summarise_curves

    records = [{"init": init, "size": label, "seed": seed, "score": score + 0.05 * seed, "train_size": n}
               for init, score in (("model", 0.8), ("random", 0.6), ("other", 0.7))
               for label, n in (("5", 5), ("all", 40)) for seed in (0, 1)]
    summary = summarise_curves(records, [5, None], "auc")
    summary["inits"]["model"]["5"]["ci"] = [0.9, 0.95]  # excludes its mean (0.825)
    summary["inits"]["model"]["all"].update(ci=None, bootstrap_ci=[NAN, NAN])
    summary["inits"]["other"]["5"]["ci"] = [None, 0.9]
    summary["inits"]["random"]["all"]["mean"] = NAN
    summary["comparisons"]["random"]["all"]["significant"] = True  # a star over a NaN neighbour
    return summary


def test_plot_curves_with_an_excluded_mean_and_nans(tmp_path):
    from arkfed.evaluation.curves import plot_curves

    assert_png(plot_curves(curve_summary(), tmp_path / "curve.png", "test mean AUC", "t"))


def test_plot_comparison_with_an_excluded_estimate_and_nans(tmp_path):
    from arkfed.evaluation.compare import comparison_rows, plot_comparison

    result = {"probe": {"curve": curve_summary()}, "curve_names": {"model": "ark", "other": "other"},
              "own_head": {"ark": {"mean_auc": 0.8, "mean_auc_ci": [0.85, 0.9]}, "other": {"mean_auc": NAN, "mean_auc_ci": None}},
              "finetune": {"curve": {"inits": {"model": {"all": {"mean": 0.7, "ci": [0.75, 0.8]}},
                                               "other": {"all": {"mean": None, "ci": [NAN, NAN]}}}}}}
    rows = comparison_rows(result)
    assert rows[0]["own head"] == (0.8, [0.85, 0.9]) and rows[0]["fine-tuned"] == (0.7, [0.75, 0.8])
    assert_png(plot_comparison(result, tmp_path / "compare.png", "t"))


# -- arkfed report --------------------------------------------------------------------------------
def write_metrics(folder):
    lines = [{"kind": "visit", "round": 0, "visit": 0, "site": "a", "loss": 0.7, "task_loss": 0.6},
             {"kind": "visit", "round": 0, "visit": 1, "site": "b", "loss": None, "task_loss": NAN}]
    for rnd, auc in enumerate((0.6, NAN, 0.7)):
        for site in ("a", "b"):
            for model in ("teacher", "student"):
                lines.append({"kind": "eval", "round": rnd, "site": site, "model": model, "mean_auc": auc, "loss": NAN if rnd else None})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (folder / "config.yaml").write_text("sites: [a, b]\nrounds: 3\n")
    return folder


def test_run_report_plots_with_nans(tmp_path):
    from arkfed.evaluation.recorded_run import read_run
    from arkfed.evaluation.report import plot_auc_over_rounds, plot_losses, summary_rows

    run = read_run(write_metrics(tmp_path / "run"))
    assert_png(plot_auc_over_rounds(run, tmp_path / "auc.png"))
    assert_png(plot_losses(run, tmp_path / "losses.png"))
    assert summary_rows(run)[0]["best_round"] == 3  # NaN rounds never win


def test_run_report_keeps_its_numbers_when_a_plot_fails(tmp_path, monkeypatch, capsys):
    import arkfed.evaluation.report as report

    def broken(run, path):
        raise RuntimeError("no display\nat all")

    monkeypatch.setattr(report, "plot_auc_over_rounds", broken)
    result = report.write_report(write_metrics(tmp_path / "run"), tmp_path / "out")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "figure auc_over_rounds.png not drawn (RuntimeError: no display at all)" in warning
    assert result["files"] == ["losses.png", "report.html"] and not (tmp_path / "out" / "auc_over_rounds.png").exists()
    assert_png(tmp_path / "out" / "losses.png")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rounds_evaluated"] == 3
    assert "auc_over_rounds" not in (tmp_path / "out" / "report.html").read_text()


# -- arkfed benchmark accrual ---------------------------------------------------------------------
def benchmark_results() -> dict:
    diff_gone = {"mean": NAN, "ci95": [NAN, NAN], "p": NAN, "resolved": False}
    stat = {"mean": 0.7, "ci95": [0.75, 0.8], "n": 2, "ark_minus_this": diff_gone}  # an interval above its mean
    gone = {"mean": NAN, "ci95": [NAN, NAN], "n": 0, "ark_minus_this": diff_gone}
    diff = {"mean": 0.02, "ci95": [0.05, 0.1], "p": 0.3, "resolved": False}
    return {
        "sites": ["a", "b"], "held_out": "b", "sources": ["a"], "seeds": [0, 1], "complete_seeds": [0, 1], "test": "paired t",
        "join_vs_alone": {s: {m: {"alone": stat, "joined": gone, "joined_minus_alone": diff if s == "a" else {"mean": None}}
                              for m in ("teacher", "student", "finetune")} for s in ("a", "b")},
        "accrual": {"held_out": "b", "orderings": [["a"]], "points": {"1": {"federations": [["a"]], "probe all": stat, "finetune": gone},
                                                                      "2": {"federations": [["a"]], "probe all": gone, "finetune": stat}}},
        "held_out_metrics": ["probe all", "finetune"],
        "baselines": {"Ark (cyclic)": {"probe all": stat, "finetune": gone},
                      "random init": {"probe all": {"mean": None, "ark_minus_this": {"mean": None}}},
                      "nothing": {"probe all": gone, "finetune": gone}},
    }


def test_benchmark_figure_with_excluded_means_and_nans(tmp_path):
    from arkfed.benchmarking.report import figure

    figure(benchmark_results(), tmp_path / "accrual.png")
    assert_png(tmp_path / "accrual.png")


def test_benchmark_outputs_keep_results_when_the_figure_fails(tmp_path, monkeypatch, capsys):
    import arkfed.benchmarking.report as report

    monkeypatch.setattr(report, "figure", lambda results, path: 1 / 0)
    report.write_outputs(benchmark_results(), tmp_path)
    assert "warning: figure accrual.png not drawn (ZeroDivisionError" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["held_out"] == "b"
    assert "Join vs alone" in (tmp_path / "results.md").read_text() and not (tmp_path / "accrual.png").exists()


# -- the bias command end to end ------------------------------------------------------------------
def test_bias_command_with_an_interval_that_excludes_its_auc_writes_results_and_figure(tmp_path, monkeypatch):
    import arkfed.evaluation.bias as bias
    from arkfed.cli import app
    from eval_fixtures import make_run_folder, schemas, write_site

    schema = schemas()["alpha"]
    run = make_run_folder(tmp_path / "run", sites={"alpha": schema})
    site = write_site(tmp_path, "alpha", schema, {"train": 60, "val": 4, "test": 60}, seed=3)
    real, done = bias.bias_analysis, []

    def excluded(*args, **kwargs):  # the real analysis, with one bootstrap interval shifted above its AUC and one AUC missing
        if not done:
            result = real(*args, **kwargs)
            first = next(iter(result["findings"].values()))
            first["M->M_ci"] = [first["M->M"] + 0.01, first["M->M"] + 0.05]
            first["F->M"], first["F->M_ci"] = NAN, None
            done.append(result)
        return done[0]

    monkeypatch.setattr(bias, "bias_analysis", excluded)
    args = ["bias", str(run), "--site", str(site), "--plugins-dir", str(tmp_path / "plugins"), "--features", "backbone",
            "--bootstrap", "20", "--min-positives", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ok")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ok" / "results.json").read_text())
    first = next(iter(data["findings"].values()))
    assert first["M->M_ci"][0] > first["M->M"] and first["F->M"] is None  # the numbers as computed, interval and all
    assert data["chart"] == "bias.png"
    assert_png(tmp_path / "ok" / "bias.png")

    # a figure that still fails: one warning line, results.json complete, exit 0
    monkeypatch.setattr(bias, "plot_bias", lambda *a, **k: math.sqrt(-1))
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "broken")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning: figure bias.png not drawn (ValueError: math domain error); the results are kept" in result.output
    assert "Traceback" not in result.output
    kept = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert "chart" not in kept and kept["findings"].keys() == data["findings"].keys()
    assert not (tmp_path / "broken" / "bias.png").exists()
