"""``arkfed release`` and ``--from RELEASE``: a 2-site release continued with a third site keeps the
old sites' heads bit for bit, gives the new site a new head, continues the teacher's schedules,
names its parent in the new lineage; a release edited by hand is refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from arkfed.cli import app
from arkfed.cli.options import resolve_run_config
from arkfed.errors import ArkfedError
from arkfed.evaluation.release import write_release
from arkfed.model.lineage import read_release
from arkfed.model.weights import load_ark_model, load_heads
from arkfed.run.local import train_local
from arkfed.run.plan import plan_visits
from arkfed.run.start import initial_state
from arkfed.schedules import schedule_values
from run.test_train_local import synthetic_site, tiny_config


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    sites = {"a": synthetic_site("a", ("x", "y"), 0), "b": synthetic_site("b", ("t",), 1), "c": synthetic_site("c", ("u", "v"), 2)}
    train_local(tiny_config(["a", "b"], rounds=1), root / "run1", sites={k: sites[k] for k in "ab"})
    result = CliRunner().invoke(app, ["release", str(root / "run1"), "--out", str(root / "rel1")])
    assert result.exit_code == 0, result.output
    return root, sites


def test_continuing_a_release_keeps_old_heads_adds_new_ones_and_names_the_parent(released):
    root, sites = released
    rel1 = root / "rel1"
    first = read_release(rel1)
    assert first["version"] == 1 and first["parents"] == [] and set(first["sites"]) == {"a", "b"}
    assert first["sites"]["a"]["visits"] == 1 and first["schedule"]["steps"] == 2
    assert first["sites"]["a"]["fingerprint"]["labels_sha256"]
    assert first["normalisation"]["img_size"] == 32 and first["id"] in (rel1 / "README.md").read_text()

    config = resolve_run_config(["a", "b", "c"], {"init": str(rel1), "model.model": "test_resnet", "model.img_size": 32,
                                                  "model.projector_dim": 16, "rounds": 1, "seed": 5,
                                                  "settings.batch_size": 8, "settings.max_steps_per_visit": 2})
    assert config.schedule_offset == 2  # the teacher's schedules continue after the release's two visits
    plan = plan_visits(config)[0]
    assert (plan.consistency, plan.momentum) == schedule_values(config.settings, 2, 2 + 3)
    restarted = resolve_run_config(["a", "b", "c"], {"init": str(rel1), "restart_schedules": True})
    assert restarted.schedule_offset == 0

    state = initial_state(config, {k: s.schema for k, s in sites.items()})
    released_student, released_teacher = load_heads(rel1 / "student-heads"), load_heads(rel1 / "heads")
    run1 = root / "run1"
    for name in ("a", "b"):  # bit for bit: the release's heads, which are the run's
        for have, want in ((state.heads[name], released_student[name]), (state.teacher_heads[name], released_teacher[name])):
            assert all(torch.equal(v, want.state_dict()[k]) for k, v in have.state_dict().items())
        assert torch.equal(released_teacher[name].weight, load_heads(run1 / "teacher-heads")[name].weight)
        assert not torch.equal(state.heads[name].weight, state.teacher_heads[name].weight)
    assert "c" not in released_student and state.heads["c"].classes == ("u", "v")
    assert torch.equal(state.heads["c"].weight, state.teacher_heads["c"].weight)  # a new head: the teacher's is its copy
    teacher = load_ark_model(rel1)
    assert all(torch.equal(v, state.teacher.state_dict()[k]) for k, v in teacher.state_dict().items())

    train_local(config, root / "run2", sites=sites)
    second = write_release(root / "run2", root / "rel2")
    assert second["version"] == 2 and second["parents"][0]["id"] == first["id"]
    assert second["parents"][0]["content_hash"] == first["content_hash"]
    assert second["ancestors"][-1]["id"] == first["id"]
    assert second["sites"]["a"]["visits_total"] == 2 and second["sites"]["c"]["visits_total"] == 1
    assert second["sites"]["c"]["contributed_in"] == [2] and second["sites"]["a"]["contributed_in"] == [1, 2]
    assert second["schedule"]["steps"] == 5


def test_a_release_whose_lineage_was_edited_by_hand_is_refused(released, tmp_path):
    import shutil

    root, _ = released
    copy = tmp_path / "edited"
    shutil.copytree(root / "rel1", copy)
    lineage = json.loads((copy / "lineage.json").read_text())
    lineage["sites"]["a"]["visits_total"] = 50  # a prettier history
    (copy / "lineage.json").write_text(json.dumps(lineage, indent=2))
    for load in (read_release, load_ark_model, lambda p: resolve_run_config(["a"], {"init": str(p)})):
        with pytest.raises(ArkfedError, match="content hash mismatch"):
            load(copy)

    shutil.rmtree(copy)
    shutil.copytree(root / "rel1", copy)
    head = copy / "student-heads" / "a.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")  # a swapped weight, lineage untouched
    with pytest.raises(ArkfedError, match="student-heads/a.safetensors changed"):
        read_release(copy)
