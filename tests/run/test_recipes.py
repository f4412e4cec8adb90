"""Recipes: each yields a valid run configuration with exactly the values it describes."""

from __future__ import annotations

import pytest

from arkfed.config import TrainConfig
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
    config = TrainConfig.model_validate({**apply_recipe("ark", BASE), "rounds": 30})
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


def test_unknown_recipe_is_named():
    with pytest.raises(ArkfedError, match="unknown recipe 'arkk' \\(known: ark, ark\\+, demo, base\\)"):
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
