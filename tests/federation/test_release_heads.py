"""A site's ``release_head`` policy (issue 17, item 4): its heads leave only with the evaluation
after the run's last round, and only when its policy says so; what the coordinator reads back is
checked like any reply."""

from __future__ import annotations

import math

import pytest
import torch

from arkfed.data.schema import LabelSchema
from arkfed.federation import messages as m
from arkfed.federation.site.client_app import _final_evaluation
from arkfed.model.ark import SiteHead
from arkfed.site.policy import SitePolicy

SCHEMA = LabelSchema(task="multilabel", classes=("x", "y"))
RESULTS = {"teacher": {"loss": 0.5, "mean_auc": 0.7, "num_examples": 4}}


def test_released_heads_travel_with_the_final_evaluation_and_are_checked():
    assert SitePolicy().release_head is False  # heads stay at the site unless its operator says otherwise
    student, teacher = SiteHead("s", SCHEMA, 16), SiteHead("s", SCHEMA, 16)
    content = m.evaluation_content(RESULTS, (student, teacher))
    assert set(m.read_eval_reply(content, SCHEMA.classes, 10)) == {"teacher"}
    got = m.read_released_heads(content, "s", SCHEMA, 16)
    assert torch.equal(got[0].weight, student.weight) and torch.equal(got[1].bias, teacher.bias)
    assert m.read_released_heads(m.evaluation_content(RESULTS), "s", SCHEMA, 16) is None
    with pytest.raises(m.BadReply):  # a head of another width
        m.read_released_heads(m.evaluation_content(RESULTS, (SiteHead("s", SCHEMA, 8), teacher)), "s", SCHEMA, 16)
    with torch.no_grad():
        student.weight[0, 0] = math.nan
    with pytest.raises(m.BadReply, match="non-finite"):
        m.read_released_heads(m.evaluation_content(RESULTS, (student, teacher)), "s", SCHEMA, 16)


def test_only_the_evaluation_after_the_last_signed_round_is_final():
    claim = {"config": {"rounds": 3}}
    assert _final_evaluation(m.json_record(round=2, final=True), claim)
    assert not _final_evaluation(m.json_record(round=1, final=True), claim)  # marked final, but not the signed last round
    assert not _final_evaluation(m.json_record(round=2), claim)
    assert _final_evaluation(m.json_record(round=0, final=True), None)  # an unsigned trial: the coordinator's word


def test_a_site_continues_a_release_with_its_own_heads_from_its_state_dir(tmp_path):
    """``--from RELEASE`` in a federation: the first request of the continued run names the parent
    run; a site that kept heads from it starts from them (teacher and student), others from the head sent."""
    from types import SimpleNamespace

    from arkfed.config import TrainConfig, TrainSettings
    from arkfed.federation.site.client_app import _start_heads
    from arkfed.federation.site.heads import HeadStore
    from arkfed.run.plan import plan_visits
    from arkfed.spec import ModelSpec

    config = TrainConfig(sites=["s"], model=ModelSpec(model="test_resnet", img_size=32, projector_dim=16), settings=TrainSettings())
    kept = {kind: SiteHead("s", SCHEMA, 16) for kind in ("head", "teacher-head")}
    for kind, head in kept.items():  # what the site stored in the parent run
        HeadStore(tmp_path, "parent1", "s", SCHEMA, None, kind).save(7, head)
    site = SimpleNamespace(name="s", schema=SCHEMA)
    sent = SiteHead("s", SCHEMA, 16)

    def start(run_uid: str, **extra):
        record = m.json_record(run_uid=run_uid, spec=config.model, settings=config.settings, head_from=m.NO_HEAD, schemas={},
                               pending=1.0, plan=plan_visits(config)[0], **extra)
        model = torch.nn.Linear(2, 2)
        request = m.read_site_request(m.request_content(record, student=m.model_record(model), teacher=m.model_record(model),
                                                        head=m.model_record(sent)), m.VISIT)
        stores = tuple(HeadStore(tmp_path, run_uid, "s", SCHEMA, None, kind) for kind in ("head", "teacher-head"))
        return _start_heads(stores, site, request, 16)

    heads = start("child1", parent_run="parent1")
    assert torch.equal(heads.student.weight, kept["head"].weight) and torch.equal(heads.teacher.weight, kept["teacher-head"].weight)
    again = start("child1", parent_run="parent1")  # a retried first visit starts from the same two heads
    assert torch.equal(again.teacher.weight, kept["teacher-head"].weight)
    fresh = start("child2", parent_run="never-ran-here")
    assert torch.equal(fresh.student.weight, sent.weight) and torch.equal(fresh.teacher.weight, sent.weight)
