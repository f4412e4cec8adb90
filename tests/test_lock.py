"""The lock file (``requirements.lock``, every distribution pinned with its hashes) covers what
pyproject.toml declares, and the SBOM (``deploy/sbom.cdx.json``) lists what the lock pins.
Both are regenerated from the tested .venv by ``sh deploy/lock.sh``; nothing here needs a network."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of every pin in requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\;]+)", line)
        if pin:
            name = _norm(pin.group(1))
            pins[name] = (pin.group(2), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            pins[name][1].append(digest)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for group in ("test", "tensorboard", "mlflow"):  # the tested set: '.[test]', which pulls in the other two
        requirements += [Requirement(r) for r in project["optional-dependencies"][group] if not r.startswith("arkfed")]
    return requirements


def test_the_lock_pins_every_declared_dependency_with_a_hash_and_a_version_it_allows():
    pins = _locked()
    assert len(pins) > 50
    for requirement in _declared():
        name = _norm(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock (run sh deploy/lock.sh)"
        version, hashes = pins[name]
        assert hashes, f"{name}=={version} has no hash"
        assert requirement.specifier.contains(Version(version), prereleases=True), f"{name}=={version} is outside {requirement}"
    assert all(hashes for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
    assert pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"


def test_the_sbom_lists_what_the_lock_pins():
    sbom = json.loads((ROOT / "deploy" / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["name"] == "arkfed"
    listed = {_norm(c["name"]): c["version"] for c in sbom["components"]}
    assert listed == {name: version for name, (version, _) in _locked().items()}
    assert all(c["purl"].startswith("pkg:pypi/") for c in sbom["components"])
