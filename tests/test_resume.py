"""Continuing interrupted work exactly: a trial resumed from any epoch checkpoint ends as if never stopped."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

import pytest
import torch

from vpt_tune.data.demo import materialise
from vpt_tune.train.job import DONE, Job, run
from vpt_tune.train.loop import LoopState, TrainConfig, train

CPU = torch.device("cpu")


def test_train_continues_from_its_loop_state(make_vit, two_class_splits):
    from vpt_tune.models.prompted_vit import PromptedViT

    def model():
        torch.manual_seed(0)
        return PromptedViT(make_vit(), 2, [2, 2, 2, 2], prompt_dropout=0.2)  # dropout: the RNG must resume too

    split = two_class_splits(24, 0)
    cfg = TrainConfig(epochs=3, batch_size=8, base_lr=1.0, weight_decay=0.001, warmup_epochs=0.5)
    whole = model()
    train(whole, split, split, cfg, CPU)

    first, state, saved = model(), LoopState(), {}
    train(first, split, split, cfg, CPU,
          on_epoch=lambda e, m: saved.update({e: (first.trainable_state(), copy.deepcopy(state))}),
          state=state)
    trainable, loop = saved[0]  # "killed" after epoch 0: a fresh process rebuilds the model and continues
    resumed = model().load_trainable(trainable)
    train(resumed, split, split, cfg, CPU, state=loop)
    assert loop.epoch == 3
    for name, tensor in whole.trainable_state().items():
        assert torch.equal(tensor, resumed.trainable_state()[name]), name


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(materialise("digits", tmp_path_factory.mktemp("demo")))


@pytest.mark.parametrize("params, options", [
    ({"condensation_ratio": 0.5}, {"options": {"condensation": {"epochs": 1}}}),  # train 2, condense 1
    ({"kv_prompts": 1, "token_prune_ratio": 0.5, "segment_prune_ratio": 0.25},
     {"method": "e2vpt", "options": {"e2vpt": {"prune_epochs": 1}}}),  # train 2, prune 1
])
def test_a_job_resumed_from_every_epoch_ends_exactly_like_an_uninterrupted_one(digits, params, options):
    job = Job(
        model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=digits,
        params={"num_prompts": 4, "placement": "last_k", "depth": 6, "base_lr": 0.5, "prompt_dropout": 0.1, **params},
        epochs=2, batch_size=200, **options,
    )
    checkpoints = {}
    model, metrics = run(job, CPU, on_epoch=lambda epoch, m, checkpoint: checkpoints.update({epoch: checkpoint()}))
    assert sorted(checkpoints) == list(range(job.total_epochs)) == [0, 1, 2]
    for epoch, checkpoint in checkpoints.items():
        resumed, resumed_metrics = run(job, CPU, resume=checkpoint)
        assert resumed.prompts.counts == model.prompts.counts, epoch
        for name, tensor in model.trainable_state().items():
            assert torch.equal(tensor, resumed.trainable_state()[name]), (epoch, name)
        timing = {"epoch_seconds"}
        assert {k: v for k, v in resumed_metrics.items() if k not in timing} == {
            k: v for k, v in metrics.items() if k not in timing}, epoch
    # checkpoints name their stage; a finished one (as the worker saves it, or as versions before named
    # stages did: "phase": 3) resumes as finished: nothing trains again, the same model and metrics
    assert [c["stage"] for c in checkpoints.values()] == ["train", "train", "condense" if "condensation_ratio"
                                                           in params else "prune"]
    done = {"loop": None, "metrics": metrics, "trainable": model.trainable_state(), "initial": None}
    for finished in ({**done, "stage": DONE}, {**done, "phase": 3}):
        trained = []
        resumed, resumed_metrics = run(job, CPU, on_epoch=lambda *a: trained.append(a), resume=finished)
        assert not trained and resumed_metrics == metrics and resumed.prompts.counts == model.prompts.counts
    with pytest.raises(ValueError, match="training stage 'distil', which this job does not have"):
        run(job, CPU, resume={**done, "stage": "distil"})


def test_jobs_differing_only_in_condensation_share_their_trained_model(digits):
    """The state after the training epochs is the base another condensation ratio starts from: the
    result equals training that job from scratch."""
    def job(ratio: float, **params) -> Job:
        return Job(model="vit_tiny_patch16_224", weights="random", img_size=32, task_dir=digits, epochs=1,
                   batch_size=200, options={"condensation": {"epochs": 1, "per_block": ratio > 0.6}},
                   params={"num_prompts": 4, "placement": "deep", "base_lr": 0.5, "condensation_ratio": ratio, **params})

    first, second = job(0.5), job(0.75)
    assert first.base_key() == second.base_key() == job(0.0).base_key()
    assert first.base_key() != job(0.5, base_lr=0.4).base_key() and first.base_key() != job(0.5, num_prompts=3).base_key()
    bases = {}
    run(first, CPU, on_epoch=lambda epoch, m, checkpoint: bases.update({epoch + 1: checkpoint()}))
    scratch, scratch_metrics = run(second, CPU)
    reused, reused_metrics = run(second, CPU, resume=bases[second.base_epochs])
    assert reused.prompts.counts == scratch.prompts.counts and sum(scratch.prompts.counts) < 4 * 12
    for name, tensor in scratch.trainable_state().items():
        assert torch.equal(tensor, reused.trainable_state()[name]), name
    assert reused_metrics["val_acc"] == scratch_metrics["val_acc"]


# ---------------------------------------------------------------- killed drivers and workers (real Ray)


def _spec_file(tmp_path, trials: int, epochs: int, name: str = "spec.yaml", early_stopping: dict | None = None) -> str:
    from test_search import small_spec

    raw = small_spec(tmp_path)
    raw["search"] = {"sampler": "random", "trials_per_task": trials, "seed": 7,
                     **({"early_stopping": early_stopping} if early_stopping else {})}
    raw["train"] = {**raw["train"], "epochs": epochs}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _cli(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vpt_tune.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray): nothing gets to clean up."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _pids(needle: str) -> list[int]:
    """Processes whose command line (Ray's process title) contains ``needle``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_driver_killed_at_a_random_moment_resumes_to_the_uninterrupted_results(tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from vpt_tune.search.jobs import make_job
    from vpt_tune.search.runner import task_dirs
    from vpt_tune.spec import load_spec

    trials = 3
    work = tmp_path / "run"
    work.mkdir()
    spec = _spec_file(work, trials, 2)
    experiment = work / "results" / "killed"
    rng = random.Random(5)
    proc = _cli("search", spec, "--name", "killed", cwd=work)
    deadline = time.monotonic() + 300
    while not (experiment / "experiment.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(rng.uniform(5, 35))  # a random moment after the search has started: mid-trial, mid-restore...
    assert proc.poll() is None, "the search ended before it could be killed"
    _kill_group(proc)
    proc = _cli("resume", str(experiment), cwd=work)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "(resumed)" in out

    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == trials and table["trial_id"].is_unique and (table["status"] == "finished").all()
    study = optuna.load_study(
        study_name="digits",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))),
    )
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == trials
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=1000)
    trial_runs = [r for r in runs if "trial_id" in r.data.tags]
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == sorted(table["trial_id"])  # one run per trial
    assert all(r.data.tags.get("status") == "finished" for r in trial_runs)
    assert len([r for r in runs if "trial_id" not in r.data.tags]) == 2  # one search run, one task run
    spec = load_spec(experiment / "spec.yaml")
    for row in table.itertuples():  # each trial, killed and resumed or not, ends as if never interrupted
        _, metrics = run(make_job(spec, str(task_dirs(spec)["digits"]), json.loads(row.config)), CPU)
        assert row.val_acc == pytest.approx(metrics["val_acc"], abs=1e-6), row.config

    # A finished search grows with more trials on the same study; the spec itself cannot change.
    refused = _cli("resume", str(experiment), "--set", "train.epochs=5", cwd=work)
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "only search.trials_per_task" in out
    extended = _cli("resume", str(experiment), "--set", f"search.trials_per_task={trials + 1}", cwd=work)
    out, _ = extended.communicate(timeout=600)
    assert extended.returncode == 0, out[-3000:]
    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == trials + 1 and table["trial_id"].is_unique and (experiment / "search.more1").is_dir()
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == trials + 1


