"""A loaded site: its config, plugin, effective label schema and split tables, read end to end
through the site's plugin (and its prepared-image cache when the YAML asks for one); every error
is one line naming the site."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from arkfed.data.cache import CacheStatus
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import SPLITS, DatasetTable
from arkfed.datasets._plugin import DatasetPlugin, get_plugin
from arkfed.errors import ArkfedError
from arkfed.site.config import SiteConfig, load_site_config, resolve_site_path


@dataclass
class Site:
    """A loaded site: its config, plugin, effective schema and split tables."""

    config: SiteConfig
    plugin: DatasetPlugin
    schema: LabelSchema
    splits: dict[str, DatasetTable]
    cache: CacheStatus | None = None  # set when the splits read from the prepared-image cache

    @property
    def name(self) -> str:
        return self.config.name

    def split(self, name: str) -> DatasetTable:
        table = self.splits.get(name)
        if table is None or len(table) == 0:
            raise ArkfedError(f"split {name!r} is empty (root {self.config.root})", site=self.name)
        return table


def site_schema(config: SiteConfig, plugins_dirs: Iterable[str | Path] = ()) -> tuple[DatasetPlugin, LabelSchema]:
    """The plugin instance and the schema with the site's policy overrides applied."""
    try:
        plugin = get_plugin(config.dataset, plugins_dirs)(config.options)
        schema = plugin.label_schema().with_policies(config.labels.uncertain, config.labels.missing)
    except ArkfedError as exc:
        raise exc.for_site(config.name) from None
    return plugin, schema


def load_site(config: SiteConfig | str | Path, plugins_dirs: Iterable[str | Path] = (), cache: bool = True) -> Site:
    """Read a site end to end through its plugin; errors are one line naming the site.

    With ``cache`` (and the YAML's ``cache:`` not ``off``) the splits read from the site's
    prepared-image cache, prepared first if needed (:func:`arkfed.site.cache.attach_cache`)."""
    if not isinstance(config, SiteConfig):
        config = load_site_config(config)
    plugin, schema = site_schema(config, plugins_dirs)
    if not config.root.exists():
        raise ArkfedError(f"data folder not found: {config.root}", site=config.name)
    try:
        splits = plugin.read(config.root, config.split)
    except ArkfedError as exc:
        raise exc.for_site(config.name) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ArkfedError(f"plugin {config.dataset!r} failed reading {config.root}: {type(exc).__name__}: {exc}", site=config.name) from exc
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ArkfedError(f"plugin {config.dataset!r} returned unknown splits {sorted(unknown)}", site=config.name)
    for name, table in splits.items():
        if table.classes != schema.classes:
            raise ArkfedError(f"plugin {config.dataset!r}: split {name!r} has classes {table.classes}, "
                              f"schema has {schema.classes}", site=config.name)
        if config.max_images is not None and len(table) > config.max_images:
            splits[name] = table.subset(range(config.max_images))
    site = Site(config=config, plugin=plugin, schema=schema, splits=splits)
    if cache and config.cache.mode != "off":
        from arkfed.site.cache import attach_cache

        site = attach_cache(site)
    return site


def load_sites(refs: Sequence[str | Path], names: Sequence[str] | None = None, plugins_dirs: Iterable[str | Path] = ()) -> dict[str, Site]:
    """Sites from their YAMLs (paths, or names meaning ``sites/NAME.yaml``), keyed by site name:
    in the order of ``names`` when given (each must be there), else in the order of ``refs``.
    A site given twice is an error."""
    sites: dict[str, Site] = {}
    for ref in refs:
        site = load_site(resolve_site_path(ref).resolve(), plugins_dirs)
        if site.name in sites:
            raise ArkfedError(f"site {site.name!r} given twice (site configs: {', '.join(str(r) for r in refs)})")
        sites[site.name] = site
    if names is None:
        return sites
    missing = [name for name in names if name not in sites]
    if missing:
        raise ArkfedError(f"no site config for {missing} (configs given: {[str(r) for r in refs]})")
    return {name: sites[name] for name in names}
