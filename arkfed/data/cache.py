"""A site's prepared-image cache: every image decoded once, resized, stored as memory-mapped uint8.

Decoding is the data path's bottleneck at real resolution: on one core a 2500x3000 JPEG costs
~76 ms and a 16-bit PNG ~140 ms, where reading 512 px of uint8 from a memory map and resizing it
costs ~1 ms. ``arkfed prepare SITE`` (or ``cache: auto`` in the site YAML, on first use) decodes each
image through :func:`arkfed.data.imageio.read_image` (DICOM modality/VOI LUT, MONOCHROME1 inverted, 16-bit
stretched, exactly as training reads files), shrinks it so its longer side is at most ``size``
pixels (aspect ratio kept, never enlarged) and appends the pixels to a shard.

Why 512 px by default: it keeps a 100k-image cache within 100k x 512 x 512 bytes (26 GB), and
recipes that cut their crops from the original image (Ark's random-resized crop at 224 px) still
find at least 224 px of source under any crop of at least 19% of the area ((224/512)^2); smaller
crops are upsampled a little, as they would be from a 1024 px ChestX-ray14 original at 8%. The
cache answers :func:`arkfed.data.loaders.source_pixels` ("the image as the source returns it") in place of
the file, so everything downstream sees images of at most ``size`` px: a recipe that resizes to
more than that (Ark+ squashes to 896 px before its 768 px crops) needs ``cache: {size: 896}``, or
it trains on upsampled images.

Layout, in the site's own folder (``cache.dir`` or ``<local_state_dir>/cache``, never sent anywhere)::

    <size>px/shard-00000.bin        raw uint8 pixels of many images, back to back
    <size>px/shard-00000.idx.npz    its index: image id, original size, stored size, offset,
                                    CRC32 of each image, the source file's fingerprint
                                    (size + mtime_ns), and the shard's byte length and CRC32

A shard's index is written (atomically, :func:`arkfed.io.atomic_write`) only after its pixels are
fsynced, so a ``prepare`` killed midway leaves complete shards plus at most one shard without
an index, which the next ``prepare`` deletes and redoes. A shard whose file is shorter or longer
than its index says (truncated, or a torn copy) is dropped at once and its rows rebuilt; every read
checks the image's CRC32 (~0.1 ms for 512x512, about a tenth of the resize that follows) and falls
back to decoding the file on a mismatch, so the cache never serves wrong pixels. A row whose
source file changed (size or mtime) since it was prepared is re-decoded into a new shard (the
newest entry wins); the count is reported.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from arkfed.data.imageio import read_image
from arkfed.data.tables import FileImages

log = logging.getLogger("arkfed.data.cache")

CacheMode = Literal["off", "auto", "on"]
DEFAULT_SIZE = 512
SHARD_BYTES = 256 << 20  # ~1,000 images at 512 px: a killed prepare loses at most one shard's work
FORMAT = 1
_SHARD = re.compile(r"^shard-(\d{5})\.(bin|idx\.npz)$")
ProgressCallback = Callable[[int, int], None]


class CacheSettings(BaseModel):
    """The ``cache:`` key of a site YAML: ``cache: auto`` or ``cache: {mode: auto, size: 768}``.

    - ``off`` (default): every access decodes the image file, as before;
    - ``auto``: prepared on first use (training, evaluation); only missing or changed rows are
      decoded, and if the folder cannot be written the site warns and decodes files;
    - ``on``: the same, but a cache that cannot be prepared is an error (a site that must not run slow).
    """

    model_config = ConfigDict(extra="forbid")

    mode: CacheMode = "off"
    size: int = Field(default=DEFAULT_SIZE, ge=16, le=4096, description="longer side of the stored images, px")
    dir: Path | None = Field(default=None, description="cache folder (default: <state_dir>/cache)")
    workers: int | None = Field(default=None, ge=0, description="decoding processes of a first-use prepare (default: cores - 1, <= 8)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        # YAML 1.1 reads a bare on/off as true/false: accept them as the modes they spell
        if isinstance(value, (str, bool)):
            value = {"mode": value}
        if isinstance(value, dict) and isinstance(value.get("mode"), bool):
            value = {**value, "mode": "on" if value["mode"] else "off"}
        return value

    def decoders(self) -> int:
        """Processes for a first-use prepare: 0 (this process) where only one would be free."""
        if self.workers is not None:
            return self.workers
        spare = min(8, (os.cpu_count() or 1) - 1)
        return spare if spare > 1 else 0


# --- pixels ---------------------------------------------------------------------------------


def stored_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape an image is stored at: longer side at most ``size``, aspect kept, never enlarged."""
    longer = max(height, width)
    if longer <= size:
        return height, width
    scale = size / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` shrunk (Pillow bilinear, antialiased like :func:`arkfed.data.loaders.read_resized`) to fit ``size``."""
    from PIL import Image

    h, w = stored_shape(*pixels.shape, size)
    if (h, w) == pixels.shape:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def prepared_pixels(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """What the cache stores for one file: (decoded and shrunk pixels, original H x W)."""
    pixels = read_image(path)
    return fit_resize(pixels, size), pixels.shape


def fingerprint(path: str | Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of a source file; (-1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def image_id(path: str | Path, root: str) -> str:
    """A row's key in the cache: its path relative to the site root when under it (moving the
    data folder keeps the cache valid), else the path as given."""
    text = str(path)
    return text[len(root):] if root and text.startswith(root) else text


# --- the index ------------------------------------------------------------------------------


@dataclass
class CacheIndex:
    """Every committed shard's entries, concatenated; a later shard's entry for an id wins."""

    folder: Path
    shards: list[int] = field(default_factory=list)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S1"))
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # shards dropped at load, with why
    orphans: list[Path] = field(default_factory=list)  # pixel files without an index (killed prepare)
    nbytes: int = 0

    COLUMNS = ("orig_h", "orig_w", "h", "w", "offset", "crc", "src_size", "src_mtime")

    @classmethod
    def load(cls, folder: Path, size: int | None = None) -> "CacheIndex":
        index = cls(folder)
        if not folder.is_dir():
            return index
        names = {}
        for p in folder.iterdir():
            m = _SHARD.match(p.name)
            if m:
                names.setdefault(int(m.group(1)), {})[m.group(2)] = p
        parts = []
        for number in sorted(names):
            files = names[number]
            if "idx.npz" not in files:
                index.orphans.append(files["bin"])
                continue
            entry, why = _load_shard(files["idx.npz"], files.get("bin"), size)
            if entry is None:
                index.broken.append(f"{files['idx.npz'].name[:11]}: {why}")
                continue
            index.shards.append(number)
            index.nbytes += int(entry["nbytes"])
            parts.append((number, entry))
        if parts:
            index.ids = np.concatenate([e["ids"] for _, e in parts])
            index.shard = np.concatenate([np.full(len(e["ids"]), n, dtype=np.int32) for n, e in parts])
            index.columns = {c: np.concatenate([e[c] for _, e in parts]) for c in cls.COLUMNS}
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """Index position of each id (the newest entry), -1 where absent."""
        latest = {key: pos for pos, key in enumerate(self.ids.tolist())}  # later (newer) entries overwrite
        return np.array([latest.get(i.encode(), -1) for i in ids], dtype=np.int64)

    def shard_path(self, number: int) -> Path:
        return self.folder / f"shard-{number:05d}.bin"


def _load_shard(idx_path: Path, bin_path: Path | None, size: int | None) -> tuple[dict | None, str]:
    try:
        with np.load(idx_path, allow_pickle=False) as z:
            entry = {k: z[k] for k in z.files}
    except Exception as exc:  # a torn or foreign index file
        return None, f"unreadable index ({type(exc).__name__})"
    if int(entry.get("format", -1)) != FORMAT:
        return None, "written by another cache format"
    if size is not None and int(entry["size"]) != size:
        return None, f"prepared at {int(entry['size'])} px, not {size}"
    if bin_path is None:
        return None, "pixel file missing"
    actual = bin_path.stat().st_size
    if actual != int(entry["nbytes"]):
        return None, f"pixel file has {actual} bytes, its index says {int(entry['nbytes'])} (truncated or torn)"
    return entry, ""


def verify_shards(index: CacheIndex, progress: ProgressCallback | None = None) -> list[str]:
    """Read every committed shard and compare its CRC32 with the index's: the slow, complete check."""
    problems = []
    for k, number in enumerate(index.shards):
        path = index.shard_path(number)
        with np.load(path.with_name(f"shard-{number:05d}.idx.npz")) as z:
            expected = int(z["shard_crc"])
        crc = 0
        with path.open("rb") as f:
            while chunk := f.read(16 << 20):
                crc = zlib.crc32(chunk, crc)
        if crc != expected:
            problems.append(f"{path.name}: CRC32 {crc:08x}, its index says {expected:08x}")
        if progress is not None:
            progress(k + 1, len(index.shards))
    return problems


# --- preparing ------------------------------------------------------------------------------


# --- reading --------------------------------------------------------------------------------


class CachedImages:
    """An :class:`~arkfed.data.tables.ImageSource` over a site's files that reads the prepared pixels.

    ``read(i)`` returns the stored (shrunk) image for rows whose entry is fresh and whose CRC32
    checks, and otherwise decodes the file and shrinks it the same way (so the pixels are those
    a fresh prepare would store). Shards are memory-mapped lazily in each process
    (DataLoader workers, DDP ranks), so RAM holds only the per-row arrays, never the pixels.
    """

    def __init__(self, source: FileImages, folder: Path, cache_size: int, shard: np.ndarray, offset: np.ndarray,
                 shape: np.ndarray, crc: np.ndarray):
        self.source, self.folder, self.cache_size = source, Path(folder), cache_size
        self.shard, self.offset, self.shape, self.crc = shard, offset, shape, crc
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are per process
        return state

    @property
    def cached_rows(self) -> int:
        return int((self.shard >= 0).sum())

    def _map(self, number: int) -> np.memmap:
        m = self._maps.get(number)
        if m is None:
            m = self._maps[number] = np.memmap(self.folder / f"shard-{number:05d}.bin", dtype=np.uint8, mode="r")
        return m

    def read(self, index: int) -> np.ndarray:
        number = int(self.shard[index])
        if number >= 0:
            h, w = (int(x) for x in self.shape[index])
            start = int(self.offset[index])
            try:
                flat = self._map(number)[start : start + h * w]
            except (OSError, ValueError):
                flat = None
            if flat is not None and len(flat) == h * w and zlib.crc32(flat) == int(self.crc[index]):
                return np.array(flat, dtype=np.uint8).reshape(h, w)
            log.warning("cache %s: stored pixels of %s fail their check; decoding the file", self.folder, self.describe(index))
            self.shard[index] = -1
        # shrunk like a stored row, so a row's pixels do not depend on whether its entry was fresh
        return fit_resize(self.source.read(index), self.cache_size)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def subset(self, indices: np.ndarray) -> "CachedImages":
        idx = np.asarray(indices, dtype=int)
        return CachedImages(self.source.subset(idx), self.folder, self.cache_size, self.shard[idx], self.offset[idx],
                            self.shape[idx], self.crc[idx])


# --- a site's cache -------------------------------------------------------------------------


class CacheStatus(BaseModel):
    """A site's cache as found: for ``arkfed validate`` and the line a run prints."""

    mode: CacheMode
    folder: str
    size: int
    rows: int = 0  # the site's file-backed rows
    fresh: int = 0
    changed: int = 0
    missing: int = 0
    shards: int = 0
    nbytes: int = 0
    broken: list[str] = Field(default_factory=list)
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"cache {self.mode} ({self.folder}): {self.note}"
        return (f"cache {self.mode} at {self.size} px ({self.folder}): {self.fresh}/{self.rows} images fresh, "
                f"{self.changed} changed, {self.missing} missing, {self.shards} shard(s), {self.nbytes / 2**20:.1f} MiB")


