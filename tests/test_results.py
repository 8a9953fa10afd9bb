"""Reading a finished experiment back: the trial table's paths, `vpt-tune pareto` and `vpt-tune export`
(a constructed table and a real MLflow store; no Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from vpt_tune.cli import main
from vpt_tune.errors import UserError
from vpt_tune.export import export_trial
from vpt_tune.search.results import (
    STATE_FILE, TABLE_FILE, experiment_relative, format_table, load_table, short_config,
)

LONG = {"num_prompts": 15, "placement": "last_k", "depth": 3, "base_lr": 0.0931234, "weight_decay": 1.25e-4,
        "prompt_dropout": 0.1, "prompt_init": "spt_mean", "condensation_ratio": 0.5, "token_prune_ratio": 0.25}


def _table(tested: bool = False) -> pd.DataFrame:
    rows = [  # task order: as first seen; in a task, the most accurate first
        ("dsprites_orientation", "a0001_00000", "finished", 0.50, 2.0, 17.9, True, "/old/train_runs/r0/checkpoint_1"),
        ("dsprites_orientation", "a0001_00001", "finished", 0.71, 30.0, 19.9, True, "train_runs/r1/checkpoint_1"),
        ("digits", "a0001_00002", "stopped", 0.10, 5.0, 18.1, False, ""),
        ("digits", "a0001_00003", "failed", None, None, None, False, ""),
        ("digits", "a0001_00004", "finished", 0.93, 5.0, 18.1, True, "train_runs/r4/checkpoint_2"),
    ]
    table = pd.DataFrame(rows, columns=["task", "trial_id", "status", "val_acc", "prompt_tokens", "gflops", "pareto",
                                        "checkpoint"])
    table["config"] = [json.dumps(LONG)] * len(table)
    table["stopped_at_epoch"] = [None, None, 3.0, None, None]
    table["mlflow_run_id"] = ""
    if tested:
        table["test_acc"] = [0.48, 0.70, None, None, 0.91]
        table["test_acc_std"] = [0.01, 0.002, None, None, 0.0]
    return table


def test_short_config_puts_prompts_and_placement_first():
    assert short_config(LONG) == \
        "15 last_k=3 · lr 0.0931 · wd 0.000125 · drop 0.1 · init spt_mean · prune-tok 0.25 · cond 0.5"
    assert short_config({"num_prompts": 8, "placement": "layers", "layers": [0, 3], "zeta": 2}) == \
        "8 layers=0,3 · zeta 2"
    assert short_config({"placement": "deep", "base_lr": 1.0}) == "deep · lr 1"
    assert short_config({"num_prompts": 10, "placement": "deep", "base_lr": 1.0, "weight_decay": 0.0,
                         "prompt_dropout": 0.0, "prompt_init": "uniform"}) == "10 deep · lr 1"  # defaults left out


def test_checkpoint_paths_are_relative_to_the_experiment(tmp_path):
    assert experiment_relative("/x/train_runs/y/train_runs/run/checkpoint_1") == "train_runs/run/checkpoint_1"
    assert experiment_relative("train_runs/run/checkpoint_1") == "train_runs/run/checkpoint_1"
    assert experiment_relative("") == "" and experiment_relative("/elsewhere/ckpt") == "/elsewhere/ckpt"
    _table().to_parquet(tmp_path / TABLE_FILE)  # a table written before experiments could move
    assert list(load_table(tmp_path)["checkpoint"]) == [
        "train_runs/r0/checkpoint_1", "train_runs/r1/checkpoint_1", "", "", "train_runs/r4/checkpoint_2"]


@pytest.mark.parametrize("tested", [False, True])
def test_pareto_table_fits_100_columns_sorted_with_units(tested):
    lines = format_table(_table(tested), width=100).splitlines()
    assert all(len(line) <= 100 for line in lines), lines
    header = lines[0].split()
    assert header[:4] == ["task", "trial", "status", "val"] and "GFLOPs" in header and "tokens" in header
    assert ("test" in header) == tested
    order = [line.split()[1] for line in lines[1:]]
    assert order == ["a0001_00001", "a0001_00000", "a0001_00004", "a0001_00002", "a0001_00003"]
    rows = dict(zip(order, lines[1:]))
    assert "stopped@3" in rows["a0001_00002"] and " 10.0 " in rows["a0001_00002"]
    assert rows["a0001_00001"].split()[3] == "71.0" and "19.90" in rows["a0001_00001"]
    assert "15 last_k=3" in rows["a0001_00001"] and rows["a0001_00001"].endswith("…")
    if tested:
        assert "70.0±0.2" in rows["a0001_00001"]
    front = format_table(_table(tested)[_table()["pareto"]], width=100).splitlines()  # no status, no marks
    assert all(len(line) <= 100 for line in front) and "status" not in front[0] and "front" not in front[0]
    assert "15 last_k=3 · lr 0.0931 · wd" in front[1], front
    assert len(format_table(_table(tested), width=10**6).splitlines()[1]) > 100  # all of the config in a file


def _experiment(tmp_path, tested=False):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    _table(tested).to_parquet(experiment / TABLE_FILE)
    return experiment


@pytest.mark.parametrize("form", ["table", "json", "csv", "parquet"])
def test_pareto_output_writes_every_format(tmp_path, capsys, form):
    experiment = _experiment(tmp_path)
    out = tmp_path / f"front.{form}"
    assert main(["pareto", str(experiment), "--format", form, "--output", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 3 rows to {out}\n"  # the front: 3 trials
    if form == "parquet":
        assert len(pd.read_parquet(out)) == 3
    elif form == "json":
        assert [r["trial_id"] for r in json.loads(out.read_text())] == ["a0001_00001", "a0001_00000", "a0001_00004"]
    elif form == "csv":
        assert len(pd.read_csv(out)) == 3
    else:
        assert out.read_text().splitlines()[0].startswith("task") and LONG["prompt_init"] in out.read_text()


@pytest.mark.parametrize("form", ["table", "json", "csv"])
def test_pareto_summary_follows_format_and_output(tmp_path, capsys, form):
    experiment = _experiment(tmp_path, tested=True)
    assert main(["pareto", str(experiment), "--summary", "--format", form]) == 0
    shown = capsys.readouterr().out
    if form == "table":
        assert "| digits | test_acc | 91.0 |" in shown
    elif form == "json":
        rows = {r["task"]: r for r in json.loads(shown)}
        assert rows["digits"]["best_acc"] == pytest.approx(0.91)
    else:
        assert "best_acc" in shown.splitlines()[0] and len(shown.splitlines()) == 3  # header + 2 tasks
    out = tmp_path / "summary.out"
    assert main(["pareto", str(experiment), "--summary", "--format", form, "-o", str(out)]) == 0
    assert out.read_text().strip() == shown.strip()


@pytest.mark.parametrize("args, message", [
    (["--summary", "--all"], "--summary reads every finished trial already; drop --all"),
    (["--format", "parquet"], "--format parquet needs --output FILE.parquet"),
    (["-o", "nowhere/front.csv"], "the folder nowhere does not exist"),
])
def test_pareto_bad_options_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    experiment = _experiment(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["pareto", str(experiment), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("options", [[], ["--summary"]])
def test_pareto_reads_the_table_without_ray_mlflow_or_torch(tmp_path, options):
    """What makes `vpt-tune pareto` answer at once (bench/pareto_latency.py measures it)."""
    import subprocess
    import sys

    experiment = _experiment(tmp_path, tested=True)
    code = "import sys; from vpt_tune.cli import main; main(sys.argv[1:]); " \
           "print(sorted(m for m in ('ray', 'mlflow', 'torch', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code, "pareto", str(experiment), *options], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out


def _trained(experiment, name: str) -> dict:
    """A trial checkpoint file of a random-init tiny ViT's job (what a finished Train run leaves)."""
    from dataclasses import asdict

    from vpt_tune.train.job import CHECKPOINT_FILE, Job

    job = Job(model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=str(experiment),
              benchmark="vtab-1k", train_split="train800", eval_split="val200", params={"num_prompts": 2},
              epochs=1, batch_size=8)
    folder = experiment / "train_runs" / name / "checkpoint_2"
    folder.mkdir(parents=True)
    state = {"job": asdict(job), "metrics": {"val_acc": 0.5},
             "trainable": {"prompts.prompts": torch.randn(1, 2, 192), "head.weight": torch.randn(3, 192)}}
    torch.save(state, folder / CHECKPOINT_FILE)
    return state