@pytest.mark.slow
@pytest.mark.parametrize("rungs", [[], [1, 3, 9]], ids=["", "early-stopping"])
def test_killed_train_worker_restarts_from_its_last_epoch(tmp_path, rungs):
    """Killed once a first checkpoint is written, the slot's worker group restarts and continues the trial from its
    last checkpoint. With early stopping, epoch 1 is a rung: a worker restarted there reports it again and waits
    for its decision."""
    import pandas as pd

    stopping = {"rule": "mo_asha", "min_epochs": 1, "reduction_factor": 3} if rungs else None
    spec = _spec_file(tmp_path, trials=1, epochs=10, early_stopping=stopping)  # long enough to kill mid-trial
    proc = _cli("search", spec, "--name", "w", cwd=tmp_path)
    runs = tmp_path / "results" / "w" / "train_runs"
    deadline = time.monotonic() + 300
    def registered() -> bool:  # a trial's checkpoint folder appears (renamed into place) once written whole
        return any(runs.glob("*/checkpoint_[0-9]*"))

    while not registered() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _pids("RayTrainWorker")
    assert workers, "no Ray Train worker found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    table = pd.read_parquet(tmp_path / "results" / "w" / "trials.parquet")
    assert (table["status"] == "finished").all() and table["epoch"].iloc[0] == 10
    trial_dir = next((tmp_path / "results" / "w" / "search").glob("*/result.json")).parent
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    resumed = [r["resumed_from"] for r in reports if r.get("resumed_from")]
    seen = [(r["epoch"], r.get("resumed_from")) for r in reports]
    assert resumed and min(resumed) >= 1, f"{seen}\n{out[-4000:]}"  # continued after epoch >= 1, not from 0
    first_after = next(r["epoch"] for r in reports if r.get("resumed_from"))
    rung_again = min(resumed) in rungs  # a rung checkpoint's epoch is reported again, then training goes on
    assert first_after == min(resumed) + (not rung_again), seen  # from the checkpoint's epoch on, not from epoch 1
    asked = [r["epoch"] for r in reports if "rung_decision" in r]
    assert asked == sorted(rungs + [min(resumed)] * rung_again), seen  # each rung once, a re-reported one twice
    startups = {r["startup_seconds"] for r in reports}
    assert len(startups) == 1, startups  # the restart keeps the first start-up, not the time since it



