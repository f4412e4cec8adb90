"""What the Ark loop tells the outside world while it runs: the callback protocol.

The loop (:mod:`arkfed.run.loop`) calls every callback at the same points in local and federated
runs; progress bars, the live view, the federation status file, metric records and trackers
(TensorBoard, MLflow) are all callbacks, so none of them has a loop of its own. A callback only
observes: it must not change the state it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from arkfed.config import TrainConfig, VisitPlan


@dataclass
class RunInfo:
    """The run a callback is attached to."""

    config: "TrainConfig"
    run_dir: Path
    total_visits: int
    visits_done: int  # > 0 when resuming
    mode: str = "local"  # "local" (in-process sites) or "federated" (Flower sites)


class LoopCallback:
    """Base class: every hook is a no-op, so a callback overrides only what it needs.

    Records are the dicts written to ``metrics.jsonl`` (``"kind"``: ``visit``, ``eval``,
    ``skip``, ``round``).
    """

    def on_run_start(self, run: RunInfo) -> None: ...

    def on_visit_start(self, plan: "VisitPlan") -> None: ...

    def on_step(self, step: int, steps: int, loss: float) -> None: ...

    def on_visit_end(self, plan: "VisitPlan", record: dict) -> None: ...

    def on_skip(self, record: dict) -> None: ...

    def on_site_status(self, site: str, state: str, detail: str = "", **metrics: float | None) -> None: ...

    def on_round_end(self, rnd: int, records: list[dict]) -> None: ...

    def on_warning(self, text: str) -> None: ...

    def on_sites_admitted(self, config: "TrainConfig") -> None:
        """The run's configuration after sites were admitted into it (a signed membership change)."""

    def on_run_end(self, summary: dict) -> None: ...

    def close(self) -> None: ...


class CallbackList(LoopCallback):
    """Fans every hook out to several callbacks, in order."""

    def __init__(self, callbacks: Sequence[LoopCallback] = ()):
        self.callbacks = list(callbacks)

    def __getattribute__(self, name: str):
        if name.startswith("on_") or name == "close":
            callbacks = object.__getattribute__(self, "callbacks")

            def fan_out(*args, **kwargs):
                for callback in callbacks:
                    getattr(callback, name)(*args, **kwargs)

            return fan_out
        return object.__getattribute__(self, name)
