"""The FGVC layout of VPT (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars): JSON splits.

``<task_dir>/{train,val,test}.json`` (UTF-8, a BOM is accepted) each map ``relative/image/path`` to a
class id. Images live under ``images/`` (CUB, NABirds), ``Images/`` (Stanford Dogs) or the task folder
itself (Cars, Flowers); the root is detected. Paths must stay inside the task folder, and a key
repeated with two ids is an error (with one id, a warning), as for VTAB-1k (:mod:`vpt_tune.data.vtab`).

Class ids (ints or strings of ints, CUB's start at 1) are remapped to 0..C-1 by the sorted order of
train.json's ids, so a class gets the same label in every split. A custom task's classes are those
of train.json: an id that only val.json or test.json has is an error. A known FGVC task (by folder
name, see :mod:`vpt_tune.data.benchmarks`) has the benchmark's number of classes; an id its train.json
lacks is a warning and takes the labels after train.json's (in sorted order), and every label must
be below that number. (VPT maps each file's own ids, which is the same when train.json holds every
class.)

VPT's transforms: resize the shorter side to R (256 for S = 224), then a random S crop and a
horizontal flip for training, a center crop for evaluation. Decoding dominates a small trial, so
every image is decoded once per (task, size) to a uint8 R x R square (cached on disk, see
:mod:`vpt_tune.data.cache`) and crops and flips are drawn per batch from those squares. Evaluation
is exactly VPT's; a training crop of a non-square image moves within the square rather than along
its whole long side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vpt_tune.data.cache import decoded_key, load_decoded, save_decoded
from vpt_tune.data.splits import Batched, DataError, ImageSplit
from vpt_tune.data.vtab import (
    Entry,
    check_range,
    check_trained,
    checked_entries,
    open_image,
    read_text,
)

SPLITS = ("train", "val", "test")
IMAGE_ROOTS = ("images", "Images", ".")


def resize_size(img_size: int) -> int:
    """VPT's resize size for crop size ``img_size``: 256 for 224, 512 for 448, 438 for 384 (S * 256 / 224, floored)."""
    return img_size * 256 // 224


class _Object(list):
    """A JSON object as its ``(key, value)`` pairs in file order, repeated keys kept (``object_pairs_hook``)."""


def _read_ids(json_file: Path) -> list[tuple[str, int]]:
    """The ``(relative path, class id)`` pairs of one split file in file order, ids as ints (not yet remapped)."""
    if not json_file.is_file():
        raise DataError(
            f"{json_file}: split file missing (expected the FGVC layout {'/'.join(SPLITS)}.json, "
            "each a JSON object {\"relative/image/path\": class_id})"
        )
    try:
        data = json.loads(read_text(json_file), object_pairs_hook=_Object)
    except json.JSONDecodeError as err:
        raise DataError(f"{json_file}: not valid JSON ({err})") from None
    if not isinstance(data, _Object):
        raise DataError(f"{json_file}: expected a JSON object {{\"relative/image/path\": class_id}}, "
                        f"got a {type(data).__name__}")
    ids = []
    for path, value in data:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{json_file}: the class id of {path!r} must be an integer, got {value!r}")
        ids.append((path, value))
    return ids


def image_root(task_dir: Path, split: str, first: str) -> Path:
    """The folder images of ``split`` are relative to: the first of images/, Images/, . holding ``first``."""
    for name in IMAGE_ROOTS:
        root = task_dir / name if name != "." else task_dir
        if (root / first).is_file():
            return root
    raise DataError(
        f"{task_dir / split}.json: its first image {first!r} is in none of "
        f"{', '.join(str(task_dir / name) + '/' for name in IMAGE_ROOTS[:2])} or {task_dir}/ "
        "(put the images there, with the paths of the json file relative to it)"
    )


def _read_entries(task_dir: Path, split: str) -> list[Entry]:
    """The checked entries of ``<task_dir>/<split>.json``, labels still the original class ids."""
    json_file = task_dir / f"{split}.json"
    ids = _read_ids(json_file)
    if not ids:
        raise DataError(f"{json_file}: the split is empty; map each image path to its class id")
    root = image_root(task_dir, split, ids[0][0])
    return checked_entries(json_file, task_dir, [(None, root, path, class_id) for path, class_id in ids])


def _read_splits(task_dir: Path, split: str = "train") -> dict[str, list[Entry]]:
    """The entries of every split file present; train.json's and ``split``'s must exist."""
    return {
        name: _read_entries(task_dir, name)
        for name in SPLITS if name in ("train", split) or (task_dir / f"{name}.json").is_file()
    }


def _class_map(splits: dict[str, list[Entry]]) -> dict[int, int]:
    """Original class id -> contiguous label: train's ids in sorted order, then those only other splits have."""
    trained = sorted({entry.label for entry in splits["train"]})
    others = sorted({entry.label for entries in splits.values() for entry in entries} - set(trained))
    return {class_id: label for label, class_id in enumerate(trained + others)}


def read_json(task_dir: Path, split: str) -> list[tuple[Path, int]]:
    """Parse ``<task_dir>/<split>.json`` into (image path, contiguous label) pairs, in file order.

    Every split file is read (the labels depend on train.json's ids); see the module for what is refused.
    """
    splits = _read_splits(task_dir, split)
    labels = _class_map(splits)
    return [(path, labels[class_id]) for path, class_id, _ in splits[split]]


