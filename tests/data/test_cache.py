"""The prepared-image cache: stored pixels equal a fresh decode, stale and broken parts are redone,
a prepare killed with SIGKILL resumes, and a site with ``cache: auto`` trains from it."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import arkfed.data.tables
from arkfed.data.cache import CachedImages, CacheIndex, CacheSettings, fit_resize
from arkfed.data.cache_prepare import prepare_cache
from arkfed.data.imageio import read_image
from arkfed.data.tables import DatasetTable, FileImages, make_meta
from arkfed.errors import ArkfedError
from arkfed.site.cache import open_cached, site_sources
from arkfed.site.config import SiteConfig, load_site_config

REPO = Path(__file__).resolve().parents[2]
SIZE = 40  # the cache's longer side in these tests; most images below are larger


def _write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n small X-ray-like files cycling through 8-bit PNG, 16-bit PNG and JPEG, of varying shapes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        kind = i % 3
        if kind == 0:
            path = folder / f"img{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
        elif kind == 1:
            path = folder / f"img{i:03d}_16.png"
            Image.fromarray(rng.integers(0, 4096, (h, w)).astype(np.uint16)).save(path)
        else:
            path = folder / f"img{i:03d}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _site(tmp_path: Path, n: int = 12, mode: str = "auto") -> tuple[SiteConfig, dict[str, DatasetTable]]:
    root = tmp_path / "data"
    paths = _write_images(root, n)
    config = SiteConfig(name="s", dataset="csv", root=root, cache=CacheSettings(mode=mode, size=SIZE, dir=tmp_path / "cache"))
    table = DatasetTable(FileImages(tuple(paths)), np.zeros((n, 1), np.float32), make_meta(n), ("a",))
    return config, {"train": table.subset(range(n - 3)), "val": table.subset(range(n - 3, n))}


def _expected(path: str) -> np.ndarray:
    return fit_resize(read_image(path), SIZE)


def _prepare(config, splits, **kw):
    return prepare_cache(Path(config.cache.dir) / f"{SIZE}px", site_sources(config, splits), SIZE, **kw)


def _all_equal_fresh_decode(splits) -> None:
    for table in splits.values():
        for i in range(len(table)):
            np.testing.assert_array_equal(table.images.read(i), _expected(table.images.describe(i)))


def test_cached_pixels_equal_a_fresh_decode_without_reading_the_files(tmp_path, monkeypatch):
    config, splits = _site(tmp_path)
    report = _prepare(config, splits)
    assert (report.new, report.reused, report.unreadable) == (12, 0, 0)
    cached, status = open_cached(config, splits)
    assert (status.rows, status.fresh, status.changed, status.missing) == (12, 12, 0, 0)
    assert status.nbytes <= 12 * SIZE * SIZE  # the memory bound: n x size^2 bytes of pixels at most
    expected = {t.images.describe(i): _expected(t.images.describe(i)) for t in splits.values() for i in range(len(t))}
    monkeypatch.setattr(arkfed.data.tables, "read_image", lambda p: (_ for _ in ()).throw(AssertionError(f"decoded {p}")))
    for table in cached.values():
        assert isinstance(table.images, CachedImages)
        for i in range(len(table)):
            pixels = table.images.read(i)
            assert max(pixels.shape) <= SIZE and pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, expected[table.images.describe(i)])
    # the row arrays are all a table carries: no pixels in RAM or in a pickle sent to a worker
    images = cached["train"].images
    images.read(0)
    assert len(pickle.dumps(images)) < 4000


def test_changed_source_is_redecoded_and_counted(tmp_path):
    config, splits = _site(tmp_path)
    _prepare(config, splits)
    path = splits["train"].images.paths[3]  # rewritten with other pixels and shape under the same name
    Image.fromarray(np.full((70, 50), 200, np.uint8)).save(path, format="JPEG")
    cached, status = open_cached(config, splits)
    assert (status.fresh, status.changed) == (11, 1)
    np.testing.assert_array_equal(cached["train"].images.read(3), _expected(path))
    report = _prepare(config, splits)
    assert (report.changed, report.reused, report.new) == (1, 11, 0)
    cached, status = open_cached(config, splits)
    assert status.fresh == 12
    _all_equal_fresh_decode(cached)


def test_truncated_shard_is_detected_served_from_files_and_rebuilt(tmp_path):
    config, splits = _site(tmp_path)
    _prepare(config, splits, shard_bytes=3000)  # several shards
    folder = Path(config.cache.dir) / f"{SIZE}px"
    index = CacheIndex.load(folder, SIZE)
    assert len(index.shards) >= 3
    victim = index.shard_path(index.shards[1])
    with victim.open("r+b") as f:
        f.truncate(victim.stat().st_size - 7)
    cached, status = open_cached(config, splits)
    assert len(status.broken) == 1 and "truncated" in status.broken[0] and status.missing > 0
    _all_equal_fresh_decode(cached)  # its rows decode their files: never wrong pixels
    report = _prepare(config, splits, shard_bytes=3000)
    assert report.dropped and report.decoded == status.missing and report.reused == status.fresh
    cached, status = open_cached(config, splits)
    assert status.fresh == 12 and not status.broken
    _all_equal_fresh_decode(cached)


def test_corrupt_bytes_of_same_length_fall_back_to_the_file(tmp_path):
    config, splits = _site(tmp_path)
    _prepare(config, splits)
    shard = CacheIndex.load(Path(config.cache.dir) / f"{SIZE}px", SIZE)
    path = shard.shard_path(shard.shards[0])
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF  # inside the first image; the length still matches the index
    path.write_bytes(bytes(data))
    cached, status = open_cached(config, splits)
    assert status.fresh == 12
    _all_equal_fresh_decode(cached)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from arkfed.data.cache_prepare import prepare_cache
    folder, kill_after = Path(sys.argv[1]), int(sys.argv[2])
    sources = [(Path(p).name, p) for p in sys.argv[3:]]
    def progress(done, total):
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    prepare_cache(folder, sources, {size}, shard_bytes=3000, progress=progress)
""")


