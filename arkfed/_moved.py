"""Old import paths of the flat layout (arkfed <= 0.1), kept working for one release.

``import arkfed.plugins`` (or ``from arkfed.schema import LabelSchema``) still works and warns
with a :class:`DeprecationWarning` naming the new place; the module object is the new one, so
registries and ``isinstance`` checks see one class. Plugin code should import from
:mod:`arkfed.datasets` instead. Removed in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    # what plugin authors imported
    "arkfed.plugins": "arkfed.datasets._plugin",
    "arkfed.schema": "arkfed.data.schema",
    "arkfed.dataset": "arkfed.data.tables",
    "arkfed.label_files": "arkfed.datasets._label_files",
    "arkfed.csv_dataset": "arkfed.datasets._csv",
    "arkfed.findings": "arkfed.data.findings",
    "arkfed.imageio": "arkfed.data.imageio",
    # the rest of the flat layout whose contents moved whole
    "arkfed.scaffold": "arkfed.datasets._scaffold",
    "arkfed.weights": "arkfed.model.weights",
    "arkfed.ark_checkpoints": "arkfed.model.released",
    "arkfed.policy": "arkfed.site.policy",
    "arkfed.validate": "arkfed.site.validate",
    "arkfed.losses": "arkfed.ark.losses",
    "arkfed.metrics": "arkfed.ark.metrics",
    "arkfed.updates": "arkfed.ark.updates",
    "arkfed.visit": "arkfed.ark.visit",
    "arkfed.site_tasks": "arkfed.ark.tasks",
    "arkfed.distributed": "arkfed.ark.ddp",
    "arkfed.runs": "arkfed.run.folder",
    "arkfed.recipes": "arkfed.run.recipes",
    "arkfed.provenance": "arkfed.run.provenance",
    "arkfed.callbacks": "arkfed.run.callbacks",
    "arkfed.progress": "arkfed.run.progress",
    "arkfed.trackers": "arkfed.run.trackers",
    "arkfed.transforms": "arkfed.data.transforms",
    "arkfed.device_views": "arkfed.data.device_views",
    "arkfed.demo_draw": "arkfed.demo.draw",
}


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; the old path will be removed in the next release "
                  "(plugins: import from arkfed.datasets)", DeprecationWarning, stacklevel=stacklevel)


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names and hands out the new modules under them."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(new))


def package_getattr(package: str, moved: dict[str, str]):
    """The module ``__getattr__`` of a package that replaced a flat module of the same name
    (``arkfed.model``, ``arkfed.site``): ``from arkfed.model import ArkModel`` keeps working, warning."""

    def __getattr__(name: str):
        new = moved.get(name)
        if new is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{new}.{name}", stacklevel=4)
        return getattr(importlib.import_module(new), name)

    return __getattr__


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
