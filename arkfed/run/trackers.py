"""Run trackers people already use: TensorBoard and MLflow, as callbacks of the one loop.

``arkfed train --log tensorboard,mlflow`` attaches one :class:`~arkfed.run.callbacks.LoopCallback`
per tracker (see :func:`make_trackers`). Both log the same values under the same names, taken
from the records the loop writes to ``metrics.jsonl``, so what a tracker shows is what the run
folder holds:

- per visit (step = global visit index): ``train/loss``, ``train/task_loss``,
  ``train/consistency_loss``, ``train/lr``, ``train/consistency``, ``train/momentum``,
  ``train/images_per_s`` and ``train/<site>/loss`` (sites differ in loss scale);
- per evaluation round (step = round): ``<split>/<site>/<model>/mean_auc``, ``.../loss``,
  ``.../accuracy`` (multiclass) and ``.../auc/<class>``;
- at the start the run configuration (MLflow params, flattened with dots; TensorBoard a text
  and the HPARAMS tab), at the end the summary.

Both are optional installs (``pip install 'arkfed[tensorboard]'`` / ``'arkfed[mlflow]'``);
neither is imported unless asked for, and neither ever talks to a network service by default:

- TensorBoard writes event files to ``RUN/tensorboard/`` (``tensorboard --logdir RUN``).
- MLflow writes to a SQLite database inside the run folder, ``RUN/mlflow/mlflow.db`` (artifacts
  in ``RUN/mlflow/artifacts``), unless the user set ``MLFLOW_TRACKING_URI``. Why not the
  ``mlruns/`` file store: MLflow 3 put it in maintenance mode and refuses it unless
  ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is MLflow's own recommended local store and needs no
  server (view it with ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db``, which
  needs the full ``mlflow`` package; logging needs only ``mlflow-skinny``). MLflow's usage
  telemetry is switched off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves.

Resume: a resumed run (``visits_done > 0``) continues the same MLflow run (its id and store are
kept in ``RUN/mlflow/run.json``; a user's store URI without its password, taken again from
``MLFLOW_TRACKING_URI`` when that is set) and the TensorBoard writer purges the events at or after the resumed
visit (``purge_step``), so the visits redone after a crash are not drawn twice. Evaluation
points use the round as step; the one case left is a crash in the middle of writing a round's
evaluation, which the resumed run evaluates again (TensorBoard then holds that round twice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from arkfed.errors import ArkfedError
from arkfed.io import write_text_atomic
from arkfed.run.callbacks import LoopCallback, RunInfo

if TYPE_CHECKING:
    from arkfed.config import VisitPlan

VISIT_SCALARS = ("loss", "task_loss", "consistency_loss", "lr", "consistency", "momentum", "images_per_s")
EVAL_SCALARS = ("mean_auc", "loss", "accuracy")
MODELS = ("student", "teacher")
EXPERIMENT = "arkfed"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :]")  # MLflow's allowed characters, minus "/" (our separator)


# --- what is logged: one mapping from records to scalar names, shared by both trackers -----------

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean_name(part: str) -> str:
    """A site or class name as one path component of a metric name (``/`` and odd characters -> ``_``)."""
    return _UNSAFE.sub("_", str(part)).strip() or "_"


def visit_scalars(record: dict) -> dict[str, float]:
    """The scalars of a ``"kind": "visit"`` record, logged at step ``record["visit"]``."""
    out = {f"train/{key}": float(record[key]) for key in VISIT_SCALARS if _finite(record.get(key))}
    if _finite(record.get("loss")):
        out[f"train/{clean_name(record['site'])}/loss"] = float(record["loss"])
    return out


def eval_prefix(split: str, site: str, model: str) -> str:
    return f"{clean_name(split)}/{clean_name(site)}/{clean_name(model)}"


def eval_scalars(record: dict, per_class: bool = True) -> dict[str, float]:
    """The scalars of a ``"kind": "eval"`` record, logged at step ``record["round"]``; absent
    (``null``) AUCs of one-valued classes are left out rather than drawn as zero."""
    prefix = eval_prefix(record["split"], record["site"], record["model"])
    out = {f"{prefix}/{key}": float(record[key]) for key in EVAL_SCALARS if _finite(record.get(key))}
    if per_class:
        for name, value in (record.get("auc") or {}).items():
            if _finite(value):
                out[f"{prefix}/auc/{clean_name(name)}"] = float(value)
    return out


def flat_params(config, **extra) -> dict[str, str | int | float | bool]:
    """The run configuration flattened with dots (``settings.lr``); lists and tuples as JSON."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:  # None, lists, empty dicts
            out[prefix] = json.dumps(value)

    walk("", data)
    for key, value in extra.items():
        walk(key, value)
    return out


# --- parsing --log ------------------------------------------------------------------------------