def test_prepare_killed_midway_resumes_and_serves_right_pixels(tmp_path):
    config, splits = _site(tmp_path)
    folder = Path(config.cache.dir) / f"{SIZE}px"
    paths = [p for t in splits.values() for p in t.images.paths]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER.format(size=SIZE), str(folder), "8", *paths], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    before = CacheIndex.load(folder, SIZE)
    assert before.shards and len(before) < 12  # some shards committed, the rest not
    assert before.orphans  # the shard being written when killed has pixels but no index
    sources = [(Path(p).name, p) for p in paths]
    report = prepare_cache(folder, sources, SIZE, shard_bytes=3000, workers=2)  # decoding processes this time
    assert report.reused == len(before) and report.new == 12 - len(before) and report.dropped
    after = CacheIndex.load(folder, SIZE)
    assert not after.orphans and len(after) == 12
    pos = after.positions(k for k, _ in sources)
    for (_, path), p in zip(sources, pos):
        number, start = int(after.shard[p]), int(after.columns["offset"][p])
        h, w = int(after.columns["h"][p]), int(after.columns["w"][p])
        stored = np.fromfile(after.shard_path(number), dtype=np.uint8, count=h * w, offset=start).reshape(h, w)
        np.testing.assert_array_equal(stored, _expected(path))


