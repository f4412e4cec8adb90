"""The data path alone: images/s of ONE worker, decoding each file vs reading the prepared-image cache.

For each format (8-bit PNG 1024^2 and a DICOM from ../shared/data/samples when present, plus
synthetic full-size 16-bit PNG and JPEG at 2500x3000 written into a temporary folder) and each
output size, one process with one thread runs :func:`arkfed.data.loaders.read_resized` over the files
through a plain ``FileImages`` table (decode + resize, today's path) and through the site cache
(``CachedImages``: memory map + CRC check + resize). Warm-up pass first, then ``--repeats``
timed passes: the table shows the median images/s and the spread (min-max), and the JSON has
every repeat. A DataLoader with W workers gets about W times this figure while cores are free.

    python benchmarks/datapath.py                       # 4 files per format, 5 repeats
    python benchmarks/datapath.py --files 8 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arkfed.data.cache_prepare import prepare_cache
from arkfed.data.loaders import read_resized
from arkfed.data.tables import DatasetTable, FileImages, make_meta
from arkfed.site.cache import open_cached, site_sources
from arkfed.site.config import SiteConfig

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "samples"


def xray_like(height: int, width: int, bits: int, seed: int) -> np.ndarray:
    """Smooth anatomy-like shading plus noise: compresses like a radiograph, not like white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    body = np.exp(-(((x - width / 2) / (0.35 * width)) ** 2 + ((y - height / 2) / (0.45 * height)) ** 2))
    lungs = np.exp(-(((np.abs(x - width / 2) - 0.18 * width) / (0.1 * width)) ** 2 + ((y - 0.45 * height) / (0.25 * height)) ** 2))
    ribs = 0.08 * np.sin(y / height * 60.0) * body
    image = 0.7 * body - 0.35 * lungs + ribs + rng.normal(0, 0.02, (height, width)).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    top = 2**bits - 1
    return np.round(image * top).astype(np.uint16 if bits > 8 else np.uint8)


def make_files(folder: Path, files: int) -> dict[str, list[str]]:
    """format name -> ``files`` paths of that format (copies: same decode cost, separate files)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Path] = {}
    nih = SAMPLES / "00000001_000.png"
    if nih.is_file():
        sources["PNG 8-bit 1024x1024 (NIH)"] = nih
    dicom = next(iter(sorted(SAMPLES.glob("*.dcm"))), None) if SAMPLES.is_dir() else None
    if dicom is not None:
        sources["DICOM 1024x1024 (RSNA)"] = dicom
    if "PNG 8-bit 1024x1024 (NIH)" not in sources:
        Image.fromarray(xray_like(1024, 1024, 8, 1)).save(folder / "synthetic8.png")
        sources["PNG 8-bit 1024x1024 (synthetic)"] = folder / "synthetic8.png"
    Image.fromarray(xray_like(3000, 2500, 16, 2)).save(folder / "synthetic16.png")
    sources["PNG 16-bit 2500x3000 (synthetic)"] = folder / "synthetic16.png"
    Image.fromarray(xray_like(3000, 2500, 8, 3)).save(folder / "synthetic.jpg", quality=95)
    sources["JPEG 2500x3000 (synthetic)"] = folder / "synthetic.jpg"
    out = {}
    for k, (name, src) in enumerate(sources.items()):
        paths = []
        for i in range(files):
            dst = folder / f"f{k}_{i}{src.suffix}"
            shutil.copyfile(src, dst)
            paths.append(str(dst))
        out[name] = paths
    return out


def table_of(paths: list[str]) -> DatasetTable:
    n = len(paths)
    return DatasetTable(FileImages(tuple(paths)), np.zeros((n, 1), np.float32), make_meta(n), ("x",))


def rate(table: DatasetTable, size: int) -> float:
    start = time.perf_counter()
    for i in range(len(table)):
        read_resized(table, i, size)
    return len(table) / (time.perf_counter() - start)


def timed(table: DatasetTable, size: int, repeats: int) -> list[float]:
    rate(table, size)  # warm-up: page cache, allocator, lazy imports, memory maps
    return [rate(table, size) for _ in range(repeats)]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4, help="files per format")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="224,512")
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--json", type=Path, default=Path("datapath.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker's view: DataLoader workers run single-threaded
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp) / "images", args.files)
        for name, paths in files.items():
            config = SiteConfig(name="bench", dataset="csv", root=Path(tmp) / "images",
                                cache={"mode": "auto", "size": args.cache_size, "dir": Path(tmp) / "cache" / str(len(rows))})
            splits = {"train": table_of(paths)}
            decodes = {size: summary(timed(splits["train"], size, args.repeats)) for size in sizes}  # also warms imports
            report = prepare_cache(Path(config.cache.dir) / f"{args.cache_size}px", site_sources(config, splits), args.cache_size)
            cached, _ = open_cached(config, splits)
            for size in sizes:
                decode = decodes[size]
                cache = summary(timed(cached["train"], size, args.repeats))
                rows.append({"format": name, "size": size, "decode": decode, "cache": cache,
                             "speedup": cache["median"] / decode["median"],
                             "prepare_images_per_s": report.decoded / report.seconds, "files": len(paths)})
                print(f"{name:34s} {size:4d} px  decode {decode['median']:8.1f} img/s ({decode['min']:.1f}-{decode['max']:.1f})"
                      f"   cache {cache['median']:8.1f} img/s ({cache['min']:.1f}-{cache['max']:.1f})   x{rows[-1]['speedup']:.1f}",
                      flush=True)
    from rich.console import Console
    from rich.table import Table

    title = f"data path, one worker (1 thread): images/s, median (min-max) of {args.repeats} runs; cache at {args.cache_size} px"
    table = Table(title=title)
    for column in ("format", "out px", "decode file", "cache", "speed-up", "prepare img/s"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for r in rows:
        d, c = r["decode"], r["cache"]
        table.add_row(r["format"], str(r["size"]), f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})",
                      f"{c['median']:.1f} ({c['min']:.1f}-{c['max']:.1f})", f"x{r['speedup']:.1f}", f"{r['prepare_images_per_s']:.1f}")
    Console(width=160).print(table)
    args.json.write_text(json.dumps({"benchmark": "datapath", "repeats": args.repeats, "cache_size": args.cache_size,
                                     "torch_threads": 1, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
