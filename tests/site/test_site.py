"""Site configs: YAML validation with one-line errors, name resolution, relative roots, load_site."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from arkfed.errors import ArkfedError
from arkfed.site.config import load_site_config, resolve_site_path
from arkfed.site.load import load_site

# A plugin that serves 10 in-memory images per split and checks its root holds "ok.txt".
TINY_PLUGIN = '''
import numpy as np
from arkfed.data.tables import ArrayImages, DatasetTable, make_meta
from arkfed.errors import ArkfedError
from arkfed.datasets._plugin import DatasetPlugin, register_dataset
from arkfed.data.schema import LabelSchema

@register_dataset
class SiteTestTiny(DatasetPlugin):
    name = "site_test_tiny"
    schema = LabelSchema(task="multilabel", classes=("A", "B"))

    def read(self, root, split):
        if not (root / "ok.txt").is_file():
            raise ArkfedError(f"{root / 'ok.txt'}: missing")
        tables = {}
        for k, name in enumerate(("train", "val", "test")):
            n = 10
            images = np.full((n, 8, 8), 40 * k, dtype=np.uint8)
            labels = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (n, 1))
            meta = make_meta(n, patient_id=[f"{name}{i}" for i in range(n)])
            tables[name] = DatasetTable(ArrayImages(images, name), labels, meta, ("A", "B"))
        return tables
'''


@pytest.fixture
def tiny_plugin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "site_test_plugins"
    folder.mkdir()
    (folder / "site_test_tiny.py").write_text(TINY_PLUGIN)
    return folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_relative_root_and_state_dir_resolve_against_the_yaml_folder(tmp_path):
    path = write(tmp_path / "conf" / "sites" / "a.yaml", """
        name: a
        dataset: site_test_tiny
        root: ../data/a
        state_dir: state
        labels: {uncertain: ignore}
        split: {val_fraction: 0.25}
        image_size: 64
    """)
    config = load_site_config(path)
    assert config.root.resolve() == (tmp_path / "conf" / "data" / "a").resolve()
    assert config.state_dir.resolve() == (tmp_path / "conf" / "sites" / "state").resolve()
    assert config.labels.uncertain == "ignore" and config.split.val_fraction == 0.25 and config.image_size == 64


def test_absolute_root_is_kept(tmp_path):
    path = write(tmp_path / "b.yaml", f"name: b\ndataset: x\nroot: {tmp_path / 'elsewhere'}\n")
    assert load_site_config(path).root == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("name: a\ndataset: x\nroot: .\ncolour: red\n", r"field 'colour': unknown key \(allowed: name, dataset, root"),
        ("name: a\ndataset: x\nroot: .\nsplit: {val_fraction: 0.1, bogus: 1}\n", r"field 'split.bogus': unknown key$"),
        ("name: a\ndataset: x\nroot: .\nlabels: {uncertain: maybe}\n", r"field 'labels.uncertain': Input should be 'ones'"),
        ("name: a\ndataset: x\nroot: .\nimage_size: 8\n", r"field 'image_size': Input should be greater than or equal to 16"),
        ("name: a\ndataset: x\n", r"field 'root': Field required"),
        ("name: a b\ndataset: x\nroot: .\n", r"field 'name': String should match pattern"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("name: [unclosed\n", r"not valid YAML"),
    ],
)
def test_config_errors_are_one_line_naming_file_and_field(tmp_path, body, expected):
    path = write(tmp_path / "bad.yaml", body)
    with pytest.raises(ArkfedError, match=expected) as err:
        load_site_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_a_name_resolves_to_sites_dir_name_yaml(tmp_path):
    sites = tmp_path / "sites"
    write(sites / "hospital_a.yaml", "name: hospital_a\ndataset: x\nroot: data\n")
    assert resolve_site_path("hospital_a", sites) == sites / "hospital_a.yaml"
    assert load_site_config("hospital_a", sites).root.resolve() == (sites / "data").resolve()
    with pytest.raises(ArkfedError, match=r"site config not found: .*hospital_b.yaml"):
        resolve_site_path("hospital_b", sites)
    with pytest.raises(ArkfedError, match="site config not found"):
        resolve_site_path(tmp_path / "missing.yaml", sites)


def test_the_repository_sites_folder_resolves_by_name(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    config = load_site_config("demo-nih")
    assert config.dataset == "chestxray14" and config.root.name == "demo-nih"


def site_yaml(tmp_path: Path, **extra: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "ok.txt").write_text("")
    lines = ["name: tiny", "dataset: site_test_tiny", "root: data", *(f"{k}: {v}" for k, v in extra.items())]
    return write(tmp_path / "tiny.yaml", "\n".join(lines) + "\n")


def test_load_site_reads_through_the_plugin_and_applies_overrides(tmp_path, tiny_plugin_dir):
    site = load_site(site_yaml(tmp_path, labels="{uncertain: zeros, missing: ignore}", max_images="4"), [tiny_plugin_dir])
    assert site.name == "tiny"
    assert site.schema.classes == ("A", "B")
    assert (site.schema.uncertain, site.schema.missing) == ("zeros", "ignore")
    assert {k: len(v) for k, v in site.splits.items()} == {"train": 4, "val": 4, "test": 4}
    assert site.split("val").images.read(0).max() == 40


def test_load_site_errors_name_the_site(tmp_path, tiny_plugin_dir):
    with pytest.raises(ArkfedError, match=r"site 'tiny': unknown dataset plugin 'nope' \(available: .*chexpert"):
        load_site(write(tmp_path / "n.yaml", "name: tiny\ndataset: nope\nroot: .\n"), [tiny_plugin_dir])
    with pytest.raises(ArkfedError, match=r"site 'tiny': data folder not found: .*absent"):
        load_site(write(tmp_path / "m.yaml", "name: tiny\ndataset: site_test_tiny\nroot: absent\n"), [tiny_plugin_dir])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArkfedError, match=r"site 'tiny': .*ok.txt: missing"):
        load_site(write(tmp_path / "e.yaml", "name: tiny\ndataset: site_test_tiny\nroot: empty\n"), [tiny_plugin_dir])
    with pytest.raises(ArkfedError, match=r"site 'tiny': plugin 'site_test_tiny': option 'colour'"):
        load_site(site_yaml(tmp_path, options="{colour: red}"), [tiny_plugin_dir])
