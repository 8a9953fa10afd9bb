"""The node-local cache: demo assets, demo datasets, and decoded image splits.

VTAB-1k has no augmentation, so a split decoded and resized once is reused by every later epoch
and trial on the node (``.npy`` uint8 arrays). An entry's key hashes the list file's lines, every
image's size and modification time and the target size, so changed data never hits a stale entry.
The decoded cache is bounded (``VPT_TUNE_DECODED_CACHE_GB``, default 8): the least recently used
entries are deleted beyond it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_DECODED_LIMIT_GB = 8.0


def cache_dir() -> Path:
    """Directory for cached assets and data: ``$VPT_TUNE_CACHE`` if set, else ``~/.cache/vpt-tune``."""
    env = os.environ.get("VPT_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vpt-tune"


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
    """The cached array for ``key``, or None; a hit refreshes the entry's use time."""
    path = _decoded_dir() / f"{key}.npy"
    try:
        array = np.load(path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError):
        return None
    os.utime(path)
    return array


def save_decoded(key: str, array: np.ndarray) -> None:
    """Store ``array`` under ``key`` atomically, then evict least recently used entries over the limit."""
    directory = _decoded_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key}.{os.getpid()}.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, directory / f"{key}.npy")
    limit = float(os.environ.get("VPT_TUNE_DECODED_CACHE_GB", DEFAULT_DECODED_LIMIT_GB)) * 1024**3
    total = 0
    for used, size, entry in sorted(_entries(directory), reverse=True):  # most recently used first
        total += size
        if total > limit:
            entry.unlink(missing_ok=True)


def _entries(directory: Path) -> list[tuple[float, int, Path]]:
    found = []
    for entry in directory.glob("*.npy"):
        try:
            stat = entry.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        found.append((stat.st_mtime, stat.st_size, entry))
    return found


def _decoded_dir() -> Path:
    return cache_dir() / "decoded"
