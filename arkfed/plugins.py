"""Dataset plugins: the base class, the registry and discovery.

A plugin is a subclass of :class:`DatasetPlugin` decorated with :func:`register_dataset`. It reads
one dataset's *official* file layout into :class:`~arkfed.dataset.DatasetTable` objects, one per
split. Plugins are found, like timm models, without a central list:

1. the built-in ``plugins/`` folder of this repository (one file per dataset);
2. extra folders given by ``--plugins-dir`` or the ``ARKFED_PLUGINS`` variable (``os.pathsep``
   separated);
3. installed packages that declare an entry point in the group ``arkfed.datasets`` (pointing at a
   plugin class or at a module whose import registers plugins).

A plugin that fails to import is reported by name; the others still load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from arkfed.dataset import DatasetTable
from arkfed.errors import ArkfedError
from arkfed.schema import LabelSchema

ENTRY_POINT_GROUP = "arkfed.datasets"
PLUGINS_ENV = "ARKFED_PLUGINS"
BUILTIN_PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(BaseModel):
    """How to split a dataset that ships no official split (always patient-wise)."""

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    use_official: bool = True


class DatasetPlugin:
    """Base class: declare ``name``, ``schema`` (or override :meth:`label_schema`) and :meth:`read`.

    Plugin-specific settings from a site config's ``options:`` are validated by ``Options`` (a
    pydantic model, extra keys forbidden) and available as ``self.options``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    schema: ClassVar[LabelSchema | None] = None
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict | None = None):
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "options"
            raise ArkfedError(f"plugin {self.name!r}: option {where!r}: {err['msg']}") from None

    def label_schema(self) -> LabelSchema:
        if self.schema is None:
            raise NotImplementedError(f"plugin {self.name!r} declares no schema")
        return self.schema

    def read(self, root: Path, split: SplitConfig) -> dict[str, DatasetTable]:
        """Read the dataset at ``root`` into ``{"train": ..., "val": ..., "test": ...}``."""
        raise NotImplementedError


_REGISTRY: dict[str, type[DatasetPlugin]] = {}


def register_dataset(cls: type[DatasetPlugin]) -> type[DatasetPlugin]:
    """Class decorator that makes a plugin discoverable by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    _REGISTRY[name] = cls
    return cls


@dataclass
class PluginCatalog:
    plugins: dict[str, type[DatasetPlugin]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> type[DatasetPlugin]:
        if name in self.plugins:
            return self.plugins[name]
        if name in self.failures:
            raise ArkfedError(f"dataset plugin {name!r} failed to load: {self.failures[name]}")
        known = ", ".join(sorted(self.plugins)) or "none"
        raise ArkfedError(
            f"unknown dataset plugin {name!r} (available: {known}); add one with `arkfed add-dataset` "
            f"or point --plugins-dir / {PLUGINS_ENV} at its folder"
        )


def _load_file(path: Path) -> None:
    module_name = f"arkfed_plugins.{path.parent.name}.{path.stem}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise


def plugin_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    dirs = [BUILTIN_PLUGINS_DIR, *map(Path, extra)]
    env = os.environ.get(PLUGINS_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    return dirs


def discover_plugins(extra_dirs: Iterable[str | Path] = ()) -> PluginCatalog:
    """Import every plugin file and entry point; collect failures instead of stopping at one."""
    catalog = PluginCatalog()
    for directory in plugin_dirs(extra_dirs):
        if not directory.is_dir():
            if directory != BUILTIN_PLUGINS_DIR:
                catalog.failures[str(directory)] = "plugin folder not found"
            continue
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                _load_file(path)
            except Exception as exc:
                catalog.failures[path.stem] = f"{path}: {type(exc).__name__}: {exc}"
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            catalog.failures[ep.name] = f"entry point {ep.value}: {type(exc).__name__}: {exc}"
            continue
        if isinstance(obj, type) and issubclass(obj, DatasetPlugin) and obj.name not in _REGISTRY:
            register_dataset(obj)
    catalog.plugins = dict(sorted(_REGISTRY.items()))
    return catalog


def get_plugin(name: str, extra_dirs: Iterable[str | Path] = ()) -> type[DatasetPlugin]:
    return discover_plugins(extra_dirs).get(name)
