"""The VTAB-1k folder layout: list files of ``relative/path <label>`` lines and images on disk.

``<root>/<task>/{train800,val200,train800val200,test}.txt`` (UTF-8, a BOM is accepted); image paths are
relative to the task folder and must stay inside it: an absolute path, a ``..`` or a symlink that
leads outside is refused before any image is read. Listing one image twice with two labels is an
error, twice with one label a warning. A known VTAB-1k task (found by folder name, see
:mod:`vpt_tune.data.benchmarks`) has the benchmark's number of classes; a custom task's classes are those
of train800val200 (one more than its largest label), and a val200 label missing from train800 or a
test label missing from train800val200 is an error (for a known task, a warning: VTAB-1k's 800
training images do not cover all of sun397's classes).

Images are resized straight to the model size (no crop, no augmentation) and normalised with the
backbone's mean and std. Since there is no augmentation, a split is decoded once into a uint8 tensor
(cached on disk across trials, see :mod:`vpt_tune.data.cache`) and batches are normalised on the fly.
The checks of list entries and images here are shared with the FGVC layout (:mod:`vpt_tune.data.fgvc`).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vpt_tune.data.cache import decoded_key, load_decoded, save_decoded
from vpt_tune.data.splits import DataError, ImageSplit

SPLITS = ("train800", "val200", "train800val200", "test")

log = logging.getLogger(__name__)


class Entry(NamedTuple):
    """One listed image: its path (the base folder joined with the listed path), label, and where it is listed."""

    path: Path
    label: int
    where: str  # "<list file>:<line>" (VTAB-1k) or "<json file>" (FGVC: the key is the listed path)


@functools.cache
def warn_once(message: str) -> None:
    """Log ``message`` as a warning once per process (every split and trial reads the list files again)."""
    log.warning(message)


def read_text(path: Path) -> str:
    """The text of a list or JSON file: UTF-8, a leading BOM dropped; a DataError naming the line otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:  # err.object: the bytes after any BOM, which err.start counts in
        line = err.object[:err.start].count(b"\n") + 1
        byte = err.object[err.start]
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {byte:#04x}); save the file as UTF-8") from None


def _resolve_inside(path: Path, listed: str, bound: Path, real_bound: Path, where: str) -> Path:
    """The real path of the image ``path`` (listed as ``listed`` at ``where``); a DataError unless
    ``listed`` is relative and ``path`` resolves, symlinks followed, inside ``bound``."""
    if Path(listed).is_absolute():
        raise DataError(f"{where}: image path {listed!r} is absolute; write it relative to the task folder {bound}")
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):  # reported when decoded; where it points is checked now
        real = path.resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError up to Python 3.12), no permission
        raise DataError(f"{path}: cannot resolve the path ({err}); listed in {where}: fix the symlink or "
                        "remove that entry") from None
    if not real.is_relative_to(real_bound):
        link = " through a symlink" if Path(os.path.normpath(path)).is_relative_to(os.path.normpath(bound)) else ""
        raise DataError(f"{where}: image path {listed!r} leads{link} to {real}, outside the task folder {bound}; "
                        "move the image into the task folder (symlinks must point inside it too)")
    return real


def checked_entries(list_file: Path, bound: Path, rows: Iterable[tuple[int | None, Path, str, int]]) -> list[Entry]:
    """The entries of ``list_file`` from its ``(line or None, base folder, listed path, label)`` rows, in order.

    An image is ``base / listed path``; the listed path must be relative and resolve (symlinks followed)
    inside ``bound``, the task folder. The same image listed twice is an error with two labels and a
    warning with one (it then counts twice).
    """
    real_bound = bound.resolve()
    entries: list[Entry] = []
    seen: dict[Path, tuple[str, int]] = {}  # real path -> (position, label) of its first listing
    repeats: list[str] = []
    for line, base, listed, label in rows:
        where, position = (f"{list_file}:{line}", f"line {line}") if line else (str(list_file), f"key {listed!r}")
        path = base / listed
        real = _resolve_inside(path, listed, bound, real_bound, where)
        if real in seen:
            first, first_label = seen[real]
            if first_label != label:
                raise DataError(f"{list_file}: the same image {path} is listed with two labels, {first_label} "
                                f"({first}) and {label} ({position}); keep one entry with the right label")
            repeats.append(f"{path} ({first} and {position})")
        else:
            seen[real] = position, label
        entries.append(Entry(path, label, where))
    if repeats:
        more = f" and {len(repeats) - 1} more" if len(repeats) > 1 else ""
        warn_once(f"{list_file}: an image is listed twice with the same label, so it counts twice: {repeats[0]}{more}; "
                  "remove the repeated entries")
    return entries


def check_range(list_file: Path, entries: Iterable[tuple], classes: int, why: str | None = None) -> None:
    """Every label of the ``(path, label, ...)`` ``entries`` must be below ``classes``; ``why`` explains the count."""
    for path, label, *_ in entries:
        if label >= classes:
            raise DataError(f"{list_file}: label {label} of {path.name} is out of range [0, {classes}) "
                            f"({why or f'the task has {classes} classes'}): fix the label")


