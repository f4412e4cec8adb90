"""Recipes: each yields a valid run configuration with exactly the values it describes."""

from __future__ import annotations

import pytest

from arkfed.ark.visit import loader_options
from arkfed.config import TrainConfig, TrainSettings
from arkfed.datasets.chestxray14 import ChestXray14
from arkfed.datasets.rsna_pneumonia import RsnaPneumonia
from arkfed.datasets.vindr_cxr import VinDrCxr
from arkfed.errors import ArkfedError
from arkfed.run.plan import plan_visits
from arkfed.run.recipes import RECIPES, apply_recipe, describe_recipes

BASE = {"sites": ["a", "b", "c"], "rounds": 3, "settings": {"max_steps_per_visit": 5, "lr": 1.0}}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_valid_config_and_is_described(name):
    config = TrainConfig.model_validate(apply_recipe(name, BASE))
    assert config.sites == ["a", "b", "c"] and config.settings.max_steps_per_visit == 5
    assert f"{name}: " in describe_recipes()
    claims_paper = "as published" in RECIPES[name].description
    assert claims_paper == (name in ("ark", "ark+"))
    assert name in ("ark", "ark+") or "NOT the paper" in RECIPES[name].description


def test_ark_recipe_is_the_miccai_recipe_and_explicit_options_win():
    config = TrainConfig.model_validate(apply_recipe("ark", BASE))
    s, m = config.settings, config.model
    expected = ("swin_base_patch4_window7_224", 224, 1376, "imagenet", 200)
    assert (m.model, m.img_size, m.projector_dim, config.init, config.rounds) == expected
    assert (s.optimizer, s.lr, s.batch_size, s.weight_decay, s.warmup_rounds, s.crop_scale) == ("sgd", 0.3, 200, 0.0, 20, (0.08, 1.0))
    assert s.crop_source == "original" and m.test_ten_crop and round(256 * m.crop_pct) == 224
    explicit = apply_recipe("ark", BASE)
    explicit["settings"]["batch_size"] = 8  # what the CLI does with an explicit option, after the recipe
    assert TrainConfig.model_validate(explicit).settings.batch_size == 8
    assert BASE["settings"] == {"max_steps_per_visit": 5, "lr": 1.0}  # the base is left alone


def test_ark_warmup_rounds_become_visits_and_start_from_warmup_lr():
    config = TrainConfig.model_validate({**apply_recipe("ark-documented", BASE), "rounds": 30})
    lrs = [p.lr for p in plan_visits(config)]
    assert len(lrs) == 90 and lrs[0] == pytest.approx(1e-6)
    warmup = 20 * 3  # 20 rounds x 3 sites, then timm's cosine over the whole run
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup])) and lrs[warmup - 1] == pytest.approx(0.3 * 59 / 60, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])) and lrs[-1] < 0.01


def test_ark_plus_ties_c_to_the_momentum():
    data = apply_recipe("ark+", BASE)
    config = TrainConfig.model_validate(data)
    assert (config.model.img_size, config.settings.train_resize, config.settings.views) == (768, 896, "ark+")
    plans = plan_visits(config)
    assert all(p.consistency == pytest.approx((p.momentum - 0.9) * 5, abs=1e-12) for p in plans)
    data["settings"]["momentum_teacher"] = 0.99  # Ark+'s formula, not a rescaled cosine
    first = plan_visits(TrainConfig.model_validate(data))[0]
    assert first.consistency == pytest.approx(0.45)


AS_RUN = ("lr_schedule", "optimizer_state", "multiclass_loss", "dataset_resize")


def test_ark_is_the_run_as_executed_and_ark_documented_the_readme():
    """`ark` and `ark+` are their code's runs; the `-documented` recipes differ from them only in the as-run options."""
    s = TrainConfig.model_validate(apply_recipe("ark", BASE)).settings
    assert (s.lr_schedule, s.optimizer_state, s.multiclass_loss) == ("ark-as-run", "carry", "bce")
    assert s.dataset_resize == {ChestXray14.name: 224, VinDrCxr.name: 224}
    plus = TrainConfig.model_validate(apply_recipe("ark+", BASE)).settings
    assert (plus.lr_schedule, plus.optimizer_state, plus.multiclass_loss, plus.dataset_resize) == ("ark-as-run", "carry", "ce", {})
    for run, documented in (("ark", "ark-documented"), ("ark+", "ark+-documented")):
        a = TrainConfig.model_validate(apply_recipe(run, BASE)).model_dump()
        b = TrainConfig.model_validate(apply_recipe(documented, BASE)).model_dump()
        assert {k for k in a["settings"] if a["settings"][k] != b["settings"][k]} <= set(AS_RUN)
        assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}
        assert [b["settings"][k] for k in AS_RUN] == ["cosine", "reset", "ce", {}]


@pytest.mark.parametrize("name", ["ark", "ark-documented", "ark+", "ark+-documented"])
def test_ark_recipes_state_each_as_run_option_they_set(name):
    """`arkfed train --recipe list` records each deviation option with the value the recipe sets."""
    settings = TrainConfig.model_validate(apply_recipe(name, BASE)).settings
    text = RECIPES[name].description
    for key in AS_RUN[:3]:
        assert f"{key} {getattr(settings, key)}" in text, key
    resize = ",".join(f"{k}={v}" for k, v in settings.dataset_resize.items())
    assert f"dataset_resize {resize}" in text if resize else "no dataset_resize" in text
    assert f"{name}: " in describe_recipes()


