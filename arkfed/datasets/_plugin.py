"""Dataset plugins: the base class, the registry and discovery.

A plugin is a subclass of :class:`DatasetPlugin` decorated with :func:`register_dataset`. It reads
one dataset's *official* file layout into :class:`~arkfed.data.tables.DatasetTable` objects, one per
split. Plugins are found, like timm models, without a central list, in this order:

1. the built-ins: every module of the :mod:`arkfed.datasets` package (they ship in the wheel, and
   are also declared as entry points, so they are found exactly like an installed contributor's);
2. the contributor's ``plugins/`` folder: ``./plugins`` of the working directory (where
   ``arkfed add-dataset`` writes) and, in a source checkout, the repository's ``plugins/``;
3. extra folders given by ``--plugins-dir`` or the ``ARKFED_PLUGINS`` variable (``os.pathsep``
   separated);
4. installed packages that declare an entry point in the group ``arkfed.datasets`` (pointing at a
   plugin class or at a module whose import registers plugins).

A plugin that fails to import is reported by name; the others still load. Two different plugins
claiming one name make that name fail with an error naming both, rather than one silently winning.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from arkfed.data.schema import LabelSchema
from arkfed.data.tables import DatasetTable
from arkfed.datasets._label_files import LabelRecords, SplitConfig, assemble_splits
from arkfed.datasets._split_lists import SplitListFormat, apply_split_lists, require_list_format
from arkfed.errors import ArkfedError

ENTRY_POINT_GROUP = "arkfed.datasets"
PLUGINS_ENV = "ARKFED_PLUGINS"
BUILTIN_PACKAGE = "arkfed.datasets"
CONTRIBUTOR_FOLDER = "plugins"
SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]
FOLDER_MODULE_PREFIX = "arkfed_plugins."


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetPlugin:
    """Base class: declare ``name``, ``schema`` (or override :meth:`label_schema`) and :meth:`read_records`.

    Most datasets are label files listing image files: such a plugin implements only
    :meth:`read_records`, and the inherited :meth:`read` checks the images and cuts the splits the
    same way for every dataset. A dataset that is not "a label table over image files" (e.g.
    MedMNIST's arrays) overrides :meth:`read` instead.

    Plugin-specific settings from a site config's ``options:`` are validated by ``Options`` (a
    pydantic model, extra keys forbidden) and available as ``self.options``. Plugins over image
    files extend :class:`~arkfed.datasets._label_files.FileDatasetOptions`, whose ``missing_images`` policy
    :meth:`read` applies. A plugin whose dataset Ark splits with list files declares
    ``split_list_format``, and a site's ``split_lists:`` then picks the splits (:mod:`arkfed.datasets._split_lists`).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    schema: ClassVar[LabelSchema | None] = None
    Options: ClassVar[type[BaseModel]] = NoOptions
    split_list_format: ClassVar[SplitListFormat | None] = None

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

    def read_records(self, root: Path) -> LabelRecords:
        """The dataset's rows as its official label files give them, before any image is touched.

        The contract, which :meth:`read`, ``arkfed validate`` and the plugin tests rely on:

        - one row per image the official files list (after the plugin's own documented filters,
          e.g. frontal views only), in the files' order;
        - ``paths``: each image's full path under ``root``; images are not opened, and missing
          ones are left for :meth:`read` to report or drop (so a full-size label file can be
          read and checked without its images);
        - ``labels``: N x K float32 in the schema's encoding (1 positive, 0 negative,
          :data:`~arkfed.data.schema.UNCERTAIN`, NaN not labelled), ``classes`` equal to
          :meth:`label_schema`'s classes, in that order;
        - ``meta``: row-aligned, built with :func:`~arkfed.data.tables.make_meta` (patient id, sex,
          age, view; missing values allowed);
        - ``official``: each row's official split ("train", "val", "test", or "trainval" for a
          train pool cut by patient), or None when the dataset ships none;
        - ``source``: the label file (or one per row), so errors name where a row came from;
        - errors are :class:`~arkfed.errors.ArkfedError` naming the file, line and column.
        """
        raise NotImplementedError(
            f"plugin {self.name!r} implements neither read_records() (rows of label files) nor its own read()"
        )

    def read(self, root: Path, split: SplitConfig) -> dict[str, DatasetTable]:
        """Read the dataset at ``root`` into ``{"train": ..., "val": ..., "test": ...}``.

        By default: :meth:`read_records`, then :func:`~arkfed.datasets._label_files.assemble_splits` (images
        checked per the ``missing_images`` option, official split kept, else split by patient).
        """
        missing_images = getattr(self.options, "missing_images", "error")
        return assemble_splits(self.read_split_records(root, split), split, missing_images)

    def read_split_records(self, root: Path, split: SplitConfig) -> LabelRecords:
        """:meth:`read_records`, cut to the site's split lists (``split_lists:``) when it gives them.

        A plugin that declares ``split_list_format`` (a
        :class:`~arkfed.datasets._split_lists.SplitListFormat`) reads lists in that format; for any
        other plugin, split lists are an error rather than silently ignored."""
        require_list_format(self.name, self.split_list_format, split)
        records = self.read_records(root)
        if split.lists is None:
            return records
        return apply_split_lists(records, self.split_list_format, split, getattr(self.options, "missing_images", "error"))


