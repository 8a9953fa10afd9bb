"""Benchmarks: task names, aliases and groups, finding task folders, and dispatch to the right loader."""

from __future__ import annotations

import pytest
import torch

from vpt_tune.data.fgvc import AugmentedSplit
from vpt_tune.data.benchmarks import BENCHMARKS, FGVC, VTAB_1K, _normalise, expand_tasks, find_task_dir
from vpt_tune.data.tasks import decode_task_split, task_classes, task_split
from vpt_tune.data.splits import ImageSplit

from test_data import _write_task as _write_vtab_task
from test_fgvc import _write_task as _write_fgvc_task

MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VPT_TUNE_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- the benchmark tables


def test_vtab_tasks_classes_and_groups():
    assert len(VTAB_1K.tasks) == 19
    assert VTAB_1K.tasks["sun397"] == 397 and VTAB_1K.tasks["oxford_iiit_pet"] == 37 and VTAB_1K.tasks["kitti"] == 4
    # METHODS.md's order and classes: natural, specialized, structured
    assert list(VTAB_1K.tasks.values()) == [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    groups = VTAB_1K.groups
    assert [len(groups[g]) for g in ("vtab-natural", "vtab-specialized", "vtab-structured")] == [7, 4, 8]
    assert groups["vtab-all"] == groups["vtab-natural"] + groups["vtab-specialized"] + groups["vtab-structured"]
    assert sorted(groups["vtab-all"]) == sorted(VTAB_1K.tasks)


def test_splits():
    assert VTAB_1K.search_splits == ("train800", "val200") and VTAB_1K.final_splits == ("train800val200", "test")
    assert FGVC.search_splits == ("train", "val") and FGVC.final_splits == ("train", "test")
    assert FGVC.tasks == {"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196}
    assert set(BENCHMARKS) == {"vtab-1k", "fgvc"}


@pytest.mark.parametrize("bench", BENCHMARKS.values(), ids=list(BENCHMARKS))
def test_aliases_are_unambiguous(bench):
    owner: dict[str, str] = {}
    for name, canonical in [(t, t) for t in bench.tasks] + list(bench.aliases.items()):
        assert canonical in bench.tasks
        assert owner.setdefault(_normalise(name), canonical) == canonical, name
        assert bench.canonical(name) == canonical


def test_canonical_ignores_case_and_separators():
    assert VTAB_1K.canonical("CIFAR") == "cifar100"
    assert VTAB_1K.canonical("oxford-pet") == "oxford_iiit_pet"
    assert FGVC.canonical("stanforddogs") == "stanford_dogs"
    assert FGVC.canonical("CUB_200_2011") == "cub"
    assert VTAB_1K.canonical("imagenet") is None


# ---------------------------------------------------------------- expanding task lists


def test_expand_groups_keeps_order_and_drops_duplicates():
    natural = VTAB_1K.groups["vtab-natural"]
    assert expand_tasks("vtab-1k", ["dtd", "vtab-natural", "cifar", "my_task", "dtd"]) == (
        ["dtd"] + [t for t in natural if t != "dtd"] + ["my_task"])
    assert expand_tasks("vtab-1k", ["all"]) == list(VTAB_1K.tasks)
    assert expand_tasks("vtab-1k", ["vtab-structured", "all"])[:8] == VTAB_1K.groups["vtab-structured"]
    assert expand_tasks("fgvc", ["fgvc-all"]) == expand_tasks("fgvc", ["all"]) == list(FGVC.tasks)


def test_expand_makes_aliases_canonical_and_keeps_unknown_names():
    assert expand_tasks("vtab-1k", ["cifar", "oxford_pet", "cifar100"]) == ["cifar100", "oxford_iiit_pet"]
    assert expand_tasks("fgvc", ["Stanford-dogs", "CUB_200_2011", "my_birds"]) == ["stanford_dogs", "cub", "my_birds"]
    assert expand_tasks("fgvc", ["vtab-natural"]) == ["vtab-natural"]  # another benchmark's group is just a name


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="'vtab'.*vtab-1k"):
        expand_tasks("vtab", ["all"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        task_classes("imagenet", None)


# ---------------------------------------------------------------- finding task folders


def test_find_task_dir_through_aliases(tmp_path):
    (tmp_path / "cifar").mkdir()
    assert find_task_dir(tmp_path, "vtab-1k", "cifar100") == tmp_path / "cifar"
    assert find_task_dir(tmp_path, "vtab-1k", "cifar") == tmp_path / "cifar"
    other = tmp_path / "other"
    (other / "cifar100").mkdir(parents=True)
    assert find_task_dir(other, "vtab-1k", "cifar") == other / "cifar100"
    assert find_task_dir(other, "vtab-1k", "dtd") is None


def test_find_task_dir_prefers_the_exact_name(tmp_path):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar100").mkdir()
    assert find_task_dir(tmp_path, "vtab-1k", "cifar") == tmp_path / "cifar"
    assert find_task_dir(tmp_path, "vtab-1k", "cifar100") == tmp_path / "cifar100"


def test_find_task_dir_ignores_case_and_separators(tmp_path):
    (tmp_path / "STANFORD-DOGS").mkdir()
    (tmp_path / "Oxford_Flowers102").mkdir()
    (tmp_path / "CUB_200_2011").mkdir()
    (tmp_path / "My-Task").mkdir()
    (tmp_path / "stanford_cars.txt").write_text("a file, not a task folder")
    assert find_task_dir(tmp_path, "fgvc", "stanford_dogs") == tmp_path / "STANFORD-DOGS"
    assert find_task_dir(tmp_path, "fgvc", "cub") == tmp_path / "CUB_200_2011"
    assert find_task_dir(tmp_path, "vtab-1k", "flowers102") == tmp_path / "Oxford_Flowers102"
    assert find_task_dir(tmp_path, "vtab-1k", "my_task") == tmp_path / "My-Task"
    assert find_task_dir(tmp_path, "fgvc", "stanford_cars") is None
    assert find_task_dir(tmp_path / "absent", "fgvc", "cub") is None


# ---------------------------------------------------------------- dispatch to the loaders


def test_vtab_dispatch(tmp_path):
    task = _write_vtab_task(tmp_path)
    assert task_classes("vtab-1k", task) == 4
    for train in (True, False):  # VTAB-1k has no augmentation
        split = task_split("vtab-1k", task, "train800", 12, MEAN, STD, classes=4, train=train)
        assert type(split) is ImageSplit and not split.augmented and split.images.shape == (3, 3, 12, 12)
    assert decode_task_split("vtab-1k", task, "train800val200", 12, classes=4) == 5


def test_fgvc_dispatch(tmp_path):
    task = _write_fgvc_task(tmp_path)
    assert task_classes("fgvc", task) == 3
    train = task_split("fgvc", task, "train", 14, MEAN, STD, classes=3, train=True)
    assert isinstance(train, AugmentedSplit) and train.augmented
    assert train.inputs(torch.arange(4)).shape == (4, 3, 14, 14)
    evaluated = task_split("fgvc", task, "test", 14, MEAN, STD, classes=3, train=False)
    assert type(evaluated) is ImageSplit and evaluated.images.shape == (2, 3, 14, 14)
    assert decode_task_split("fgvc", task, "val", 14, classes=3) == 2


# ---------------------------------------------------------------- a spec's tasks


def test_spec_tasks_resolve_groups_and_aliases_and_report_all_missing(tmp_path):
    from vpt_tune.search.runner import task_dirs
    from vpt_tune.spec import SpecError, validate

    for folder in ("cifar", "DTD"):
        (tmp_path / folder).mkdir()

    def spec(**data):
        space = {"num_prompts": {"int": [1, 4]}}
        return validate({"name": "t", "space": space, "data": {"root": str(tmp_path), **data}})

    assert task_dirs(spec(tasks=["cifar100", "dtd"])) == {"cifar100": tmp_path / "cifar", "dtd": tmp_path / "DTD"}
    with pytest.raises(SpecError) as err:
        task_dirs(spec(tasks=["vtab-natural"]))
    missing = str(err.value)
    assert all(t in missing for t in ("caltech101", "svhn", "sun397")) and "cifar100" not in missing
    with pytest.raises(SpecError, match="demo tasks use the VTAB-1k layout"):
        task_dirs(validate({"name": "t", "space": {"num_prompts": {"int": [1, 4]}}, "data": {"benchmark": "fgvc"}}))


@pytest.mark.parametrize("layout", ["vtab-1k", "fgvc"])
def test_preprocess_gives_new_images_the_evaluations_exact_inputs(tmp_path, layout):
    """vpt_tune.load's model.preprocess: PIL images in, the evaluation split's normalised inputs out, to
    the bit (VTAB-1k: straight resize; FGVC: shorter-side resize and center crop), grey and RGBA too."""
    from PIL import Image

    from vpt_tune.data.tasks import Preprocess
    from test_fgvc import _noise

    if layout == "fgvc":
        task, split = _write_fgvc_task(tmp_path), "test"
        paths = [task / "images" / p for p in ("001.a/t.png", "003.c/s.png")]
    else:
        task, split = tmp_path / "toy", "val200"
        paths = [task / f"{i}.png" for i in range(3)]
        task.mkdir()
        for i, (path, size) in enumerate(zip(paths, [(40, 30), (17, 33), (64, 64)])):
            image = _noise(size, seed=i)
            (image.convert("L") if i == 1 else image.convert("RGBA") if i == 2 else image).save(path)
        (task / "val200.txt").write_text("".join(f"{p.name} {i}\n" for i, p in enumerate(paths)))
    evaluated = task_split(layout, task, split, 24, MEAN, STD, 12, train=False)
    preprocess = Preprocess(layout, 24, MEAN, STD)
    with Image.open(paths[0]) as one:
        assert torch.equal(preprocess(one), evaluated.inputs(torch.tensor([0])))
    assert torch.equal(preprocess([Image.open(p) for p in paths]), evaluated.inputs(torch.arange(len(paths))))
