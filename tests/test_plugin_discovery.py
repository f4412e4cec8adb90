"""Plugin discovery: built-in folder, --plugins-dir, $ARKFED_PLUGINS, entry points, broken plugins."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from arkfed.errors import ArkfedError
from arkfed.plugins import ENTRY_POINT_GROUP, PLUGINS_ENV, DatasetPlugin, discover_plugins, get_plugin

BUILTIN = {"chestxray14", "chexpert", "mimic_cxr", "vindr_cxr", "rsna_pneumonia", "shenzhen", "medmnist", "csv"}


def plugin_code(name: str, classes: tuple[str, ...] = ("A",)) -> str:
    return f'''
from arkfed.plugins import DatasetPlugin, register_dataset
from arkfed.schema import LabelSchema

@register_dataset
class P(DatasetPlugin):
    name = {name!r}
    description = "test plugin {name}"
    schema = LabelSchema(task="multilabel", classes={classes!r})
'''


def plugin_folder(tmp_path: Path, folder: str, files: dict[str, str]) -> Path:
    path = tmp_path / folder
    path.mkdir()
    for name, code in files.items():
        (path / name).write_text(code)
    return path


def test_builtin_plugins_are_found_without_configuration():
    catalog = discover_plugins()
    assert BUILTIN <= set(catalog.plugins)
    assert all(issubclass(cls, DatasetPlugin) for cls in catalog.plugins.values())


def test_plugins_dir_adds_a_folder(tmp_path):
    folder = plugin_folder(tmp_path, "discovery_extra", {"disc_extra.py": plugin_code("disc_extra", ("X", "Y"))})
    cls = get_plugin("disc_extra", [folder])
    assert cls().label_schema().classes == ("X", "Y")
    assert BUILTIN <= set(discover_plugins([folder]).plugins)


def test_arkfed_plugins_variable_adds_folders(tmp_path, monkeypatch):
    one = plugin_folder(tmp_path, "discovery_env1", {"disc_env_one.py": plugin_code("disc_env_one")})
    two = plugin_folder(tmp_path, "discovery_env2", {"disc_env_two.py": plugin_code("disc_env_two")})
    monkeypatch.setenv(PLUGINS_ENV, f"{one}:{two}")
    catalog = discover_plugins()
    assert {"disc_env_one", "disc_env_two"} <= set(catalog.plugins)


def test_a_broken_plugin_is_reported_by_name_while_the_others_load(tmp_path):
    folder = plugin_folder(
        tmp_path,
        "discovery_broken",
        {
            "disc_good.py": plugin_code("disc_good"),
            "disc_broken.py": "import numpy\nraise RuntimeError('bad install of this plugin')\n",
            "disc_syntax.py": "def oops(:\n",
            "_helper.py": "raise RuntimeError('private modules are not plugins')\n",
        },
    )
    catalog = discover_plugins([folder])
    assert "disc_good" in catalog.plugins and BUILTIN <= set(catalog.plugins)
    assert "RuntimeError: bad install of this plugin" in catalog.failures["disc_broken"]
    assert "SyntaxError" in catalog.failures["disc_syntax"]
    assert "_helper" not in catalog.failures
    with pytest.raises(ArkfedError, match="dataset plugin 'disc_broken' failed to load: .*bad install"):
        catalog.get("disc_broken")


def test_a_missing_plugin_folder_is_reported(tmp_path):
    catalog = discover_plugins([tmp_path / "no_such_folder"])
    assert catalog.failures[str(tmp_path / "no_such_folder")] == "plugin folder not found"


def test_unknown_plugin_error_lists_the_available_ones():
    with pytest.raises(ArkfedError, match=r"unknown dataset plugin 'nope' \(available: .*chestxray14.*\); add one with"):
        get_plugin("nope")


def test_entry_points_register_plugin_classes_and_report_failures(tmp_path, monkeypatch):
    package = plugin_folder(tmp_path, "ep_site_packages", {"disc_ep_module.py": plugin_code("disc_ep_plugin").replace("@register_dataset\n", "")})
    monkeypatch.syspath_prepend(str(package))
    points = [
        importlib.metadata.EntryPoint(name="disc_ep_plugin", value="disc_ep_module:P", group=ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint(name="disc_ep_missing", value="disc_no_such_module:P", group=ENTRY_POINT_GROUP),
    ]

    def fake_entry_points(**selection):
        assert selection == {"group": ENTRY_POINT_GROUP}
        return points

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    catalog = discover_plugins()
    assert catalog.plugins["disc_ep_plugin"]().label_schema().classes == ("A",)
    assert "ModuleNotFoundError" in catalog.failures["disc_ep_missing"]


def test_plugin_options_are_validated_with_a_one_line_error():
    medmnist = get_plugin("medmnist")
    with pytest.raises(ArkfedError, match=r"plugin 'medmnist': option 'colour'"):
        medmnist({"colour": "red"})
