"""The node-local cache: demo assets, demo datasets, and bounded stores of arrays shared by trials.

A :class:`Store` is a directory of ``.npy`` arrays under :func:`cache_dir`, by key: entries are
written atomically (a temporary file, then ``os.replace``), so concurrent trials never read half an
entry; an unreadable entry is a miss; beyond its size limit (an environment variable, in GB) the
least recently used entries are deleted. Keys must hash everything an entry depends on.

:data:`DECODED` holds decoded image splits: VTAB-1k has no augmentation, so a split decoded and
resized once is reused by every later epoch and trial on the node (uint8 arrays). Its key
(:func:`decoded_key`) hashes the list file's lines, every image's size and modification time and
the target size, so changed data never hits a stale entry (``VPT_TUNE_DECODED_CACHE_GB``, default 8).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_DECODED_LIMIT_GB = 8.0
STALE_TMP_S = 24 * 3600  # a temporary file this old was left by a crashed writer


def cache_dir() -> Path:
    """Directory for cached assets and data: ``$VPT_TUNE_CACHE`` if set, else ``~/.cache/vpt-tune``."""
    env = os.environ.get("VPT_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vpt-tune"


class Store:
    """Arrays by key in ``cache_dir()/<name>``, at most ``$<limit_env>`` GB (default ``default_gb``)."""

    def __init__(self, name: str, limit_env: str, default_gb: float):
        self.name, self.limit_env, self.default_gb = name, limit_env, default_gb

    @property
    def directory(self) -> Path:
        return cache_dir() / self.name

    def limit_bytes(self) -> float:
        return float(os.environ.get(self.limit_env, self.default_gb)) * 1024**3

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load(self, key: str, mmap: bool = False) -> np.ndarray | None:
        """The array stored under ``key``, or None (missing or unreadable); a hit refreshes its use time.

        ``mmap``: map the file copy-on-write instead of reading it (pages shared with other trials).
        """
        path = self.path(key)
        try:
            array = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
            os.utime(path)
        except (OSError, ValueError, EOFError):  # missing, truncated, corrupt, or evicted meanwhile
            return None
        return array

    def save(self, key: str, array: np.ndarray) -> bool:
        """Store ``array`` under ``key`` atomically, then evict least recently used entries over the limit.

        False when it was not stored: larger than the limit, or the write failed (e.g. a full disk).
        """
        limit = self.limit_bytes()
        if array.nbytes > limit:
            return False
        directory = self.directory
        tmp = directory / f".{key}.{os.getpid()}.{threading.get_ident()}.npy"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, self.path(key))
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        self._evict(limit)
        return True

    def _evict(self, limit: float) -> None:
        entries = []
        for entry in self.directory.glob("*.npy"):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if not entry.name.startswith("."):
                entries.append((stat.st_mtime, stat.st_size, entry))
            elif stat.st_mtime < time.time() - STALE_TMP_S:  # another writer's file, unless it is long dead
                entry.unlink(missing_ok=True)
        total = 0
        for _, size, entry in sorted(entries, reverse=True):  # most recently used first
            total += size
            if total > limit:
                entry.unlink(missing_ok=True)


DECODED = Store("decoded", "VPT_TUNE_DECODED_CACHE_GB", DEFAULT_DECODED_LIMIT_GB)


def decoded_key(entries: Sequence[tuple[Path, int]], img_size: int) -> str:
    """Cache key of a split's decoded images: paths, labels, file sizes and mtimes, and the size."""
    digest = hashlib.sha256(f"decoded-v1 {img_size}".encode())
    for path, label in entries:
        try:
            stat = path.stat()
            stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        except FileNotFoundError:
            stamp = "missing"
        digest.update(f"\n{path.resolve()} {label} {stamp}".encode())
    return digest.hexdigest()[:32]


def load_decoded(key: str) -> np.ndarray | None:
    """The decoded images cached under ``key``, or None."""
    return DECODED.load(key)


def save_decoded(key: str, array: np.ndarray) -> None:
    """Cache decoded images under ``key`` (see :meth:`Store.save`)."""
    DECODED.save(key, array)
