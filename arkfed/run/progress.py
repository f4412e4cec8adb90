"""How a training run reports itself: a rich live view, or plain lines for CI logs (quiet mode).

Both are callbacks of the Ark loop (:class:`arkfed.run.callbacks.LoopCallback`); ``on_step`` matches
:data:`arkfed.ark.visit.VisitProgress`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from arkfed.run.callbacks import LoopCallback

if TYPE_CHECKING:
    from arkfed.config import VisitPlan
    from arkfed.run.callbacks import RunInfo


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class QuietProgress(LoopCallback):
    """One plain line per round's evaluation (and per visit with ``per_visit``): readable in CI
    logs and in a Flower ServerApp's streamed output."""

    def __init__(self, console: Console | None = None, per_visit: bool = False):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.per_visit = per_visit
        self.total = 0
        self.rounds = 0

    def on_run_start(self, run: "RunInfo") -> None:
        self.total, self.rounds = run.total_visits, run.config.rounds
        if run.visits_done:
            self.console.print(f"resuming after visit {run.visits_done}/{run.total_visits}")

    def on_visit_end(self, plan: "VisitPlan", record: dict) -> None:
        if self.per_visit:
            self.console.print(
                f"visit {plan.visit + 1}/{self.total} {plan.site}: loss {record['loss']:.4f} "
                f"({record['images_per_s']:.0f} img/s)"
                + (f", epsilon {record['epsilon_spent']:.2f} of {record['epsilon_budget']:.2f}" if record.get("epsilon_budget") else "")
            )

    def on_warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}")

    def on_round_end(self, rnd: int, records: list[dict]) -> None:
        evals = [r for r in records if r.get("kind") == "eval"]
        parts = [f"{r['site']} {_fmt(r['mean_auc'])}" for r in evals if r["model"] == "student"]
        teacher = [f"{r['site']} {_fmt(r['mean_auc'])}" for r in evals if r["model"] == "teacher"]
        self.console.print(f"round {rnd + 1}/{self.rounds} val mean AUC  student: {', '.join(parts)}  teacher: {', '.join(teacher)}")


class RichProgress(QuietProgress):
    """Overall visits with ETA, the current site's batches and loss, and per-round AUC lines."""

    def __init__(self, console: Console | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        super().__init__(console)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.overall = None
        self.current = None

    def on_run_start(self, run: "RunInfo") -> None:
        super().on_run_start(run)
        self.progress.start()
        self.overall = self.progress.add_task("visits", total=run.total_visits, completed=run.visits_done, info="")
        self.current = self.progress.add_task("site", total=1, info="", visible=False)

    def on_visit_start(self, plan: "VisitPlan") -> None:
        self.progress.update(
            self.overall, description=f"round {plan.round + 1}", info=f"c={plan.consistency:.2f} m={plan.momentum:.3f}"
        )
        self.progress.reset(self.current, total=1, description=f"  {plan.site}", info="", visible=True)

    def on_step(self, step: int, steps: int, loss: float) -> None:
        self.progress.update(self.current, completed=step, total=steps, info=f"loss {loss:.4f}")

    def on_visit_end(self, plan: "VisitPlan", record: dict) -> None:
        self.progress.update(self.overall, advance=1)

    def on_skip(self, record: dict) -> None:
        if record.get("stage") == "visit":
            self.progress.update(self.overall, advance=1)

    def close(self) -> None:
        self.progress.stop()


def make_progress(quiet: bool) -> QuietProgress:
    """Rich live view on a terminal; plain lines when quiet or when output is not a terminal."""
    if quiet or not sys.stdout.isatty():
        return QuietProgress()
    return RichProgress()


def summary_table(summary: dict) -> Table:
    """The final table: per site, mean AUC (over the schema's eval classes) and loss of student
    and teacher on the evaluation split."""
    table = Table(
        title=f"{summary.get('split', 'val')} after {summary['rounds']} rounds ({summary['seconds']:.0f} s)",
        caption="AUC: mean over each site's evaluation classes",
    )
    table.add_column("site", no_wrap=True)
    table.add_column("task", no_wrap=True)
    for column in ("student AUC", "teacher AUC", "student loss", "teacher loss"):
        table.add_column(column, justify="right")
    for site, entry in summary["sites"].items():
        s, t = entry.get("student", {}), entry.get("teacher", {})
        table.add_row(
            site, entry.get("task", ""), _fmt(s.get("mean_auc")), _fmt(t.get("mean_auc")),
            _fmt(s.get("loss")), _fmt(t.get("loss")),
        )
    return table
