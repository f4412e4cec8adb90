"""Plugin discovery: built-in package, plugins/ folders, --plugins-dir, $ARKFED_PLUGINS, entry points, broken and duplicate plugins."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

import arkfed.datasets
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import ENTRY_POINT_GROUP, PLUGINS_ENV, DatasetPlugin, discover_plugins, get_plugin
from arkfed.errors import ArkfedError

BUILTIN = {"chestxray14", "chexpert", "mimic_cxr", "vindr_cxr", "rsna_pneumonia", "shenzhen", "medmnist", "csv"}


def plugin_code(name: str, classes: tuple[str, ...] = ("A",)) -> str:
    return f'''
from arkfed.datasets._plugin import DatasetPlugin, register_dataset
from arkfed.data.schema import LabelSchema

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
    assert all(catalog.plugins[name].__module__ == f"arkfed.datasets.{name}" for name in BUILTIN)
    assert not catalog.failures


def test_every_builtin_module_is_declared_as_an_entry_point_of_its_class():
    """pyproject.toml's entry points name exactly the built-in modules, each pointing at its registered class."""
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    points = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    modules = {p.stem for p in Path(arkfed.datasets.__file__).parent.glob("*.py") if not p.name.startswith("_")}
    assert set(points) == BUILTIN == modules
    catalog = discover_plugins()
    for name, value in points.items():
        point = importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
        assert point.load() is catalog.plugins[name]


def test_builtins_reached_through_entry_points_too_are_counted_once(monkeypatch):
    points = [importlib.metadata.EntryPoint(name=n, value=f"arkfed.datasets.{n}", group=ENTRY_POINT_GROUP) for n in sorted(BUILTIN)]
    points.append(importlib.metadata.EntryPoint(name="medmnist", value="arkfed.datasets.medmnist:MedMnist", group=ENTRY_POINT_GROUP))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: points)
    catalog = discover_plugins()
    assert BUILTIN <= set(catalog.plugins) and not catalog.failures


def test_the_working_directory_plugins_folder_is_searched_by_default(tmp_path, monkeypatch):
    """`arkfed add-dataset` writes ./plugins/NAME.py; later commands from that directory find it unasked."""
    plugin_folder(tmp_path, "plugins", {"disc_cwd.py": plugin_code("disc_cwd")})
    monkeypatch.chdir(tmp_path)
    assert "disc_cwd" in discover_plugins().plugins
    monkeypatch.chdir(tmp_path.parent)
    assert "disc_cwd" not in discover_plugins().plugins  # another directory: its plugins/ folder is not ours


def test_same_file_name_in_two_folders_are_two_plugins(tmp_path):
    one = plugin_folder(tmp_path, "a", {"disc_same.py": plugin_code("disc_same_a")})
    two = plugin_folder(tmp_path / "a", "plugins", {"disc_same.py": plugin_code("disc_same_b")})
    assert "disc_same_a" in discover_plugins([one]).plugins
    catalog = discover_plugins([two])
    assert "disc_same_b" in catalog.plugins and "disc_same_a" not in catalog.plugins


def test_a_name_claimed_twice_fails_naming_both_files(tmp_path):
    one = plugin_folder(tmp_path, "one", {"disc_dup1.py": plugin_code("disc_dup", ("X",))})
    two = plugin_folder(tmp_path, "two", {"disc_dup2.py": plugin_code("disc_dup", ("Y",))})
    assert get_plugin("disc_dup", [one])().label_schema().classes == ("X",)
    catalog = discover_plugins([one, two])
    assert "disc_dup" not in catalog.plugins
    message = catalog.failures["disc_dup"]
    assert str(one / "disc_dup1.py") in message and str(two / "disc_dup2.py") in message and "rename one" in message
    with pytest.raises(ArkfedError, match=r"dataset plugin 'disc_dup' failed to load: 2 plugins are named 'disc_dup'"):
        catalog.get("disc_dup")


