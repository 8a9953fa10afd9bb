"""VTAB-1k layout loading on generated image folders, and the built-in demo tasks."""

from __future__ import annotations

import functools
import gzip
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vpt_tune.data import demo, vtab
from vpt_tune.data.tasks import task_classes
from vpt_tune.data.splits import DataError, ImageSplit
from vpt_tune.data.vtab import load_split, num_classes, read_list

from conftest import require

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)

# name, size (w, h), colour, format
IMAGES = [
    ("red.png", (10, 7), (255, 0, 0), "PNG"),
    ("sub/green.jpg", (40, 24), (0, 200, 0), "JPEG"),
    ("blue.png", (16, 16), (0, 0, 255), "PNG"),
    ("grey.jpg", (7, 33), (128, 128, 128), "JPEG"),
    ("teal.png", (32, 32), (0, 128, 128), "PNG"),
]


def _write_task(root: Path) -> Path:
    """A VTAB-1k task folder ``toy`` with real PNG/JPEG files of different sizes and the four list files.

    A custom task of 4 classes (one more than the largest training label; class 2 has no image): val200's
    labels are in train800 and test's in train800val200, as a custom task needs.
    """
    task = root / "toy"
    for name, size, colour, fmt in IMAGES:
        path = task / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(path, format=fmt)
    lines = {
        "train800": ["images/red.png 0", "images/sub/green.jpg 1", "", "images/blue.png 3"],
        "val200": ["images/grey.jpg 1", "images/teal.png 0"],
        "test": ["images/teal.png 3", "images/red.png 0"],
    }
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, content in lines.items():
        (task / f"{split}.txt").write_text("\n".join(content) + "\n")
    return task


@pytest.fixture
def task(tmp_path) -> Path:
    return _write_task(tmp_path)


