"""Sites that come and go (issue 17), in the one loop, with in-process sites: a quorum, a late join,
missed turns, ``max_absent``, a site coming back, resume, and a local run without an unreadable site.
"""

from __future__ import annotations

import pytest
import torch

from arkfed.config import TrainConfig, TrainSettings
from arkfed.data.schema import LabelSchema
from arkfed.errors import ArkfedError
from arkfed.federation.coordinator.status import StatusFile, read_status
from arkfed.run.attendance import Attendance
from arkfed.run.folder import RunFolder
from arkfed.run.local import InProcessSites
from arkfed.run.loop import ArkLoop, SiteFailure
from arkfed.run.start import init_heads, initial_state
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from synthetic import synthetic_table

TINY = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def synthetic_site(name: str, seed: int, n: int = 16) -> Site:
    schema = LabelSchema(task="multilabel", classes=("x", "y"))
    splits = {"train": synthetic_table(n, schema.classes, 32, seed), "val": synthetic_table(8, schema.classes, 32, seed + 100)}
    return Site(SiteConfig(name=name, dataset="synthetic", root="."), None, schema, splits)


def config(names, rounds: int, **changes) -> TrainConfig:
    settings = TrainSettings(batch_size=8, max_steps_per_visit=1, crop_scale=(0.5, 1.0))
    return TrainConfig(sites=list(names), rounds=rounds, seed=5, model=TINY, settings=settings, **changes)


def test_a_sites_initial_head_depends_only_on_the_run_seed_and_its_name():
    schemas = {name: LabelSchema(task="multilabel", classes=("x", "y", "z")[: i + 1]) for i, name in enumerate("abc")}
    cfg = config("abc", 1)
    state = initial_state(cfg, schemas)
    dim = state.student.embed_dim
    alone = init_heads(cfg, {"b": schemas["b"]}, dim)["b"].state_dict()
    together = state.heads["b"].state_dict()
    assert all(torch.equal(alone[k], together[k]) for k in alone)  # the same head, whoever else is there
    other_seed = init_heads(cfg.model_copy(update={"seed": 6}), {"b": schemas["b"]}, dim)["b"].state_dict()
    assert not torch.equal(alone["weight"], other_seed["weight"])
    with pytest.raises(ValueError, match="min_sites 4 is more than the 3 listed sites"):
        config("abc", 1, min_sites=4)


class ComingAndGoing(InProcessSites):
    """In-process sites that are not always there: ``late`` joins at the boundary of round
    ``late_round``; ``away`` answers as if gone for the visits in ``away_visits`` and joins again at
    the boundary of round ``back_round``. Records every plan it was asked to train."""

    def __init__(self, sites, late: str, late_round: int, away: str, away_visits: set[int], back_round: int):
        super().__init__(sites)
        self.late, self.late_round, self.away, self.away_visits, self.back_round = late, late_round, away, away_visits, back_round
        self.boundary = -1
        self.asked: list[tuple[int, str]] = []
        self.first_heads: dict[str, dict] = {}

    def join(self, cfg):
        infos = super().join(cfg)
        return {name: info for name, info in infos.items() if name != self.late}

    def joined_since(self):
        self.boundary += 1
        names = {self.late: self.late_round, self.away: self.back_round}
        return {name: super(ComingAndGoing, self).join(self.config)[name] for name, rnd in names.items() if rnd == self.boundary}

    def visit(self, state, plans):
        answers = {}
        for plan in plans:
            self.asked.append((plan.visit, plan.site))
            self.first_heads.setdefault(plan.site, {k: v.clone() for k, v in state.heads[plan.site].state_dict().items()})
            if plan.site == self.away and plan.visit in self.away_visits:
                answers[plan.site] = SiteFailure("site went offline", away=True)
            else:
                answers.update(super().visit(state, [plan]))
        return answers