def test_rsna_trains_with_bce_under_ark_and_cross_entropy_under_ark_documented():
    import torch

    from arkfed.ark.losses import task_loss

    assert RsnaPneumonia.schema.task == "multiclass" and len(RsnaPneumonia.schema.classes) == 3
    torch.manual_seed(0)
    logits, classes = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    onehot, mask = torch.nn.functional.one_hot(classes, 3).float(), torch.ones(6, 3)
    for name, expected in (("ark", torch.nn.BCEWithLogitsLoss()(logits, onehot)),
                           ("ark-documented", torch.nn.functional.cross_entropy(logits, classes))):
        settings = TrainConfig.model_validate(apply_recipe(name, BASE)).settings
        loss = task_loss(logits, onehot, mask, RsnaPneumonia.schema.task, settings.multiclass_loss)
        assert torch.allclose(loss, expected, atol=1e-7), name


def test_ark_squashes_chestxray14_and_vindr_to_224_before_the_crop():
    from arkfed.config import VisitPlan
    from arkfed.site.config import ComputeSettings

    settings = TrainConfig.model_validate(apply_recipe("ark", BASE)).settings
    plan = VisitPlan(round=0, visit=0, total_visits=3, site="a", consistency=0.0, momentum=0.9, lr=0.1, seed=1)
    for dataset, expected in (("chestxray14", ("resized", 224)), ("vindr_cxr", ("resized", 224)),
                              ("chexpert", ("original", None)), ("rsna_pneumonia", ("original", None))):
        options = loader_options(settings, plan, ComputeSettings(), dataset=dataset)
        assert (options.crop_source, options.train_resize) == expected, dataset
    parsed = TrainSettings(dataset_resize="chestxray14=224, vindr_cxr=256")  # the command line's NAME=SIZE,NAME=SIZE
    assert parsed.dataset_resize == {"chestxray14": 224, "vindr_cxr": 256} and TrainSettings(dataset_resize="").dataset_resize == {}
    for bad in ("chestxray14", "chestxray14=8"):
        with pytest.raises(ValueError):
            TrainSettings(dataset_resize=bad)


def test_ark_as_run_lr_is_what_timm_gives_when_stepped_with_validation_losses():
    """Ark builds timm's scheduler with create_scheduler(args, optimizer) (engine.py line 101) and calls
    lr_scheduler.step(val_loss) after every epoch (line 169): replay that with timm itself."""
    from argparse import Namespace

    import torch
    from timm.scheduler import create_scheduler

    from arkfed.schedules import ark_as_run_lr, ark_as_run_round_lr

    # main_ark.py's defaults with the README's Ark-6 options (--opt sgd --warmup-epochs 20 --lr 0.3)
    args = Namespace(sched="cosine", epochs=200, lr=0.3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=20, cooldown_epochs=10,
                     decay_epochs=30, decay_rate=0.5, patience_epochs=10, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    scheduler, _ = create_scheduler(args, optimizer)
    losses = [0.31, 0.2, 0.17, 0.9, 19.9, 20.0, 37.5, 199.0, 250.0]
    expected = [optimizer.param_groups[0]["lr"]]  # the first epoch, before any validation loss
    for loss in losses:
        scheduler.step(loss)
        expected.append(optimizer.param_groups[0]["lr"])
    settings = TrainConfig.model_validate(apply_recipe("ark", BASE)).settings
    got = [ark_as_run_round_lr(settings, 200, dict(enumerate(losses)), rnd) for rnd in range(len(losses) + 1)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[0] == 1e-6 and got[1] == pytest.approx(1e-6 + 0.31 * (0.3 - 1e-6) / 20, rel=1e-12)
    assert ark_as_run_round_lr(settings, 200, {0: 0.31}, 3) == ark_as_run_lr(settings, 0.31, 200)  # no loss: the lr stays
    no_warmup = settings.model_copy(update={"warmup_rounds": 0})
    assert ark_as_run_round_lr(no_warmup, 200, {}, 0) == 0.3


def test_unknown_recipe_is_named():
    with pytest.raises(ArkfedError, match="unknown recipe 'arkk' \\(known: ark, ark-documented, ark\\+, ark\\+-documented, demo, base\\)"):
        apply_recipe("arkk", BASE)


def test_evaluate_uses_ten_crop_on_the_test_split_when_the_model_asks_for_it(tmp_path):
    """``--recipe ark`` models carry Ark's test protocol in their spec; evaluate follows it by default."""
    from arkfed.evaluation.evaluate import evaluate_source
    from arkfed.model.ark import ArkModel
    from arkfed.site.load import load_site
    from eval_fixtures import make_run_folder, schemas, tiny_spec, write_site

    spec = tiny_spec().model_copy(update={"crop_pct": 28 / 32, "img_size": 28, "test_ten_crop": True})
    run = make_run_folder(tmp_path / "run", teacher=ArkModel(spec), sites={"alpha": schemas()["alpha"]})
    site = load_site(write_site(tmp_path, "alpha", schemas()["alpha"], {"train": 2, "val": 6, "test": 6}), [tmp_path / "plugins"])
    test = evaluate_source(run, site, "test", n_boot=0)
    assert test["ten_crop"] is True
    assert evaluate_source(run, site, "val", n_boot=0)["ten_crop"] is False
    single = evaluate_source(run, site, "test", ten_crop=False, n_boot=0)
    assert single["ten_crop"] is False and single["models"]["teacher"]["loss"] != test["models"]["teacher"]["loss"]
