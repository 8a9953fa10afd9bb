"""Built-in demo tasks, materialised on first use into the VTAB-1k layout as real image files.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).
- ``fashion_mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` when installed.

Each task gets 800 train / 200 val images (and their union) plus a held-out test split, so the
demo goes through the same loader as a real VTAB-1k task.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vpt_tune.data.splits import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN, VAL = 800, 200


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_mnist(test_size: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    if not FASHION_MNIST_DIR.is_dir():
        raise DataError(
            f"demo task 'fashion_mnist' needs {FASHION_MNIST_DIR}: install it with "
            "`apt-get install dataset-fashion-mnist`, or use the 'digits' demo task"
        )
    # The first TRAIN+VAL training images and the first `test_size` test images: small like VTAB-1k.
    train = _read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[: TRAIN + VAL]
    train_labels = _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[: TRAIN + VAL]
    test = _read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:test_size]
    test_labels = _read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:test_size]
    return np.concatenate([train, test]), np.concatenate([train_labels, test_labels]).astype(np.int64)


DEMO_TASKS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
}


DEMO_CLASSES = 10  # both demo tasks
# Images per split once materialised (digits: 1,797 images in all; fashion_mnist: 2,000 test images).
DEMO_SIZES = {task: {"train800": TRAIN, "val200": VAL, "train800val200": TRAIN + VAL, "test": test}
              for task, test in (("digits", 797), ("fashion_mnist", 2000))}


def available_demo_tasks() -> list[str]:
    """Demo tasks whose source data is present on this machine."""
    return [name for name in DEMO_TASKS if name != "fashion_mnist" or FASHION_MNIST_DIR.is_dir()]


def materialise(task: str, root: Path, seed: int = 0) -> Path:
    """Write demo ``task`` under ``root/task`` in the VTAB-1k layout unless already there; return its folder."""
    if task not in DEMO_TASKS:
        raise DataError(f"unknown demo task {task!r}; demo tasks: {', '.join(DEMO_TASKS)}")
    task_dir = root / task
    if (task_dir / "test.txt").is_file():
        return task_dir
    images, labels = DEMO_TASKS[task]()
    # fashion_mnist keeps its official train/test separation; digits is shuffled once with `seed`.
    order = np.random.default_rng(seed).permutation(len(labels)) if task == "digits" else np.arange(len(labels))
    splits = {"train800": order[:TRAIN], "val200": order[TRAIN:TRAIN + VAL], "test": order[TRAIN + VAL:]}
    splits["train800val200"] = order[:TRAIN + VAL]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root))
    (staging / "images").mkdir()
    for i in order:
        Image.fromarray(images[i]).save(staging / "images" / f"{i:05d}.png")
    for split, indices in splits.items():
        lines = [f"images/{i:05d}.png {labels[i]}" for i in indices]
        (staging / f"{split}.txt").write_text("\n".join(lines) + "\n")
    try:
        staging.rename(task_dir)  # atomic: a half-written task folder is never visible
    except OSError:  # another process materialised it first
        shutil.rmtree(staging, ignore_errors=True)
    return task_dir
