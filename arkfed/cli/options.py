"""One run configuration for every command that starts a run (``arkfed train``, ``arkfed coordinator``).

The definition is :class:`arkfed.config.TrainConfig` itself: every field with a description
(also inside ``model`` and ``settings``) becomes one command-line option with that help text, so
both commands accept exactly the same options and a new setting appears in both without being
listed anywhere. The resolved configuration is: the recipe, then ``--config FILE`` (e.g. an earlier
run's ``config.yaml``), then the options given on the command line.
"""

from __future__ import annotations

import copy
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

PANEL = "Run configuration: the recipe, then --config FILE, then these options (--dry-run shows the result)"
SECTIONS = {"": "arkfed.config:TrainConfig", "model": "arkfed.spec:ModelSpec", "settings": "arkfed.config:TrainSettings"}
NOT_OPTIONS = {"", "sites", "recipe", "model", "settings", "model.num_features", "model.mean", "model.std", "schedule_offset", "admitted"}
FROM_HELP = ("continue the foundation model of a release (`arkfed release`, or a released Ark .pth.tar): its teacher, the heads "
             "of its sites (teacher and student), and the teacher's schedules from where it stopped; sites not in it get new "
             "heads. Same as --init RELEASE")


@dataclass(frozen=True)
class RunOption:
    path: str  # dotted TrainConfig path, e.g. "settings.lr"
    param: str  # python parameter name, e.g. "lr"
    kind: type  # int, float or str on the command line
    help: str
    pair: bool = False  # "MIN,MAX" -> (min, max)


