"""Benchmarks: their tasks, the folder names other repos give them, and groups (no data loading here).

A search selects hyperparameters on ``search_splits`` (train, eval) and retrains the chosen ones on
``final_splits``: VTAB-1k tunes on train800/val200 and retrains on all 1,000 images before testing;
FGVC (as in VPT) selects on val and trains on train only for the test. Task folders are named
differently across repos (NOAH's ``cifar100``/``oxford_pet``, SPT's ``cifar``/``oxford_iiit_pet``,
DAM-VP's ``Stanford-dogs``...), so a task is found under any of its aliases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's splits, tasks (canonical name -> classes), folder-name aliases and task groups."""

    name: str
    search_splits: tuple[str, str]
    final_splits: tuple[str, str]
    tasks: dict[str, int]
    aliases: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> split -> images (for plans)

    def canonical(self, task: str) -> str | None:
        """The canonical name of ``task`` (a canonical name or alias, any case, ``-``/``_`` alike), or None."""
        key = _normalise(task)
        for name in self.tasks:
            if _normalise(name) == key:
                return name
        for alias, name in self.aliases.items():
            if _normalise(alias) == key:
                return name
        return None

    def names(self, task: str) -> list[str]:
        """The canonical name of a known ``task`` followed by all its aliases."""
        return [task] + [alias for alias, name in self.aliases.items() if name == task]


_NATURAL = {"cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
            "svhn": 10, "sun397": 397}
_SPECIALIZED = {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5}
_STRUCTURED = {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
               "smallnorb_azi": 18, "smallnorb_ele": 9}

# VTAB-1k's test splits (the test.txt lists NOAH, SPT and later repos share); its other splits are fixed.
_VTAB_TEST = {"cifar100": 10_000, "caltech101": 6_084, "dtd": 1_880, "oxford_flowers102": 6_149,
              "oxford_iiit_pet": 3_669, "svhn": 26_032, "sun397": 21_750, "patch_camelyon": 32_768, "eurosat": 5_400,
              "resisc45": 6_300, "diabetic_retinopathy": 42_670, "clevr_count": 15_000, "clevr_dist": 15_000,
              "dmlab": 22_735, "kitti": 711, "dsprites_loc": 73_728, "dsprites_ori": 73_728, "smallnorb_azi": 12_150,
              "smallnorb_ele": 12_150}

VTAB_1K = Benchmark(
    name="vtab-1k",
    search_splits=("train800", "val200"),
    final_splits=("train800val200", "test"),
    tasks={**_NATURAL, **_SPECIALIZED, **_STRUCTURED},
    # NOAH names cifar100/oxford_pet; SPT, SSF and most later repos cifar/oxford_iiit_pet; some READMEs clever_*.
    aliases={
        "cifar": "cifar100",
        "caltech": "caltech101",
        "flowers102": "oxford_flowers102", "oxford_flowers": "oxford_flowers102", "flowers": "oxford_flowers102",
        "oxford_pet": "oxford_iiit_pet", "oxford_pets": "oxford_iiit_pet", "pets": "oxford_iiit_pet",
        "svhn_cropped": "svhn",
        "sun": "sun397",
        "camelyon": "patch_camelyon", "pcam": "patch_camelyon",
        "retinopathy": "diabetic_retinopathy",
        "clever_count": "clevr_count",
        "clevr_distance": "clevr_dist", "clever_dist": "clevr_dist",
        "kitti_distance": "kitti", "kitti_dist": "kitti",
        "dsprites_location": "dsprites_loc",
        "dsprites_orientation": "dsprites_ori",
        "smallnorb_azimuth": "smallnorb_azi",
        "smallnorb_elevation": "smallnorb_ele",
    },
    groups={
        "vtab-natural": list(_NATURAL),
        "vtab-specialized": list(_SPECIALIZED),
        "vtab-structured": list(_STRUCTURED),
        "vtab-all": [*_NATURAL, *_SPECIALIZED, *_STRUCTURED],
    },
    sizes={task: {"train800": 800, "val200": 200, "train800val200": 1000, "test": test}
           for task, test in _VTAB_TEST.items()},
)

FGVC = Benchmark(
    name="fgvc",
    search_splits=("train", "val"),
    final_splits=("train", "test"),
    tasks={"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196},
    # DAM-VP's README: CUB_200_2011, nabirds, OxfordFlower, Stanford-dogs, Stanford-cars; other VPT forks:
    # OxfordFlowers, StanfordDogs, StanfordCars (VPT's DATA.NAME values); VPT's config files: cub, flowers, dogs, cars.
    aliases={
        "CUB_200_2011": "cub", "cub200": "cub", "cub2011": "cub",
        "OxfordFlower": "oxford_flowers", "flowers": "oxford_flowers", "flowers102": "oxford_flowers",
        "Stanford-dogs": "stanford_dogs", "dogs": "stanford_dogs",
        "Stanford-cars": "stanford_cars", "cars": "stanford_cars",
    },
    groups={"fgvc-all": ["cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]},
    # VPT's splits (its paper's appendix table: train / val / test).
    sizes={task: dict(zip(("train", "val", "test"), sizes)) for task, sizes in {
        "cub": (5_394, 600, 5_794), "nabirds": (21_536, 2_393, 24_633), "oxford_flowers": (1_020, 1_020, 6_149),
        "stanford_dogs": (10_800, 1_200, 8_580), "stanford_cars": (7_329, 815, 8_041)}.items()},
)

BENCHMARKS = {"vtab-1k": VTAB_1K, "fgvc": FGVC}


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_benchmark(benchmark: str) -> Benchmark:
    """The benchmark named ``benchmark``; ValueError naming the known ones otherwise."""
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise ValueError(f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})") from None


def expand_tasks(benchmark: str, names: Sequence[str]) -> list[str]:
    """Task names with groups and ``all`` expanded and aliases made canonical, in order, without duplicates.

    A name that is neither a group nor a known task is kept as is (a custom task folder).
    """
    bench = get_benchmark(benchmark)
    tasks: list[str] = []
    for name in names:
        if name == "all":
            expanded = list(bench.tasks)
        elif name in bench.groups:
            expanded = bench.groups[name]
        else:
            expanded = [bench.canonical(name) or name]
        tasks.extend(task for task in expanded if task not in tasks)
    return tasks


def find_task_dir(root: Path, benchmark: str, task: str) -> Path | None:
    """The folder of ``task`` under ``root``: ``root/task``, else the first folder named as the task or one
    of its aliases (exact names first, then ignoring case and ``-``/``_``), else None."""
    bench = get_benchmark(benchmark)
    if (root / task).is_dir():
        return root / task
    canonical = bench.canonical(task)
    names = [task] + (bench.names(canonical) if canonical else [])
    for name in names:
        if (root / name).is_dir():
            return root / name
    try:
        folders = sorted(path for path in root.iterdir() if path.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    by_key: dict[str, Path] = {}
    for folder in folders:
        by_key.setdefault(_normalise(folder.name), folder)
    for name in names:
        if _normalise(name) in by_key:
            return by_key[_normalise(name)]
    return None