def test_a_folder_plugin_reusing_a_builtin_name_is_reported_not_silently_used(tmp_path):
    folder = plugin_folder(tmp_path, "shadow", {"my_chexpert.py": plugin_code("chexpert", ("Mine",))})
    catalog = discover_plugins([folder])
    assert "chexpert" not in catalog.plugins
    assert "arkfed.datasets.chexpert.CheXpert" in catalog.failures["chexpert"]
    assert str(folder / "my_chexpert.py") in catalog.failures["chexpert"]
    assert "chexpert" in discover_plugins().plugins  # without that folder the built-in is back


def test_the_same_folder_given_twice_is_searched_once(tmp_path, monkeypatch):
    folder = plugin_folder(tmp_path, "twice", {"disc_twice.py": plugin_code("disc_twice")})
    monkeypatch.setenv(PLUGINS_ENV, str(folder))
    catalog = discover_plugins([folder, tmp_path / "twice" / ".." / "twice"])
    assert "disc_twice" in catalog.plugins and not catalog.failures


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
    undecorated = plugin_code("disc_ep_plugin").replace("@register_dataset\n", "")
    package = plugin_folder(tmp_path, "ep_site_packages", {"disc_ep_module.py": undecorated})
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


RECORDS_PLUGIN = """
import numpy as np
from arkfed.data.tables import make_meta
from arkfed.datasets._label_files import FileDatasetOptions, LabelRecords
from arkfed.datasets._plugin import DatasetPlugin, register_dataset
from arkfed.data.schema import LabelSchema

@register_dataset
class Rows(DatasetPlugin):
    name = "disc_rows"
    schema = LabelSchema(task="binary", classes=("A",))
    Options = FileDatasetOptions

    def read_records(self, root):
        paths = np.array([str(root / f"{i}.png") for i in range(10)], dtype=object)
        return LabelRecords(paths=paths, labels=(np.arange(10) % 2).astype(np.float32)[:, None],
                            meta=make_meta(10, patient_id=[f"p{i}" for i in range(10)]), classes=("A",), source=root / "labels.csv",
                            official=np.array(["trainval"] * 8 + ["test"] * 2, dtype=object))
"""


def test_a_plugin_declaring_only_read_records_reads_through_the_shared_default(tmp_path):
    """The base class's read(): images checked per ``missing_images``, official test kept, train pool cut by patient."""
    folder = plugin_folder(tmp_path, "rows", {"disc_rows.py": RECORDS_PLUGIN})
    data = tmp_path / "data"
    data.mkdir()
    for i in range(9):  # 9.png is missing
        (data / f"{i}.png").write_bytes(b"")
    cls = get_plugin("disc_rows", [folder])
    with pytest.raises(ArkfedError, match=r"labels.csv: 1 of 10 listed image files are missing, first .*9.png"):
        cls().read(data, SplitConfig())
    splits = cls({"missing_images": "drop"}).read(data, SplitConfig(val_fraction=0.25))
    assert len(splits["test"]) == 1 and len(splits["train"]) + len(splits["val"]) == 8 and len(splits["val"]) >= 1
    assert splits["test"].labels[:, 0].tolist() == [0.0]  # row 8 (label 0) is the test image left


def test_read_records_is_declared_on_the_base_class_with_its_contract():
    assert "contract" in (DatasetPlugin.read_records.__doc__ or "")
    with pytest.raises(NotImplementedError, match="implements neither read_records"):
        get_plugin("medmnist")().read_records(Path("."))
    overriding = {name for name, cls in discover_plugins().plugins.items() if name in BUILTIN and "read_records" in vars(cls)}
    assert overriding == BUILTIN - {"medmnist", "csv"}  # medmnist reads arrays; csv inherits CsvDatasetPlugin's
    own_read = {name for name, cls in discover_plugins().plugins.items() if name in BUILTIN and "read" in vars(cls)}
    assert own_read == {"medmnist", "rsna_pneumonia"}  # arrays; DICOM headers read after the missing-image check
