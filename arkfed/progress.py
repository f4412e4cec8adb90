"""How a training run reports itself: a rich live view, or plain lines for CI logs (quiet mode).

Both reporters have the same methods, called by the coordinator; the visit-level callback
(:meth:`TrainProgress.step`) matches :data:`arkfed.visit.VisitProgress`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from arkfed.training import VisitPlan
    from arkfed.visit import VisitResult


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class QuietProgress:
    """One plain line per visit and per round's evaluation: readable in CI logs."""

    def __init__(self, console: Console | None = None, per_visit: bool = False):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.per_visit = per_visit
        self.total = 0

    def start(self, total_visits: int, done: int) -> None:
        self.total = total_visits
        if done:
            self.console.print(f"resuming after visit {done}/{total_visits}")

    def visit_started(self, plan: "VisitPlan") -> None:
        pass

    def step(self, step: int, steps: int, loss: float) -> None:
        pass

    def visit_finished(self, plan: "VisitPlan", result: "VisitResult") -> None:
        if self.per_visit:
            self.console.print(
                f"visit {plan.visit + 1}/{self.total} {plan.site}: loss {result.loss:.4f} "
                f"({result.images_per_s:.0f} img/s)"
            )

    def round_evaluated(self, rnd: int, rounds: int, records: list[dict]) -> None:
        parts = [f"{r['site']} {_fmt(r['mean_auc'])}" for r in records if r["model"] == "student"]
        teacher = [f"{r['site']} {_fmt(r['mean_auc'])}" for r in records if r["model"] == "teacher"]
        self.console.print(f"round {rnd + 1}/{rounds} val mean AUC  student: {', '.join(parts)}  teacher: {', '.join(teacher)}")

    def close(self) -> None:
        pass


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

    def start(self, total_visits: int, done: int) -> None:
        super().start(total_visits, done)
        self.progress.start()
        self.overall = self.progress.add_task("visits", total=total_visits, completed=done, info="")
        self.current = self.progress.add_task("site", total=1, info="", visible=False)

    def visit_started(self, plan: "VisitPlan") -> None:
        self.progress.update(
            self.overall, description=f"round {plan.round + 1}", info=f"c={plan.consistency:.2f} m={plan.momentum:.3f}"
        )
        self.progress.reset(self.current, total=1, description=f"  {plan.site}", info="", visible=True)

    def step(self, step: int, steps: int, loss: float) -> None:
        self.progress.update(self.current, completed=step, total=steps, info=f"loss {loss:.4f}")

    def visit_finished(self, plan: "VisitPlan", result: "VisitResult") -> None:
        self.progress.update(self.overall, advance=1)

    def round_evaluated(self, rnd: int, rounds: int, records: list[dict]) -> None:
        super().round_evaluated(rnd, rounds, records)

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
