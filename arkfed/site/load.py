"""A loaded site: its config, plugin, effective label schema and split tables, read end to end
through the site's plugin (and its prepared-image cache when the YAML asks for one); every error
is one line naming the site.

Reading protocols (issue 20): a site is read ``arkfed``'s way by default, or as Ark's reference
code reads the dataset (``ark``): :func:`load_site`'s ``protocol`` sets the plugin option
``protocol`` (chexpert: all of valid.csv, laterals included; mimic_cxr: uncertain as positive,
test laterals kept; vindr_cxr: any reader's positive) over what the YAML says. A plugin without
that option reads its dataset the same way under both protocols (Ark differs there only in its
split lists, which the site's ``split_lists:`` gives): the site is read as it is and
:attr:`Site.protocol_note` says so, rather than failing, so one ``--protocol ark`` runs over a
whole benchmark. :attr:`Site.protocol` is the protocol the site was read under, for the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, get_args

from arkfed.data.cache import CacheStatus
from arkfed.data.schema import LabelSchema
from arkfed.data.tables import SPLITS, DatasetTable
from arkfed.datasets._label_files import ReadingProtocol
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
    protocol: ReadingProtocol = "arkfed"  # the reading protocol the splits were read under
    protocol_note: str | None = None  # set when that protocol does not change how this plugin reads

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


PROTOCOLS: tuple[str, ...] = get_args(ReadingProtocol)


def check_protocol(protocol: str) -> ReadingProtocol:
    """``protocol`` when it is one of :data:`PROTOCOLS`; a one-line error otherwise."""
    if protocol not in PROTOCOLS:
        raise ArkfedError(f"unknown reading protocol {protocol!r}: use {' or '.join(PROTOCOLS)}")
    return protocol  # type: ignore[return-value]


def with_protocol(config: SiteConfig, protocol: str | None, plugins_dirs: Iterable[str | Path] = ()) -> tuple[SiteConfig, str | None]:
    """``config`` read under ``protocol`` (None: as its YAML says) and a note when the protocol
    does not change how the site's plugin reads (a plugin without a ``protocol`` option).

    The plugin option ``protocol`` is set over the YAML's ``options:``. Under ``ark`` the note
    also says when the plugin reads Ark's split lists but the site gives none."""
    if protocol is None:
        return config, None
    protocol = check_protocol(protocol)
    try:
        plugin = get_plugin(config.dataset, plugins_dirs)
    except ArkfedError as exc:
        raise exc.for_site(config.name) from None
    if "protocol" in getattr(plugin.Options, "model_fields", {}):
        return config.model_copy(update={"options": {**config.options, "protocol": protocol}}), None
    note = f"site {config.name}: plugin {config.dataset!r} reads its dataset the same way under protocols arkfed and ark"
    if protocol == "ark" and plugin.split_list_format is not None and config.split.lists is None:
        note += "; Ark's split lists were not given (site key split_lists:), so its splits are arkfed's"
    return config, note


def site_protocol(plugin: DatasetPlugin | None, requested: str | None = None) -> ReadingProtocol:
    """The protocol a site is read under: its plugin's ``protocol`` option, else the one requested
    (a plugin without the option reads alike under both), else ``arkfed``."""
    return getattr(getattr(plugin, "options", None), "protocol", None) or requested or "arkfed"


def load_site(config: SiteConfig | str | Path, plugins_dirs: Iterable[str | Path] = (), cache: bool = True,
              protocol: str | None = None) -> Site:
    """Read a site end to end through its plugin; errors are one line naming the site.

    ``protocol`` (``arkfed`` | ``ark``; None: as the YAML says) is the reading protocol of
    :func:`with_protocol`. With ``cache`` (and the YAML's ``cache:`` not ``off``) the splits read
    from the site's prepared-image cache, prepared first if needed (:func:`arkfed.site.cache.attach_cache`)."""
    if not isinstance(config, SiteConfig):
        config = load_site_config(config)
    config, note = with_protocol(config, protocol, plugins_dirs)
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
    site = Site(config=config, plugin=plugin, schema=schema, splits=splits, protocol=site_protocol(plugin, protocol), protocol_note=note)
    if cache and config.cache.mode != "off":
        from arkfed.site.cache import attach_cache

        site = attach_cache(site)
    return site


def load_sites(refs: Sequence[str | Path], names: Sequence[str] | None = None, plugins_dirs: Iterable[str | Path] = (),
               protocol: str | None = None) -> dict[str, Site]:
    """Sites from their YAMLs (paths, or names meaning ``sites/NAME.yaml``), keyed by site name:
    in the order of ``names`` when given (each must be there), else in the order of ``refs``;
    each read under ``protocol`` (see :func:`load_site`). A site given twice is an error."""
    sites: dict[str, Site] = {}
    for ref in refs:
        site = load_site(resolve_site_path(ref).resolve(), plugins_dirs, protocol=protocol)
        if site.name in sites:
            raise ArkfedError(f"site {site.name!r} given twice (site configs: {', '.join(str(r) for r in refs)})")
        sites[site.name] = site
    if names is None:
        return sites
    missing = [name for name in names if name not in sites]
    if missing:
        raise ArkfedError(f"no site config for {missing} (configs given: {[str(r) for r in refs]})")
    return {name: sites[name] for name in names}
