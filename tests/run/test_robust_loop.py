"""The Ark loop against one bad site (issue 21), with in-process sites: the same gate as a federation.

- a model that two different sites cannot train on (non-finite losses, no visit accepted between)
  stops the run, unfinished, saying which update is suspect; one site claiming so cannot stop it;
- a parallel run with one site returning x 1e6 weights, a billion examples and an AUC of 1e9
  refuses those replies and finishes with the honest sites' median.
"""

from __future__ import annotations

import json

import pytest
import torch

from arkfed.config import TrainConfig, TrainSettings
from arkfed.data.schema import LabelSchema
from arkfed.run.folder import RunFolder
from arkfed.run.local import InProcessSites
from arkfed.run.loop import ArkLoop, ModelUnusable, SiteFailure
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from synthetic import synthetic_table

TINY = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def synthetic_site(name: str, seed: int, n: int = 24) -> Site:
    schema = LabelSchema(task="multilabel", classes=("x", "y"))
    splits = {"train": synthetic_table(n, schema.classes, 32, seed), "val": synthetic_table(16, schema.classes, 32, seed + 100)}
    return Site(SiteConfig(name=name, dataset="synthetic", root="."), None, schema, splits)


@pytest.fixture(scope="module")
def sites() -> dict[str, Site]:
    return {s.name: s for s in (synthetic_site("a", 0), synthetic_site("b", 1), synthetic_site("c", 2))}


def config(sites, rounds: int = 2, **changes) -> TrainConfig:
    settings = TrainSettings(batch_size=8, max_steps_per_visit=2, lr=3e-3, crop_scale=(0.5, 1.0))
    return TrainConfig(sites=list(sites), rounds=rounds, seed=5, model=TINY, settings=settings).model_copy(update=changes)


class FaultySites(InProcessSites):
    """In-process sites, except that ``faults`` (visit index -> fault) replace some answers."""

    def __init__(self, sites, faults: dict[int, str], bad_eval: str | None = None):
        super().__init__(sites)
        self.faults, self.bad_eval = faults, bad_eval

    def visit(self, state, plans):
        replies = super().visit(state, plans)
        for plan in plans:
            fault = self.faults.get(plan.visit)
            if fault == "non_finite_loss":
                replies[plan.site] = SiteFailure("non_finite_loss")
            elif fault == "scale":
                replies[plan.site].student = {k: v * 1e6 if v.dtype.is_floating_point else v for k, v in replies[plan.site].student.items()}
            elif fault == "examples":
                replies[plan.site].result = replies[plan.site].result.model_copy(update={"num_examples": 10**9})
        return replies

    def evaluate(self, state, split, names):
        answers = super().evaluate(state, split, names)
        if self.bad_eval in answers:
            answers[self.bad_eval]["student"]["mean_auc"] = 1e9
            answers[self.bad_eval]["teacher"]["loss"] = -5.0
        return answers


def test_a_model_two_sites_cannot_train_on_stops_the_run_unfinished(sites, tmp_path):
    run = RunFolder(tmp_path / "run")
    loop = ArkLoop(config(sites), run, FaultySites(sites, {3: "non_finite_loss", 4: "non_finite_loss"}))
    with pytest.raises(ModelUnusable) as info:
        loop.run_loop()
    text = str(info.value)
    print(f"\nstop message: {text}")
    assert text.startswith("stopped, not finished: the model became unusable: training on it gave non-finite losses at sites "
                           "'a' (visit 4), 'b' (visit 5), with no visit accepted in between; suspect the last accepted update, "
                           "visit 3 from site 'c'")
    assert not (run.path / "summary.json").exists()  # never reported as finished
    assert run.load_checkpoint().visits_done == 4  # the model both sites were sent
    skips = [(r["visit"], r["reason"]) for r in run.read_metrics() if r["kind"] == "skip"]
    assert skips == [(3, "non_finite_loss"), (4, "non_finite_loss")]


def test_one_site_claiming_non_finite_losses_cannot_stop_a_run(sites, tmp_path):
    run = RunFolder(tmp_path / "run")
    summary = ArkLoop(config(sites), run, FaultySites(sites, {0: "non_finite_loss", 3: "non_finite_loss"})).run_loop()
    assert [(s["visit"], s["site"]) for s in summary["skipped"]] == [(0, "a"), (3, "a")]
    assert (run.path / "summary.json").is_file() and summary["evaluated_round"] == 1


def test_a_parallel_run_refuses_one_bad_sites_replies_and_metrics_and_takes_the_honest_median(sites, tmp_path):
    run = RunFolder(tmp_path / "run")
    faults = {0: "scale", 3: "examples"}  # site a: round 0 x 1e6, round 1 a billion examples; every evaluation out of range
    cfg = config(sites, mode="parallel", weighting="samples")
    assert cfg.aggregation == "median"
    summary = ArkLoop(cfg, run, FaultySites(sites, faults, bad_eval="a")).run_loop()
    reasons = {(s["stage"], s["round"]): s["reason"] for s in summary["skipped"]}
    print("\nrefused: " + json.dumps({f"{stage} round {rnd}": text for (stage, rnd), text in reasons.items()}))
    assert set(reasons) == {("visit", 0), ("visit", 1), ("evaluation", 0), ("evaluation", 1)}
    assert "returned student: update norm" in reasons["visit", 0] and "exceeds the bound" in reasons["visit", 0]
    assert "num_examples 1000000000 exceeds what the site declared" in reasons["visit", 1]
    assert reasons["evaluation", 0] == "rejected reply: evaluation of the student: mean_auc 1000000000.0 is outside [0, 1]"
    assert "a" not in summary["sites"] or "student" not in summary["sites"]["a"]
    visits = [r for r in run.read_metrics() if r["kind"] == "visit"]
    assert {r["site"] for r in visits} == {"b", "c"} and all(r["update_norm"] > 0 for r in visits)
    teacher = run.load_checkpoint().teacher
    floats = [v for v in teacher.state_dict().values() if v.dtype.is_floating_point]
    assert all(bool(torch.isfinite(v).all()) and float(v.abs().max()) < 1e3 for v in floats)


class Interrupt(Exception):
    pass


def test_a_resumed_run_bounds_updates_with_the_norms_it_accepted_before(sites, tmp_path):
    from arkfed.run.callbacks import LoopCallback

    class StopAtFourth(LoopCallback):
        def on_visit_start(self, plan):
            if plan.visit == 3:
                raise Interrupt

    full = ArkLoop(config(sites), RunFolder(tmp_path / "full"), InProcessSites(sites))
    full.run_loop()
    with pytest.raises(Interrupt):
        ArkLoop(config(sites), RunFolder(tmp_path / "cut"), InProcessSites(sites), [StopAtFourth()]).run_loop()
    resumed = ArkLoop(config(sites), RunFolder(tmp_path / "cut"), InProcessSites(sites))
    resumed.run_loop(resume=True)
    assert len(full.guard.history) == len(resumed.guard.history) == 6
    assert resumed.guard.history == full.guard.history  # norms from metrics.jsonl, then the same visits