def test_a_late_site_enters_at_the_next_round_and_an_absent_one_is_dropped_then_back(tmp_path):
    sites = {name: synthetic_site(name, i, n=16) for i, name in enumerate("abc")}
    cfg = config("abc", 5, min_sites=2, max_absent=2)
    run = RunFolder(tmp_path / "run")
    # c joins before round 2; b is gone in rounds 2 and 3 (visits 4 and 7), dropped, and joins again before round 5
    in_process = ComingAndGoing(sites, late="c", late_round=1, away="b", away_visits={4, 7}, back_round=4)
    summary = ArkLoop(cfg, run, in_process, [StatusFile(run.path, cfg)]).run_loop()

    turns = {r["visit"]: (r["site"], r["kind"], r.get("reason"), r.get("away")) for r in run.read_metrics()
             if r["kind"] == "visit" or (r["kind"] == "skip" and r["stage"] == "visit")}
    assert sorted(turns) == list(range(cfg.total_visits))  # every turn recorded once
    assert turns[2] == ("c", "skip", "absent", True)  # not joined: skipped, nothing sent
    assert turns[4] == ("b", "skip", "site went offline", True) and turns[7] == ("b", "skip", "site went offline", True)
    assert turns[10] == ("b", "skip", "dropped", True)  # two missed turns in a row: not even asked
    assert turns[13][:2] == ("b", "visit")  # joined again: back
    assert [v for v, site in in_process.asked if site == "c"] == [5, 8, 11, 14]  # from the round after it joined
    assert (10, "b") not in in_process.asked and (2, "c") not in in_process.asked
    expected = init_heads(cfg, {"c": sites["c"].schema}, initial_state(cfg, {}).student.embed_dim)["c"]
    assert all(torch.equal(in_process.first_heads["c"][k], v) for k, v in expected.state_dict().items())  # as at the start
    evaluated = {(r["round"], r["site"]) for r in run.read_metrics() if r["kind"] == "eval"}
    assert (0, "c") not in evaluated and (1, "c") in evaluated and (3, "b") not in evaluated and (4, "b") in evaluated
    status = read_status(run.path)
    assert any("site 'c' joined late: it enters in round 2" in w for w in status.warnings)
    assert any("site 'b' dropped: it missed 2 turns in a row" in w for w in status.warnings)
    assert any("site 'b' joined again: back from round 5" in w for w in status.warnings)
    assert status.phase == "finished" and summary["evaluated_round"] == 4


def test_a_resumed_run_goes_on_counting_missed_turns_from_its_records():
    records = [{"kind": "visit", "site": "b", "visit": 1},
               {"kind": "skip", "stage": "visit", "site": "b", "visit": 4, "reason": "no reply within 60 s", "away": True},
               {"kind": "skip", "stage": "evaluation", "site": "b", "visit": 6, "reason": "absent"},  # not a turn
               {"kind": "skip", "stage": "visit", "site": "b", "visit": 7, "reason": "absent", "away": True},
               {"kind": "skip", "stage": "visit", "site": "a", "visit": 9, "reason": "rejected reply: x"}]  # there, refused
    attendance = Attendance(max_absent=2)
    attendance.restore(records, joined={"a", "c"})
    assert attendance.missed == {"b": 2, "a": 0} and attendance.dropped == {"b"}
    assert attendance.away("b", {"a", "c"}) == "dropped" and attendance.away("c", {"a", "c"}) is None
    joined_again = Attendance(max_absent=2)
    joined_again.restore(records, joined={"a", "b"})  # b is connected at the restart: waited for again
    assert joined_again.dropped == set() and Attendance(None).turn("b", True) is False


def test_a_local_run_with_a_quorum_goes_on_without_a_site_whose_data_cannot_be_read(tmp_path):
    import yaml

    from arkfed.run.local import train_local
    from federation_fixtures import make_sites, site_name, tiny_config

    paths = make_sites(tmp_path / "fed")
    broken = paths[1]
    data = yaml.safe_load(broken.read_text())
    broken.write_text(yaml.safe_dump(data | {"root": str(tmp_path / "gone")}))
    names = [site_name(p) for p in paths]
    cfg = tiny_config(paths, rounds=1, max_steps_per_visit=1)
    with pytest.raises(ArkfedError, match=rf"data folder not found: {tmp_path / 'gone'}"):
        train_local(cfg, tmp_path / "all", site_configs=paths)  # without --min-sites: every site, as before
    with pytest.raises(ArkfedError, match=r"the run needs 3 \(--min-sites\)"):
        train_local(cfg.model_copy(update={"min_sites": 3}), tmp_path / "three", site_configs=paths)
    summary = train_local(cfg.model_copy(update={"min_sites": 2}), tmp_path / "two", site_configs=paths)
    skipped = [(s["stage"], s["site"], s["reason"]) for s in summary["skipped"]]
    assert skipped == [("visit", names[1], "absent"), ("evaluation", names[1], "absent")]
    assert {r["site"] for r in RunFolder(tmp_path / "two").read_metrics() if r["kind"] == "visit"} == {names[0], names[2]}
