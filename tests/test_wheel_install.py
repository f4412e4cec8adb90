"""The wheel a site installs: built from this tree, installed offline into a fresh virtual environment.

A site installs arkfed with pip, not from a checkout, so this test builds the wheel, installs it
with ``--no-deps --no-index`` into a new venv that borrows the test environment's third-party
packages (one plain path line in a ``.pth`` file: the test environment's own ``.pth`` files, such
as an editable install of arkfed, are not processed, so they cannot shadow the wheel), and runs
that venv's ``arkfed`` console script: every built-in plugin must be listed, once, from the
installed package, and ``arkfed validate`` must read a small generated MedMNIST site.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BUILTIN = {"chestxray14", "chexpert", "mimic_cxr", "vindr_cxr", "rsna_pneumonia", "shenzhen", "medmnist", "csv"}

PROBE = """
import importlib.metadata, json, arkfed
from arkfed.datasets._plugin import ENTRY_POINT_GROUP, discover_plugins
catalog = discover_plugins()
print(json.dumps({
    "arkfed": arkfed.__file__,
    "entry_points": [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)],
    "plugins": {name: cls.__module__ for name, cls in catalog.plugins.items()},
    "failures": catalog.failures,
}))
"""

CONSOLE_PROBE = """
import sys
from pathlib import Path
import arkfed.console.app as console
from starlette.testclient import TestClient
client = TestClient(console.create_app(console.ConsoleTarget("run", Path(sys.argv[1]))), base_url="http://127.0.0.1")
paths = ("/", "/static/console.css", "/static/console.js", "/static/vendor/uplot/uPlot.iife.min.js", "/static/vendor/uplot/LICENSE")
print(console.__file__, *(client.get(path).status_code for path in paths))
"""

CONTRIBUTOR_PLUGIN = """
from arkfed.datasets._plugin import DatasetPlugin, register_dataset
from arkfed.data.schema import LabelSchema

@register_dataset
class Mine(DatasetPlugin):
    name = "wheel_contributor"
    schema = LabelSchema(task="binary", classes=("A",))
"""


def run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run without this checkout on the path: PYTHONPATH would put the source tree before the wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(COLUMNS="250", NO_COLOR="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` on a copy of the sources, so the build leaves no build/ or egg-info in the checkout."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("cannot build the wheel: setuptools (the build backend) is not installed in the test environment")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "arkfed", src / "arkfed", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src], tmp_path)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = dist.glob("arkfed-*.whl")
    return wheel


def pip_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version("pip").split(".")[:2] if part.isdigit())


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel, then given the test environment's packages (read-only)."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # Installed before the test environment is visible, so pip sees an empty environment and
    # neither "upgrades" nor uninstalls anything outside the new venv. pip >= 22.3 installs into
    # another interpreter (--python); an older one needs the venv's own pip (bundled, offline).
    own_pip = pip_version() < (22, 3)
    made = run([sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]), venv], tmp_path)
    assert made.returncode == 0, made.stderr
    pip = [python, "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python", python]
    installed = run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "-q", wheel], tmp_path)
    assert installed.returncode == 0, f"pip install of the wheel failed:\n{installed.stdout}\n{installed.stderr}"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    borrowed = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "_test_environment.pth").write_text("".join(f"{p}\n" for p in borrowed if Path(p).is_dir()))
    return venv


def medmnist_site(work: Path) -> Path:
    """A tiny PneumoniaMNIST-shaped file and the site YAML reading it."""
    data = work / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(data / "pneumoniamnist.npz", **arrays)
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "dataset": "medmnist", "root": "data"}))
    return config


@pytest.mark.slow
def test_the_wheel_installed_offline_lists_every_builtin_and_validates_a_site(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"
    (work / "plugins").mkdir(parents=True)
    (work / "plugins" / "wheel_contributor.py").write_text(CONTRIBUTOR_PLUGIN)

    probe = run([venv / "bin" / "python", "-c", PROBE], work)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["arkfed"]).resolve().is_relative_to(venv.resolve()), f"arkfed imported from {found['arkfed']}, not the wheel"
    assert sorted(found["entry_points"]) == sorted(BUILTIN), "each built-in declared once, by the installed wheel"
    assert {n: m for n, m in found["plugins"].items() if n in BUILTIN} == {n: f"arkfed.datasets.{n}" for n in BUILTIN}
    assert "wheel_contributor" in found["plugins"] and not found["failures"]

    # the console's pages, style, script and vendored chart library (with its licence) ship in the wheel
    console = run([venv / "bin" / "python", "-c", CONSOLE_PROBE, work / "no-run-yet"], work)
    assert console.returncode == 0, console.stderr
    module, *codes = console.stdout.split()
    assert Path(module).resolve().is_relative_to(venv.resolve()) and codes == ["200"] * 5, console.stdout

    listed = run([venv / "bin" / "arkfed", "list-datasets"], work)
    assert listed.returncode == 0, listed.stderr
    names = {line.split("│")[1].strip() for line in listed.stdout.splitlines() if line.count("│") > 2}
    assert BUILTIN | {"wheel_contributor"} <= names, listed.stdout
    assert "failed to load" not in listed.stdout

    checked = run([venv / "bin" / "arkfed", "validate", medmnist_site(work)], work)
    assert checked.returncode == 0, f"{checked.stdout}\n{checked.stderr}"
    assert "site tiny: OK" in checked.stdout and "dataset medmnist" in checked.stdout
    assert "read 20 of 20 images: 0 unreadable" in checked.stdout, checked.stdout