def _index_split(n: int) -> ImageSplit:
    """Image i is the constant value i (so a batch tells which examples it holds); mean 0, std 1."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    return ImageSplit(images, torch.arange(n), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0] * 255).round().long().tolist()


# ---------------------------------------------------------------- reading the layout


def test_read_list(task):
    entries = read_list(task, "train800")
    assert entries == [(task / "images/red.png", 0), (task / "images/sub/green.jpg", 1), (task / "images/blue.png", 3)]
    assert all(path.is_file() for path, _ in read_list(task, "train800val200"))


def test_num_classes_of_a_custom_task_counts_its_training_labels(task):
    assert num_classes(task) == 4  # the largest label of train800val200 is 3
    (task / "train800val200.txt").write_text("images/red.png 0\nimages/sub/green.jpg 1\nimages/blue.png 5\n")
    (task / "test.txt").write_text("images/teal.png 5\n")
    assert num_classes(task) == 6


def test_load_split_decodes_every_image(task):
    split = load_split(task, "train800", 12, MEAN, STD, classes=4)
    assert len(split) == 3
    assert split.images.shape == (3, 3, 12, 12) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [0, 1, 3] and split.labels.dtype == torch.long
    # each image is resized whole (no crop) to S x S: a constant image stays its colour everywhere
    for image, (_, _, colour, fmt) in zip(split.images, [IMAGES[0], IMAGES[1], IMAGES[2]]):
        expected = torch.tensor(colour, dtype=torch.float).view(3, 1, 1).expand(3, 12, 12)
        tolerance = 0 if fmt == "PNG" else 3  # JPEG is lossy
        assert (image.float() - expected).abs().max() <= tolerance


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    task = tmp_path / "modes"
    (task / "images").mkdir(parents=True)
    Image.new("L", (9, 9), 77).save(task / "images/g.png")
    Image.new("RGBA", (9, 9), (10, 20, 30, 128)).save(task / "images/a.png")
    (task / "test.txt").write_text("images/g.png 0\nimages/a.png 1\n")
    split = load_split(task, "test", 8, MEAN, STD, classes=2)
    assert split.images.shape == (2, 3, 8, 8)
    assert (split.images[0] == 77).all()
    assert split.images[1, :, 0, 0].tolist() == [10, 20, 30]


def test_batches_are_normalised_with_mean_and_std(task):
    split = load_split(task, "val200", 8, MEAN, STD, classes=4)
    teal = torch.tensor([0, 128, 128]) / 255.0
    expected = (teal - torch.tensor(MEAN)) / torch.tensor(STD)
    images, labels = next(split.batches(batch_size=2))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 8, 8)
    assert labels.tolist() == [1, 0]
    for channel in range(3):
        assert torch.allclose(images[1, channel], expected[channel].expand(8, 8), atol=1e-6)


def test_batches_in_order_without_generator():
    split = _index_split(10)
    batches = list(split.batches(4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert [i for images, _ in batches for i in _ids(images)] == list(range(10))
    assert torch.cat([labels for _, labels in batches]).tolist() == list(range(10))


def test_shuffling_permutes_and_covers_every_example():
    split = _index_split(50)
    orders = []
    for seed in (0, 0, 1):
        gen = torch.Generator().manual_seed(seed)
        batches = list(split.batches(8, gen))
        ids = [i for images, _ in batches for i in _ids(images)]
        # images and labels stay paired
        assert ids == torch.cat([labels for _, labels in batches]).tolist()
        orders.append(ids)
    assert sorted(orders[0]) == list(range(50))
    assert orders[0] != list(range(50))
    assert orders[0] == orders[1]  # same seed, same order
    assert orders[0] != orders[2]


def test_indices_restrict_batches_to_a_shard():
    split = _index_split(20)
    shard = torch.arange(1, 20, 3)
    assert [i for images, _ in split.batches(4, indices=shard) for i in _ids(images)] == shard.tolist()
    shuffled = [i for images, _ in split.batches(4, torch.Generator().manual_seed(0), shard) for i in _ids(images)]
    assert sorted(shuffled) == shard.tolist() and shuffled != shard.tolist()


# ---------------------------------------------------------------- errors name the file


def test_missing_list_file(task):
    (task / "val200.txt").unlink()
    with pytest.raises(DataError, match="val200.txt") as err:
        read_list(task, "val200")
    assert str(task) in str(err.value)


@pytest.mark.parametrize("line", ["images/red.png", "images/red.png x", "images/red.png -1", " 3"])
def test_malformed_line(task, line):
    (task / "test.txt").write_text(f"images/teal.png 0\n{line}\n")
    with pytest.raises(DataError, match=r"test\.txt:2"):
        read_list(task, "test")


def test_missing_image(task):
    (task / "test.txt").write_text("images/teal.png 0\nimages/nope.png 1\n")
    with pytest.raises(DataError, match="nope.png"):
        load_split(task, "test", 8, MEAN, STD, classes=4)


@pytest.mark.parametrize("content", [b"this is not a jpeg at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_corrupt_image(task, content):
    (task / "images" / "bad.jpg").write_bytes(content)
    (task / "test.txt").write_text("images/teal.png 0\nimages/bad.jpg 1\n")
    with pytest.raises(DataError, match="bad.jpg"):
        load_split(task, "test", 8, MEAN, STD, classes=4)


def test_truncated_image(task):
    data = (task / "images" / "sub" / "green.jpg").read_bytes()
    (task / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (task / "test.txt").write_text("images/cut.jpg 1\n")
    with pytest.raises(DataError, match="cut.jpg"):
        load_split(task, "test", 8, MEAN, STD, classes=4)


def test_label_out_of_range(task):
    with pytest.raises(DataError, match=r"test\.txt.*label 3"):
        load_split(task, "test", 8, MEAN, STD, classes=3)


def test_empty_split(task):
    (task / "val200.txt").write_text("\n   \n")
    with pytest.raises(DataError, match=r"val200\.txt.*empty"):
        read_list(task, "val200")


# ---------------------------------------------------------------- the data stays inside its task folder


def _no_decoding(monkeypatch):
    """Fail the test if any image is opened: what is refused must be refused before."""

    def refuse(path, img_size):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(vtab, "decode_image", refuse)


@pytest.mark.parametrize(
    "listed, problem",
    [
        ("../outside.png", "leads to {outside}, outside the task folder"),
        ("images/../../outside.png", "leads to {outside}, outside the task folder"),
        ("/etc/passwd", "is absolute; write it relative to the task folder"),
    ],
)
def test_entries_outside_the_task_folder_are_refused(task, monkeypatch, listed, problem):
    Image.new("RGB", (4, 4)).save(task.parent / "outside.png")  # a real image: only the check stops it
    (task / "train800.txt").write_text(f"images/red.png 0\n{listed} 1\n")
    _no_decoding(monkeypatch)
    with pytest.raises(DataError) as err:
        load_split(task, "train800", 8, MEAN, STD, classes=4)
    message = str(err.value)
    assert message.startswith(f"{task}/train800.txt:2: image path {listed!r} ")
    assert problem.format(outside=task.parent / "outside.png") in message and str(task) in message
    assert "\n" not in message


def test_every_list_is_checked_before_the_search(task):
    """num_classes (what the search's data check calls first) reads test.txt too, which no trial decodes."""
    (task / "test.txt").write_text("images/teal.png 3\n/etc/passwd 0\n")
    with pytest.raises(DataError, match=r"test\.txt:2: image path '/etc/passwd' is absolute"):
        num_classes(task)


@pytest.mark.parametrize("link, listed", [("images/link.png", "images/link.png"), ("images/ext", "images/ext/a.png")])
def test_symlink_leading_outside_is_refused(task, tmp_path, monkeypatch, link, listed):
    (tmp_path / "ext").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "ext" / "a.png")
    target = tmp_path / "ext" / "a.png" if link.endswith(".png") else tmp_path / "ext"
    (task / link).symlink_to(target)
    (task / "train800.txt").write_text(f"images/red.png 0\n{listed} 1\n")
    _no_decoding(monkeypatch)
    with pytest.raises(DataError) as err:
        load_split(task, "train800", 8, MEAN, STD, classes=4)
    assert str(err.value).startswith(
        f"{task}/train800.txt:2: image path {listed!r} leads through a symlink to {tmp_path / 'ext' / 'a.png'}, "
        f"outside the task folder {task}; move the image into the task folder"
    )


