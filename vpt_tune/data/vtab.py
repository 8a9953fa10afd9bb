"""The VTAB-1k folder layout: list files of ``relative/path <label>`` lines and images on disk.

``<root>/<task>/{train800,val200,train800val200,test}.txt``; image paths are relative to the task
folder. Images are resized straight to the model size (no crop, no augmentation) and normalised
with the backbone's mean and std. Since there is no augmentation, a split is decoded once into a
uint8 tensor (cached on disk across trials, see :mod:`vpt_tune.data.cache`) and batches are
normalised on the fly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vpt_tune.data.cache import decoded_key, load_decoded, save_decoded
from vpt_tune.errors import UserError

SPLITS = ("train800", "val200", "train800val200", "test")


class DataError(UserError, ValueError):
    """A dataset that is missing or malformed; the message names the file and the problem."""


def read_list(task_dir: Path, split: str) -> list[tuple[Path, int]]:
    """Parse ``<task_dir>/<split>.txt`` into (image path, label) pairs."""
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file missing (expected the VTAB-1k layout {'/'.join(SPLITS)}.txt)")
    entries = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.lstrip("-").isdigit() or int(label) < 0:
            raise DataError(f"{list_file}:{lineno}: expected '<relative/path> <label >= 0>', got {line!r}")
        entries.append((task_dir / path, int(label)))
    if not entries:
        raise DataError(f"{list_file}: the split is empty; list one '<relative/path> <label>' line per image")
    return entries


def num_classes(task_dir: Path) -> int:
    """Number of classes of a task: one more than the largest label in its train+val and test lists."""
    return 1 + max(label for split in ("train800val200", "test") for _, label in read_list(task_dir, split))


def decode_image(path: Path, img_size: int) -> np.ndarray:
    """Read an image file as RGB, resized to (img_size, img_size): uint8 array (3, S, S)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((img_size, img_size), Image.BILINEAR)
    except FileNotFoundError:
        raise DataError(f"{path}: image does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: unreadable or corrupt image ({err})") from None
    return np.asarray(rgb).transpose(2, 0, 1)


class Batched:
    """Batches of ``(inputs, labels)`` over a split that has ``labels`` and ``inputs(indices)``."""

    labels: torch.Tensor
    augmented: bool = False  # batches differ between epochs: inputs cannot be cached

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, indices: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in order, or shuffled when a ``generator`` is given; restricted to ``indices``."""
        order = torch.arange(len(self)) if indices is None else indices
        if generator is not None:
            order = order[torch.randperm(len(order), generator=generator)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.inputs(idx), self.labels[idx]


@dataclass
class ImageSplit(Batched):
    """One decoded split: uint8 images (N, 3, S, S), int64 labels (N,), normalisation constants, and
    ``key``, the images' cache key (:func:`decoded_key`) when known: caches derived from the images use it."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    key: str | None = None

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, S, S)."""
        return (self.images[indices].float() / 255.0 - self.mean) / self.std


def decode_split(task_dir: Path, split: str, img_size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, 3, S, S) and labels (N,) of ``split``; labels must be < ``classes``.

    Every image is checked (exists, decodes, label in range); the result is cached on disk.
    """
    images, labels, _ = _decode_split(task_dir, split, img_size, classes)
    return images, labels


def _decode_split(task_dir: Path, split: str, img_size: int, classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    entries = read_list(task_dir, split)
    for path, label in entries:
        if label >= classes:
            raise DataError(
                f"{task_dir / split}.txt: label {label} of {path.name} is out of range [0, {classes}) "
                "(the classes are counted from train800val200.txt and test.txt, which must hold every label)"
            )
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
