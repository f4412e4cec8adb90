"""``arkfed report``: plots of a run and a small HTML page that shows them with a summary table.

Reads only the run folder's ``metrics.jsonl`` (and config/summary through
:mod:`arkfed.evaluation.recorded_run`), so it works on a finished run, an interrupted one, or one
still training. Plots:

- ``auc_over_rounds.png``: per-site validation mean AUC by round, teacher (solid) vs student (dashed);
- ``losses.png``: training loss of every visit (task and consistency parts) and validation loss by round.
"""

from __future__ import annotations

import html
from functools import partial
from pathlib import Path

import numpy as np

from arkfed.errors import ArkfedError
from arkfed.evaluation.plots import as_floats, try_figure
from arkfed.evaluation.recorded_run import RecordedRun, read_run
from arkfed.io import atomic_write

MODEL_STYLES = {"teacher": "-", "student": "--"}


def _series(evals: list[dict], site: str, model: str, key: str) -> tuple[list[int], list[float]]:
    rows = sorted((int(r["round"]), float(r[key])) for r in evals
                  if r.get("site") == site and r.get("model") == model and r.get(key) is not None)
    return [r for r, _ in rows], [v for _, v in rows]  # NaN values stay: a gap in the line, never a crash


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_auc_over_rounds(run: RecordedRun, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, site in enumerate(run.sites):
        for model, style in MODEL_STYLES.items():
            rounds, values = _series(run.evals, site, model, "mean_auc")
            if rounds:
                ax.plot(np.array(rounds) + 1, values, style, marker="o", ms=3, color=colours[i % len(colours)], label=f"{site} ({model})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation mean AUC")
    ax.set_title("Mean AUC per site: teacher (solid) vs student (dashed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_losses(run: RecordedRun, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, site in enumerate(run.sites):
        visits = sorted((int(r.get("visit", j)), r) for j, r in enumerate(run.visits) if r.get("site") == site)
        if visits:
            x = [v + 1 for v, _ in visits]
            c = colours[i % len(colours)]
            left.plot(x, as_floats(r.get("loss") for _, r in visits), "-o", ms=3, color=c, label=f"{site} total")
            if all("task_loss" in r for _, r in visits):
                left.plot(x, as_floats(r["task_loss"] for _, r in visits), ":", color=c, label=f"{site} task")
        for model, style in MODEL_STYLES.items():
            rounds, values = _series(run.evals, site, model, "loss")
            if rounds:
                right.plot(np.array(rounds) + 1, values, style, marker="o", ms=3, color=colours[i % len(colours)],
                           label=f"{site} ({model})")
    left.set_xlabel("visit")
    left.set_ylabel("training loss")
    left.set_title("Training loss per visit")
    right.set_xlabel("round")
    right.set_ylabel("validation loss")
    right.set_title("Validation loss: teacher (solid) vs student (dashed)")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def summary_rows(run: RecordedRun) -> list[dict]:
    """Per site: final teacher and student mean AUC, the teacher's best round, the visits made (and,
    when a site trained with differential privacy, epsilon spent of its budget after its last visit)."""
    final = run.final_metrics()
    private = any(r.get("epsilon_budget") is not None for r in run.visits)
    rows = []
    for site in run.sites:
        rounds, values = _series(run.evals, site, "teacher", "mean_auc")
        best = int(np.nanargmax(values)) if np.isfinite(values).any() else None
        rows.append({
            "site": site,
            "teacher_mean_auc": (final.get((site, "teacher")) or {}).get("mean_auc"),
            "student_mean_auc": (final.get((site, "student")) or {}).get("mean_auc"),
            "best_teacher_mean_auc": values[best] if best is not None else None,
            "best_round": rounds[best] + 1 if best is not None else None,
            "visits": sum(1 for r in run.visits if r.get("site") == site),
        })
        if private:
            last = next((r for r in reversed(run.visits) if r.get("site") == site and r.get("epsilon_budget") is not None), {})
            rows[-1] |= {"epsilon_spent": last.get("epsilon_spent"), "epsilon_budget": last.get("epsilon_budget")}
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def html_page(run: RecordedRun, rows: list[dict], images: list[str]) -> str:
    cfg = run.config
    model = (cfg.get("model") or {}).get("model", "n/a")
    header = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    figures = "".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}"></figure>' for name in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>arkfed run {html.escape(run.folder.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>arkfed run: {html.escape(run.folder.name)}</h1>
<p>model {html.escape(str(model))}; sites {html.escape(', '.join(run.sites))};
{run.rounds_done} of {_cell(cfg.get('rounds'))} rounds evaluated; {len(run.visits)} visits.</p>
<h2>Summary (validation split)</h2><table><tr>{header}</tr>{body}</table>
<h2>Curves</h2>{figures}
</body></html>
"""


def write_report(run_folder: str | Path, out: str | Path) -> dict:
    """Write ``results.json``, then the plots and ``report.html`` into ``out``; returns the summary rows and
    file names (a plot that fails is left out with a one-line warning)."""
    run = read_run(run_folder)
    if not run.records:
        raise ArkfedError(f"{run_folder}: no metrics.jsonl records to report (has the run started?)")
    from arkfed.evaluation.sources import write_results

    out = Path(out)
    rows = summary_rows(run)
    result = {"run": str(run.folder), "rounds_evaluated": run.rounds_done, "visits": len(run.visits), "sites": rows}
    write_results(out, result)  # the numbers first: a figure that fails cannot lose them
    images = []
    for name, plot in (("auc_over_rounds.png", plot_auc_over_rounds), ("losses.png", plot_losses)):
        if try_figure(partial(plot, run, out / name), name):
            images.append(name)
    page = html_page(run, rows, images)
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(page))
    return {**result, "files": [*images, "report.html"]}