def check_trained(list_file: Path, entries: Sequence[Entry], train_file: Path, trained: set[int], custom: bool) -> None:
    """Labels of ``entries`` (of ``list_file``) that no entry of ``train_file`` (labels ``trained``) has: an
    error for a custom task, whose classes are its training labels; a warning for a known benchmark task."""
    untrained = [entry for entry in entries if entry.label not in trained]
    if not untrained:
        return
    if custom:
        path, label, where = untrained[0]
        raise DataError(f"{where}: label {label} of {path.name} occurs nowhere in {train_file.name}, so the model "
                        f"cannot learn it: fix the label, or add training images of class {label} to "
                        f"{train_file.name} (a custom task's classes are those of its training list)")
    labels = sorted({entry.label for entry in untrained})
    shown = ", ".join(map(str, labels[:10])) + (", ..." if len(labels) > 10 else "")
    warn_once(f"{list_file}: labels that no entry of {train_file.name} has: {shown} ({len(untrained)} of "
              f"{len(entries)} entries); the model cannot learn those classes")


def _read_entries(task_dir: Path, split: str) -> list[Entry]:
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file missing (expected the VTAB-1k layout {'/'.join(SPLITS)}.txt)")
    rows = []
    for lineno, line in enumerate(read_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.lstrip("-").isdigit() or int(label) < 0:
            raise DataError(f"{list_file}:{lineno}: expected '<relative/path> <label >= 0>', got {line!r}")
        rows.append((lineno, task_dir, path, int(label)))
    if not rows:
        raise DataError(f"{list_file}: the split is empty; list one '<relative/path> <label>' line per image")
    return checked_entries(list_file, task_dir, rows)


def read_list(task_dir: Path, split: str) -> list[tuple[Path, int]]:
    """Parse ``<task_dir>/<split>.txt`` into (image path, label) pairs; see the module for what is refused."""
    return [(path, label) for path, label, _ in _read_entries(task_dir, split)]


def num_classes(task_dir: Path, known: int | None = None) -> int:
    """Number of classes of the task at ``task_dir``, once all its list files are checked.

    ``known``: the class count of a known benchmark task; every label must be below it, and a class that
    training lacks is a warning. Otherwise (a custom task) one more than the largest label of
    train800val200; a val200 label missing from train800, or a test label missing from train800val200, is
    an error.
    """
    lists = {split: _read_entries(task_dir, split) for split in SPLITS}
    if known is None:
        classes = 1 + max(label for _, label, _ in lists["train800val200"])
        why = "the classes are counted from train800val200.txt and test.txt, which must hold every label"
        ranged: Sequence[str] = ("train800", "val200")  # test: a label missing from training is the error below
    else:
        classes, ranged = known, SPLITS
        why = f"{task_dir.name} is the VTAB-1k task with {known} classes; a custom task needs another folder name"
    for split in ranged:
        check_range(task_dir / f"{split}.txt", lists[split], classes, why)
    for split, train in (("val200", "train800"), ("test", "train800val200")):
        trained = {label for _, label, _ in lists[train]}
        check_trained(task_dir / f"{split}.txt", lists[split], task_dir / f"{train}.txt", trained, known is None)
    return classes


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``; any failure within the block is a one-line DataError naming ``path``.

    An image over ``Image.MAX_IMAGE_PIXELS`` (about 89 Mpx) is refused as a possible decompression bomb,
    like one over twice that (which Pillow refuses itself), instead of decoded with Pillow's warning: no
    benchmark image comes near that size, and every image is downscaled to a few hundred pixels anyway.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except FileNotFoundError:
        raise DataError(f"{path}: image does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: refused as a possible decompression bomb ({err}); downscale the image") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: unreadable or corrupt image ({err})") from None


def decode_image(path: Path, img_size: int) -> np.ndarray:
    """Read an image file as RGB, resized to (img_size, img_size): uint8 array (3, S, S)."""
    with open_image(path) as img:
        return resize_image(img, img_size)


def resize_image(img: Image.Image, img_size: int) -> np.ndarray:
    """An image as RGB, resized straight to (img_size, img_size) (bilinear): uint8 array (3, S, S)."""
    return np.asarray(img.convert("RGB").resize((img_size, img_size), Image.BILINEAR)).transpose(2, 0, 1)


def decode_split(task_dir: Path, split: str, img_size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, 3, S, S) and labels (N,) of ``split``; labels must be < ``classes``.

    Every image is checked (exists, decodes, label in range); the result is cached on disk.
    """
    images, labels, _ = _decode_split(task_dir, split, img_size, classes)
    return images, labels


def _decode_split(task_dir: Path, split: str, img_size: int, classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    entries = read_list(task_dir, split)
    check_range(task_dir / f"{split}.txt", entries, classes)
    key = decoded_key(entries, img_size)
    images = load_decoded(key)
    if images is None:
        try:
            images = np.stack([decode_image(path, img_size) for path, _ in entries])
        except DataError as err:
            raise DataError(f"{err}; listed in {task_dir / split}.txt: fix or remove that line") from None
        save_decoded(key, images)
    return images, np.array([label for _, label in entries], dtype=np.int64), key


def load_split(
    task_dir: Path, split: str, img_size: int, mean: Sequence[float], std: Sequence[float], classes: int
) -> ImageSplit:
    """The decoded ``split`` of the task at ``task_dir``, normalised with ``mean``/``std`` per batch."""
    images, labels, key = _decode_split(task_dir, split, img_size, classes)
    return ImageSplit(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        mean=torch.tensor(mean).view(1, 3, 1, 1),
        std=torch.tensor(std).view(1, 3, 1, 1),
        key=key,
    )