def num_classes(task_dir: Path, known: int | None = None) -> int:
    """Number of classes of the task at ``task_dir``, once all its split files are checked.

    ``known``: the class count of a known benchmark task; every label must be below it, and a class id
    that train.json lacks is a warning. Otherwise (a custom task) the distinct class ids of train.json;
    an id that only val.json or test.json has is an error.
    """
    splits = _read_splits(task_dir)
    trained = {entry.label for entry in splits["train"]}
    for split, entries in splits.items():
        if split != "train":
            check_trained(task_dir / f"{split}.json", entries, task_dir / "train.json", trained, known is None)
    if known is None:
        return len(trained)
    labels = _class_map(splits)
    why = (f"{task_dir.name} is the FGVC task with {known} classes, and its {len(labels)} class ids take the labels "
           f"0..{len(labels) - 1} in sorted order; a custom task needs another folder name")
    for split, entries in splits.items():
        check_range(task_dir / f"{split}.json", [(path, labels[class_id]) for path, class_id, _ in entries], known, why)
    return known


def decode_image(path: Path, size: int, crop: int) -> np.ndarray:
    """Read an image as RGB, shorter side resized to ``size`` (R), and keep an R x R square: uint8 (3, R, R)
    (see :func:`square_image`)."""
    with open_image(path) as img:
        return square_image(img, size, crop)


def square_image(img: Image.Image, size: int, crop: int) -> np.ndarray:
    """An image as RGB, shorter side resized to ``size`` (R), and an R x R square of it: uint8 (3, R, R).

    VPT resizes the shorter side (``Resize(256)``) and crops 224 from the whole resized image. The
    square is placed so that its :func:`center_crop` to ``crop`` (S) is exactly VPT's center crop of
    the whole image; training crops then move within the square (up to R - S pixels each way)
    instead of along the whole long side.
    """
    rgb = img.convert("RGB")
    width, height = rgb.size
    if width <= height:  # the long side is truncated, like torchvision's Resize(int)
        new = (size, max(size, int(size * height / width)))
    else:
        new = (max(size, int(size * width / height)), size)
    rgb = rgb.resize(new, Image.BILINEAR)
    # torchvision's CenterCrop offset on the whole image, minus center_crop's offset within the square
    left = round((new[0] - crop) / 2) - round((size - crop) / 2)
    top = round((new[1] - crop) / 2) - round((size - crop) / 2)
    return np.asarray(rgb)[top:top + size, left:left + size].transpose(2, 0, 1)


def center_crop(images: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop`` x ``crop`` of (N, 3, R, R) images (offsets rounded like torchvision's CenterCrop)."""
    start = round((images.shape[-1] - crop) / 2)
    return np.ascontiguousarray(images[..., start:start + crop, start:start + crop])


def _key(entries: Sequence[tuple[Path, int]], size: int, crop: int) -> str:
    # cache.decoded_key has no tag parameter: hash its key again with a prefix (and the crop size, which
    # places the square), so this decode never shares an entry with a VTAB decode of the same files.
    tag = f"fgvc-shorter-side-square-v1 {crop} {decoded_key(entries, size)}"
    return hashlib.sha256(tag.encode()).hexdigest()[:32]


def decode_split(task_dir: Path, split: str, img_size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, 3, R, R), R = :func:`resize_size` (img_size), and labels (N,) of ``split``.

    Every image is checked (exists, decodes, label < ``classes``); the result is cached on disk.
    """
    entries = read_json(task_dir, split)
    check_range(task_dir / f"{split}.json", entries, classes)
    size = resize_size(img_size)
    key = _key(entries, size, img_size)
    images = load_decoded(key)
    if images is None:
        try:
            images = np.stack([decode_image(path, size, img_size) for path, _ in entries])
        except DataError as err:
            raise DataError(f"{err}; listed in {task_dir / split}.json: fix or remove that entry") from None
        save_decoded(key, images)
    return images, np.array([label for _, label in entries], dtype=np.int64)


@dataclass
class AugmentedSplit(Batched):
    """A training split: uint8 images (N, 3, R, R) cropped to S at random and flipped per batch.

    The crops and flips come from torch's global RNG, so ``torch.manual_seed`` makes a run repeatable.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    crop: int

    augmented = True

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, S, S): an independent random crop and horizontal flip each."""
        batch, size, crop = len(indices), self.images.shape[-1], self.crop
        top = torch.randint(0, size - crop + 1, (batch,)).tolist()
        left = torch.randint(0, size - crop + 1, (batch,)).tolist()
        flip = (torch.rand(batch) < 0.5).tolist()
        # A copy per image of a strided view is ~10x faster on CPU than one advanced-indexing gather.
        crops = self.images.new_empty((batch, self.images.shape[1], crop, crop))
        for i, (index, y, x, mirror) in enumerate(zip(indices.tolist(), top, left, flip)):
            view = self.images[index, :, y:y + crop, x:x + crop]
            crops[i] = view.flip(-1) if mirror else view
        return crops.float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)


def load_split(
    task_dir: Path,
    split: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    classes: int,
    train: bool,
) -> Batched:
    """``split`` of the FGVC task at ``task_dir``: randomly cropped and flipped when ``train``, else center-cropped."""
    images, labels = decode_split(task_dir, split, img_size, classes)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    if train:
        return AugmentedSplit(torch.from_numpy(images), torch.from_numpy(labels), mean_t, std_t, crop=img_size)
    return ImageSplit(torch.from_numpy(center_crop(images, img_size)), torch.from_numpy(labels), mean_t, std_t)