def test_site_yaml_cache_auto_prepares_on_first_use_and_trains_identically(tmp_path):
    from arkfed.data.loaders import read_resized
    from arkfed.demo.generate import generate_demo_federation
    from arkfed.site.load import load_site
    from arkfed.site.validate import validate_site

    yaml = generate_demo_federation(tmp_path / "demo", size=32, counts={"demo-nih": 1, "demo-chexpert": 1, "demo-shenzhen": 20})[-1]
    plain = load_site(yaml)
    assert plain.cache is None
    yaml.write_text(yaml.read_text() + "cache: {mode: auto, dir: ../cache}\n")
    assert validate_site(yaml).cache.fresh == 0
    site = load_site(yaml)
    assert site.cache.fresh == site.cache.rows == sum(len(t) for t in plain.splits.values())
    assert (tmp_path / "demo" / "cache" / "512px").is_dir()
    train, ref = site.split("train"), plain.split("train")
    assert isinstance(train.images, CachedImages)
    for i in range(len(train)):  # 32 px images are stored as they are: the same tensors as from the files
        assert read_resized(train, i, 32).equal(read_resized(ref, i, 32))
    report = validate_site(yaml)
    assert report.ok and report.cache.fresh == report.cache.rows

    from typer.testing import CliRunner

    from arkfed.cli import app

    Path(plain.split("train").images.paths[0]).touch()  # one source changed since prepared
    out = CliRunner().invoke(app, ["prepare", str(yaml), "--verify"], catch_exceptions=False)
    assert out.exit_code == 0 and f"{report.cache.rows - 1} already prepared, 0 new, 1 changed" in " ".join(out.output.split())
    out = CliRunner().invoke(app, ["validate", str(yaml), "--no-check-images"], catch_exceptions=False)
    assert f"{report.cache.rows}/{report.cache.rows} images fresh" in " ".join(out.output.split())


def test_cache_setting_shorthand_and_errors(tmp_path):
    assert CacheSettings.model_validate("auto").mode == "auto"
    assert CacheSettings.model_validate(False).mode == "off"  # YAML's bare `off`
    site = tmp_path / "s.yaml"
    site.write_text("name: s\ndataset: csv\nroot: data\ncache: {mode: sometimes}\n")
    with pytest.raises(ArkfedError, match=r"s.yaml: field 'cache.mode'"):
        load_site_config(site)
    site.write_text("name: s\ndataset: csv\nroot: data\ncache: {mode: on, dir: c, size: 768}\n")
    config = load_site_config(site)
    assert config.cache.size == 768 and config.cache.dir == tmp_path / "c"


def test_dicom_sample_cached_like_the_reader(tmp_path, shared_data):
    dcm = next((shared_data / "samples").glob("*.dcm"), None)
    if dcm is None:
        pytest.skip("no DICOM sample in ../shared/data/samples")
    local = tmp_path / "x.dcm"
    shutil.copy(dcm, local)
    report = prepare_cache(tmp_path / "c", [("x", str(local))], 256)
    assert report.new == 1
    index = CacheIndex.load(tmp_path / "c", 256)
    h, w = int(index.columns["h"][0]), int(index.columns["w"][0])
    stored = np.fromfile(index.shard_path(index.shards[0]), dtype=np.uint8, count=h * w).reshape(h, w)
    original = read_image(local)
    assert (int(index.columns["orig_h"][0]), int(index.columns["orig_w"][0])) == original.shape and max(h, w) == 256
    np.testing.assert_array_equal(stored, fit_resize(original, 256))


def test_unwritable_cache_folder_warns_under_auto_and_fails_under_on(tmp_path, caplog):
    from arkfed.site.cache import attach_cache
    from arkfed.site.load import Site

    config, splits = _site(tmp_path)
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"dir": tmp_path / "blocked"})})
    site = Site(config=config, plugin=None, schema=None, splits=splits)
    with caplog.at_level("WARNING", logger="arkfed.site.cache"):
        same = attach_cache(site)
    assert same.cache is None and isinstance(same.splits["train"].images, FileImages)
    assert "decoding files" in caplog.text
    strict = Site(config=config.model_copy(update={"cache": config.cache.model_copy(update={"mode": "on"})}),
                  plugin=None, schema=None, splits=splits)
    with pytest.raises(ArkfedError, match="site 's': cannot prepare the image cache"):
        attach_cache(strict)