def parse_log_option(names: str | Iterable[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` (or a list of such strings) -> known tracker names, in order;
    empty, ``none`` or ``None`` -> ``[]``. Unknown names are a one-line error."""
    if names is None:
        return []
    parts = [names] if isinstance(names, str) else list(names)
    chosen: list[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name not in TRACKERS:
                raise ArkfedError(f"--log: unknown tracker {name!r} (choose from: {', '.join(TRACKERS)}, none)")
            if name not in chosen:
                chosen.append(name)
    return chosen


def make_trackers(names: str | Iterable[str] | None, run_dir: str | Path) -> list[LoopCallback]:
    """The tracker callbacks ``--log`` asks for, writing into ``run_dir``. Fails here, before any
    training, when an optional package is missing."""
    return [TRACKERS[name](Path(run_dir)) for name in parse_log_option(names)]


def _missing(package: str, extra: str) -> ArkfedError:
    return ArkfedError(f"--log {extra} needs the {package} package: pip install 'arkfed[{extra}]'")


# --- TensorBoard --------------------------------------------------------------------------------

class TensorBoardLogger(LoopCallback):
    """Event files in ``RUN/tensorboard/``; see the module docstring for what is logged."""

    def __init__(self, run_dir: Path, per_class_auc: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(run_dir) / "tensorboard"
        self.per_class_auc = per_class_auc
        self.writer = None
        self._hparams_end = None

    def on_run_start(self, run: RunInfo) -> None:
        # purge_step: a resumed run redoes the visits after its checkpoint; TensorBoard then drops
        # the events of the first attempt at those steps instead of drawing them twice (all of
        # them when a run killed before its first checkpoint starts over).
        earlier = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        purge = run.visits_done if run.visits_done or earlier else None
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge, flush_secs=10)
        from torch.utils.tensorboard.summary import hparams

        params = flat_params(run.config, mode=run.mode, total_visits=run.total_visits)
        metrics = {f"{eval_prefix(run.config.eval_split, site, model)}/mean_auc": 0.0
                   for site in run.config.sites for model in MODELS}
        experiment, start, self._hparams_end = hparams(params, metrics)
        if earlier:
            return  # a resume: the first attempt wrote the configuration (texts are never purged)
        text = "\n".join(f"    {key}: {value}" for key, value in params.items())  # indented = preformatted
        self.writer.add_text("config", text, global_step=0)
        for summary in (experiment, start):
            self.writer.file_writer.add_summary(summary)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def on_visit_end(self, plan: "VisitPlan", record: dict) -> None:
        self._scalars(visit_scalars(record), record.get("visit", plan.visit))

    def on_skip(self, record: dict) -> None:
        step = record.get("visit") if record.get("visit") is not None else record.get("round", 0)
        self.writer.add_text(f"skips/{clean_name(record.get('site', '?'))}",
                             f"{record.get('stage', '?')} of round {record.get('round')}: {record.get('reason', '')}", step)

    def on_round_end(self, rnd: int, records: list[dict]) -> None:
        for record in records:
            if record.get("kind") == "eval":
                self._scalars(eval_scalars(record, self.per_class_auc), record.get("round", rnd))
        self.writer.flush()

    def on_run_end(self, summary: dict) -> None:
        text = json.dumps(summary, indent=2, default=str, allow_nan=True)
        self.writer.add_text("summary", "\n".join("    " + line for line in text.splitlines()),
                             global_step=summary.get("visits", 0))
        if self._hparams_end is not None:
            self.writer.file_writer.add_summary(self._hparams_end)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- MLflow -------------------------------------------------------------------------------------

RUN_FILE = "run.json"  # under RUN/mlflow/: which tracking store and run this run folder logs to
RUN_FOLDER_STORE = "run-folder"  # run.json's tracking_uri when the run logs to RUN/mlflow/mlflow.db
_MAX_PARAM = 6000  # MLflow's limit on a parameter value


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's SQLite store announces its table migrations at INFO and triggers SQLAlchemy
    deprecation warnings; neither is news to a user watching a training run."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class MLflowLogger(LoopCallback):
    """One MLflow run per run folder (experiment ``arkfed``, named after the folder); see the
    module docstring for the store it uses and what is logged."""

    def __init__(self, run_dir: Path, per_class_auc: bool = True):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # never phone home unless the user asked
        try:
            import mlflow  # noqa: F401  (fails here, before training, when it is not installed)
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow-skinny", "mlflow") from None
        self._client_class = MlflowClient
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "mlflow"
        self.per_class_auc = per_class_auc
        self.client = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._stored = RUN_FOLDER_STORE
        self._ended = False

    # where the run lives ------------------------------------------------------------------------

    def _folder_store(self) -> str:
        return "sqlite:///" + str((self.folder / "mlflow.db").resolve())

    def _resolve_store(self, resuming: bool) -> tuple[str, str, dict | None]:
        """(tracking URI, what to record in run.json, the recorded run or None)."""
        recorded = None
        path = self.folder / RUN_FILE
        if resuming and path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ArkfedError(f"{path}: unreadable ({exc}); delete it to start a new MLflow run") from None
            stored = recorded.get("tracking_uri", RUN_FOLDER_STORE)
            if stored == RUN_FOLDER_STORE:
                return self._folder_store(), stored, recorded
            # the user's store: as the environment names it now (run.json holds it without a password)
            return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or stored, stored, recorded
        user = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if user:
            return user, _without_password(user), None
        return self._folder_store(), RUN_FOLDER_STORE, None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            with _quiet():
                return fn(*args, **kwargs)
        except ArkfedError:
            raise
        except Exception as exc:  # MlflowException, sqlite errors, an unreachable server
            first = str(exc).strip().split("\n")[0].split(". ")[0]
            hint = "" if self._stored == RUN_FOLDER_STORE else " (unset MLFLOW_TRACKING_URI to log into the run folder)"
            raise ArkfedError(f"MLflow ({self.tracking_uri}): could not {what}: {first}{hint}") from None

    def on_run_start(self, run: RunInfo) -> None:
        resuming = run.visits_done > 0
        uri, stored, recorded = self._resolve_store(resuming)
        self.tracking_uri, self._stored = uri, stored
        if stored == RUN_FOLDER_STORE:
            (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)
        self.client = self._call("open the tracking store", self._client_class, tracking_uri=uri)
        if recorded is not None:
            self.run_id = recorded["run_id"]
            self._call("reopen the run", self.client.update_run, self.run_id, status="RUNNING")
            self._log_params(run, resumed=True)
            return
        experiment = self._call("read the experiment", self.client.get_experiment_by_name, EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (self.folder / "artifacts").resolve().as_uri() if stored == RUN_FOLDER_STORE else None
            experiment_id = self._call("create the experiment", self.client.create_experiment, EXPERIMENT,
                                       artifact_location=location)
        tags = {"arkfed.run_dir": str(self.run_dir.resolve()), "arkfed.mode": run.mode}
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        created = self._call("create the run", self.client.create_run, experiment_id,
                             run_name=self.run_dir.resolve().name, tags=tags)
        self.run_id = created.info.run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / RUN_FILE, json.dumps(
            {"tracking_uri": stored, "experiment_id": experiment_id, "run_id": self.run_id}, indent=2) + "\n")
        self._log_params(run, resumed=False)
        config_file = self.run_dir / "config.yaml"
        if config_file.is_file():
            self._call("store config.yaml", self.client.log_artifact, self.run_id, str(config_file))

    def _log_params(self, run: RunInfo, resumed: bool) -> None:
        from mlflow.entities import Param, RunTag

        params = {k: str(v)[:_MAX_PARAM] for k, v in
                  flat_params(run.config, mode=run.mode, total_visits=run.total_visits).items()}
        tags = []
        if resumed:  # MLflow params are write-once: keep the first, note a changed value as a tag
            logged = self._call("read the run", self.client.get_run, self.run_id).data.params
            tags = [RunTag(f"arkfed.resumed.{k}", v[:_MAX_PARAM]) for k, v in params.items() if k in logged and logged[k] != v]
            tags.append(RunTag("arkfed.resumed_at_visit", str(run.visits_done)))
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(items), 1), 100):  # MLflow takes at most 100 params per batch
            self._call("log the configuration", self.client.log_batch, self.run_id,
                       params=items[i:i + 100], tags=tags if i == 0 else [])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, value, stamp, step) for key, value in values.items()]
        for i in range(0, len(items), 1000):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def on_visit_end(self, plan: "VisitPlan", record: dict) -> None:
        self._metrics(visit_scalars(record), record.get("visit", plan.visit))

    def on_skip(self, record: dict) -> None:
        key = f"arkfed.skip.{clean_name(record.get('stage', '?'))}.round{record.get('round')}.{clean_name(record.get('site', '?'))}"
        self._call("log a skip", self.client.set_tag, self.run_id, key, str(record.get("reason", ""))[:_MAX_PARAM])

    def on_round_end(self, rnd: int, records: list[dict]) -> None:
        values: dict[int, dict[str, float]] = {}
        for record in records:
            if record.get("kind") == "eval":
                values.setdefault(record.get("round", rnd), {}).update(eval_scalars(record, self.per_class_auc))
        for step, scalars in values.items():
            self._metrics(scalars, step)

    def on_run_end(self, summary: dict) -> None:
        from arkfed.io import json_safe

        self._call("store the summary", self.client.log_dict, self.run_id, json_safe(summary), "summary.json")
        provenance = self.run_dir / "provenance.json"
        if provenance.is_file():
            self._call("store provenance.json", self.client.log_artifact, self.run_id, str(provenance))
        if _finite(summary.get("seconds")):
            self._metrics({"run/seconds": float(summary["seconds"])}, int(summary.get("visits") or 0))
        self._call("finish the run", self.client.set_terminated, self.run_id, "FINISHED")
        self._ended = True

    def close(self) -> None:
        """A run that stops without reaching its end (an error, Ctrl-C) is marked KILLED; resuming
        it sets it RUNNING again."""
        if self.client is not None and self.run_id is not None and not self._ended:
            try:
                with _quiet():
                    self.client.set_terminated(self.run_id, "KILLED")
            except Exception:  # closing must not hide the error that stopped the run
                pass
        self._ended = True


def _without_password(uri: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...`` (run.json is no place for it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _git_commit() -> str | None:
    from arkfed.run.provenance import git_state

    return git_state().get("commit")


TRACKERS: dict[str, type[LoopCallback]] = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
