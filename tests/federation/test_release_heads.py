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
