"""TensorBoard and MLflow loggers: driven with the loop's real records, then read back.

The records come from the functions the loop uses (``visit_record``, ``eval_record``,
``score_predictions``), so the shapes are those of ``metrics.jsonl``; what each tracker wrote is
read with its own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from arkfed.ark.metrics import Predictions, score_predictions
from arkfed.ark.visit import VisitResult
from arkfed.config import TrainConfig, TrainSettings
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.io import append_jsonl
from arkfed.run.callbacks import CallbackList, RunInfo
from arkfed.run.plan import plan_visits
from arkfed.run.records import eval_record, visit_record
from arkfed.run.trackers import (
    MLflowLogger,
    TensorBoardLogger,
    _quiet,
    _without_password,
    eval_scalars,
    flat_params,
    make_trackers,
    parse_log_option,
    visit_scalars,
)
from tracker_checks import (
    check_trackers_match_metrics,
    mlflow_client,
    read_mlflow,
    read_tensorboard,
    read_tensorboard_texts,
)

# arkfed.run.trackers imports neither package until a tracker is made, so these can come after the imports
pytest.importorskip("tensorboard", reason="pip install 'arkfed[tensorboard]' to test the TensorBoard logger")
pytest.importorskip("mlflow", reason="pip install 'arkfed[mlflow]' to test the MLflow logger")

SCHEMA = LabelSchema(task="multilabel", classes=("Effusion", "Pleural/Other", "Rare"))


def config(rounds: int = 2) -> TrainConfig:
    return TrainConfig(sites=["alpha", "beta"], rounds=rounds, settings=TrainSettings(lr=3e-3, warmup_visits=1))


def eval_result(rng: np.random.Generator) -> dict:
    """A real evaluation result: 'Rare' has one positive label value only, so its AUC is null."""
    n = 12
    targets = (rng.random((n, 3)) < 0.5).astype(np.float32)
    targets[:, 2] = 0.0
    targets[0, :2], targets[1, :2] = 1.0, 0.0
    return score_predictions(Predictions(rng.normal(size=(n, 3)).astype(np.float32), targets, np.ones((n, 3), np.float32)), SCHEMA)


def drive(callbacks, cfg: TrainConfig, run_dir, visits_done: int = 0, stop_at: int | None = None, seed: int = 0,
          end: bool = True) -> list[dict]:
    """Play the loop's calls for visits ``visits_done..stop_at`` (recording them in metrics.jsonl
    as the loop does); evaluates each round that completes; returns the records."""
    rng = np.random.default_rng(seed)
    cb = CallbackList(callbacks)
    cb.on_run_start(RunInfo(cfg, run_dir, cfg.total_visits, visits_done))
    records = []
    plans = plan_visits(cfg)
    stop_at = cfg.total_visits if stop_at is None else stop_at
    for plan in plans[visits_done:stop_at]:
        loss = float(rng.uniform(0.5, 1.0))
        result = VisitResult(site=plan.site, round=plan.round, visit=plan.visit, loss=loss, task_loss=0.8 * loss,
                             consistency_loss=0.2 * loss, num_examples=40, steps=3, seconds=1.5, images_per_s=26.7,
                             lr=plan.lr, consistency=plan.consistency, momentum=plan.momentum)
        record = visit_record(plan, result)
        append_jsonl(run_dir / "metrics.jsonl", record)
        cb.on_visit_end(plan, record)
        records.append(record)
        if plan.visit == len(plans) - 1 or plans[plan.visit + 1].round != plan.round:
            evals = [eval_record(plan.round, site, model, cfg.eval_split, eval_result(rng))
                     for site in cfg.sites for model in ("student", "teacher")]
            for r in evals:
                append_jsonl(run_dir / "metrics.jsonl", r)
            cb.on_round_end(plan.round, evals)
            records += evals
    if end:
        cb.on_run_end({"rounds": cfg.rounds, "visits": cfg.total_visits, "seconds": 12.5, "sites": {"alpha": {}}})
    cb.close()
    return records


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made. Making them runs MLflow's ~50 schema migrations,
    each a committed transaction (about 1.5 s of CPU and, on a busy disk, ten times that in
    fsyncs), so the tests make them once and copy the file where a run folder expects it."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    with _quiet():
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def new_run_dir(parent, empty_store, name: str = "run"):
    run_dir = parent / name
    (run_dir / "mlflow").mkdir(parents=True)
    shutil.copyfile(empty_store, run_dir / "mlflow" / "mlflow.db")
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, empty_store):
    """One complete 2-round, 2-site run logged by both trackers."""
    run_dir = new_run_dir(tmp_path_factory.mktemp("trackers"), empty_store, "run-2026-12-01")
    (run_dir / "config.yaml").write_text("sites: [alpha, beta]\n")
    cfg = config()
    records = drive(make_trackers("tensorboard,mlflow", run_dir), cfg, run_dir)
    return run_dir, cfg, records


def test_parse_log_option():
    assert parse_log_option("tensorboard,mlflow") == ["tensorboard", "mlflow"]
    assert parse_log_option(["MLflow", "tensorboard, mlflow"]) == ["mlflow", "tensorboard"]
    assert parse_log_option("") == parse_log_option("none") == parse_log_option(None) == []
    assert make_trackers("none", ".") == []
    with pytest.raises(ArkfedError, match=r"unknown tracker 'wandb' \(choose from: tensorboard, mlflow, none\)"):
        parse_log_option("tensorboard,wandb")


@pytest.mark.parametrize("module, extra", [("torch.utils.tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_package_is_one_line(monkeypatch, tmp_path, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ArkfedError) as err:
        make_trackers(extra, tmp_path)
    package = "mlflow-skinny" if extra == "mlflow" else "tensorboard"
    assert str(err.value) == f"--log {extra} needs the {package} package: pip install 'arkfed[{extra}]'"


def test_scalar_names():
    record = {"kind": "eval", "round": 1, "site": "alpha", "model": "teacher", "split": "val", "loss": 0.4,
              "mean_auc": 0.7, "auc": {"Pleural/Other": 0.6, "Rare": None}, "num_examples": 9}
    assert eval_scalars(record) == {"val/alpha/teacher/loss": 0.4, "val/alpha/teacher/mean_auc": 0.7,
                                    "val/alpha/teacher/auc/Pleural_Other": 0.6}
    assert eval_scalars(record, per_class=False) == {"val/alpha/teacher/loss": 0.4, "val/alpha/teacher/mean_auc": 0.7}
    assert visit_scalars({"site": "beta", "loss": 1.0, "lr": 0.1, "momentum": float("nan")}) == {
        "train/loss": 1.0, "train/lr": 0.1, "train/beta/loss": 1.0}
    params = flat_params(config(), mode="local")
    assert params["settings.lr"] == 0.003 and params["sites"] == '["alpha", "beta"]' and params["mode"] == "local"
    assert params["settings.crop_scale"] == "[0.08, 1.0]" and params["model.model"] == config().model.model
    assert params["model.num_features"] == "null"


def test_tensorboard_reads_back(finished_run):
    run_dir, _, records = finished_run
    scalars = read_tensorboard(run_dir)
    counts = check_trackers_match_metrics(run_dir, trackers=("tensorboard",))
    assert counts["tensorboard"] == 4 * 8 + 8 * 4  # 8 scalars per visit, 4 per evaluation (one AUC is null)
    visits = [r for r in records if r["kind"] == "visit"]
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2, 3]
    assert [step for step, _ in scalars["train/beta/loss"]] == [1, 3]
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in visits])
    assert [step for step, _ in scalars["val/beta/student/mean_auc"]] == [0, 1]  # step = round
    assert "val/alpha/student/auc/Effusion" in scalars and "val/alpha/student/auc/Pleural_Other" in scalars
    assert not any(tag.endswith("/auc/Rare") for tag in scalars)  # null AUCs are not drawn as numbers
    texts = read_tensorboard_texts(run_dir)
    assert "settings.lr: 0.003" in texts["config"][0][1]
    assert '"seconds": 12.5' in texts["summary"][0][1]
    hparams = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert hparams and any(b"_hparams_/session_start_info" in p.read_bytes() for p in hparams)


def test_mlflow_reads_back(finished_run):
    run_dir, _, records = finished_run
    run, history = read_mlflow(run_dir)
    client, run_id = mlflow_client(run_dir)
    recorded = json.loads((run_dir / "mlflow" / "run.json").read_text())
    assert recorded["tracking_uri"] == "run-folder"  # the run folder's own store, no server
    assert run.info.run_name == "run-2026-12-01" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "arkfed"
    assert run.data.params["settings.lr"] == "0.003" and run.data.params["rounds"] == "2"
    assert run.data.params["total_visits"] == "4" and run.data.params["mode"] == "local"
    counts = check_trackers_match_metrics(run_dir, trackers=("mlflow",))
    assert counts["mlflow"] == 4 * 8 + 8 * 4
    assert [step for step, _ in history["train/loss"]] == [0, 1, 2, 3]
    evals = [r for r in records if r["kind"] == "eval" and r["site"] == "alpha" and r["model"] == "teacher"]
    assert history["val/alpha/teacher/mean_auc"] == [(r["round"], pytest.approx(r["mean_auc"])) for r in evals]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "config.yaml"} <= artifacts
    assert recorded["run_id"] == run_id
    assert client.get_experiment(run.info.experiment_id).artifact_location == (run_dir / "mlflow" / "artifacts").resolve().as_uri()


def test_resume_continues_the_same_runs(tmp_path, empty_store):
    """Killed after visit 2 was recorded but before its checkpoint (visits_done = 2): the resumed
    run redoes visit 2 into the same MLflow run, and TensorBoard shows only the redone visit."""
    run_dir = new_run_dir(tmp_path, empty_store)
    cfg = config()
    first = drive(make_trackers("tensorboard,mlflow", run_dir), cfg, run_dir, stop_at=3, seed=1, end=False)
    _, run_id = mlflow_client(run_dir)
    client, _ = mlflow_client(run_dir)
    assert client.get_run(run_id).info.status == "KILLED"
    stale = next(r["loss"] for r in first if r["kind"] == "visit" and r["visit"] == 2)

    second = drive(make_trackers(["tensorboard", "mlflow"], run_dir), cfg, run_dir, visits_done=2, seed=2)
    redone = next(r["loss"] for r in second if r["kind"] == "visit" and r["visit"] == 2)
    assert redone != stale
    scalars = read_tensorboard(run_dir)
    last = next(r["loss"] for r in second if r["kind"] == "visit" and r["visit"] == 3)
    assert scalars["train/loss"][2:] == [(2, pytest.approx(redone)), (3, pytest.approx(last))]
    assert [step for step, _ in scalars["val/alpha/student/mean_auc"]] == [0, 1]

    run, history = read_mlflow(run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the same run, finished now
    assert run.data.tags["arkfed.resumed_at_visit"] == "2"
    steps = [step for step, _ in history["train/loss"]]
    assert steps[:3] == [0, 1, 2] and steps[-2:] == [2, 3]  # MLflow keeps both attempts at step 2
    assert dict(history["train/loss"])[2] == pytest.approx(redone)  # the later one is the value shown
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tensorboard_restart_from_scratch_replaces_the_first_attempt(tmp_path):
    """Killed before its first checkpoint, a run starts over at visit 0: only the second attempt shows."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    drive([TensorBoardLogger(run_dir)], config(rounds=1), run_dir, stop_at=1, seed=1, end=False)
    (run_dir / "metrics.jsonl").unlink()  # the loop rewrites metrics.jsonl empty when it starts over
    records = drive([TensorBoardLogger(run_dir)], config(rounds=1), run_dir, seed=2)
    scalars = read_tensorboard(run_dir)
    assert scalars["train/loss"] == [(r["visit"], pytest.approx(r["loss"])) for r in records if r["kind"] == "visit"]
    assert len(read_tensorboard_texts(run_dir)["config"]) == 1
    check_trackers_match_metrics(run_dir, trackers=("tensorboard",))


