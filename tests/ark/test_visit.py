"""The site visit: deterministic given (weights, settings, plan), teacher untouched, metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.visit import loader_options, train_site_visit
from arkfed.config import TrainSettings, VisitPlan
from arkfed.errors import ArkfedError
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.schedules import ema_update, teacher_momentum
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from synthetic import multilabel_schema, synthetic_table

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def make_site(n=40, uncertain=0.2) -> Site:
    schema = multilabel_schema()
    splits = {"train": synthetic_table(n, schema.classes, 32, seed=0, uncertain=uncertain)}
    return Site(SiteConfig(name="s1", dataset="synthetic", root="."), None, schema, splits)


def make_models(seed=0):
    torch.manual_seed(seed)
    student = ArkModel(SPEC)
    teacher = copy.deepcopy(student)
    head = SiteHead("s1", multilabel_schema(), SPEC.projector_dim)
    return student, teacher, head


def pair_of(student, teacher, head) -> ArkPair:
    return ArkPair(student, teacher, SiteHeads.fresh(head))


def plan(**kw) -> VisitPlan:
    values = dict(round=1, visit=4, total_visits=9, site="s1", consistency=0.3, momentum=0.95, lr=0.01, seed=11)
    return VisitPlan(**(values | kw))


def states(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SETTINGS = TrainSettings(batch_size=8, max_steps_per_visit=3, lr=0.01)


def test_visit_is_deterministic_and_leaves_the_teacher_alone():
    site = make_site()
    runs = []
    for _ in range(2):
        student, teacher, head = make_models()
        teacher_before = states(teacher)[0]
        result = train_site_visit(pair_of(student, teacher, head), site, SETTINGS, plan())
        assert same(states(teacher)[0], teacher_before)  # visit-wise EMA is the caller's job
        assert all(p.grad is None for p in teacher.parameters())
        runs.append((states(student, head), result))
    (a, ra), (b, rb) = runs
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert ra.loss == rb.loss and ra.num_examples == 24 and ra.steps == 3
    assert ra.consistency_loss > 0 and ra.task_loss > 0
    assert ra.loss == pytest.approx(0.7 * ra.task_loss + 0.3 * ra.consistency_loss, rel=1e-5)
    student, teacher, head = make_models()
    train_site_visit(pair_of(student, teacher, head), site, SETTINGS, plan(seed=12))
    assert not same(states(student)[0], a[0])  # the plan's seed drives data order and augmentation


def test_visit_trains_student_and_head_and_keeps_callers_rng():
    site = make_site()
    student, teacher, head = make_models()
    before = states(student, head)
    torch.manual_seed(123)
    train_site_visit(pair_of(student, teacher, head), site, SETTINGS, plan(consistency=0.0))
    after_visit = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_visit)
    after = states(student, head)
    assert not same(before[0], after[0]) and not same(before[1], after[1])


def test_first_visit_has_no_consistency_term():
    student, teacher, head = make_models()
    result = train_site_visit(pair_of(student, teacher, head), make_site(), SETTINGS, plan(consistency=0.0))
    assert result.consistency_loss == 0.0 and result.loss == result.task_loss


def test_per_iteration_ema_updates_teacher_after_each_step():
    site = make_site()
    student, teacher, head = make_models()
    teacher0 = copy.deepcopy(teacher)
    settings = SETTINGS.model_copy(update={"ema": "iteration", "max_steps_per_visit": 1})
    p = plan()
    result = train_site_visit(pair_of(student, teacher, head), site, settings, p)
    momentum = teacher_momentum(p.visit + 1, p.total_visits, settings.momentum_teacher)
    assert result.momentum_product == momentum  # what the other sites' teacher heads missed (one step)
    ema_update(teacher0, student, momentum)
    for key, value in teacher.state_dict().items():
        assert torch.allclose(value.float(), teacher0.state_dict()[key].float(), atol=1e-6), key
    assert not same(states(teacher)[0], states(make_models()[1])[0])


def test_progress_callback_and_wrong_head_error():
    site = make_site()
    student, teacher, head = make_models()
    calls = []
    train_site_visit(pair_of(student, teacher, head), site, SETTINGS, plan(), progress=lambda s, n, loss: calls.append((s, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    wrong = SiteHead("s1", multilabel_schema(("a", "b")), SPEC.projector_dim)
    with pytest.raises(ArkfedError, match="s1"):
        train_site_visit(pair_of(student, teacher, wrong), site, SETTINGS, plan())


def reference_visit(student, head, site, settings, p, optimizer):
    """A visit by hand (c = 0, visit-wise EMA): set the lr as Ark's scheduler does, then step ``optimizer``
    through the visit's batches."""
    from arkfed.ark.losses import task_loss
    from arkfed.data.loaders import make_train_loader
    from arkfed.site.config import ComputeSettings

    for group in optimizer.param_groups:
        group["lr"] = p.lr
    loader = make_train_loader(site.split("train"), site.schema, SPEC, loader_options(settings, p, ComputeSettings()))
    student.train()
    head.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        for batch in loader:
            loss = task_loss(head(student(batch.student)), batch.targets, batch.mask, site.schema.task, settings.multiclass_loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_carried_optimizer_state_equals_one_optimizer_stepping_through_both_visits():
    """optimizer_state carry: two visits (two sites) in one process, the state carried between them,
    equal one timm optimizer over the student and both heads stepping through both visits (Ark's)."""
    from timm.optim import create_optimizer_v2

    schema_b = multilabel_schema(("p", "q"))
    site_a = make_site()
    site_b = Site(SiteConfig(name="s2", dataset="synthetic", root="."), None, schema_b,
                  {"train": synthetic_table(32, schema_b.classes, 32, seed=5)})
    settings = SETTINGS.model_copy(update={"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "optimizer_state": "carry"})
    plans = [plan(site="s1", visit=0, consistency=0.0, lr=0.05, seed=3), plan(site="s2", visit=1, consistency=0.0, lr=0.02, seed=4)]

    def models():
        student, teacher, head_a = make_models()
        torch.manual_seed(1)
        return student, teacher, head_a, SiteHead("s2", schema_b, SPEC.projector_dim)

    finals = {}
    for mode in ("carry", "reset"):
        student, teacher, head_a, head_b = models()
        carried = {} if mode == "carry" else None
        for site, p, head in ((site_a, plans[0], head_a), (site_b, plans[1], head_b)):
            train_site_visit(pair_of(student, teacher, head), site, settings, p, optimizer_state=carried)
        finals[mode] = states(student, head_a, head_b)
        if mode == "carry":
            assert {k.rsplit(".", 1)[1] for k in carried} == {"momentum_buffer"}
            assert any(k.startswith("heads.s1.") for k in carried) and any(k.startswith("heads.s2.") for k in carried)
    student, _, head_a, head_b = models()
    optimizer = create_optimizer_v2(torch.nn.ModuleDict({"student": student, "heads": torch.nn.ModuleDict({"s1": head_a, "s2": head_b})}),
                                    opt="sgd", lr=0.05, weight_decay=0.0, momentum=0.9)
    for site, p, head in ((site_a, plans[0], head_a), (site_b, plans[1], head_b)):
        reference_visit(student, head, site, settings, p, optimizer)
    reference = states(student, head_a, head_b)
    for got, expected in zip(finals["carry"], reference):
        for key in expected:
            assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-6), key
    assert not torch.allclose(finals["reset"][0]["projector.weight"], reference[0]["projector.weight"], atol=1e-4)
    assert same(finals["reset"][1], finals["carry"][1])  # the first visit is the same either way


def test_multiclass_site_trains_with_bce_on_one_hot_targets_when_asked():
    """multiclass_loss bce (Ark-6): the task loss of a multiclass site is BCE on the one-hot targets."""
    from arkfed.data.loaders import make_train_loader
    from arkfed.data.schema import LabelSchema
    from arkfed.site.config import ComputeSettings

    schema = LabelSchema(task="multiclass", classes=("normal", "opacity", "other"))
    site = Site(SiteConfig(name="s1", dataset="rsna_pneumonia", root="."), None, schema,
                {"train": synthetic_table(24, schema.classes, 32, seed=2, multiclass=True)})
    settings = SETTINGS.model_copy(update={"max_steps_per_visit": 1, "multiclass_loss": "bce"})
    p = plan(consistency=0.0)
    student, teacher, _ = make_models()
    head = SiteHead("s1", schema, SPEC.projector_dim)
    batch = next(iter(make_train_loader(site.split("train"), schema, SPEC, loader_options(settings, p, ComputeSettings()))))
    reference = copy.deepcopy(student).train(), copy.deepcopy(head).train()
    with torch.no_grad():
        logits = reference[1](reference[0](batch.student))
    expected = torch.nn.BCEWithLogitsLoss()(logits, batch.targets)
    result = train_site_visit(pair_of(student, teacher, head), site, settings, p)
    assert result.task_loss == pytest.approx(float(expected), rel=1e-5)
    assert result.task_loss != pytest.approx(float(torch.nn.functional.cross_entropy(logits, batch.targets.argmax(1))), rel=1e-3)
