"""Recipes: named starting points for a run's configuration, recorded in the run folder.

A recipe is data: nested :class:`~arkfed.training.TrainConfig` fields. The run's settings are
the recipe, then a ``--config`` file, then explicit command-line options, each overriding the
one before (:func:`arkfed.cli.options.resolve_run_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arkfed.errors import ArkfedError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "demo",
            "arkfed's demo settings, sized so the synthetic demo federation learns visibly in about 5 minutes on "
            "2 CPU cores: timm's test_resnet at 128 px, 8 rounds, batch 16, AdamW lr 3e-3, crop scale 0.7-1. "
            "Not the paper's.",
            {"rounds": 8, "model": {"model": "test_resnet", "img_size": 128},
             "settings": {"batch_size": 16, "lr": 3e-3, "crop_scale": [0.7, 1.0]}},
        ),
        Recipe(
            "base",
            "arkfed's defaults for real sites: Ark's architecture and input (swin_base_patch4_window7_224 at "
            "224 px, crop scale 0.08-1, linear projector to 1376) with random init, AdamW lr 5e-4, weight decay "
            "0.05, batch 32, 20 rounds, no warm-up. Not the paper's optimisation recipe.",
            {"rounds": 20, "model": {"model": "swin_base_patch4_window7_224", "img_size": 224},
             "settings": {"batch_size": 32, "lr": 5e-4, "crop_scale": [0.08, 1.0]}},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ArkfedError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_recipe(name: str, base: dict) -> dict:
    """``base`` (a TrainConfig as a dict) with the recipe's values on top."""
    return deep_merge(base, get_recipe(name).overrides)


def describe_recipes() -> str:
    return "\n\n".join(f"{r.name}: {r.description}" for r in RECIPES.values())