def test_user_tracking_uri_is_used(tmp_path, monkeypatch, empty_store):
    store = tmp_path / "elsewhere" / "shared.db"
    store.parent.mkdir()
    shutil.copyfile(empty_store, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)  # MLflow puts a user store's artifacts in ./mlruns by default
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = config(rounds=1)
    drive([MLflowLogger(run_dir)], cfg, run_dir)
    assert store.is_file() and not (run_dir / "mlflow" / "mlflow.db").exists()
    assert json.loads((run_dir / "mlflow" / "run.json").read_text())["tracking_uri"] == f"sqlite:///{store}"
    counts = check_trackers_match_metrics(run_dir, trackers=("mlflow",))
    assert counts["mlflow"] == 2 * 8 + 4 * 4
    assert _without_password("postgresql://bob:pw@db:5432/ml") == "postgresql://bob:***@db:5432/ml"  # never in run.json


def test_unusable_tracking_uri_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://somewhere")
    logger = MLflowLogger(tmp_path)
    with pytest.raises(ArkfedError, match=r"^MLflow \(nosuchscheme://somewhere\): could not") as err:
        logger.on_run_start(RunInfo(config(), tmp_path, 4, 0))
    assert "\n" not in str(err.value)


def test_tensorboard_alone_writes_only_its_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    drive([TensorBoardLogger(run_dir)], config(rounds=1), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_real_training_run_with_both_trackers(tmp_path, empty_store):
    """The one loop with in-process sites, stopped after three checkpointed visits and resumed:
    both trackers hold exactly what metrics.jsonl holds, in one MLflow run."""
    from arkfed.run.callbacks import LoopCallback
    from arkfed.run.folder import RunFolder
    from arkfed.run.local import train_local
    from arkfed.site.config import SiteConfig
    from arkfed.site.load import Site
    from arkfed.spec import ModelSpec
    from synthetic import multilabel_schema, synthetic_table

    sites = {name: Site(SiteConfig(name=name, dataset="synthetic", root="."), None, multilabel_schema(("x", "y")),
                        {"train": synthetic_table(16, ("x", "y"), 32, seed), "val": synthetic_table(16, ("x", "y"), 32, seed + 9)})
             for seed, name in enumerate(("a", "b"))}
    cfg = TrainConfig(sites=list(sites), rounds=2, seed=5, model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16),
                      settings=TrainSettings(batch_size=8, max_steps_per_visit=1, crop_scale=(0.5, 1.0)))
    run_dir = new_run_dir(tmp_path, empty_store)

    class Stop(Exception):
        pass

    class StopBeforeFourth(LoopCallback):
        def on_visit_start(self, plan):
            if plan.visit == 3:
                raise Stop

    with pytest.raises(Stop):
        train_local(cfg, run_dir, sites=sites, callbacks=[*make_trackers("tensorboard,mlflow", run_dir), StopBeforeFourth()])
    _, run_id = mlflow_client(run_dir)
    train_local(RunFolder(run_dir).read_config(), run_dir, resume=True, sites=sites,
                callbacks=make_trackers("tensorboard,mlflow", run_dir))
    counts = check_trackers_match_metrics(run_dir)
    assert counts == {"tensorboard": 4 * 8 + 8 * 4, "mlflow": 4 * 8 + 8 * 4}
    run, history = read_mlflow(run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [step for step, _ in history["train/loss"]] == [0, 1, 2, 3]
    assert [step for step, _ in read_tensorboard(run_dir)["val/b/teacher/mean_auc"]] == [0, 1]
