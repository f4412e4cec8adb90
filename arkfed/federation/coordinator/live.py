"""The coordinator's live view: each site's state, its last metrics, and the run's progress.

:class:`FederationView` renders :class:`~arkfed.federation.coordinator.status.FederationStatus` snapshots with
rich (a table redrawn in place), or, in quiet mode, prints one plain line per change (CI logs).
"""

from __future__ import annotations

import math

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from arkfed.federation.coordinator.status import FederationStatus

STATE_STYLES = {
    "waiting": "dim", "joined": "cyan", "training": "bold yellow", "evaluating": "magenta",
    "done": "green", "failed": "bold red", "skipped": "red", "refused": "bold red", "absent": "dim yellow", "dropped": "bold yellow",
}
METRIC_LABELS = (("loss", "loss"), ("student_auc", "student AUC"), ("teacher_auc", "teacher AUC"), ("images_per_s", "img/s"))


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def last_metrics_text(metrics: dict) -> str:
    parts = [f"{label} {_fmt(metrics[key])}" for key, label in METRIC_LABELS if key in metrics]
    return "  ".join(parts)


def render_status(status: FederationStatus | None, title: str = "arkfed federation"):
    """A rich renderable: header with phase and round progress, then one row per site."""
    if status is None:
        return Text("starting the SuperLink and the ServerApp ...", style="dim")
    header = Text.assemble(
        (f"{title}  ", "bold"), (f"{status.mode} mode  ", "cyan"), (f"phase: {status.phase}  ", "bold"),
        f"round {min(status.round + 1, status.rounds)}/{status.rounds}  visits {status.visits_done}/{status.total_visits}",
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(status.total_visits, 1), completed=status.visits_done, width=50),
                Text(f"{status.visits_done}/{status.total_visits} visits"))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("site", "state", "node", "visits", "skips", "last metrics", "detail"):
        table.add_column(column)
    for name, site in status.sites.items():
        table.add_row(
            name, Text(site.state, style=STATE_STYLES.get(site.state, "")), str(site.node_id or "-"),
            str(site.visits), str(site.skips), last_metrics_text(site.last_metrics), site.detail[:60],
        )
    parts = [header, bar, table]
    away = [f"{name} ({site.state})" for name, site in status.sites.items() if site.state in ("absent", "dropped")]
    if away:
        parts.append(Text(f"not here: {', '.join(away)}", style="yellow"))
    if status.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in status.warnings[-3:]), style="yellow"))
    if status.error:
        parts.append(Text(f"error: {status.error}", style="bold red"))
    return Group(*parts)


class FederationView:
    """Context manager fed with status snapshots (``update``); live table or plain change lines."""

    def __init__(self, console: Console | None = None, quiet: bool = False, title: str = "arkfed federation"):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.quiet, self.title = quiet, title
        self.live: Live | None = None
        self.seen: dict[str, str] = {}
        self.warnings = 0

    def __enter__(self) -> "FederationView":
        if not self.quiet:
            self.live = Live(render_status(None), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def update(self, status: FederationStatus | None) -> None:
        if self.live is not None:
            self.live.update(render_status(status, self.title))
            return
        if status is None:
            return
        self._print_changes(status)

    def _print_changes(self, status: FederationStatus) -> None:
        if self.seen.get("") != status.phase:
            self.seen[""] = status.phase
            self.console.print(f"[{status.phase}] round {min(status.round + 1, status.rounds)}/{status.rounds}, "
                               f"visits {status.visits_done}/{status.total_visits}", markup=False)
        for name, site in status.sites.items():
            key = f"{site.state}|{site.detail}"
            if self.seen.get(name) != key:
                self.seen[name] = key
                metrics = last_metrics_text(site.last_metrics)
                self.console.print(f"  {name}: {site.state} {site.detail} {metrics}".rstrip(), markup=False)
        for warning in status.warnings[self.warnings:]:
            self.console.print(f"  warning: {warning}", markup=False)
        self.warnings = len(status.warnings)

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
