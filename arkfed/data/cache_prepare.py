"""``arkfed prepare``: decode a site's images once into the prepared-image cache (:mod:`arkfed.data.cache`).

Shards are written whole and fsynced before their index is written atomically, so a prepare killed
at any point leaves complete shards plus at most one without an index, which the next prepare
deletes and redoes; one prepare at a time holds the folder's lock. Decoding runs in worker
processes; only new or changed images are decoded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from pydantic import BaseModel, Field

from arkfed.data.cache import _SHARD, FORMAT, SHARD_BYTES, CacheIndex, ProgressCallback, fingerprint, prepared_pixels
from arkfed.errors import ArkfedError
from arkfed.io import atomic_write

log = logging.getLogger("arkfed.data.cache")


class PrepareReport(BaseModel):
    """What a prepare did; the counts add up to ``images``."""

    folder: str
    size: int
    images: int = 0
    reused: int = 0
    new: int = 0
    changed: int = 0  # source changed since prepared: re-decoded
    unreadable: int = 0
    errors: list[str] = Field(default_factory=list)  # the first few unreadable files
    dropped: list[str] = Field(default_factory=list)  # broken shards and orphans removed, with why
    shards: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def decoded(self) -> int:
        return self.new + self.changed


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One preparer per cache folder (two sites' runs, or a run and ``arkfed prepare``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        yield


class _ShardWriter:
    """Appends images to ``shard-NNNNN.bin``; :meth:`commit` fsyncs it and then writes its index."""

    def __init__(self, folder: Path, number: int, size: int):
        self.folder, self.number, self.size = folder, number, size
        self.path = folder / f"shard-{number:05d}.bin"
        self.file = self.path.open("wb")
        self.rows: list[tuple] = []
        self.nbytes = 0
        self.crc = 0

    def add(self, key: str, pixels: np.ndarray, original: tuple[int, int], fp: tuple[int, int]) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        self.file.write(memoryview(data).cast("B"))
        self.crc = zlib.crc32(data, self.crc)
        self.rows.append((key.encode(), *original, *data.shape, self.nbytes, zlib.crc32(data), *fp))
        self.nbytes += data.nbytes

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        keys, *cols = zip(*self.rows) if self.rows else ((),) * 9
        arrays = {
            "format": np.int64(FORMAT), "size": np.int64(self.size), "nbytes": np.int64(self.nbytes),
            "shard_crc": np.int64(self.crc), "ids": np.array(keys, dtype=bytes),
        }
        dtypes = (np.int32, np.int32, np.int32, np.int32, np.int64, np.uint32, np.int64, np.int64)
        for name, values, dtype in zip(CacheIndex.COLUMNS, cols, dtypes):
            arrays[name] = np.array(values, dtype=dtype)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)

        atomic_write(self.folder / f"shard-{self.number:05d}.idx.npz", write)


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, tuple[int, int], str]:
    path, size = job
    try:
        pixels, original = prepared_pixels(path, size)
        return pixels, original, ""
    except ArkfedError as exc:
        return None, (0, 0), str(exc)


def prepare_cache(
    folder: Path,
    sources: list[tuple[str, str]],
    size: int,
    workers: int = 0,
    shard_bytes: int = SHARD_BYTES,
    rebuild: bool = False,
    progress: ProgressCallback | None = None,
) -> PrepareReport:
    """Bring ``folder`` up to date for ``sources`` ((image id, path) pairs); resumable and incremental.

    Committed shards are kept; rows that are absent, or whose source's fingerprint changed, are
    decoded (``workers`` processes) into new shards. Broken shards and orphan pixel files are removed.
    """
    start = time.perf_counter()
    report = PrepareReport(folder=str(folder), size=size, images=len(sources))
    with _locked(folder):
        if rebuild:
            for p in folder.iterdir():
                if _SHARD.match(p.name):
                    p.unlink()
        index = CacheIndex.load(folder, size)
        report.dropped = list(index.broken) + [f"{p.name}: no index (an interrupted prepare)" for p in index.orphans]
        _remove_dropped(folder, index)
        index = CacheIndex.load(folder, size)
        pos = index.positions(key for key, _ in sources)
        todo = []
        for (key, path), p in zip(sources, pos):
            fp = fingerprint(path)
            if p >= 0 and (int(index.columns["src_size"][p]), int(index.columns["src_mtime"][p])) == fp:
                report.reused += 1
                continue
            todo.append((key, path, fp, p >= 0))
        if progress is not None:
            progress(0, len(todo))
        _write_shards(folder, index, todo, size, workers, shard_bytes, report, progress)
        final = CacheIndex.load(folder, size)
        report.shards, report.nbytes = len(final.shards), final.nbytes
    report.seconds = time.perf_counter() - start
    if report.changed:
        log.warning("cache %s: %d image(s) changed since they were prepared: re-decoded", folder, report.changed)
    return report


def _remove_dropped(folder: Path, index: CacheIndex) -> None:
    for p in index.orphans:
        p.unlink(missing_ok=True)
    for line in index.broken:
        stem = line.split(":", 1)[0]
        for suffix in (".bin", ".idx.npz"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)


def _write_shards(folder, index, todo, size, workers, shard_bytes, report, progress) -> None:
    number = max(index.shards, default=-1) + 1
    writer = None
    jobs = [(path, size) for _, path, _, _ in todo]
    pool = ProcessPoolExecutor(workers) if workers > 0 and len(todo) > 1 else None
    try:
        results = pool.map(_decode, jobs, chunksize=8) if pool else map(_decode, jobs)
        for done, ((key, _path, fp, known), (pixels, original, error)) in enumerate(zip(todo, results), start=1):
            if pixels is None:
                report.unreadable += 1
                if len(report.errors) < 5:
                    report.errors.append(error)
            else:
                if writer is None:
                    writer = _ShardWriter(folder, number, size)
                    number += 1
                writer.add(key, pixels, original, fp)
                report.changed += known
                report.new += not known
                if writer.nbytes >= shard_bytes:
                    writer.commit()
                    writer = None
            if progress is not None:
                progress(done, len(todo))
        if writer is not None:
            writer.commit()
            writer = None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if writer is not None:  # interrupted: leave no uncommitted pixels
            writer.file.close()
            writer.path.unlink(missing_ok=True)
