"""The bad-input catalogue (issues 5 and 12), end to end through ``python -m vpt_tune.cli search``:
the spec file and its values, the data (paths outside the task folder, bombs, loops, labels,
duplicates), the backbone, resources, tracking, storage and names; and Ctrl-C, then resume.

Every mistake is refused before Ray starts: exit code 2, one line naming the file/key/value and the
fix, no traceback (``--debug`` shows it), and nothing written in the working directory (no experiment
directory, no ``mlflow.db``) nor a Ray session directory.

Each case runs the real CLI in its own working directory. A CLI that gets past the spec imports Ray,
torch, timm and MLflow (seconds), so the module fixture runs the selected cases concurrently and each
test checks one outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import assert_front
from test_cli import vpt_tune
from test_data import _write_task
from test_resume import _cli, _spec_file
from test_search import small_spec

pytestmark = pytest.mark.slow  # each case runs the real CLI (imports of Ray, torch, timm, MLflow)

HAS_GPU = torch.cuda.is_available()

Setup = Callable[[Path], list[str]]  # writes the spec and inputs into the working directory; returns CLI args


def spec_with(changes: dict[str, Any], *extra_args: str, prepare: Callable[[Path], None] | None = None) -> Setup:
    """``small_spec`` (a valid 2-trial search) with dotted ``changes`` applied, as ``spec.yaml``; paths in
    ``changes`` are relative to the working directory, ``prepare`` writes more inputs there."""

    def setup(cwd: Path) -> list[str]:
        raw = small_spec(cwd)
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        if prepare:
            prepare(cwd)
        (cwd / "spec.yaml").write_text(yaml.safe_dump(raw))
        return ["search", "spec.yaml", *extra_args]

    return setup


def spec_text(content: str | bytes) -> Setup:
    """``content`` as ``spec.yaml``, byte for byte: for specs that ``yaml.safe_dump`` cannot write."""

    def setup(cwd: Path) -> list[str]:
        (cwd / "spec.yaml").write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["search", "spec.yaml"]

    return setup


def vtab_task(defect: Callable[[Path], None] = lambda task: None, tasks: tuple[str, ...] = ("toy",)) -> Setup:
    """A VTAB-1k root ``data/`` holding the task ``toy`` of test_data (4 classes), with ``defect`` applied."""
    return spec_with(
        {"data": {"root": "data", "tasks": list(tasks)}},
        prepare=lambda cwd: defect(_write_task(cwd / "data")),
    )


def _write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return write


@dataclass(frozen=True)
class Case:
    setup: Setup
    expect: tuple[str, ...]  # each must appear in the error line


CASES = {
    # ---- the spec (fails before the heavy imports)
    "unknown_spec_key": Case(
        spec_with({"train.epochz": 3}),
        ("spec.yaml: train.epochz: Extra inputs are not permitted", "did you mean epochs?", "valid keys here:")),
    "wrong_type": Case(
        spec_with({"train.epochs": "ten"}), ("spec.yaml: train.epochs: Input should be a valid integer", "got 'ten'")),
    "empty_search_space": Case(
        spec_with({"space": {"num_prompts": 8, "placement": "deep", "base_lr": 0.1}}),
        ("spec.yaml: space: the search space is empty", "make at least one entry a Param")),
    "low_above_high": Case(
        spec_with({"space.num_prompts": {"int": [8, 1]}}),
        ("spec.yaml: space.num_prompts: low 8 > high 1", "write the range as [low, high]")),
    "log_non_positive_bound": Case(
        spec_with({"space.base_lr": {"float": [0.0, 0.5], "log": True}}),
        ("spec.yaml: space.base_lr: log: true needs a positive low bound, got 0.0",)),
    "unknown_sampler": Case(
        spec_with({"search.sampler": "cmaes"}),
        ("spec.yaml: search.sampler: unknown sampler 'cmaes'", "choose one of tpe, nsga2, gp, random")),
    "unknown_early_stopping_rule": Case(
        spec_with({"search.early_stopping": {"rule": "asha"}}),
        ("spec.yaml: search.early_stopping.rule: Input should be 'off', 'mo_asha' or 'known_cost'", "got 'asha'")),
    "rung_after_the_schedule": Case(
        spec_with({"search.early_stopping": {"rule": "known_cost", "min_epochs": 2}}),
        ("search.early_stopping.min_epochs: 2 leaves no rung before the last of train.epochs 2",
         "set search.early_stopping.rule: off")),
    "malformed_set": Case(
        spec_with({}, "--set", "search.trials_per_task"),
        ("--set 'search.trials_per_task': expected key.path=value", "e.g. --set search.trials_per_task=8")),
    # ---- the backbone
    "unknown_timm_model": Case(
        spec_with({"backbone.model": "vit_nope"}),
        ("backbone.model: unknown timm model 'vit_nope'", "timm.list_models('vit_*')")),
    "not_a_vit_model": Case(
        spec_with({"backbone.model": "resnet18"}),
        ("backbone.model: 'resnet18' is not a timm VisionTransformer with a class token", "vit_base_patch16_224")),
    "missing_weights_file": Case(
        spec_with({"backbone.weights": "weights/vit.safetensors"}),
        ("backbone.weights: file weights/vit.safetensors does not exist", "(or use demo, hub, random)")),
    # ---- the data
    "data_root_missing": Case(
        spec_with({"data": {"root": "nowhere", "tasks": ["toy"]}}),
        ("data.root: nowhere does not exist", "point it at your vtab-1k folder")),
    "unknown_task": Case(
        vtab_task(tasks=("toy", "no_such_task")),
        ("data.tasks: no folder for no_such_task under data", "a group (vtab-natural")),
    "unknown_group": Case(
        vtab_task(tasks=("vtab-naturel",)),
        ("data.tasks: no folder for vtab-naturel under data", "a group (vtab-natural, vtab-specialized")),
    "list_names_missing_image": Case(
        vtab_task(_write("val200.txt", "images/teal.png 0\nimages/nope.png 1\n")),
        ("data/toy/images/nope.png: image does not exist", "listed in data/toy/val200.txt: fix or remove that line")),
    "corrupt_image": Case(
        vtab_task(_write("images/blue.png", b"\x89PNG truncated")),
        ("data/toy/images/blue.png: unreadable or corrupt image", "listed in data/toy/train800.txt")),
    "label_out_of_range": Case(
        vtab_task(_write("train800.txt", "images/red.png 0\nimages/blue.png 7\n")),
        ("data/toy/train800.txt: label 7 of blue.png is out of range [0, 4)",
         "counted from train800val200.txt and test.txt")),
    "empty_split": Case(
        vtab_task(_write("val200.txt", "\n  \n")),
        ("data/toy/val200.txt: the split is empty", "one '<relative/path> <label>' line per image")),
    # ---- resources, tracking, storage
    "gpus_without_gpu": Case(
        spec_with({"resources.gpus_per_worker": 1}),
        ("resources.gpus_per_worker: the trials ask for GPUs but this machine has none",
         "--set resources.gpus_per_worker=0")),
    "mlflow_unreachable": Case(
        spec_with({"tracking.mlflow_uri": "http://127.0.0.1:9"}),
        ("tracking.mlflow_uri: no MLflow server answers at http://127.0.0.1:9", "start one with `mlflow server")),
    "storage_not_writable": Case(
        spec_with({"storage": "a_file/results"}, prepare=_write("a_file", "")),
        ("storage: cannot create", "a_file/results", "a_file is not a writable directory")),
    # ---- the spec file itself: size, bombs, nesting, encoding, syntax, duplicate keys (issue 12)
    "spec_alias_bomb": Case(  # 9 levels of 9 aliases: 9**9 leaves once expanded
        spec_text("name: t\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 9)}]\n"
                                        for i in range(9))),
        ("spec.yaml:7:", "more than 100,000 YAML nodes once aliases (*name) are expanded", "(an alias bomb?)")),
    "spec_deep_nesting": Case(
        spec_text("name: t\nspace: " + "[" * 10_000), ("spec.yaml:2:57: nested deeper than 50 levels", "flatten it")),
    "spec_over_1mb": Case(
        spec_text("name: t\n#" + "x" * 1_000_000 + "\n"),
        ("spec.yaml: larger than 1,000,000 bytes, the limit for a spec", "keep data and generated lists out of it")),
    "spec_invalid_utf8": Case(
        spec_text(b"name: t\nspace: {num_prompts: caf\xe9}\n"),
        ("spec.yaml: not UTF-8 text: byte 0xe9 at byte offset 32 (line 2)", "save the spec as UTF-8")),
    "spec_syntax_error": Case(
        spec_text("name: t\nspace: {num_prompts: [1, 2\n"),
        ("spec.yaml:3:1: not valid YAML: expected ',' or ']', but got '<stream end>'",)),
    "spec_duplicate_key": Case(
        spec_text("name: t\nspace:\n  num_prompts: {int: [1, 8]}\n  num_prompts: 4\n"),
        ("spec.yaml:4:3: duplicate key 'num_prompts' (first at line 3)", "merge the two or delete one")),
    "spec_set_duplicate_key": Case(
        spec_with({}, "--set", "space.num_prompts={int: [1, 8], int: [2, 4]}"),
        ("--set 'space.num_prompts={int: [1, 8], int: [2, 4]}':1:15: duplicate key 'int' (first at line 1)",)),
    # ---- the data stays inside its root: escapes, symlinks, bombs, loops, labels, duplicates, BOM (issue 12)
    "data_entry_escapes_with_dotdot": Case(
        vtab_task(_write("val200.txt", "images/teal.png 0\n../outside.png 1\n")),
        ("data/toy/val200.txt:2: image path '../outside.png' leads to", "outside the task folder data/toy",
         "move the image into the task folder")),
    "data_entry_absolute": Case(
        vtab_task(_write("train800.txt", "images/red.png 0\n/etc/passwd 1\nimages/blue.png 3\n")),
        ("data/toy/train800.txt:2: image path '/etc/passwd' is absolute", "write it relative to the task folder data/toy")),
    "data_symlink_outside": Case(  # in test.txt, which no trial reads before the search ends: checked up front
        vtab_task(lambda task: (task / "images" / "link.png").symlink_to("/etc/passwd")
                  or _write("test.txt", "images/teal.png 3\nimages/link.png 0\n")(task)),
        ("data/toy/test.txt:2: image path 'images/link.png' leads through a symlink to",
         "outside the task folder data/toy", "symlinks must point inside it too")),
    "data_symlink_loop": Case(
        vtab_task(lambda task: (task / "images" / "loop.png").symlink_to("loop.png")
                  or _write("train800.txt", "images/red.png 0\nimages/loop.png 1\n")(task)),
        ("data/toy/images/loop.png: cannot resolve the path (",
         "listed in data/toy/train800.txt:2: fix the symlink or remove that entry")),
    "data_decompression_bomb": Case(  # a PNG header declaring 14000 x 14000 1-bit pixels, and no pixel data
        vtab_task(_write("images/blue.png", bytes.fromhex(
            "89504e470d0a1a0a0000000d49484452000036b0000036b001000000008ca0c8c40000000049454e44ae426082"))),
        ("data/toy/images/blue.png: refused as a possible decompression bomb (Image size (196000000 pixels)",
         "listed in data/toy/train800.txt")),
    "data_test_only_label": Case(
        vtab_task(_write("test.txt", "images/teal.png 3\nimages/red.png 2\n")),
        ("data/toy/test.txt:2: label 2 of red.png occurs nowhere in train800val200.txt",
         "fix the label, or add training images of class 2 to train800val200.txt")),
    "data_one_image_two_labels": Case(
        vtab_task(_write("train800.txt", "images/red.png 0\nimages/blue.png 3\nimages/red.png 1\n")),
        ("data/toy/train800.txt: the same image data/toy/images/red.png is listed with two labels, 0 (line 1) and 1 "
         "(line 3)", "keep one entry with the right label")),
    # ---- preflight: weights files, MLflow URIs, resources, experiment names (issue 12)
    "weights_text_safetensors": Case(
        spec_with({"backbone.weights": "vit.safetensors"}, prepare=_write("vit.safetensors", "not weights\n")),
        ("backbone.weights: vit.safetensors: not a readable safetensors file (SafetensorError",
         "give a .safetensors file or a torch.save()d state dict of timm's vit_tiny_patch16_224")),
    "weights_text_pth": Case(
        spec_with({"backbone.weights": "vit.pth"}, prepare=_write("vit.pth", "not weights\n")),
        ("backbone.weights: vit.pth: not a readable torch (weights_only=True) file",)),
    "weights_list_pth": Case(
        spec_with({"backbone.weights": "vit.pth"}, prepare=lambda cwd: torch.save([torch.zeros(2)], cwd / "vit.pth")),
        ("backbone.weights: vit.pth: holds a Python list, not a state dict",)),
    "weights_of_another_model": Case(
        spec_with({"backbone.weights": "vit.pth"},
                  prepare=lambda cwd: torch.save(torch.nn.Linear(2, 2).state_dict(), cwd / "vit.pth")),
        ("backbone.weights: vit.pth: does not fit vit_tiny_patch16_224", "missing cls_token, pos_embed",
         "unexpected weight, bias")),
    "mlflow_uri_folder": Case(
        spec_with({"tracking.mlflow_uri": "./mlruns"}),
        ("tracking.mlflow_uri: ./mlruns is a file store (a folder), which MLflow 3 refuses",
         "sqlite:///path/mlflow.db", "http://HOST:5000")),
    "mlflow_uri_file_scheme": Case(
        spec_with({"tracking.mlflow_uri": "file:///tmp/mlflow.db"}),
        ("tracking.mlflow_uri: file:///tmp/mlflow.db is a file store", "sqlite:////tmp/mlflow.db")),
    "mlflow_uri_unknown_scheme": Case(
        spec_with({"tracking.mlflow_uri": "s3://bucket/mlflow"}),
        ("tracking.mlflow_uri: s3://bucket/mlflow: MLflow has no tracking store for s3://", "sqlite:///")),
    "worker_beyond_any_node": Case(
        spec_with({"resources.cpus_per_worker": 1024}),
        ("resources.cpus_per_worker: a worker asks for 1024 CPUs but this machine has",
         "set resources.cpus_per_worker:")),
    "trial_beyond_machine": Case(  # one CPU more than the machine has: each worker fits, all of them do not
        spec_with({"resources.workers_per_trial": (os.cpu_count() or 1) + 1}),
        ("resources.workers_per_trial:", "workers of 1 CPU each do not fit on this machine",
         "set workers_per_trial:")),
    # Storage is <cwd>/results, so an escape would land in the working directory, where the test looks.
    "name_escapes_storage": Case(
        spec_with({}, "--name", "../escape"),
        ("--name '../escape': an experiment name is one folder name", "--storage")),
    "name_with_slash": Case(spec_with({}, "--name", "a/b"), ("--name 'a/b': an experiment name is one folder name",)),
    "name_dot_dot": Case(spec_with({}, "--name", ".."), ("--name '..': an experiment name", "not . or ..")),
    "name_links_outside_storage": Case(
        spec_with({}, "--name", "linked", prepare=lambda cwd: (cwd / "results").mkdir() or
                  (cwd / "results" / "linked").symlink_to(cwd / "elsewhere")),
        ("--name linked:", "is a link to", "outside the storage folder")),
}


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    cwd: Path
    before: set[str]  # the working directory's files before the run
    ray_dir: Path  # RAY_TMPDIR of the run: Ray creates it when it starts


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Runs the selected cases concurrently, each in its own working directory; a private node cache and
    Ray temp directory (``RAY_TMPDIR``) for all of them."""
    wanted = [
        item.callspec.params["case"] for item in request.session.items
        if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    wanted = [name for name in wanted if not (name == "gpus_without_gpu" and HAS_GPU)]
    base = tmp_path_factory.mktemp("bad_input")
    runs = {}
    for name in wanted:
        cwd = base / name
        cwd.mkdir()
        runs[name] = (cwd, CASES[name].setup(cwd), _files(cwd))
    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        env.setenv("VPT_TUNE_CACHE", str(base / "cache"))
        env.setenv("RAY_TMPDIR", str(base / "ray"))
        env.delenv("RAY_ADDRESS", raising=False)
        procs = pool.map(lambda run: vpt_tune(*run[1], cwd=run[0]), runs.values())
        return {name: Outcome(proc, run[0], run[2], base / "ray") for (name, run), proc in zip(runs.items(), procs)}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(name, marks=pytest.mark.skipif(HAS_GPU, reason="a GPU exists here")) if name == "gpus_without_gpu"
        else name
        for name in CASES
    ],
)
def test_bad_input_is_refused_before_anything_starts(case, outcomes):
    outcome = outcomes[case]
    proc = outcome.proc
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vpt-tune: error: "), proc.stderr
    for text in CASES[case].expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert _files(outcome.cwd) == outcome.before  # no experiment directory, no mlflow.db, no mlruns/
    assert not outcome.ray_dir.exists()  # Ray never started


