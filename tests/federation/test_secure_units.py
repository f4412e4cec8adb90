"""Secure aggregation's pieces without processes: the site's protocol check and kept update, the
signed run's rule, the coordinator's refusals and the gateway's limit (the protocol itself runs
over real processes in ``test_secure_aggregation.py``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from arkfed.config import TrainConfig
from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.coordinator.gateway import masked_vector_bytes, model_state_bytes, run_push_object_limit
from arkfed.federation.coordinator.secure import secure_mean
from arkfed.federation.describe import describe_content
from arkfed.federation.secagg import CONFIGS, DIGEST_FIELD, SECURE_FIELD, config_digest
from arkfed.federation.signing import RunRefused, check_request
from arkfed.federation.site import secure
from arkfed.run.folder import RunFolder
from arkfed.run.loop import ArkLoop, SiteFailure
from arkfed.run.plan import plan_groups
from arkfed.spec import ModelSpec
from site_messages import message

NODE = 7  # site_messages' destination node


def _message(configs: dict, digest: str | None = None, **request) -> Message:
    record = ConfigRecord(configs)
    fields = {"run_uid": "r1", "plan": {"visit": 0}, DIGEST_FIELD: digest or config_digest(record), **request}
    return message(RecordDict({CONFIGS: record, m.REQUEST: m.json_record(**fields)}), "train")


def _passes(message: Message) -> bool:
    return secure.check_protocol(message, None, lambda msg, ctx: "handed on") == "handed on"


def _setup(sites: int, threshold: int) -> dict:
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sites, Key.SHARE_NUMBER: sites, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: 2.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1.0}


def test_the_site_hands_on_only_protocol_fields_the_coordinator_signed():
    assert _passes(_message(_setup(3, 3)))
    with pytest.raises(m.BadRequest, match="differ from those the coordinator signed"):
        _passes(_message(_setup(3, 3), digest=config_digest(ConfigRecord(_setup(3, 2)))))
    no_digest = _message(_setup(3, 3))
    no_digest.content.config_records[m.REQUEST] = m.json_record(run_uid="r1")
    with pytest.raises(m.BadRequest, match="not a secure aggregation request"):
        _passes(no_digest)


@pytest.mark.parametrize("sites,threshold", [(1, 2), (2, 1), (1, 1)])
def test_the_site_refuses_a_sum_that_would_be_its_own_update(sites, threshold):
    with pytest.raises(m.BadRequest, match="at least two sites") as info:
        _passes(_message(_setup(sites, threshold)))
    assert info.value.public.startswith("secure_aggregation_refused:")  # what the coordinator is told


def test_the_site_refuses_an_unmask_that_would_reveal_its_masks():
    unmask = {Key.STAGE: Stage.UNMASK}
    assert _passes(_message({**unmask, Key.ACTIVE_NODE_ID_LIST: [NODE, 8, 9], Key.DEAD_NODE_ID_LIST: []}))
    assert _passes(_message({**unmask, Key.ACTIVE_NODE_ID_LIST: [NODE, 8], Key.DEAD_NODE_ID_LIST: [9]}))  # a dropped site
    for active, dead in (([NODE, 8], [NODE]), ([NODE, 8, 9], [8])):
        with pytest.raises(m.BadRequest, match="both alive and dropped, or this site as dropped"):
            _passes(_message({**unmask, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}))


def _context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


def test_a_kept_update_is_clipped_and_handed_over_once():
    context = _context()
    request = SimpleNamespace(run_uid="r1", plan=SimpleNamespace(site="a", visit=4))
    sent, trained = {"w": torch.zeros(4), "n": torch.tensor(1)}, {"w": torch.full((4,), 3.0), "n": torch.tensor(3)}
    norm = secure.keep_update(context, request, {"max_norm": 1.0, "weighting": "samples"}, sent, trained, num_examples=16)
    assert norm == pytest.approx(6.0)
    reply = secure.masked_update(_message({}, plan={"visit": 4}), context)
    arrays = [a.numpy() for a in reply.content.array_records["fitres.parameters"].values()]
    assert len(arrays) == 1 and np.allclose(arrays[0], 0.5)  # clipped onto norm 1; the integer buffer stays
    assert reply.content.metric_records["fitres.num_examples"]["num_examples"] == 16
    with pytest.raises(m.BadRequest, match="keeps no update of visit 4"):  # masked once only
        secure.masked_update(_message({}, plan={"visit": 4}), context)
    secure.keep_update(context, request, {"max_norm": 1.0, "weighting": "equal"}, sent, trained, num_examples=16)
    with pytest.raises(m.BadRequest, match="keeps no update of visit 5"):
        secure.masked_update(_message({}, plan={"visit": 5}), context)
    reply = secure.masked_update(_message({}, plan={"visit": 4}), context)
    assert reply.content.metric_records["fitres.num_examples"]["num_examples"] == 1  # equal weights


def _claim(config: TrainConfig) -> dict:
    return {"run_uid": "r1", "config": config.model_dump(mode="json")}


def test_a_run_signed_with_secure_aggregation_refuses_a_visit_that_does_not_ask_for_it():
    config = TrainConfig(sites=["a", "b"], mode="parallel", secure_aggregation=True)
    plan = plan_groups(config)[0][0].model_dump(mode="json")
    request = {"run_uid": json.dumps("r1"), "plan": json.dumps(plan)}
    with pytest.raises(RunRefused, match="does not ask for it"):
        check_request(_claim(config), request)
    check_request(_claim(config), {**request, SECURE_FIELD: json.dumps({"max_norm": 1.0, "weighting": "samples"})})
    check_request(_claim(config), {**request, DIGEST_FIELD: json.dumps("0" * 64)})  # a protocol message
    check_request(_claim(config.model_copy(update={"secure_aggregation": False})), request)


def test_the_coordinator_never_sums_a_single_update():
    result = secure_mean(None, {"a": 1}, {"a": SimpleNamespace(round=0)}, "r1", 1.0, 1.0, 10.0)
    assert isinstance(result, SiteFailure) and "at least two accepted visits" in result.reason


def test_a_secure_visit_reply_carries_metrics_only():
    from arkfed.ark.visit import VisitResult

    plan = plan_groups(TrainConfig(sites=["a", "b"], mode="parallel"))[0][0]
    planned = {"lr": plan.lr, "consistency": plan.consistency, "momentum": plan.momentum, "momentum_product": plan.momentum}
    zeros = {k: 0.0 for k, f in VisitResult.model_fields.items() if f.annotation is float and k not in planned}
    result = VisitResult(site="a", round=0, visit=0, num_examples=8, steps=1, **planned, **zeros)
    content = secure.metrics_reply(result)
    reply = m.read_visit_reply(content, plan, None, None, False, secure=True)
    assert reply.student == {} and reply.result.num_examples == 8
    content[m.STUDENT] = ArrayRecord()
    with pytest.raises(m.BadReply, match="more than its metrics"):
        m.read_visit_reply(content, plan, None, None, False, secure=True)
    assert isinstance(content[m.METRICS], MetricRecord)


def test_secure_aggregation_needs_a_federation_and_a_norm_bound(tmp_path):
    config = TrainConfig(sites=["a", "b"], mode="parallel", secure_aggregation=True)
    with pytest.raises(ArkfedError, match="is for federated runs"):
        ArkLoop(config, RunFolder(tmp_path), SimpleNamespace(mode="local"), max_update_norm=1.0)._check_secure()
    federated = SimpleNamespace(mode="federated", secure_mean=None)
    with pytest.raises(ArkfedError, match="needs max_update_norm"):
        ArkLoop(config, RunFolder(tmp_path), federated)._check_secure()
    ArkLoop(config, RunFolder(tmp_path), federated, max_update_norm=1.0)._check_secure()


def test_the_gateway_lets_a_masked_vector_through(tmp_path):
    spec = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)
    config = TrainConfig(sites=["a", "b"], mode="parallel", secure_aggregation=True, model=spec)
    RunFolder(tmp_path / "secure").write_config(config)
    RunFolder(tmp_path / "plain").write_config(config.model_copy(update={"secure_aggregation": False}))
    masked = masked_vector_bytes(spec)
    assert masked > 2 * model_state_bytes(spec) - 4096  # int64 per float32 value
    assert run_push_object_limit(tmp_path / "secure") > masked > run_push_object_limit(tmp_path / "plain")
    described = describe_content(RecordDict({CONFIGS: ConfigRecord({"masked": [b"abc", b"de"]})}))
    assert json.dumps(described) and described[CONFIGS]["values"]["masked"] == "<2 byte strings, 5 bytes>"


def test_the_command_line_says_what_secure_aggregation_needs():
    from typer.testing import CliRunner

    from arkfed.cli import app

    def error(*args: str) -> str:
        result = CliRunner().invoke(app, ["coordinator", "--sites", "a,b", "--secure-aggregation", "--insecure", *args])
        assert result.exit_code != 0 and isinstance(result.exception, ArkfedError)
        return str(result.exception)

    assert "needs mode 'parallel': in cyclic mode" in error("--dry-run")
    assert "cannot be combined with aggregation 'median': robust rules need every single update" in error(
        "--mode", "parallel", "--aggregation", "median", "--dry-run")
    assert "needs --max-update-norm N: each site clips its own update" in error("--mode", "parallel")
    shown = CliRunner().invoke(app, ["coordinator", "--sites", "a,b", "--secure-aggregation", "--mode", "parallel", "--dry-run"])
    assert shown.exit_code == 0 and "secure_aggregation: true" in shown.output and "aggregation: mean" in shown.output
