"""VPT's FGVC layout on generated folders: JSON splits, class remapping, image roots, crops and flips, errors."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_tune.data import cache, fgvc
from vpt_tune.data.fgvc import AugmentedSplit, decode_split, load_split, num_classes, read_json, resize_size
from vpt_tune.data.tasks import task_classes
from vpt_tune.data.splits import DataError, ImageSplit

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
S = 14  # crop size; resize_size(14) == 16
R = 16


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path / "cache"))


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_task(root: Path, image_dir: str = "images") -> Path:
    """A three-class FGVC task (ids 3, 7, 11; val's as strings) with PNG images of different shapes."""
    task = root / "birds"
    images = task / image_dir if image_dir != "." else task
    splits = {
        "train": {"001.a/x.png": 7, "002.b/y.png": 3, "003.c/z.png": 11, "001.a/w.png": 7},
        "val": {"002.b/v.png": "3", "003.c/u.png": "11"},
        "test": {"001.a/t.png": 7, "003.c/s.png": 11},
    }
    for i, rel in enumerate(path for split in splits.values() for path in split):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        _noise([(40, 30), (30, 40), (20, 20), (33, 17)][i % 4], seed=i).save(images / rel)
    for split, content in splits.items():
        (task / f"{split}.json").write_text(json.dumps(content))
    return task


@pytest.fixture
def task(tmp_path) -> Path:
    return _write_task(tmp_path)


# ---------------------------------------------------------------- reading the layout


def test_resize_size_follows_vpt():
    assert [resize_size(s) for s in (224, 384, 448, 14)] == [256, 438, 512, 16]


@pytest.mark.parametrize("image_dir", ["images", "Images", "."])
def test_image_root_is_detected(tmp_path, image_dir):
    task = _write_task(tmp_path, image_dir)
    root = task / image_dir if image_dir != "." else task
    assert read_json(task, "train")[0] == (root / "001.a/x.png", 1)
    assert all(path.is_file() for split in ("train", "val", "test") for path, _ in read_json(task, split))


def test_class_ids_are_remapped_consistently_across_splits(task):
    # ids {3, 7, 11} -> {0, 1, 2} in every split, whether written as ints or strings
    assert [label for _, label in read_json(task, "train")] == [1, 0, 2, 1]
    assert [label for _, label in read_json(task, "val")] == [0, 2]
    assert [label for _, label in read_json(task, "test")] == [1, 2]
    assert num_classes(task) == 3


def test_remapping_comes_from_train_ids(task):
    (task / "val.json").write_text(json.dumps({"002.b/v.png": 3}))  # val lacks classes 7 and 11: no change
    assert [label for _, label in read_json(task, "val")] == [0]
    assert [label for _, label in read_json(task, "test")] == [1, 2]


@pytest.mark.parametrize("split", ["val", "test"])
def test_custom_task_id_missing_from_train_is_an_error(task, split):
    (task / f"{split}.json").write_text(json.dumps({"001.a/t.png": 7, "003.c/s.png": 5}))
    with pytest.raises(DataError) as err:
        num_classes(task)
    assert str(err.value) == (
        f"{task}/{split}.json: label 5 of s.png occurs nowhere in train.json, so the model cannot learn it: "
        "fix the label, or add training images of class 5 to train.json (a custom task's classes are those of "
        "its training list)"
    )


def test_known_task_has_the_benchmark_classes_and_may_miss_some_in_training(task, caplog):
    cub = task.rename(task.parent / "CUB_200_2011")  # a known FGVC task (an alias of cub)
    (cub / "test.json").write_text(json.dumps({"001.a/t.png": 1, "003.c/s.png": 11}))  # id 1 only in test
    with caplog.at_level(logging.WARNING, logger="vpt_tune.data.vtab"):
        assert task_classes("fgvc", cub) == 200
    assert [record.getMessage() for record in caplog.records] == [
        f"{cub}/test.json: labels that no entry of train.json has: 1 (1 of 2 entries); "
        "the model cannot learn those classes"
    ]
    # train's ids keep their labels; the id train lacks comes after them
    assert [label for _, label in read_json(cub, "train")] == [1, 0, 2, 1]
    assert [label for _, label in read_json(cub, "test")] == [3, 2]


def test_known_task_with_more_ids_than_classes(tmp_path):
    flowers = tmp_path / "oxford_flowers"  # 102 classes
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (flowers / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(flowers / "images" / "0.png")
    (flowers / "train.json").write_text(json.dumps({f"{i}.png": i + 1 for i in range(103)}))  # ids 1..103
    with pytest.raises(DataError) as err:
        task_classes("fgvc", flowers)
    assert str(err.value) == (
        f"{flowers}/train.json: label 102 of 102.png is out of range [0, 102) (oxford_flowers is the FGVC task "
        "with 102 classes, and its 103 class ids take the labels 0..102 in sorted order; a custom task needs "
        "another folder name): fix the label"
    )


# ---------------------------------------------------------------- eval: VPT's resize + center crop


def _reference_center_crop(path: Path) -> np.ndarray:
    """Shorter side to R (long side truncated), then the center S x S, computed with PIL: uint8 (3, S, S)."""
    with Image.open(path) as img:
        w, h = img.size
        new = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
        img = img.convert("RGB").resize(new, Image.BILINEAR)
    left, top = round((new[0] - S) / 2), round((new[1] - S) / 2)
    return np.asarray(img.crop((left, top, left + S, top + S))).transpose(2, 0, 1)


def test_eval_split_is_vpt_center_crop(task):
    split = load_split(task, "train", S, MEAN, STD, classes=3, train=False)
    assert type(split) is ImageSplit and split.images.shape == (4, 3, S, S)
    assert split.labels.tolist() == [1, 0, 2, 1]
    for image, (path, _) in zip(split.images, read_json(task, "train")):
        assert np.array_equal(image.numpy(), _reference_center_crop(path))
    images, labels = next(split.batches(4))
    expected = (split.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(images, expected)


def test_eval_matches_torchvision_transforms(task):
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.Resize(R), tv.CenterCrop(S), tv.ToTensor(), tv.Normalize(MEAN, STD)])
    split = load_split(task, "val", S, MEAN, STD, classes=3, train=False)
    images, _ = next(split.batches(2))
    for image, (path, _) in zip(images, read_json(task, "val")):
        with Image.open(path) as img:
            assert torch.allclose(image, transform(img.convert("RGB")), atol=1e-5)


def test_center_crop_removes_a_border(tmp_path):
    task = tmp_path / "framed"
    task.mkdir()
    framed = Image.new("RGB", (96, 64), (255, 0, 0))  # a 2 px red frame around green
    framed.paste((0, 200, 0), (2, 2, 94, 62))
    framed.save(task / "f.png")
    for split in ("train", "val", "test"):
        (task / f"{split}.json").write_text(json.dumps({"f.png": 1}))
    full, _ = decode_split(task, "test", S, classes=1)
    assert full.shape == (1, 3, R, R) and full[0, 0, 0].max() > 50  # the decoded square still shows red
    split = load_split(task, "test", S, MEAN, STD, classes=1, train=False)
    assert (split.images[0, 0] == 0).all() and (split.images[0, 1] == 200).all()


# ---------------------------------------------------------------- train: random crop + flip


def test_train_split_crops_and_flips_at_random(task):
    split = load_split(task, "train", S, MEAN, STD, classes=3, train=True)
    assert isinstance(split, AugmentedSplit) and split.augmented and not ImageSplit.augmented
    assert split.images.shape == (4, 3, R, R) and len(split) == 4
    idx = torch.tensor([0, 2, 3])
    torch.manual_seed(0)
    first = split.inputs(idx)
    torch.manual_seed(0)
    again = split.inputs(idx)
    torch.manual_seed(1)
    other = split.inputs(idx)
    assert first.shape == (3, 3, S, S) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_every_train_input_is_a_crop_or_its_mirror(task):
    split = load_split(task, "train", S, (0.0,) * 3, (1.0,) * 3, classes=3, train=True)
    square = split.images[0]
    offsets = range(R - S + 1)
    crops = {(top, left): square[:, top:top + S, left:left + S] for top in offsets for left in offsets}
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        batch = (split.inputs(torch.zeros(8, dtype=torch.long)) * 255).round().to(torch.uint8)
        for image in batch:
            plain = [pos for pos, crop in crops.items() if torch.equal(image, crop)]
            mirrored = [pos for pos, crop in crops.items() if torch.equal(image, crop.flip(-1))]
            assert plain or mirrored  # nothing but a crop, possibly flipped
            seen.update(("plain", pos) for pos in plain)
            seen.update(("flip", pos) for pos in mirrored)
    assert {kind for kind, _ in seen} == {"plain", "flip"}
    assert {pos for _, pos in seen} == set(crops)  # every offset gets drawn


def test_batches_pair_labels_with_augmented_inputs(task):
    split = load_split(task, "train", S, MEAN, STD, classes=3, train=True)
    torch.manual_seed(0)
    batches = list(split.batches(3, torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in batches] == [3, 1]
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == [0, 1, 1, 2]


# ---------------------------------------------------------------- decoded once per (task, size)


def test_each_image_is_decoded_once(task, monkeypatch):
    calls = []
    real = fgvc.decode_image
    monkeypatch.setattr(fgvc, "decode_image", lambda path, size, crop: calls.append(path) or real(path, size, crop))
    train = load_split(task, "train", S, MEAN, STD, classes=3, train=True)
    assert len(calls) == 4
    assert len(list((cache.cache_dir() / "decoded").glob("*.npy"))) == 1

    def refuse(path, size, crop):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(fgvc, "decode_image", refuse)
    evaluated = load_split(task, "train", S, (0.0,) * 3, (1.0,) * 3, classes=3, train=False)
    assert torch.equal(evaluated.images, torch.from_numpy(fgvc.center_crop(train.images.numpy(), S)))
    monkeypatch.setattr(fgvc, "decode_image", lambda path, size, crop: calls.append(path) or real(path, size, crop))
    load_split(task, "train", 21, MEAN, STD, classes=3, train=True)  # another size: decoded again
    assert len(calls) == 8


def test_cache_entry_differs_from_a_vtab_decode_of_the_same_files(task):
    from vpt_tune.data.cache import decoded_key

    entries = read_json(task, "train")
    assert fgvc._key(entries, R, S) != decoded_key(entries, R)
    assert fgvc._key(entries, R, S) != fgvc._key(entries, R, S - 1)


# ---------------------------------------------------------------- errors name the file


def test_missing_json(task):
    (task / "val.json").unlink()
    with pytest.raises(DataError, match=r"val\.json.*missing.*train/val/test\.json") as err:
        read_json(task, "val")
    assert str(task) in str(err.value)


def test_num_classes_without_any_json(tmp_path):
    with pytest.raises(DataError, match=r"train\.json.*missing"):
        num_classes(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"x"', "\xff"])
def test_invalid_json(task, content):
    (task / "train.json").write_text(content)
    with pytest.raises(DataError, match=r"train\.json"):
        read_json(task, "train")


@pytest.mark.parametrize("value", ['"x"', "1.5", "true", "null", "[3]", '"3.0"'])
def test_non_integer_class_id(task, value):
    (task / "test.json").write_text('{"001.a/t.png": 7, "003.c/s.png": %s}' % value)
    with pytest.raises(DataError, match=r"test\.json.*003\.c/s\.png.*integer"):
        read_json(task, "val")  # a bad id anywhere breaks the remapping of every split


def test_empty_split(task):
    (task / "val.json").write_text("{}")
    with pytest.raises(DataError, match=r"val\.json.*empty"):
        read_json(task, "val")


def test_first_image_in_no_known_root(task):
    (task / "test.json").write_text(json.dumps({"nowhere/q.png": 7}))
    with pytest.raises(DataError, match=r"test\.json.*nowhere/q\.png.*images/.*Images/") as err:
        read_json(task, "test")
    assert str(task) in str(err.value)


def test_missing_image(task):
    (task / "test.json").write_text(json.dumps({"001.a/t.png": 7, "001.a/gone.png": 7}))
    with pytest.raises(DataError, match=r"gone\.png.*does not exist"):
        load_split(task, "test", S, MEAN, STD, classes=3, train=False)


@pytest.mark.parametrize("content", [b"this is not a jpeg at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_corrupt_image(task, content):
    (task / "images/001.a/bad.jpg").write_bytes(content)
    (task / "test.json").write_text(json.dumps({"001.a/t.png": 7, "001.a/bad.jpg": 3}))
    with pytest.raises(DataError, match=r"bad\.jpg.*corrupt"):
        load_split(task, "test", S, MEAN, STD, classes=3, train=True)
    assert not list((cache.cache_dir() / "decoded").glob("*.npy"))  # nothing half-decoded is cached


def test_label_out_of_range(task):
    with pytest.raises(DataError, match=r"train\.json.*label 2 of z\.png"):
        load_split(task, "train", S, MEAN, STD, classes=2, train=True)


# ---------------------------------------------------------------- the data stays inside its task folder


def _with_key(task: Path, key: str, split: str = "train") -> None:
    """Add ``key`` (class 7) after the first entry of ``split``.json."""
    data = json.loads((task / f"{split}.json").read_text())
    first = next(iter(data.items()))
    (task / f"{split}.json").write_text(json.dumps(dict([first, (key, 7), *list(data.items())[1:]])))


@pytest.mark.parametrize(
    "key, problem",
    [
        ("../../outside.png", "leads to {outside}, outside the task folder {task}"),  # images/ is the image root
        ("/etc/passwd", "is absolute; write it relative to the task folder {task}"),
    ],
)
def test_keys_outside_the_task_folder_are_refused(task, monkeypatch, key, problem):
    Image.new("RGB", (4, 4)).save(task.parent / "outside.png")
    _with_key(task, key, "test")
    monkeypatch.setattr(fgvc, "decode_image", lambda *args: pytest.fail("an image was decoded"))
    with pytest.raises(DataError) as err:
        num_classes(task)  # the search's data check: test.json is checked before anything is decoded
    assert str(err.value).startswith(
        f"{task}/test.json: image path {key!r} " + problem.format(outside=task.parent / "outside.png", task=task))


def test_parent_of_the_image_root_is_still_inside(task):
    Image.new("RGB", (4, 4)).save(task / "extra.png")
    _with_key(task, "../extra.png")  # images/../extra.png: in the task folder, the bound
    assert read_json(task, "train")[1] == (task / "images" / "../extra.png", 1)


def test_symlinks_are_refused_outside_and_accepted_inside(task, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (task / "images" / "001.a" / "out.png").symlink_to(tmp_path / "outside.png")
    _noise((9, 9), seed=9).save(task / "images" / "unlisted.png")
    (task / "images" / "001.a" / "in.png").symlink_to("../unlisted.png")
    _with_key(task, "001.a/in.png")
    assert read_json(task, "train")[1] == (task / "images" / "001.a/in.png", 1)
    _with_key(task, "001.a/out.png", "val")
    with pytest.raises(DataError) as err:
        read_json(task, "train")
    assert str(err.value).startswith(
        f"{task}/val.json: image path '001.a/out.png' leads through a symlink to {tmp_path / 'outside.png'}, "
        f"outside the task folder {task}")


def test_symlink_loop_is_one_line_naming_image_and_list(task):
    (task / "images" / "001.a" / "loop.png").symlink_to("loop.png")
    _with_key(task, "001.a/loop.png")
    with pytest.raises(DataError) as err:
        read_json(task, "train")
    message = str(err.value)
    assert message.startswith(f"{task}/images/001.a/loop.png: cannot resolve the path (")
    assert message.endswith(f"; listed in {task}/train.json: fix the symlink or remove that entry")


@pytest.mark.parametrize("side", [11, 20])  # over MAX_IMAGE_PIXELS (Pillow warns) and over twice it (Pillow refuses)
def test_images_over_the_pixel_limit_are_refused(task, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (side, side)).save(task / "images" / "001.a" / "big.png")
    (task / "val.json").write_text(json.dumps({"001.a/big.png": 7}))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError) as err:
        warnings.simplefilter("always")
        load_split(task, "val", S, MEAN, STD, classes=3, train=False)
    assert not caught  # Pillow's DecompressionBombWarning became the error, it did not slip out as a warning
    message = str(err.value)
    assert message.startswith(f"{task}/images/001.a/big.png: refused as a possible decompression bomb (")
    assert f"{side * side} pixels" in message
    assert message.endswith(f"listed in {task}/val.json: fix or remove that entry")


def test_repeated_key_with_two_ids_is_an_error(task):
    (task / "train.json").write_text('{"001.a/x.png": 7, "002.b/y.png": 3, "003.c/z.png": 11, "001.a/x.png": 3}')
    with pytest.raises(DataError) as err:
        num_classes(task)
    assert str(err.value) == (
        f"{task}/train.json: the same image {task}/images/001.a/x.png is listed with two labels, 7 (key "
        "'001.a/x.png') and 3 (key '001.a/x.png'); keep one entry with the right label"
    )


def test_repeated_key_with_one_id_is_a_warning(task, caplog):
    (task / "train.json").write_text('{"001.a/x.png": 7, "002.b/y.png": 3, "003.c/z.png": 11, "./001.a/x.png": 7}')
    with caplog.at_level(logging.WARNING, logger="vpt_tune.data.vtab"):
        assert [label for _, label in read_json(task, "train")] == [1, 0, 2, 1]
    assert [record.getMessage() for record in caplog.records] == [(
        f"{task}/train.json: an image is listed twice with the same label, so it counts twice: "
        f"{task}/images/001.a/x.png (key '001.a/x.png' and key './001.a/x.png'); remove the repeated entries"
    )]


def test_byte_order_mark_is_accepted(task):
    (task / "val.json").write_text("\ufeff" + json.dumps({"002.b/v.png": 3}), encoding="utf-8")
    assert read_json(task, "val") == [(task / "images/002.b/v.png", 0)]


def test_json_that_is_not_utf8_is_one_line(task):
    (task / "val.json").write_bytes(b'{"002.b/v.png": 3,\n "caf\xe9.png": 7}')
    with pytest.raises(DataError) as err:
        read_json(task, "val")
    assert str(err.value) == f"{task}/val.json:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


# ---------------------------------------------------------------- a trial on FGVC


def test_a_trial_trains_on_fgvc_with_fresh_crops_every_epoch(task):
    """A job on the FGVC layout: remapped classes size the head; augmented training is never prefix-cached."""
    import torch

    from vpt_tune.train.job import Job, build, run
    from vpt_tune.train.loop import evaluate
    from vpt_tune.train.prefix_cache import cached_prefix

    job = Job(
        model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=str(task), benchmark="fgvc",
        train_split="train", eval_split="val",
        params={"num_prompts": 2, "placement": "last_k", "depth": 2, "base_lr": 0.1}, epochs=2, batch_size=2,
    )
    model, train_split, eval_split = build(job)
    assert model.head.out_features == 3 and train_split.augmented and not eval_split.augmented
    net, splits = cached_prefix(model, [train_split, eval_split], 2, torch.device("cpu"))
    assert net is model and splits == [train_split, eval_split]  # new crops each epoch: nothing to cache
    epochs = []
    trained, metrics = run(job, torch.device("cpu"), on_epoch=lambda epoch, m, _: epochs.append(epoch))
    assert epochs == [0, 1]
    assert metrics["val_acc"] == evaluate(trained, eval_split, job.batch_size, torch.device("cpu"))  # center crops