@pytest.mark.slow
def test_driver_killed_mid_rung_resumes_to_the_same_stopping_decisions(tmp_path):
    """Early stopping survives a SIGKILLed driver: the rung records come back with Tune's experiment state,
    so every trial ends (finished or stopped, each once) as the uninterrupted search decides."""
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from test_search import early_stopping_spec, rung_replay

    trials = 5
    raw = early_stopping_spec(tmp_path, trials)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    experiment = tmp_path / "results" / "killed"
    proc = _cli("search", "spec.yaml", "--name", "killed", cwd=tmp_path)
    deadline = time.monotonic() + 400
    while len(list((experiment / "search").glob("run_trial_*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)  # two trials judged at the rung, the third under way
    time.sleep(random.Random(11).uniform(0, 8))
    assert proc.poll() is None, "the search ended before it could be killed"
    _kill_group(proc)
    proc = _cli("resume", str(experiment), cwd=tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]

    table = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id")
    assert len(table) == trials and table.index.is_unique
    decisions = rung_replay(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "test")
    assert {t: status == "finished" for t, status in table["status"].items()} == decisions, out[-3000:]
    assert (table["status"] == "stopped").any()
    # The resumed scheduler went on from the records saved before the kill: its last saved state holds the
    # rung results of every trial, those that ended before the kill included (they never ran again).
    # The newest by the session start in its name: Tune rewrites every session's files at the end (equal mtimes).
    newest = max((experiment / "search").glob("callback-states-*.pkl"), key=lambda p: p.name)
    records = pickle.loads(newest.read_bytes())[0]
    assert sorted(records["records"]["digits"][1]) == sorted(table.index)
    assert sorted(records["finished"]["digits"]) == sorted(table.index[table["status"] == "finished"])
    study = optuna.load_study(study_name="digits", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))))
    states = [t.state for t in study.trials if t.state != optuna.trial.TrialState.FAIL]  # FAIL: asked, never run
    assert sorted(s.name for s in states) == sorted("COMPLETE" if d else "PRUNED" for d in decisions.values())


def test_jobs_saved_before_methods_had_options_still_load(digits):
    """Checkpoints and exported files of earlier versions kept E²VPT's and condensation's settings as job fields."""
    old = {"model": "vit_tiny_patch16_224", "weights": "random", "img_size": 32, "task_dir": digits, "epochs": 2,
           "batch_size": 8, "kv_shared": False, "kv_position": "append", "prune_scoring": "ours", "prune_epochs": 1,
           "condense_epochs": 3, "condense_per_block": True, "prefix_cache": True,
           "params": {"num_prompts": 4, "placement": "deep", "base_lr": 0.5, "kv_prompts": 2, "condensation_ratio": 0.5}}
    job = Job.from_dict(old)
    assert job.method == "e2vpt" and [name for name, _, _ in job.stages()] == ["train", "condense"]
    assert job.options == {"e2vpt": {"kv_shared": False, "kv_position": "append", "prune_scoring": "ours",
                                     "prune_epochs": 1}, "condensation": {"epochs": 3, "per_block": True}}
    assert job.total_epochs == 5 and Job.from_dict(dataclasses.asdict(job)) == job
    plain = Job.from_dict({**old, "params": {"num_prompts": 4, "placement": "deep", "base_lr": 0.5}})
    assert plain.method == "vpt" and plain.total_epochs == 2
