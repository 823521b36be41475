"""The scan cache: rescans reuse rows of unchanged files and give the same manifest, byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from components.common.config import DataConfig, ValidationConfig
from components.data import scan_cache
from components.data.scan import scan_folder
from tests.conftest import write_photo

CFG, VALIDATION = DataConfig(), ValidationConfig()


def _csv(root: Path, cache: Path | None) -> tuple[str, int]:
    result = scan_folder(root, CFG, VALIDATION, seed=0, cache_path=cache)
    return result.manifest.to_csv(index=False), result.from_cache


@pytest.fixture
def data(photo_root: Path) -> Path:
    (photo_root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return photo_root


def test_warm_scan_reads_nothing_and_writes_the_same_manifest(data: Path, tmp_path: Path) -> None:
    cache = scan_cache.cache_file(tmp_path / "cache", data)
    fresh, _ = _csv(data, None)
    cold, cold_hits = _csv(data, cache)
    warm, warm_hits = _csv(data, cache)
    assert cold_hits == 0 and warm_hits == 17
    assert fresh == cold == warm  # the undecodable file's reason is cached too
    assert "broken.jpg" in warm


def test_changed_new_and_deleted_files_are_seen(data: Path, tmp_path: Path) -> None:
    cache = scan_cache.cache_file(tmp_path / "cache", data)
    _csv(data, cache)
    changed = data / "cats" / "0.jpg"
    before = os.stat(changed)
    write_photo(changed, seed=999)  # other pixels, same path
    # a filesystem with a coarse clock may keep the time: move it on, as any later write would
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    write_photo(data / "cats" / "new.jpg", seed=1000)
    (data / "dogs" / "1.jpg").unlink()
    warm, hits = _csv(data, cache)
    assert hits == 17 - 1 - 1  # all but the changed one and the deleted one
    assert warm == _csv(data, None)[0]
    assert "dogs/1.jpg" not in warm and "cats/new.jpg" in warm
    rows = scan_cache.load(cache, VALIDATION.max_image_pixels)
    assert len(rows) == 17 and not any(k[0].endswith("dogs/1.jpg") for k in rows)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other-limit"])
def test_a_damaged_or_foreign_cache_is_rebuilt(data: Path, tmp_path: Path, damage: str) -> None:
    cache = scan_cache.cache_file(tmp_path / "cache", data)
    expected, _ = _csv(data, cache)
    if damage == "garbage":
        cache.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1500])
    elif damage == "empty":
        cache.write_bytes(b"")
    else:
        scan_cache.save(cache, [], VALIDATION.max_image_pixels + 1)
    manifest, hits = _csv(data, cache)
    assert manifest == expected and hits == 0
    assert _csv(data, cache) == (expected, 17)  # rebuilt


def test_the_cache_is_replaced_atomically(data: Path, tmp_path: Path) -> None:
    cache = scan_cache.cache_file(tmp_path / "cache", data)
    _csv(data, cache)
    first_inode = os.stat(cache).st_ino
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    _csv(data, cache)
    assert os.stat(cache).st_ino == first_inode  # nothing changed: nothing rewritten
    write_photo(data / "dogs" / "new.jpg", seed=7)
    _csv(data, cache)
    assert os.stat(cache).st_ino != first_inode  # a new file moved in, not one written over
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary file left
    # another folder has a cache of its own
    assert scan_cache.cache_file(tmp_path / "cache", copy) != cache