def test_export_falls_back_to_the_mlflow_copy(tmp_path):
    """An experiment whose train_runs/ stayed behind exports from the prompts its MLflow run logged."""
    experiment = _experiment(tmp_path)
    state = _trained(experiment, "r4")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "mlruns").as_uri()))
    client.log_artifacts(run.info.run_id, str(experiment / "train_runs/r4/checkpoint_2"), "prompts")
    (experiment / STATE_FILE).write_text(json.dumps({"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    row = {**_table().iloc[4].to_dict(), "mlflow_run_id": run.info.run_id}

    direct = torch.load(export_trial(experiment, row, tmp_path / "a.pt"), weights_only=True)
    (experiment / "train_runs/r4/checkpoint_2/trainable.pt").unlink()
    copied = torch.load(export_trial(experiment, row, tmp_path / "b.pt"), weights_only=True)
    for name, tensor in state["trainable"].items():
        assert torch.equal(direct["trainable"][name], tensor) and torch.equal(copied["trainable"][name], tensor)

    with pytest.raises(UserError, match="no .*trainable.pt and no prompts/trainable.pt in its MLflow run"):
        export_trial(experiment, {**row, "mlflow_run_id": ""}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="is stopped, not finished"):
        export_trial(experiment, _table().iloc[2].to_dict(), tmp_path / "d.pt")
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "d.pt").exists()


def test_plotly_js_goes_to_a_search_run_once(tmp_path):
    from vpt_tune.search.tracking import PLOTLY_JS, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "plotly-once")
    run = tracker.start_run("search")
    uploads = []
    log_artifact = tracker.client.log_artifact
    tracker.client.log_artifact = lambda *args, **kwargs: (uploads.append(args), log_artifact(*args, **kwargs))
    tracker.log_plotly(run)
    tracker.log_plotly(run)  # a resumed search: its run has it already
    assert len(uploads) == 1 and [a.path for a in tracker.client.list_artifacts(run)] == [PLOTLY_JS]


def test_the_summary_puts_reference_points_beside_the_fronts_and_off_them():
    from vpt_tune.search.summary import summary_markdown, summary_table

    rows = [  # svhn: two searched trials and a linear probe at two lrs (the second selected on val)
        {"task": "svhn", "trial_id": "a", "val_acc": 0.90, "gflops": 2.0, "prompt_tokens": 8.0, "reference": ""},
        {"task": "svhn", "trial_id": "b", "val_acc": 0.895, "gflops": 1.5, "prompt_tokens": 4.0, "reference": ""},
        {"task": "svhn", "trial_id": "c", "val_acc": 0.95, "gflops": 1.0, "prompt_tokens": 0.0, "reference": "linear"},
        {"task": "svhn", "trial_id": "d", "val_acc": 0.97, "gflops": 1.0, "prompt_tokens": 0.0, "reference": "linear",
         "selected": True},
    ]
    table = pd.DataFrame(rows).assign(status="finished")
    table["selected"] = table["selected"].fillna(False).astype(bool)
    summary = summary_table(table)
    row = summary.iloc[0]
    assert (row["best_trial"], row["cheap_trial"]) == ("a", "b")  # the references stay off the front's points
    assert (row["linear_acc"], row["linear_gflops"]) == (0.97, 1.0)  # the selected one
    markdown = summary_markdown(summary)
    assert "| linear acc % (GFLOPs) |" in markdown.splitlines()[0]
    assert markdown.splitlines()[2].endswith("| 97.0 (1.00) |")
