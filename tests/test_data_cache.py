"""The decoded-split cache: each image is decoded once across trials, and never served stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vpt_tune.data import cache, vtab
from vpt_tune.data.vtab import DataError, decode_split, load_split

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
