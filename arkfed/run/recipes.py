"""Named training recipes: the settings of a published Ark run, or of arkfed's own defaults, by name.

A recipe is data: a nested dict of :class:`arkfed.config.TrainConfig` fields (``model``,
``settings``, ``rounds``, ``init``, ...). The run's settings are the recipe, then a ``--config``
file, then explicit command-line options, each overriding the one before
(:func:`arkfed.cli.options.resolve_run_config`); the run folder records the recipe. Each description says
exactly what the recipe sets and where the values come from, so a user can check them against
the source. Only ``ark`` and ``ark+`` claim to be the papers' recipes: the runs behind the published
numbers, i.e. what Ark's code did where it differs from its README (each difference one option:
``lr_schedule``, ``optimizer_state``, ``multiclass_loss``, ``dataset_resize``). ``ark-documented`` and
``ark+-documented`` are the same recipes as the READMEs describe them.

Sources: github.com/jlianglab/Ark, ``Ark_MICCAI2023/README.md`` ("Train Ark-6"), its
``main_ark.py`` defaults, ``dataloader.py`` and ``engine.py``; ``Ark_Plus/README.md`` ("Train Ark+")
and ``Ark_Plus/Pretraining/{main_ark,dataloader,engine,trainer}.py``.

Mapping from Ark's epochs: an Ark epoch trains every dataset for one epoch in turn, which is one
arkfed *round* with ``local_epochs=1``; Ark's teacher EMA per epoch-of-a-dataset is arkfed's
``ema="visit"``. Ark steps its warm-up per epoch; arkfed's lr schedule is per visit, so Ark's 20
warm-up epochs become ``warmup_rounds=20`` (= 20 x the number of sites visits), a finer-grained
version of the same ramp (``lr_schedule: cosine``, the ``-documented`` recipes). As run, Ark's lr is
per epoch, i.e. per round here (``lr_schedule: ark-as-run``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from arkfed.errors import ArkfedError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)


def deep_merge(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of a copy of ``base``, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_ARK_COMMON_SETTINGS = {
    "optimizer": "sgd",  # timm's "sgd" is SGD with Nesterov momentum, as Ark's --opt sgd through timm
    "momentum": 0.9,
    "weight_decay": 0.0,
    "min_lr": 1e-5,
    "warmup_rounds": 20,
    "warmup_visits": 0,
    "warmup_lr": 1e-6,
    "local_epochs": 1,
    "crop_scale": [0.08, 1.0],
    "jitter_p": 0.3,
    "ema": "visit",
    "momentum_teacher": 0.9,
    "max_consistency": 0.5,
}

_ARK = {
    "model": {"model": "swin_base_patch4_window7_224", "img_size": 224, "projector": "linear",
              "projector_dim": 1376, "projector_hidden": None, "crop_pct": 224 / 256, "test_ten_crop": True},
    "init": "imagenet",
    "rounds": 200,
    "settings": {**_ARK_COMMON_SETTINGS, "lr": 0.3, "batch_size": 200, "crop_source": "original",
                 "train_resize": None, "views": "ark", "consistency_schedule": "cosine"},
}
_ARK_PLUS = {
    "model": {"model": "swin_large_patch4_window12_384", "img_size": 768, "projector": "linear",
              "projector_dim": 1376, "projector_hidden": None, "crop_pct": 768 / 896, "test_ten_crop": True},
    "init": "imagenet",
    "rounds": 200,
    "settings": {**_ARK_COMMON_SETTINGS, "lr": 0.3, "batch_size": 50, "crop_source": "resized",
                 "train_resize": 896, "views": "ark+", "consistency_schedule": "momentum"},
}
_DOCUMENTED = {"lr_schedule": "cosine", "optimizer_state": "reset", "multiclass_loss": "ce", "dataset_resize": {}}
_ARK_AS_RUN = {"lr_schedule": "ark-as-run", "optimizer_state": "carry", "multiclass_loss": "bce",
               "dataset_resize": {"chestxray14": 224, "vindr_cxr": 224}}
_ARK_PLUS_AS_RUN = {"lr_schedule": "ark-as-run", "optimizer_state": "carry", "multiclass_loss": "ce", "dataset_resize": {}}

_ARK_TEXT = (
    "swin_base_patch4_window7_224 at 224 px from ImageNet-22k->1k weights (--init imagenet, timm's "
    "default swin_base tag ms_in22k_ft_in1k, the README's swin_base_patch4_window7_224_22kto1k.pth); linear "
    "projector to 1376; SGD with Nesterov momentum 0.9, lr 0.3, weight decay 0, batch 200, 20 warm-up rounds "
    "from 1e-6 (Ark: 20 warm-up epochs; one Ark epoch = one round here), min lr 1e-5; 200 rounds, one "
    "local epoch per visit; teacher momentum 0.9 -> 1 and c 0 -> 0.5 on cosines, teacher EMA after every visit; "
    "views: random-resized crop (0.08-1), shift/scale/rotate p=0.5, student-only "
    "brightness/contrast or gamma p=0.3; validation Resize(256)+CenterCrop(224) (crop_pct 0.875); test with "
    "ten-crop. The released Ark-6 file is named projector1376_mlp: add model.projector=mlp, projector_hidden=1376 to match it."
)
_ARK_PLUS_TEXT = (
    "swin_large_patch4_window12_384 run at 768 px (Ark's swin_large_768: window 12, img_size 768) from "
    "ImageNet-22k->1k weights (--init imagenet; README: swin_large_patch4_window12_384_22kto1k.pth); linear "
    "projector to 1376; every image is first resized to 896 x 896 and the student's random-resized crop "
    "(0.08-1) to 768 is cut from that, then shift/scale/rotate p=0.5 and jitter p=0.3; the teacher sees the "
    "whole 896 image resized to 768 (views ark+); c = (m - 0.9) * 5 tied to the teacher momentum m "
    "(trainer.py; at momentum 0.9 the same values as the cosine 0 -> 0.5); SGD Nesterov 0.9, lr 0.3, weight "
    "decay 0, batch 50, 20 warm-up rounds from 1e-6, 200 rounds; validation Resize(896)+CenterCrop(768) "
    "(crop_pct 768/896); test ten-crop."
)

RECIPES: dict[str, Recipe] = {
    "ark": Recipe(
        "ark",
        "Ark-6 as published: the run behind the MICCAI 2023 numbers, i.e. Ark's code where it differs from its README "
        "(Ark_MICCAI2023/README.md 'Train Ark-6', main_ark.py, dataloader.py, engine.py, trainer.py): " + _ARK_TEXT
        + " As run, unlike the README: lr_schedule ark-as-run (engine.py line 169 calls lr_scheduler.step(val_loss) on "
        "timm's scheduler, whose first argument is the epoch, so the lr of round r+1 is 1e-6 + L x 0.3 / 20 for the "
        "mean validation loss L of round r (0.0045 at L = 0.3), never the README's cosine from 0.3; the first round at "
        "1e-6); optimizer_state carry (one optimizer for every dataset and epoch, engine.py line 100; local runs "
        "only: federated runs reset it, as its momentum buffers come from a site's gradients and would leave the "
        "site); multiclass_loss bce (BCEWithLogitsLoss for every dataset, RSNA's 3 classes on one-hot targets "
        "included, engine.py line 68); dataset_resize chestxray14=224,vindr_cxr=224 (dataloader.py lines 130 and 346 "
        "squash these two to 224 before the crop; the others are cropped from the source image; evaluation here "
        "reads the source image, where Ark's starts from the 224 square for these two too). --recipe "
        "ark-documented runs the README's version.",
        deep_merge(_ARK, {"settings": _ARK_AS_RUN}),
    ),
    "ark-documented": Recipe(
        "ark-documented",
        "Ark-6 as its README and main_ark.py document it, NOT the paper's run as executed (--recipe ark is): " + _ARK_TEXT
        + " As documented: lr_schedule cosine (the stated warm-up to 0.3 and cosine to 1e-5, stepped per visit), "
        "optimizer_state reset (a fresh optimizer every visit), multiclass_loss ce (cross-entropy for RSNA's 3 "
        "classes), no dataset_resize (every dataset cropped from the source image).",
        deep_merge(_ARK, {"settings": _DOCUMENTED}),
    ),
    "ark+": Recipe(
        "ark+",
        "Ark+ as published: the run behind its numbers, i.e. its code where it differs from its README (Ark_Plus/README.md "
        "'Train Ark+', Ark_Plus/Pretraining/{main_ark,dataloader,engine,trainer}.py): " + _ARK_PLUS_TEXT
        + " As run, unlike the README: lr_schedule ark-as-run (Ark_Plus/Pretraining/engine.py line 176 steps timm's "
        "scheduler with the validation loss as the epoch: 1e-6 + L x 0.3 / 20; the first round at 1e-6); "
        "optimizer_state carry (one optimizer, engine.py line 96; local runs only, federated runs reset it). "
        "As the README: multiclass_loss ce (engine.py line 161: cross-entropy for multiclass datasets), no "
        "dataset_resize (every dataset resized to 896 first). --recipe ark+-documented runs the README's version.",
        deep_merge(_ARK_PLUS, {"settings": _ARK_PLUS_AS_RUN}),
    ),
    "ark+-documented": Recipe(
        "ark+-documented",
        "Ark+ as its README documents it, NOT the paper's run as executed (--recipe ark+ is): " + _ARK_PLUS_TEXT
        + " As documented: lr_schedule cosine (warm-up to 0.3, cosine to 1e-5, per visit), optimizer_state reset, "
        "multiclass_loss ce, no dataset_resize.",
        deep_merge(_ARK_PLUS, {"settings": _DOCUMENTED}),
    ),
    "demo": Recipe(
        "demo",
        "arkfed's demo settings (the default without --sites), sized so the synthetic demo federation learns "
        "visibly in about five minutes on 2 CPU cores; NOT the paper's: test_resnet (timm's 0.4 M-parameter "
        "ResNet) at 128 px from random init, "
        "8 rounds, batch 16, AdamW lr 3e-3 with weight decay 0.05 and no warm-up, crop scale 0.7-1, and the "
        "teacher EMA after every iteration (Ark's --ema_mode iteration; its default is per epoch): with only "
        "24 visits, a per-visit EMA whose momentum rises to 1 leaves the teacher 0.04-0.07 AUC behind the "
        "student on the demo, per iteration it stays within 0.01. The rest (views, jitter, schedules of c and "
        "momentum) as Ark.",
        {
            "model": {"model": "test_resnet", "img_size": 128},
            "init": "random",
            "rounds": 8,
            "settings": {"batch_size": 16, "lr": 3e-3, "optimizer": "adamw", "weight_decay": 0.05,
                         "warmup_visits": 0, "warmup_rounds": 0, "crop_scale": [0.7, 1.0], "ema": "iteration"},
        },
    ),
    "base": Recipe(
        "base",
        "arkfed's defaults for real sites (the default with --sites; the rest TrainSettings' defaults); NOT the "
        "paper's recipe: swin_base_patch4_window7_224 at 224 px from random init, 20 rounds, batch 32, AdamW lr "
        "5e-4 with weight decay 0.05 and no warm-up, crop scale 0.08-1 cut from the source image, whole-image validation resize, "
        "single-crop test; linear projector to 1376; views, jitter and the c / momentum schedules as Ark.",
        {
            "model": {"model": "swin_base_patch4_window7_224", "img_size": 224},
            "init": "random",
            "rounds": 20,
            "settings": {"batch_size": 32, "lr": 5e-4, "optimizer": "adamw", "weight_decay": 0.05,
                         "warmup_visits": 0, "warmup_rounds": 0, "crop_scale": [0.08, 1.0]},
        },
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ArkfedError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def apply_recipe(name: str, base: dict) -> dict:
    """``base`` (TrainConfig fields as a nested dict: defaults or a config file) with recipe
    ``name``'s overrides on top, nested dicts merged key by key. Apply explicit options after this
    so that they win. ``base`` is not modified."""
    return deep_merge(base, get_recipe(name).overrides)


def describe_recipes() -> str:
    """One paragraph per recipe, for ``--help`` and the README."""
    return "\n\n".join(f"{r.name}: {r.description}" for r in RECIPES.values())