def test_symlink_inside_the_task_folder_is_accepted(task):
    (task / "images" / "alias.png").symlink_to("red.png")  # relative: stays inside wherever the task folder is
    (task / "links").symlink_to("images", target_is_directory=True)
    (task / "train800.txt").write_text("images/alias.png 0\nlinks/blue.png 3\n")
    split = load_split(task, "train800", 8, MEAN, STD, classes=4)
    assert split.images[0, :, 0, 0].tolist() == [255, 0, 0] and split.images[1, :, 0, 0].tolist() == [0, 0, 255]


def test_symlink_loop_is_one_line_naming_image_and_list(task):
    (task / "images" / "loop.png").symlink_to("loop2.png")
    (task / "images" / "loop2.png").symlink_to("loop.png")
    (task / "train800.txt").write_text("images/red.png 0\nimages/loop.png 1\n")
    with pytest.raises(DataError) as err:
        read_list(task, "train800")
    message = str(err.value)
    assert message.startswith(f"{task}/images/loop.png: cannot resolve the path (")
    assert message.endswith(f"; listed in {task}/train800.txt:2: fix the symlink or remove that entry")
    assert "\n" not in message


def png_bomb(path: Path, side: int = 14000) -> None:
    """A valid black 1-bit PNG of side x side pixels (196 Mpx by default, over twice Pillow's limit): the
    zero rows compress to a few tens of KB, written row by row so that nothing large is ever in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_without_decoding_it(task, monkeypatch):
    png_bomb(task / "images" / "blue.png")
    assert (task / "images" / "blue.png").stat().st_size < 100_000
    (task / "train800.txt").write_text("images/blue.png 3\n")

    def refuse(self):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)  # fails if anything gets past the header
    with pytest.raises(DataError) as err:
        load_split(task, "train800", 8, MEAN, STD, classes=4)
    message = str(err.value)
    assert message.startswith(f"{task}/images/blue.png: refused as a possible decompression bomb (")
    assert "196000000 pixels" in message and f"listed in {task}/train800.txt" in message and "\n" not in message


@pytest.mark.parametrize("side", [11, 20])  # over MAX_IMAGE_PIXELS (Pillow warns) and over twice it (Pillow refuses)
def test_images_over_the_pixel_limit_are_refused_not_warned(task, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (side, side)).save(task / "images" / "blue.png")
    (task / "train800.txt").write_text("images/blue.png 3\n")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError) as err:
        warnings.simplefilter("always")
        load_split(task, "train800", 8, MEAN, STD, classes=4)
    assert not caught  # Pillow's DecompressionBombWarning became the error, it did not slip out as a warning
    message = str(err.value)
    assert message.startswith(f"{task}/images/blue.png: refused as a possible decompression bomb (")
    assert f"{side * side} pixels" in message
    assert message.endswith(f"listed in {task}/train800.txt: fix or remove that line")


def test_custom_task_test_label_missing_from_training_is_an_error(task):
    (task / "test.txt").write_text("images/teal.png 3\nimages/red.png 2\n")  # 2 < 4 classes, but no training image
    with pytest.raises(DataError) as err:
        num_classes(task)
    assert str(err.value) == (
        f"{task}/test.txt:2: label 2 of red.png occurs nowhere in train800val200.txt, so the model cannot learn it: "
        "fix the label, or add training images of class 2 to train800val200.txt "
        "(a custom task's classes are those of its training list)"
    )


def test_custom_task_val_label_missing_from_train800_is_an_error(task):
    (task / "val200.txt").write_text("images/grey.jpg 1\nimages/teal.png 2\n")
    with pytest.raises(DataError, match=r"val200\.txt:2: label 2 of teal\.png occurs nowhere in train800\.txt"):
        num_classes(task)


def test_known_task_has_the_benchmark_classes_and_may_miss_some_in_training(task, caplog):
    sun = task.rename(task.parent / "SUN397")  # a known VTAB-1k task (any case), like the real benchmark's
    (sun / "test.txt").write_text("images/teal.png 3\nimages/red.png 396\n")  # class 396: no training image
    with caplog.at_level(logging.WARNING, logger="vpt_tune.data.vtab"):
        assert task_classes("vtab-1k", sun) == 397
    assert [record.getMessage() for record in caplog.records] == [(
        f"{sun}/test.txt: labels that no entry of train800val200.txt has: 396 (1 of 2 entries); "
        "the model cannot learn those classes"
    )]
    (sun / "val200.txt").write_text("images/grey.jpg 1\nimages/teal.png 397\n")
    with pytest.raises(DataError, match=r"val200\.txt: label 397 of teal\.png is out of range \[0, 397\) "
                                        r"\(SUN397 is the VTAB-1k task with 397 classes"):
        task_classes("vtab-1k", sun)
    (sun / "val200.txt").write_text("images/grey.jpg 1\nimages/teal.png 0\n")
    assert task_classes("vtab-1k", sun.rename(task.parent / "sun")) == 397  # an alias of sun397
    assert task_classes("vtab-1k", _write_task(task.parent)) == 4  # toy is no VTAB-1k task: counted from the lists


@pytest.mark.parametrize("listed", ["images/red.png", "images/sub/../red.png", "./images/red.png"])
def test_one_image_with_two_labels_is_an_error(task, listed):
    (task / "train800.txt").write_text(f"images/red.png 0\nimages/sub/green.jpg 1\n{listed} 1\n")
    with pytest.raises(DataError) as err:
        read_list(task, "train800")
    assert str(err.value) == (
        f"{task}/train800.txt: the same image {task / listed} is listed with two labels, 0 (line 1) and 1 (line 3); "
        "keep one entry with the right label"
    )


def test_exact_duplicate_is_a_warning_logged_once(task, caplog):
    (task / "train800.txt").write_text("images/red.png 0\nimages/blue.png 3\nimages/red.png 0\n")
    with caplog.at_level(logging.WARNING, logger="vpt_tune.data.vtab"):
        assert [label for _, label in read_list(task, "train800")] == [0, 3, 0]  # kept as listed
        read_list(task, "train800")
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [(
        "WARNING",
        (f"{task}/train800.txt: an image is listed twice with the same label, so it counts twice: "
         f"{task}/images/red.png (line 1 and line 3); remove the repeated entries"),
    )]


def test_byte_order_mark_is_accepted(task):
    (task / "train800.txt").write_text("\ufeffimages/red.png 0\r\nimages/blue.png 3\r\n", encoding="utf-8")
    assert read_list(task, "train800") == [(task / "images/red.png", 0), (task / "images/blue.png", 3)]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_list_that_is_not_utf8_is_one_line(task, bom):
    (task / "train800.txt").write_bytes(bom + b"images/red.png 0\nimages/caf\xe9.png 1\n")  # Latin-1
    with pytest.raises(DataError) as err:
        read_list(task, "train800")
    assert str(err.value) == f"{task}/train800.txt:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


# ---------------------------------------------------------------- demo tasks


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return demo.materialise("digits", tmp_path_factory.mktemp("demo"))


def _list(task: Path, split: str) -> list[tuple[str, int]]:
    return [(str(path.relative_to(task)), label) for path, label in read_list(task, split)]


def test_digits_vtab_layout(digits_dir):
    from sklearn.datasets import load_digits

    total = len(load_digits().target)  # 1,797 images
    splits = {split: _list(digits_dir, split) for split in ("train800", "val200", "train800val200", "test")}
    assert [len(splits[s]) for s in ("train800", "val200", "train800val200")] == [800, 200, 1000]
    assert len(splits["test"]) == total - 1000
    train, val, trainval, test = (
        {p for p, _ in splits[s]} for s in ("train800", "val200", "train800val200", "test"))
    assert not train & val and train | val == trainval
    assert not trainval & test
    assert len(trainval | test) == total
    assert num_classes(digits_dir) == 10
    assert {label for _, label in splits["train800"]} == set(range(10))


def test_digits_images_are_real_pngs_with_correct_labels(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    flat = digits.images.reshape(len(digits.images), -1)  # values 0..16
    for rel, label in _list(digits_dir, "val200")[:40]:
        with Image.open(digits_dir / rel) as img:
            assert img.format == "PNG" and img.size == (8, 8)
            pixels = np.asarray(img.convert("L"), dtype=float).reshape(-1)
        nearest = np.abs(flat - pixels * 16 / 255).sum(axis=1).argmin()
        assert np.abs(flat[nearest] - pixels * 16 / 255).max() < 0.1  # it is that digit image
        assert digits.target[nearest] == label


def test_digits_load_through_the_vtab_loader(digits_dir):
    split = load_split(digits_dir, "val200", 16, MEAN, STD, classes=num_classes(digits_dir))
    assert split.images.shape == (200, 3, 16, 16)
    assert split.images.float().std() > 10  # real content, not blank


def test_materialise_is_idempotent(digits_dir):
    stamps = {p: p.stat().st_mtime_ns for p in digits_dir.rglob("*")}
    assert demo.materialise("digits", digits_dir.parent) == digits_dir
    assert {p: p.stat().st_mtime_ns for p in digits_dir.rglob("*")} == stamps
    assert [p.name for p in digits_dir.parent.iterdir()] == ["digits"]  # no staging folders left


def test_unknown_demo_task(tmp_path):
    with pytest.raises(DataError, match="'mnist'"):
        demo.materialise("mnist", tmp_path)


def test_fashion_mnist_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert "fashion_mnist" not in demo.available_demo_tasks()
    assert "digits" in demo.available_demo_tasks()
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        demo.materialise("fashion_mnist", tmp_path)
    assert not (tmp_path / "fashion_mnist").exists()


def _idx(path: Path) -> np.ndarray:
    """Independent IDX reader: magic (2 zero bytes, dtype 0x08, ndim), big-endian sizes, uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    assert raw[:3] == b"\x00\x00\x08"
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def test_fashion_mnist_materialises_the_real_images(tmp_path, monkeypatch):
    require(demo.FASHION_MNIST_DIR.is_dir(), "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    # A 20-image test split keeps this quick; the train/val part is the real 800/200.
    monkeypatch.setitem(demo.DEMO_TASKS, "fashion_mnist", functools.partial(demo._fashion_mnist, test_size=20))
    task = demo.materialise("fashion_mnist", tmp_path)
    source = Path("/usr/share/datasets/fashion-mnist")
    train_images = _idx(source / "train-images-idx3-ubyte.gz")
    train_labels = _idx(source / "train-labels-idx1-ubyte.gz")
    test_images = _idx(source / "t10k-images-idx3-ubyte.gz")
    test_labels = _idx(source / "t10k-labels-idx1-ubyte.gz")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    lists = {split: read_list(task, split) for split in ("train800", "val200", "train800val200", "test")}
    assert [len(lists[s]) for s in ("train800", "val200", "train800val200", "test")] == [800, 200, 1000, 20]
    assert lists["train800val200"] == lists["train800"] + lists["val200"]
    # the official separation is kept: train/val come from the training file, test from t10k, in order
    for (path, label), image, expected in [
        (lists["train800"][0], train_images[0], train_labels[0]),
        (lists["val200"][-1], train_images[999], train_labels[999]),
        (lists["test"][0], test_images[0], test_labels[0]),
        (lists["test"][-1], test_images[19], test_labels[19]),
    ]:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert np.array_equal(np.asarray(img), image)
        assert label == expected
    assert train_labels[0] == 9  # the first Fashion-MNIST training image is an ankle boot
    assert num_classes(task) == 10
