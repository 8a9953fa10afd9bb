"""A task's data, read by its benchmark's loader (:mod:`vtab` or :mod:`fgvc`): class counts, splits, and
the evaluation's preprocessing for new images. The benchmarks themselves: :mod:`vpt_tune.data.benchmarks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vpt_tune.data import fgvc, vtab
from vpt_tune.data.benchmarks import get_benchmark
from vpt_tune.data.splits import Batched, DataError, ImageSplit


def task_classes(benchmark: str, task_dir: Path) -> int:
    """Number of classes of the task at ``task_dir``, once its split files are checked: the benchmark's
    count for a known task (folder named as the task or an alias), else counted from its training lists."""
    bench = get_benchmark(benchmark)
    canonical = bench.canonical(task_dir.name)
    known = bench.tasks[canonical] if canonical else None
    return fgvc.num_classes(task_dir, known) if benchmark == "fgvc" else vtab.num_classes(task_dir, known)


@dataclass(frozen=True)
class TaskSize:
    """A task's classes and images per split, for plans made before its data is read."""

    classes: int
    images: dict[str, int]  # split -> images


def task_size(benchmark: str, task: str, task_dir: Path | None) -> TaskSize:
    """Classes and split sizes of ``task``: counted in ``task_dir`` when it exists (read, not decoded),
    else the benchmark's published figures for a known task; a DataError for an unknown task with no folder."""
    bench = get_benchmark(benchmark)
    if task_dir is not None and task_dir.is_dir():
        read = fgvc.read_json if benchmark == "fgvc" else vtab.read_list
        splits = (*bench.search_splits, *bench.final_splits)
        return TaskSize(task_classes(benchmark, task_dir), {split: len(read(task_dir, split)) for split in splits})
    canonical = bench.canonical(task)
    if canonical is None:
        raise DataError(f"task {task!r}: no folder to count its images in and not a known {benchmark} task; "
                             "point data.root at its folder")
    return TaskSize(bench.tasks[canonical], dict(bench.sizes[canonical]))


def task_split(
    benchmark: str,
    task_dir: Path,
    split: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    classes: int,
    train: bool,
) -> Batched:
    """``split`` of the task at ``task_dir``; ``train`` turns on FGVC's augmentation (VTAB-1k has none)."""
    get_benchmark(benchmark)
    if benchmark == "fgvc":
        return fgvc.load_split(task_dir, split, img_size, mean, std, classes, train)
    return vtab.load_split(task_dir, split, img_size, mean, std, classes)


def decode_task_split(benchmark: str, task_dir: Path, split: str, img_size: int, classes: int) -> int:
    """Decode (and cache) every image of ``split``, checking files and labels; the number of images."""
    get_benchmark(benchmark)
    decode = fgvc.decode_split if benchmark == "fgvc" else vtab.decode_split
    images, _ = decode(task_dir, split, img_size, classes)
    return len(images)


@dataclass(frozen=True)
class Preprocess:
    """What evaluation does to an image, for predictions on new ones: RGB; resized as the benchmark's
    evaluation split is (VTAB-1k: straight to ``img_size`` squared, bilinear; FGVC: shorter side to
    256/224 of ``img_size``, bilinear, then the central ``img_size`` square); scaled to [0, 1];
    normalised with the backbone's ``mean`` and ``std``. The numbers equal the evaluation's exactly."""

    benchmark: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """One PIL image or a sequence of them as a float batch (B, 3, S, S) for the model."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if self.benchmark == "fgvc":
            size = fgvc.resize_size(self.img_size)
            pixels = fgvc.center_crop(np.stack([fgvc.square_image(i, size, self.img_size) for i in images]),
                                      self.img_size)
        else:
            pixels = np.stack([vtab.resize_image(i, self.img_size) for i in images])
        split = ImageSplit(torch.from_numpy(pixels), torch.zeros(len(images), dtype=torch.int64),
                                torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1))
        return split.inputs(torch.arange(len(images)))  # the evaluation's own arithmetic
