"""End-to-end searches on a real local Ray, a real Optuna journal, a real MLflow sqlite store."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

import vpt_tune

from vpt_tune.cli import main
from vpt_tune.search.results import short_config
from vpt_tune.search.runner import resume_search, run_search
from vpt_tune.spec import SpecError, load_spec, validate
from vpt_tune.train.slot_worker import TrialCheckpoints

from conftest import assert_front

pytestmark = pytest.mark.slow  # real Ray searches


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, as in CI)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def small_spec(tmp_path, **sections) -> dict:
    """A 2-trial search on the demo digits task with a small random-init ViT."""
    raw = {
        "name": "small",
        "backbone": {"model": "vit_tiny_patch16_224", "weights": "random", "img_size": 32},
        "data": {"root": None, "tasks": ["digits"]},
        "space": {
            "num_prompts": {"int": [1, 8]},
            "placement": {"choice": ["shallow", "deep", "last_k"]},
            "depth": {"int": [1, 12], "when": {"placement": ["last_k"]}},
            "base_lr": {"float": [0.05, 0.5], "log": True},
        },
        "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
        "search": {"sampler": "random", "trials_per_task": 2, "seed": 3},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        "storage": str(tmp_path / "results"),
    }
    raw.update(sections)
    return raw


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _same_trained(one: Path, other: Path) -> bool:
    """Whether two exported trials hold the same trained tensors."""
    one, other = (torch.load(path, weights_only=True)["trainable"] for path in (one, other))
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_two_trial_search_end_to_end(tmp_path, local_ray, capsys):
    raw = small_spec(tmp_path)
    raw["space"]["condensation_ratio"] = 0.5  # Prompt Condensation after training, then 1 fine-tuning epoch
    raw["condensation"] = {"epochs": 1}
    spec = validate(raw)
    result = run_search(spec, name="exp")
    table = result.table
    printed = capsys.readouterr().out  # the plan atop the search: its work and time before any trial
    assert re.search(r"digits +2 +3\.0 +800/200", printed) and "CPU-hours" in printed, printed[:2000]

    # Both trials finished with the three objectives, and the front is the non-dominated set.
    assert list(table["status"]) == ["finished", "finished"]
    assert table[["val_acc", "prompt_tokens", "gflops"]].notna().all().all()
    assert (table["epoch"] == 3).all()
    assert table["val_acc_uncondensed"].notna().all()
    assert_front(table)
    # Where each trial's time went: Ray Train's start-up and the model/data set-up, inside its wall time.
    assert (table["startup_seconds"] > 0).all() and (table["setup_seconds"] > 0).all()
    assert (table[["train_seconds", "startup_seconds", "setup_seconds"]].sum(axis=1) < table["wall_seconds"]).all()
    configs = [json.loads(c) for c in table["config"]]
    for config, tokens in zip(configs, table["prompt_tokens"]):
        assert 1 <= config["num_prompts"] <= 8
        assert ("depth" in config) == (config["placement"] == "last_k")
        blocks = {"shallow": 1, "deep": 12, "last_k": config.get("depth")}[config["placement"]]
        kept = math.ceil(0.5 * config["num_prompts"] * blocks)  # the cost is that of the condensed model
        assert tokens == pytest.approx(kept if config["placement"] == "shallow" else kept / 12)

    # The Optuna study in the experiment directory saw both trials with the same objective values.
    study = optuna.load_study(
        study_name="digits",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(result.experiment_dir / "optuna.journal"))
        ),
    )
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.values[0] for t in completed) == sorted(table["val_acc"])
    # ... named objectives, and each trial's vpt-tune id and MLflow run (optuna-dashboard shows them).
    assert study.metric_names == ["val_acc", "prompt_tokens", "gflops"]
    runs_of = dict(zip(table["trial_id"], table["mlflow_run_id"]))
    assert {t.user_attrs["trial_id"]: t.user_attrs["mlflow_run_id"] for t in completed} == runs_of

    # MLflow: search run -> task run -> one run per trial, with params, per-epoch metrics and tags.
    client = MlflowClient(spec.tracking.mlflow_uri)
    runs = _runs(client, "test")
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[result.parent_run_id]
    assert parent.info.status == "FINISHED"
    task_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.data.tags["task"] for r in task_runs] == ["digits"]
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == task_runs[0].info.run_id]
    assert len(trial_runs) == 2
    for run in trial_runs:
        row = table[table["trial_id"] == run.data.tags["trial_id"]].iloc[0]
        assert run.data.tags["pareto"] == str(bool(row["pareto"])).lower()
        assert run.data.tags["status"] == "finished"
        assert run.data.params["num_prompts"] == str(json.loads(row["config"])["num_prompts"])
        assert run.data.metrics["val_acc"] == pytest.approx(row["val_acc"])
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 3  # one per epoch, fine-tuning too
        assert "pid" not in run.data.metrics  # Tune's bookkeeping stays out
        assert run.data.metrics["startup_seconds"] == pytest.approx(row["startup_seconds"])
        assert run.info.run_name == f"digits · {short_config(json.loads(row['config']))}"  # what the runs list shows
        # Costs are logged when known, not every epoch: the planned one, and the measured one after condensing
        # where it differs (the condensed blocks' uneven token counts, in the attention's quadratic term).
        assert len(client.get_metric_history(run.info.run_id, "prompt_tokens")) == 1
        assert len(client.get_metric_history(run.info.run_id, "gflops")) <= 2
        assert run.data.metrics["gflops"] == pytest.approx(row["gflops"])
        saved = {a.path for a in client.list_artifacts(run.info.run_id, "prompts")}
        assert saved == ({"prompts/trainable.pt"} if row["pareto"] else set())  # prompts + head of Pareto trials
    task_artifacts = {a.path for a in client.list_artifacts(task_runs[0].info.run_id)}
    assert {"front_val_acc.html", "front_val_acc_vs_prompt_tokens.png", "front_val_acc_vs_gflops.png",
            "trials.parquet"} <= task_artifacts
    history = [m.value for m in sorted(client.get_metric_history(task_runs[0].info.run_id, "hypervolume"),
                                       key=lambda m: m.step)]
    assert len(history) == 2 and 0 < history[0] <= history[1] <= 1  # one point per finished trial, normalised
    summary = task_runs[0].data.metrics
    assert summary["front_size"] == table["pareto"].sum() and summary["best_val_acc"] == table["val_acc"].max()
    assert {f"digits/{k}": v for k, v in summary.items()} == {k: v for k, v in parent.data.metrics.items()
                                                              if k.startswith("digits/")}
    assert client.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "trials.csv" in task_artifacts  # a table MLflow's UI can show
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "digits")}
    assert "digits/front_val_acc.html" in parent_artifacts
    assert "plotly.min.mjs" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # loaded by every front
    assert task_runs[0].info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())  # beside mlflow.db
    local = client.download_artifacts(task_runs[0].info.run_id, "trials.parquet", str(tmp_path))
    assert len(pd.read_parquet(local)) == 2

    # The CLI reads the experiment back.
    capsys.readouterr()
    assert main(["pareto", str(result.experiment_dir), "--all", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["trial_id"] for r in records} == set(table["trial_id"])
    for record in records:
        assert {"task", "trial_id", "config", "metrics", "pareto"} <= set(record)
        assert {"val_acc", "prompt_tokens", "gflops"} <= set(record["metrics"])
    assert main(["pareto", str(result.experiment_dir), "--format", "json"]) == 0
    assert all(r["pareto"] for r in json.loads(capsys.readouterr().out))

    # A Pareto trial exported to a small file loads back as a model that scores its val_acc again.
    best = table[table["pareto"]].sort_values("val_acc").iloc[-1]
    out = tmp_path / "best.pt"
    assert main(["export", str(result.experiment_dir), "--task", "digits", "--trial", best["trial_id"], str(out)]) == 0
    assert out.stat().st_size < 1_000_000  # prompts + head, never the backbone
    model = vpt_tune.load(out)
    from vpt_tune.data.vtab import load_split
    from vpt_tune.models.backbone import normalisation
    from vpt_tune.train.loop import evaluate

    task_dir = Path(torch.load(out, weights_only=True)["job"]["task_dir"])
    split = load_split(task_dir, "val200", 32, *normalisation(model.backbone), model.head.out_features)
    assert evaluate(model, split, 64, torch.device("cpu")) == pytest.approx(best["val_acc"], abs=0.01)
    # ... and from the image files, through the model's own preprocessing, as the README shows.
    from PIL import Image

    from vpt_tune.data.vtab import read_list

    files = read_list(task_dir, "val200")
    with torch.no_grad():
        predicted = model(model.preprocess([Image.open(path) for path, _ in files])).argmax(-1)
    accuracy = (predicted == torch.tensor([label for _, label in files])).float().mean().item()
    assert accuracy == pytest.approx(best["val_acc"], abs=0.01)
    assert main(["export", str(result.experiment_dir), "--task", "digits", "--trial", "nope", str(out)]) == 2

    # The same experiment name is refused before anything runs.
    with pytest.raises(SpecError, match="exists already.*vpt-tune resume"):
        run_search(spec, name="exp")

    # Moved to another folder, the experiment prints its fronts, exports and resumes: its table holds
    # paths relative to it, and Tune and Ray Train restore from where it is now.
    moved = tmp_path / "elsewhere" / "exp"
    moved.parent.mkdir()
    result.experiment_dir.rename(moved)
    capsys.readouterr()
    assert main(["pareto", str(moved)]) == 0
    assert best["trial_id"] in capsys.readouterr().out
    assert main(["export", str(moved), "--task", "digits", "--trial", best["trial_id"], str(tmp_path / "m.pt")]) == 0
    assert _same_trained(out, tmp_path / "m.pt")
    more = resume_search(moved, ["search.trials_per_task=3"]).table
    assert len(more) == 3 and (more["status"] == "finished").all()
    assert all((moved / c / "trainable.pt").is_file() for c in more["checkpoint"])
    assert not result.experiment_dir.exists()  # nothing written where it was
    # Without its train_runs/ (not copied along), a Pareto trial exports from the copy in its MLflow run.
    for folder in (moved / "train_runs").iterdir():
        folder.rename(tmp_path / folder.name)
    assert main(["export", str(moved), "--task", "digits", "--trial", best["trial_id"], str(tmp_path / "f.pt")]) == 0
    assert _same_trained(out, tmp_path / "f.pt")


def test_two_tasks_with_the_final_protocol(tmp_path, local_ray, capsys):
    """Two VTAB-named tasks written by the test (digits under two folder names, one with its labels
    permuted); Pareto configs are retrained on train800val200 per seed and tested once on test, and so is
    each task's linear probe (a reference point) picked on val from its two learning rates."""
    import shutil

    from vpt_tune.data.demo import materialise

    source = materialise("digits", tmp_path / "source")
    shutil.copytree(source, tmp_path / "vtab" / "svhn")  # natural group
    shutil.copytree(source, tmp_path / "vtab" / "eurosat")  # specialized group, other labels: another task
    for split in (tmp_path / "vtab" / "eurosat").glob("*.txt"):
        lines = [line.rsplit(" ", 1) for line in split.read_text().splitlines()]
        split.write_text("".join(f"{path} {(int(label) * 3 + 1) % 10}\n" for path, label in lines))
    raw = small_spec(tmp_path, final={"seeds": [1, 2]})
    raw["search"]["trials_per_task"] = 1  # on each front; what matters here is what follows the search
    raw["data"] = {"root": str(tmp_path / "vtab"), "tasks": ["svhn", "eurosat"]}
    raw["train"]["epochs"] = 2
    raw["space"]["placement"] = "shallow"
    raw["search"]["references"] = ["linear"]
    raw["linear"] = {"base_lrs": [0.05, 0.5]}
    result = run_search(validate(raw), name="final")
    table, experiment = result.table, result.experiment_dir

    # Both tasks' trials and reference points ran in one Tune experiment, each task on its own Optuna study.
    assert sorted(p.name for p in experiment.iterdir() if (p / "tuner.pkl").is_file()) == [
        "final1", "search"]
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal")))
    studies = optuna.get_all_study_summaries(journal)
    assert sorted(s.study_name for s in studies) == ["eurosat", "svhn"] and all(s.n_trials == 1 for s in studies)
    searched, references = table[table["reference"] == ""], table[table["reference"] != ""]
    assert sorted(searched["task"]) == ["eurosat", "svhn"] and not references["pareto"].any()

    # The linear probe of each task: both lrs, no prompts, the plain backbone's cost; the better one on val selected.
    assert sorted(zip(references["task"], [json.loads(c)["base_lr"] for c in references["config"]])) == [
        ("eurosat", 0.05), ("eurosat", 0.5), ("svhn", 0.05), ("svhn", 0.5)]
    assert (references["status"] == "finished").all() and (references["prompt_tokens"] == 0).all()
    assert (references["gflops"] < searched["gflops"].min()).all() and (references["trainable_params"] == 193 * 10).all()
    selected = references[references["selected"]]
    assert sorted(selected["task"]) == ["eurosat", "svhn"]
    for row in selected.itertuples():
        assert row.val_acc == references[references["task"] == row.task]["val_acc"].max()

    # Every Pareto trial and selected reference point was retrained once per seed on the final split and tested;
    # others were not.
    finals = pd.concat([pd.read_parquet(experiment / "tables" / f"{t}.final.parquet") for t in ("svhn", "eurosat")])
    pareto = table[table["pareto"]]
    assert sorted(zip(finals["source_trial"], finals["seed"])) == sorted(
        (t, s) for t in [*pareto["trial_id"], *selected["trial_id"]] for s in (1, 2))
    assert (finals["status"] == "finished").all() and finals["test_acc"].between(0, 1).all()
    assert pareto["test_acc"].notna().all() and (pareto["test_seeds"] == 2).all()
    assert selected["test_acc"].notna().all()
    assert table[~table["pareto"] & ~table["selected"]]["test_acc"].isna().all()
    for row in pareto.itertuples():
        mine = finals[finals["source_trial"] == row.trial_id]["test_acc"]
        assert row.test_acc == pytest.approx(mine.mean()) and row.test_acc_std == pytest.approx(mine.std(ddof=0))
    assert table["test_pareto"].sum() >= 2  # one test front per task

    # MLflow: final runs under each task run, test fronts, the summary on the search run.
    client = MlflowClient(result.mlflow_uri)
    runs = _runs(client, "test")
    final_runs = [r for r in runs if r.data.tags.get("final") == "true"]
    assert sorted((r.data.tags["source_trial"], int(r.data.tags["seed"])) for r in final_runs) == sorted(
        zip(finals["source_trial"], finals["seed"]))
    assert all("test_acc" in r.data.metrics and "val_acc" not in r.data.metrics for r in final_runs)
    for run in final_runs:  # two epochs trained, tested once after them (the papers' protocol)
        history = {k: client.get_metric_history(run.info.run_id, k) for k in ("train_loss", "test_acc")}
        assert [m.step for m in history["train_loss"]] == [1, 2] and [m.step for m in history["test_acc"]] == [2]
    task_runs = {r.data.tags["task"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id}
    for task, run in task_runs.items():
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"front_test_acc.html", "front_val_acc.html", "final_runs.parquet"} <= names
        assert all(r.data.tags["mlflow.parentRunId"] == run.info.run_id for r in final_runs if r.data.tags["task"] == task)
    assert {"summary.md", "summary.parquet"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    page = (Path(client.download_artifacts(task_runs["svhn"].info.run_id, "front_val_acc.html"))).read_text()
    assert '"name":"linear"' in page.replace(" ", "")  # the reference point, its own trace on every front

    # The CLI: test_acc for final points, and the summary with group means and the VTAB-1k mean.
    capsys.readouterr()
    assert main(["pareto", str(experiment), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    tested = table.set_index("trial_id")["test_acc"]
    assert records and all(r["metrics"]["test_acc"] == pytest.approx(tested[r["trial_id"]]) for r in records)
    assert main(["pareto", str(experiment), "--summary"]) == 0
    summary = capsys.readouterr().out
    for line in ("| svhn | test_acc |", "| eurosat | test_acc |", "| mean vtab-natural |",
                 "| mean vtab-specialized |", "| mean vtab-1k (of group means) |"):
        assert line in summary, summary
    best = {t: 100 * searched[(searched["task"] == t)]["test_acc"].max() for t in ("svhn", "eurosat")}
    assert f"| mean vtab-1k (of group means) |  | {(best['svhn'] + best['eurosat']) / 2:.1f} |" in summary
    assert "linear acc % (GFLOPs) |" in summary
    linear = selected.set_index("task")
    assert f"{100 * linear.loc['svhn', 'test_acc']:.1f} ({linear.loc['svhn', 'gflops']:.2f}) |" in summary


def test_demo_search_on_real_backbone_reuses_the_trained_model(tmp_path, local_ray):
    """The built-in demo spec, shortened: the real converted DINOv2 backbone learns the digits; the second
    trial differs only in its condensation ratio, so it starts from the first's trained model."""
    spec = load_spec(
        "demo",
        [
            "search.trials_per_task=2",
            "search.references=[]",
            "search.sampler=grid",
            "search.max_concurrent_trials=1",
            "train.epochs=1",
            "condensation.epochs=1",
            "space.num_prompts=4",
            "space.placement=last_k",
            "space.depth=2",
            "space.base_lr=0.1",
            "space.weight_decay=0.0",
            "space.condensation_ratio={choice: [0.25, 0.75]}",
            f"storage={tmp_path / 'results'}",
            f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    table = run_search(spec, name="demo").table
    assert list(table["status"]) == ["finished", "finished"] and table["config"].nunique() == 2
    # A pretrained backbone is far above chance (0.1) after one epoch; a random one is not.
    assert table["val_acc_uncondensed"].min() > 0.5

    first, second = table.iloc[0], table.iloc[1]
    assert first["reused_base_from"] == "" and second["reused_base_from"].endswith(first["trial_id"])
    assert second["val_acc_uncondensed"] == first["val_acc_uncondensed"]  # the same trained model, condensed otherwise
    assert second["prompt_tokens"] != first["prompt_tokens"]
    assert len(list((tmp_path / "results" / "demo" / "base_models").glob("*.pt"))) == 1
    client = MlflowClient(spec.tracking.mlflow_uri)
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["reused_base_from"] == second["reused_base_from"]  # the MLflow run says what it reused
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [2]  # condensation only


def test_diverging_trials_fail_and_the_search_goes_on(tmp_path, local_ray):
    """A NaN loss stops its trial with the reason recorded; Optuna is told; no failed trial is on a front."""
    raw = small_spec(tmp_path, train={"epochs": 1, "batch_size": 64})
    raw["space"] = {"num_prompts": 2, "placement": "shallow", "base_lr": {"choice": [0.1, 1e30]}}
    raw["search"] = {"sampler": "grid", "trials_per_task": 2, "seed": 1}
    spec = validate(raw)
    result = run_search(spec, name="nan")
    table = result.table
    lrs = [json.loads(c)["base_lr"] for c in table["config"]]
    assert sorted(lrs) == [0.1, 1e30]  # the grid: each once
    for lr, status, error, pareto in zip(lrs, table["status"], table["error"], table["pareto"]):
        assert status == ("failed" if lr == 1e30 else "finished")
        assert ("DivergenceError" in error and "lower base_lr" in error) == (lr == 1e30)
        assert not (status == "failed" and pareto)
    study = optuna.load_study(
        study_name="digits",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(result.experiment_dir / "optuna.journal"))
        ),
    )
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted("FAIL" if lr == 1e30 else "COMPLETE" for lr in lrs)
    client = MlflowClient(spec.tracking.mlflow_uri)
    trial_runs = [r for r in _runs(client, "test") if "trial_id" in r.data.tags]
    failed = [r for r in trial_runs if r.data.tags["status"] == "failed"]
    assert len(failed) == lrs.count(1e30)
    assert all(r.info.status == "FAILED" and "lower base_lr" in r.data.tags["error"] for r in failed)


def early_stopping_spec(tmp_path, trials: int, parallel: int = 1) -> dict:
    """``trials`` trials, ``parallel`` at a time, each with a good (0.3) or a hopeless (1e-6) learning rate, 4
    epochs; MO-ASHA at epoch 1 keeps the top quarter, so a hopeless trial reaching the rung after good ones stops."""
    raw = small_spec(tmp_path)
    raw["space"] = {"num_prompts": 2, "placement": "deep", "base_lr": {"choice": [0.3, 1e-6]}}
    raw["train"] = {"epochs": 4, "batch_size": 64, "warmup_epochs": 0, "reuse_base": False}  # repeats train again
    raw["search"] = {"sampler": "random", "trials_per_task": trials, "seed": 1, "max_concurrent_trials": parallel,
                     "early_stopping": {"rule": "mo_asha", "min_epochs": 1, "reduction_factor": 4}}
    return raw


def rung_replay(client: MlflowClient, experiment: str, rule: str = "mo_asha") -> dict[str, bool]:
    """Each trial's decision at epoch 1 made afresh from the epoch-1 accuracies MLflow recorded, in the order
    the search received them (the trial logger records each result as the scheduler judges it): what an
    uninterrupted search decides."""
    from vpt_tune.search.scheduler import Rungs

    rungs = Rungs(rule, 1, 4, 4)
    at_rung = []
    for run in (r for r in _runs(client, experiment) if "trial_id" in r.data.tags):
        first = min((m for m in client.get_metric_history(run.info.run_id, "val_acc") if m.step == 1),
                    key=lambda m: m.timestamp)
        at_rung.append((first.timestamp, run.data.tags["trial_id"], first.value,
                        (run.data.metrics["prompt_tokens"], run.data.metrics["gflops"])))
    return {trial: rungs.judge("digits", trial, 1, acc, costs) for _, trial, acc, costs in sorted(at_rung)}


def test_early_stopping_stops_hopeless_trials_at_the_rung_and_says_so_everywhere(tmp_path, local_ray, capsys):
    spec = validate(early_stopping_spec(tmp_path, 6, parallel=2))  # more stops than CPUs: none may leak one
    result = run_search(spec, name="asha")
    table = result.table.set_index("trial_id")
    client = MlflowClient(spec.tracking.mlflow_uri)

    # The decisions are MO-ASHA's on the recorded rung accuracies, and only hopeless trials stop, at the rung.
    decisions = rung_replay(client, "test")
    assert sorted(decisions) == sorted(table.index)
    assert {t: status == "finished" for t, status in table["status"].items()} == decisions
    stopped = table[table["status"] == "stopped"]
    assert len(stopped) >= 3  # seed 1 draws hopeless trials after good ones: more stops than CPUs
    assert all(json.loads(c)["base_lr"] == 1e-6 for c in stopped["config"])
    assert (stopped["stopped_at_epoch"] == 1).all() and (stopped["epoch"] == 1).all()
    assert (table.loc[table["status"] == "finished", "epoch"] == 4).all()
    assert_front(table.reset_index())  # a stopped trial is never on a front
    # A stopped trial's slot ends it at the rung: nothing is trained after it.
    for trial_id in stopped.index:
        latest = TrialCheckpoints(result.experiment_dir / "train_runs" / f"run_trial_{trial_id}").latest()
        assert latest.name == "checkpoint_000001"

    # Optuna hears PRUNED with the last accuracy and epoch; MLflow and the terminal say stopped.
    study = optuna.load_study(study_name="digits", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(result.experiment_dir / "optuna.journal"))))
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert len(pruned) == len(stopped) and len(study.trials) == len(table)
    assert sorted(t.user_attrs["val_acc"] for t in pruned) == sorted(stopped["val_acc"])
    assert all(t.user_attrs["stopped_at_epoch"] == 1 for t in pruned)
    for run in (r for r in _runs(client, "test") if "trial_id" in r.data.tags):
        status = table.loc[run.data.tags["trial_id"], "status"]
        assert run.data.tags["status"] == status
        assert (run.data.tags.get("stopped_at_epoch"), run.data.metrics.get("stopped_at_epoch")) == \
            (("1", 1.0) if status == "stopped" else (None, None))
    out = capsys.readouterr().out
    assert out.count(": stopped at epoch 1 (val_acc") == len(stopped)
    main(["pareto", str(result.experiment_dir), "--all"])
    shown = capsys.readouterr().out
    assert shown.count("stopped@1") == len(stopped)