def _load(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _cli_type(annotation) -> tuple[type, str, bool]:
    """The command-line type of a field's annotation, a choices hint, and whether it is a pair."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, " | ".join(map(str, typing.get_args(annotation))), False
    if typing.get_origin(annotation) is tuple:
        return str, "MIN,MAX", True
    if args and annotation not in (int, float, str):  # X | None
        return _cli_type(args[0])
    return annotation if annotation in (int, float, str, bool) else str, "", False


def run_options() -> list[RunOption]:
    """Every configurable TrainConfig field, as an option (derived, never listed by hand)."""
    options = []
    for prefix, ref in SECTIONS.items():
        for name, info in _load(ref).model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            if path in NOT_OPTIONS or not info.description:
                continue
            kind, hint, pair = _cli_type(info.annotation)
            text = info.description + (f" ({hint})" if hint and hint not in info.description else "")
            options.append(RunOption(path, name, kind, text, pair))
    params = [o.param for o in options]
    duplicates = {p for p in params if params.count(p) > 1}
    if duplicates:  # a programming error: two sections define the same name
        raise RuntimeError(f"run options {sorted(duplicates)} are defined twice")
    return options


def with_run_options(command: Callable) -> Callable:
    """Give a typer command every run option; it receives them as ``run_overrides`` (dotted
    path -> value, only those given)."""
    options = run_options()
    hints = typing.get_type_hints(command)  # the command's annotations are strings (postponed evaluation)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(command).parameters.values() if p.name != "run_overrides"]
    generated = [
        inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[o.kind],
                          default=typer.Option(None, f"--{o.param.replace('_', '-')}", help=o.help, rich_help_panel=PANEL))
        for o in options
    ] + [inspect.Parameter("from_release", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                           default=typer.Option(None, "--from", metavar="RELEASE", help=FROM_HELP, rich_help_panel=PANEL))]

    def wrapper(**kwargs):
        overrides = _from_release(kwargs.pop("from_release"), kwargs.get("init"))
        for o in options:
            value = kwargs.pop(o.param)
            if value is not None:
                overrides[o.path] = _parse_pair(o, value) if o.pair else value
        return command(run_overrides=overrides, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + generated)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + generated}
    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    return wrapper


def _from_release(release: str | None, init: str | None) -> dict:
    from arkfed.errors import ArkfedError

    if release is None:
        return {}
    if init is not None and init != release:
        raise ArkfedError(f"--from {release} and --init {init}: give one (--from RELEASE is --init RELEASE)")
    return {"init": release}


def _continued_schedules(data: dict, overrides: dict) -> None:
    """A run started from a release continues the teacher's schedules after the release's steps
    (:attr:`arkfed.config.TrainConfig.schedule_offset`), unless ``restart_schedules``."""
    from arkfed.model.lineage import is_release, schedule_steps

    if "init" in overrides or "restart_schedules" in overrides:  # a new start: its schedules follow the new source
        data.pop("schedule_offset", None)
    init = data.get("init")
    if data.get("restart_schedules"):
        data["schedule_offset"] = 0
    elif init and is_release(init) and "schedule_offset" not in data:
        data["schedule_offset"] = schedule_steps(init)


def _parse_pair(option: RunOption, text: str) -> list[float]:
    from arkfed.errors import ArkfedError

    try:
        low, high = (float(x) for x in str(text).split(","))
    except ValueError:
        raise ArkfedError(f"--{option.param.replace('_', '-')} takes MIN,MAX (e.g. 0.08,1), got {text!r}") from None
    return [low, high]


def _set(data: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def resolve_run_config(sites: list[str], overrides: dict[str, Any], config_file: Path | None = None,
                       recipe: str | None = None, default_recipe: str = "base", federated: bool = False):
    """The run's TrainConfig: recipe < ``config_file`` < ``overrides``; sites from the command line
    or else from the file. Errors are one line naming the setting. A ``federated`` run's
    ``optimizer_state`` is ``reset`` unless the file or an option sets it (a recipe's ``carry`` is
    for local runs: its momentum buffers come from a site's gradients and would leave the site)."""
    import yaml

    from arkfed.config import TrainConfig
    from arkfed.errors import ArkfedError
    from arkfed.run.recipes import deep_merge, get_recipe

    file_data: dict = {}
    if config_file is not None:
        try:
            file_data = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ArkfedError(f"--config {config_file}: cannot read it: {' '.join(str(exc).split())}") from None
        if not isinstance(file_data, dict):
            raise ArkfedError(f"--config {config_file}: expected a mapping of run settings")
        file_data.pop("site_configs", None)  # where a local run's sites were (older run folders)
        for key in ("device", "num_workers"):  # the sites' hardware (older run folders)
            (file_data.get("settings") or {}).pop(key, None)
    name = recipe or file_data.get("recipe") or default_recipe
    data = copy.deepcopy(deep_merge(get_recipe(name).overrides, file_data))  # never mutate the recipe
    if federated and "settings.optimizer_state" not in overrides and "optimizer_state" not in (file_data.get("settings") or {}):
        data.setdefault("settings", {})["optimizer_state"] = "reset"
    for path, value in overrides.items():
        _set(data, path, value)
    _continued_schedules(data, overrides)
    data["sites"] = list(sites) or list(file_data.get("sites") or [])
    data["recipe"] = name
    if not data["sites"]:
        raise ArkfedError("give --sites NAME,NAME (or a --config file that lists sites)")
    try:
        config = TrainConfig.model_validate(data)
    except ValueError as exc:
        raise ArkfedError(f"invalid run configuration: {first_error(exc)}") from None
    if federated and config.settings.optimizer_state == "carry":
        raise ArkfedError("optimizer_state carry is for local runs: its momentum buffers are derived from a site's gradients "
                          "and would leave the site; use --optimizer-state reset")
    return config


def first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        text = err["msg"].removeprefix("Value error, ")  # a rule over several settings has no single place
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        return (f"{where}: " if where else "") + text + got
    return str(exc)


def check_secure_aggregation(config, max_update_norm: float | None, federated: bool = True) -> None:
    """``--secure-aggregation`` needs a federated run and ``--max-update-norm`` (one line each, before anything starts)."""
    from arkfed.errors import ArkfedError

    if config is None or not config.secure_aggregation:
        return
    if not federated:
        raise ArkfedError("--secure-aggregation is for federated runs (add --federated, or use arkfed coordinator): in a local run "
                          "every site's update is in this process anyway")
    if not max_update_norm:
        raise ArkfedError("--secure-aggregation needs --max-update-norm N: each site clips its own update to it before masking, "
                          "as the coordinator can no longer check single updates")
