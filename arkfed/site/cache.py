"""A site's prepared-image cache as the site uses it: where it lives, how fresh it is, and the
site's splits reading from it (``cache: off | auto | on`` in the site YAML).

The cache itself, a store of decoded pixels that knows nothing of sites, is
:mod:`arkfed.data.cache`; this module maps a site's files onto it. The cache lives in the site's
own folder (``cache.dir`` or ``<local_state_dir>/cache``) and never travels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from arkfed.data.cache import SHARD_BYTES, CachedImages, CacheIndex, CacheStatus, ProgressCallback, fingerprint, image_id
from arkfed.data.cache_prepare import PrepareReport, prepare_cache
from arkfed.data.tables import SPLITS, DatasetTable, FileImages
from arkfed.errors import ArkfedError
from arkfed.site.config import SiteConfig


class LoadedSite(Protocol):
    """What the cache needs of a loaded site (:class:`arkfed.site.load.Site`, which imports this module)."""

    config: SiteConfig
    splits: dict[str, DatasetTable]


S = TypeVar("S", bound=LoadedSite)


log = logging.getLogger("arkfed.site.cache")


def cache_folder(config: SiteConfig) -> Path:
    """``<cache.dir or local_state_dir/cache>/<size>px``: the site's own folder, never shipped."""
    base = config.cache.dir if config.cache.dir is not None else config.local_state_dir / "cache"
    return Path(base) / f"{config.cache.size}px"


def site_sources(config: SiteConfig, splits: dict[str, DatasetTable]) -> list[tuple[str, str]]:
    """(image id, path) of every file-backed row of every split, each file once."""
    root = str(config.root).rstrip(os.sep) + os.sep
    seen: dict[str, str] = {}
    for name in SPLITS:
        table = splits.get(name)
        if table is not None and isinstance(table.images, FileImages):
            for path in table.images.paths:
                seen.setdefault(image_id(path, root), str(path))
    return list(seen.items())


def cache_status(config: SiteConfig, splits: dict[str, DatasetTable]) -> CacheStatus:
    """Compare the site's cache with its files (one stat per file; pixels are not read)."""
    folder = cache_folder(config)
    status = CacheStatus(mode=config.cache.mode, folder=str(folder), size=config.cache.size)
    sources = site_sources(config, splits)
    status.rows = len(sources)
    if not sources:
        status.note = "no file-backed images (in-memory datasets are not cached)"
        return status
    index = CacheIndex.load(folder, config.cache.size)
    status.shards, status.nbytes = len(index.shards), index.nbytes
    status.broken = list(index.broken) + [f"{p.name}: no index (an interrupted prepare)" for p in index.orphans]
    if not index.shards and not status.broken:
        status.note = f"not prepared ({len(sources)} images; run `arkfed prepare {config.name}`)"
        return status
    pos = index.positions(key for key, _ in sources)
    for (_, path), p in zip(sources, pos):
        if p < 0:
            status.missing += 1
        elif (int(index.columns["src_size"][p]), int(index.columns["src_mtime"][p])) == fingerprint(path):
            status.fresh += 1
        else:
            status.changed += 1
    return status


def prepare_site(site: LoadedSite, workers: int = 0, rebuild: bool = False, progress: ProgressCallback | None = None,
                 shard_bytes: int = SHARD_BYTES) -> PrepareReport:
    """Prepare (or bring up to date) the cache of a loaded site, every split."""
    return prepare_cache(cache_folder(site.config), site_sources(site.config, site.splits), site.config.cache.size,
                         workers=workers, rebuild=rebuild, progress=progress, shard_bytes=shard_bytes)


def open_cached(config: SiteConfig, splits: dict[str, DatasetTable]) -> tuple[dict[str, DatasetTable], CacheStatus]:
    """The splits with file-backed images reading from the cache where an entry is fresh.

    Rows without a fresh entry keep decoding their file; nothing is written here.
    """
    folder = cache_folder(config)
    index = CacheIndex.load(folder, config.cache.size)
    status = CacheStatus(mode=config.cache.mode, folder=str(folder), size=config.cache.size,
                         shards=len(index.shards), nbytes=index.nbytes, broken=list(index.broken))
    root = str(config.root).rstrip(os.sep) + os.sep
    out = {}
    for name, table in splits.items():
        if not isinstance(table.images, FileImages) or len(index) == 0:
            out[name] = table
            continue
        paths = table.images.paths
        pos = index.positions(image_id(p, root) for p in paths)
        fresh = pos >= 0
        for k in np.flatnonzero(fresh):
            p = pos[k]
            if (int(index.columns["src_size"][p]), int(index.columns["src_mtime"][p])) != fingerprint(paths[k]):
                fresh[k] = False
                status.changed += 1
        status.rows += len(paths)
        status.fresh += int(fresh.sum())
        status.missing += int((pos < 0).sum())
        safe = np.where(fresh, pos, 0)
        col = index.columns
        images = CachedImages(
            table.images, folder, config.cache.size, np.where(fresh, index.shard[safe], -1).astype(np.int32),
            col["offset"][safe].astype(np.int64), np.stack([col["h"][safe], col["w"][safe]], axis=1).astype(np.int32),
            col["crc"][safe].astype(np.uint32),
        )
        out[name] = replace(table, images=images)
    return out, status


def attach_cache(site: S) -> S:
    """Apply the site's ``cache:`` setting to a loaded site: prepare on first use, then read from it.

    ``auto`` turns a failure to write the cache into a warning; ``on`` makes it an error naming the site.
    """
    config = site.config
    mode = config.cache.mode
    if mode == "off":
        return site
    try:
        report = prepare_site(site, workers=config.cache.decoders())
        if report.new:  # once per new image: worth a line on the console (the logging default shows warnings)
            log.warning("site %s: image cache: decoded %d new image(s) in %.1f s into %s", config.name, report.new,
                        report.seconds, report.folder)
    except OSError as exc:
        message = f"cannot prepare the image cache in {cache_folder(config)}: {exc}"
        if mode == "on":
            raise ArkfedError(message, site=config.name) from None
        log.warning("site %s: %s; decoding files", config.name, message)
        return site
    splits, status = open_cached(config, site.splits)
    return replace(site, splits=splits, cache=status)