def test_debug_shows_the_traceback(tmp_path):
    args = CASES["low_above_high"].setup(tmp_path)
    proc = vpt_tune("--debug", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "SpecError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vpt-tune: error: spec.yaml")
    assert sorted(_files(tmp_path)) == ["spec.yaml"]


# ---------------------------------------------------------------- Ctrl-C, then resume (issue 12)

def _reports(experiment: Path) -> list[list[dict]]:
    """Every trial's reports so far (its result.json lines, written as it reports; the last one does not
    say ``done``: Tune marks that only in its own state), one list per trial of the search."""
    trials = []
    for path in (experiment / "search").glob("*/result.json"):
        lines = path.read_text().splitlines()
        trials.append([json.loads(line) for line in lines if line.strip()])
    return trials


def test_ctrl_c_stops_the_search_truthfully_and_resume_finishes_each_trial_once(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while one trial has finished and another is mid-way:
    exit 130 with the count and the resume command, the stopped trial recorded as interrupted (never on a
    front, its MLflow run KILLED, the search run KILLED); then `vpt-tune resume` finishes every trial once,
    telling Optuna each result once."""
    trials = 3
    spec = _spec_file(tmp_path, trials, epochs=6)
    experiment = tmp_path / "results" / "ctrl-c"
    proc = _cli("search", spec, "--name", "ctrl-c", cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # the terminal's view
    reader.start()
    deadline = time.monotonic() + 600

    def ready() -> bool:  # Tune counts one trial complete, another one is past its first epoch
        completed = any("[digits] 1/3 trials" in line and "val_acc" in line for line in list(lines))
        last_epochs = [r[-1]["epoch"] for r in _reports(experiment) if r] if (experiment / "search").is_dir() else []
        return completed and any(1 <= epoch < 6 for epoch in last_epochs)

    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and ready(), "the search ended before it could be interrupted:\n" + "".join(lines[-40:])
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    proc.wait(timeout=300)
    reader.join(timeout=60)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("vpt-tune: interrupted:"))
    finished_before = int(line.split("interrupted: ")[1].split(" of ")[0])
    assert 1 <= finished_before < trials and f"of {trials} trials finished" in line, line
    assert f"vpt-tune resume {experiment}" in line
    assert "finished" not in out.split(line)[1]  # no summary claiming the search finished

    table = pd.read_parquet(experiment / "trials.parquet")
    assert (table["status"] == "finished").sum() == finished_before
    stopped = table[table["status"] == "interrupted"]
    assert len(stopped) >= 1 and table.loc[table["status"] == "finished", "val_acc"].notna().all()
    assert_front(table)  # the finished trials' front; the stopped ones are never on it
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("test").experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    search_run = next(r for r in runs if "task" not in r.data.tags)
    assert search_run.info.status == "KILLED"
    stopped_runs = [r for r in runs if r.data.tags.get("trial_id") in set(stopped["trial_id"])]
    assert stopped_runs and all(r.data.tags["status"] == "interrupted" and r.info.status == "KILLED"
                                for r in stopped_runs)

    proc = _cli("resume", str(experiment), cwd=tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "Cannot tell" not in out
    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == trials and table["trial_id"].is_unique and (table["status"] == "finished").all()
    assert set(stopped["trial_id"]) <= set(table["trial_id"])  # the stopped trials continued, not replaced
    study = optuna.load_study(
        study_name="digits",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))),
    )
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * trials, states
    runs = client.search_runs([experiment_id], max_results=1000)
    assert next(r for r in runs if "task" not in r.data.tags).info.status == "FINISHED"
    trial_runs = [r for r in runs if "trial_id" in r.data.tags]
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == sorted(table["trial_id"])
    assert all(r.data.tags["status"] == "finished" and r.info.status == "FINISHED" for r in trial_runs)