_REGISTERED: dict[str, type[DatasetPlugin]] = {}  # "module.QualName" -> class (a module re-import replaces its class)


def register_dataset(cls: type[DatasetPlugin]) -> type[DatasetPlugin]:
    """Class decorator that makes a plugin discoverable by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    _REGISTERED[_class_key(cls)] = cls
    return cls


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def plugin_origin(cls: type[DatasetPlugin]) -> str:
    """Where a plugin class was defined: its file for a folder plugin, else ``module.Class``."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__.startswith(FOLDER_MODULE_PREFIX) and getattr(module, "__file__", None):
        return f"{module.__file__} ({cls.__qualname__})"
    return _class_key(cls)


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


def folder_module_name(path: Path) -> str:
    """The module name a plugin file is imported under: unique per file, stable across calls.

    Two folders may hold files of the same name (every test's ``tmp/plugins/x.py``); a digest of
    the full path keeps them apart, so one never silently stands in for the other.
    """
    resolved = Path(path).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    folder, stem = (re.sub(r"\W", "_", part) for part in (resolved.parent.name, resolved.stem))
    return f"{FOLDER_MODULE_PREFIX}{folder}_{digest}.{stem}"


def forget_plugin_file(path: Path) -> None:
    """Drop an imported plugin file and the classes it registered, so the next discovery re-reads it."""
    module_name = folder_module_name(path)
    sys.modules.pop(module_name, None)
    for key in [k for k, cls in _REGISTERED.items() if cls.__module__ == module_name]:
        del _REGISTERED[key]


def _load_file(path: Path) -> str:
    module_name = folder_module_name(path)
    if module_name in sys.modules:
        return module_name
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        forget_plugin_file(path)
        raise
    return module_name


def default_plugin_dirs() -> list[Path]:
    """The contributor's ``plugins/`` folders searched without configuration (absent ones are skipped).

    ``./plugins`` is where ``arkfed add-dataset`` writes by default; a source checkout's own
    ``plugins/`` is searched too, so its plugins work from any working directory.
    """
    dirs = [Path.cwd() / CONTRIBUTOR_FOLDER]
    if (SOURCE_CHECKOUT / "pyproject.toml").is_file():
        dirs.append(SOURCE_CHECKOUT / CONTRIBUTOR_FOLDER)
    return dirs


def plugin_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    """The explicit folders: ``--plugins-dir`` ones, then those in ``ARKFED_PLUGINS``."""
    env = os.environ.get(PLUGINS_ENV, "")
    return [*map(Path, extra), *(Path(p) for p in env.split(os.pathsep) if p)]


def _import_builtins(catalog: PluginCatalog) -> None:
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        except Exception as exc:
            catalog.failures[info.name] = f"{BUILTIN_PACKAGE}.{info.name}: {type(exc).__name__}: {exc}"


def _import_folders(catalog: PluginCatalog, extra_dirs: Iterable[str | Path]) -> set[str]:
    """Import every ``*.py`` of the folders (each folder once); returns this discovery's module names."""
    folders = [d for d in default_plugin_dirs() if d.is_dir()] + plugin_dirs(extra_dirs)
    loaded: set[str] = set()
    seen: set[Path] = set()
    for directory in folders:
        if directory.resolve() in seen:
            continue
        seen.add(directory.resolve())
        if not directory.is_dir():
            catalog.failures[str(directory)] = "plugin folder not found"
            continue
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                loaded.add(_load_file(path))
            except Exception as exc:
                catalog.failures[path.stem] = f"{path}: {type(exc).__name__}: {exc}"
    return loaded


def _import_entry_points(catalog: PluginCatalog) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            catalog.failures[ep.name] = f"entry point {ep.value}: {type(exc).__name__}: {exc}"
            continue
        if isinstance(obj, type) and issubclass(obj, DatasetPlugin):
            register_dataset(obj)


def discover_plugins(extra_dirs: Iterable[str | Path] = ()) -> PluginCatalog:
    """Import the built-ins, plugin folders and entry points; collect failures instead of stopping at one.

    The catalog holds the plugins registered by the built-ins, by the entry points, by code already
    imported, and by the files of *this* call's folders (a folder searched by an earlier call in
    the process does not leak into this one). A name registered by two different classes is a
    failure naming both.
    """
    catalog = PluginCatalog()
    _import_builtins(catalog)
    folder_modules = _import_folders(catalog, extra_dirs)
    _import_entry_points(catalog)
    by_name: dict[str, list[type[DatasetPlugin]]] = {}
    for cls in _REGISTERED.values():
        if cls.__module__.startswith(FOLDER_MODULE_PREFIX) and cls.__module__ not in folder_modules:
            continue
        by_name.setdefault(cls.name, []).append(cls)
    for name, classes in sorted(by_name.items()):
        if len(classes) == 1:
            catalog.plugins[name] = classes[0]
        else:
            origins = " and ".join(plugin_origin(cls) for cls in classes)
            catalog.failures[name] = f"{len(classes)} plugins are named {name!r}: {origins}; rename one (its `name = ...`) or remove it"
    return catalog


def get_plugin(name: str, extra_dirs: Iterable[str | Path] = ()) -> type[DatasetPlugin]:
    return discover_plugins(extra_dirs).get(name)
