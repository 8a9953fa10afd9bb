"""The decoded-split cache: each image is decoded once across trials, and never served stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vpt_tune.data import cache, vtab
from vpt_tune.data.splits import DataError
from vpt_tune.data.vtab import decode_split, load_split

from test_data import _write_task


@pytest.fixture
def counted_decodes(monkeypatch, tmp_path):
    """A private cache dir and a counter of real image decodes."""
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = vtab.decode_image

    def counting(path, img_size):
        calls.append(path)
        return real(path, img_size)

    monkeypatch.setattr(vtab, "decode_image", counting)
    return calls


def test_two_trials_decode_each_image_once(tmp_path, counted_decodes):
    task = _write_task(tmp_path)
    first = load_split(task, "train800", 16, (0.5,) * 3, (0.5,) * 3, classes=4)
    assert len(counted_decodes) == 3
    second = load_split(task, "train800", 16, (0.0,) * 3, (1.0,) * 3, classes=4)  # another backbone's stats
    assert len(counted_decodes) == 3  # served from the cache
    assert np.array_equal(first.images.numpy(), second.images.numpy())
    assert np.array_equal(first.labels.numpy(), second.labels.numpy())
    load_split(task, "train800", 24, (0.5,) * 3, (0.5,) * 3, classes=4)  # another size: decoded again
    assert len(counted_decodes) == 6


def test_changed_image_or_list_is_never_stale(tmp_path, counted_decodes):
    task = _write_task(tmp_path)
    before, _ = decode_split(task, "train800", 8, classes=4)
    Image.new("RGB", (10, 7), (0, 0, 0)).save(task / "images" / "red.png")  # red -> black
    os.utime(task / "images" / "red.png", ns=(1, 1))  # even with an unusual mtime
    after, _ = decode_split(task, "train800", 8, classes=4)
    assert before[0].max() == 255 and after[0].max() == 0
    (task / "train800.txt").write_text("images/blue.png 2\n")
    images, labels = decode_split(task, "train800", 8, classes=4)
    assert len(images) == 1 and labels.tolist() == [2]


def test_cache_is_bounded(tmp_path, counted_decodes, monkeypatch):
    task = _write_task(tmp_path)
    monkeypatch.setenv("VPT_TUNE_DECODED_CACHE_GB", str(3 * 3 * 32 * 32 * 1.5 / 1024**3))  # ~1.5 entries
    decode_split(task, "train800", 32, classes=4)
    decode_split(task, "val200", 32, classes=4)
    assert len(list((cache.cache_dir() / "decoded").glob("*.npy"))) == 1  # the older one was evicted


def test_bad_image_is_not_cached(tmp_path, counted_decodes):
    task = _write_task(tmp_path)
    (task / "images" / "blue.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="blue.png"):
        decode_split(task, "train800", 8, classes=4)
    assert not list((cache.cache_dir() / "decoded").glob("*.npy"))


# ---------------------------------------------------------------- the store both caches use


@pytest.fixture
def store(monkeypatch, tmp_path) -> cache.Store:
    """A store in a private cache dir whose limit holds two 1000-byte entries (plus headers), not three."""
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VPT_TUNE_TEST_CACHE_GB", str(2500 / 1024**3))
    return cache.Store("test", "VPT_TUNE_TEST_CACHE_GB", 1.0)


def _array(value: int) -> np.ndarray:
    return np.full(1000, value, dtype=np.uint8)


def test_store_evicts_the_least_recently_used(store):
    assert store.save("a", _array(1)) and store.save("b", _array(2))
    os.utime(store.path("a"), (1000, 1000))  # a written first, b later...
    os.utime(store.path("b"), (2000, 2000))
    assert store.load("a")[0] == 1  # ...but a used last
    store.save("c", _array(3))
    assert store.load("b") is None  # the least recently used went
    assert store.load("a")[0] == 1 and store.load("c")[0] == 3
    assert sorted(p.name for p in store.directory.iterdir()) == ["a.npy", "c.npy"]  # no temporary files left


def test_store_mmap_load_and_too_large_entries(store):
    store.save("a", _array(7))
    mapped = store.load("a", mmap=True)
    assert isinstance(mapped, np.memmap) and mapped.flags.writeable and mapped[999] == 7
    mapped[0] = 0  # copy-on-write: the entry is unchanged
    assert store.load("a")[0] == 7
    assert not store.save("big", np.zeros(3000, dtype=np.uint8))  # larger than the whole limit: not stored
    assert store.load("big") is None and store.load("a") is not None


def test_store_ignores_other_writers_files_and_bad_entries(store):
    store.directory.mkdir(parents=True)
    writing = store.directory / f".x.{os.getpid() + 1}.1.npy"  # another process is writing this one
    writing.write_bytes(b"x" * 3000)
    stale = store.directory / ".y.1.1.npy"  # left by a writer that died long ago
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    store.path("bad").write_bytes(b"not an array")
    store.save("a", _array(1))
    assert writing.exists() and not stale.exists() and store.load("a") is not None
    assert store.load("bad") is None and store.load("missing") is None
    store.save("bad", _array(2))  # a bad entry is simply replaced
    assert store.load("bad")[0] == 2
