"""A trial on Ray Train workers: runs :mod:`vpt_tune.train.job` on each worker, reports and checkpoints every epoch.

Several workers train data-parallel (DDP over the trainable parameters only: the frozen backbone
has no gradients to reduce). Rank 0's metrics reach Tune. Every ``checkpoint_every`` epochs (and at
the end) rank 0 writes a checkpoint: the prompts, masks, KV prompts and head (never the backbone)
plus the optimiser, schedule, phase and random state, so a restarted worker group (a killed worker,
a lost node) or a restarted trial continues from its last checkpoint instead of epoch 0. Ray Train
registers a checkpoint only once it is fully written and keeps the newest few.

With a ``base_store``, the state after the epochs before condensation is kept there under the job's
:meth:`~vpt_tune.train.job.Job.base_key`; a later trial that differs only in its condensation settings
(or repeats a config) starts from it instead of training again, and reports which trial it reused.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import ray.train
import torch
from ray.train.torch import get_device, prepare_model

from vpt_tune.errors import DIVERGED, OUT_OF_MEMORY, DivergenceError
from vpt_tune.train.job import CHECKPOINT_FILE, DONE, Job, run
from vpt_tune.train.probe import out_of_memory_message
from vpt_tune.train.rung_decision import RUNG_DECISION, await_decision, decision_file

NODE = "node_id"  # result key: the Ray node rank 0 trains on
COMPLETE = "trial_complete"  # result key, in a trial's last report only: it ran to its end
REUSED_BASE = "reused_base_from"  # result key: the trial whose trained, uncondensed model this one started from
STARTED_AT = "trial_started_at"  # config key: when the trial's driver started the TorchTrainer (time.time())
RUNGS = "rungs"  # config key: {"epochs": the rung epochs, "folder": where their decisions are written}


class TrialIO(Protocol):
    """Where a trial's reports and epoch checkpoints go: its own Ray Train run (:class:`TrainRunIO`) or,
    on a long-lived slot, the slot's pool and the trial's checkpoint folder (:mod:`vpt_tune.train.slot_worker`)."""

    trial_name: str  # the trial's Tune name: what its base models and checkpoints are keyed by

    def restore(self) -> dict | None:
        """The state of the trial's latest checkpoint (None: it starts from scratch)."""

    def report(self, metrics: dict[str, Any], state: dict | None, last: bool = False) -> None:
        """Report one epoch's ``metrics`` (every rank calls it), with a checkpoint of ``state`` (rank 0's, or None);
        ``last``: the trial's final report, which must reach the search even without a state."""


class StoppedAtRung(Exception):
    """The search stopped the trial at a rung: the worker ends its training function early."""


def load_checkpoint(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    """The state saved in a trial checkpoint (tensors and plain values only: loaded with weights_only)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True)


def save_base(path: Path, state: dict) -> None:
    """Write a trained-before-condensation state for other trials to start from (atomically: a reader
    never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class TrainRunIO:
    """A trial's own Ray Train run (``resources.slots: false``): reports and checkpoints go through Ray Train
    (``TuneReportCallback`` relays them to the trial), which keeps the newest checkpoints of the run."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.trial_name = context.get_experiment_name()  # the trial's Train run, named after the trial
        self.rank = context.get_world_rank()

    def restore(self) -> dict | None:
        return load_checkpoint(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, Any], state: dict | None, last: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if state is not None and self.rank == 0:
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            elif last and self.rank == 0:  # a Train result keeps its metrics only with a checkpoint
                Path(tmp, CHECKPOINT_FILE).write_text(json.dumps(metrics, default=str))
            saved = any(Path(tmp).iterdir())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if saved else None)


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of a trial's own TorchTrainer: :func:`train_trial` through Ray Train."""
    train_trial(config, TrainRunIO())


def train_trial(config: dict[str, Any], io: TrialIO) -> None:
    """Train one trial on this worker; ``config`` = {"job": asdict(Job), "report": {...}, ...}.

    With early stopping (``config[RUNGS]``), a report of a rung epoch names a decision file and the worker
    waits for the search's decision (:mod:`vpt_tune.train.rung_decision`); on stop it returns at once, as a
    finished trial does. A worker restarted from a checkpoint taken at a rung asks again.

    Besides the job's metrics it reports where a trial's time goes before training: ``startup_seconds``
    (the driver handing the trial over until this function runs: a Ray Train run's controller, worker group
    and imports, or a slot's lease) and ``setup_seconds`` (from here to the first epoch: model, data, caches).
    Both describe the trial's first start: a worker group restarted from a checkpoint keeps them.
    """
    entered = time.time()
    timing = {"startup_seconds": entered - config[STARTED_AT]} if STARTED_AT in config else {}
    job = Job.from_dict(config["job"])
    constant_metrics = config["report"]  # cost figures known before training; the last report has the final ones
    every = int(config.get("checkpoint_every", 1))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    resume = io.restore()
    if resume:  # a restarted worker group or trial: epochs up to the checkpoint are not trained again
        constant_metrics = {**constant_metrics, "resumed_from": resume["report"]["epoch"] + 1}
        timing = resume.get("timing", timing)  # not the time since the first start, failed attempt included
    base_file = Path(config["base_store"], f"{job.base_key()}.pt") if config.get("base_store") else None
    if resume is None and base_file is not None and base_file.is_file():  # trained before, maybe condensed otherwise
        resume = torch.load(base_file, weights_only=True)
        report = resume["report"]  # train_seconds: this trial's own work, not the reused model's
        report.update(train_seconds=0.0, metrics={**report["metrics"], "train_seconds": 0.0})
        constant_metrics = {**constant_metrics, REUSED_BASE: resume["source"]}
    last: dict[str, Any] = resume["report"] if resume else {"epoch": -1, "metrics": {}, "train_seconds": 0.0}
    constant_metrics = {**constant_metrics, NODE: ray.get_runtime_context().get_node_id()}  # rank 0's reaches Tune
    rungs = config[RUNGS]  # the trial driver always sets it (no rungs: an empty list)

    def report(epoch: int, metrics: dict[str, float], state: dict | None, final: bool = False) -> bool:
        """Report ``epoch`` (0-based), with a checkpoint of ``state`` if given; whether the trial trains on
        (at a rung: the search's decision)."""
        rung = decision_file(rungs["folder"], epoch + 1) if epoch + 1 in rungs["epochs"] and not final else None
        saved = {**state, "report": dict(last), "job": asdict(job), "timing": timing} if state and rank == 0 else None
        io.report({**constant_metrics, **timing, **metrics, "epoch": epoch + 1,
                   **({RUNG_DECISION: str(rung)} if rung else {})}, saved, last=final)
        return rung is None or await_decision(rung)

    def on_epoch(epoch: int, metrics: dict[str, float], checkpoint) -> None:
        if "setup_seconds" not in timing:  # this worker's first epoch began once the model and data were ready
            timing["setup_seconds"] = time.time() - metrics["epoch_seconds"] - entered
        last["train_seconds"] += metrics["epoch_seconds"]  # training + evaluation time, no overheads
        last.update(epoch=epoch, metrics={**metrics, "train_seconds": last["train_seconds"]})
        if base_file is not None and rank == 0 and epoch + 1 == job.base_epochs and not base_file.exists():
            save_base(base_file, {**checkpoint(), "report": dict(last), "job": asdict(job), "source": io.trial_name})
        if epoch + 1 == job.total_epochs:  # reported with the final metrics below
            return
        if not report(epoch, last["metrics"], checkpoint() if (epoch + 1) % every == 0 else None):
            raise StoppedAtRung

    # Restarted from a checkpoint taken at a rung: its decision may be unread (or, in a resumed search, not made
    # yet): report the rung again and wait (a search decides each trial's rung once, so the answer is the same).
    if resume and last["epoch"] + 1 in rungs["epochs"] and not report(last["epoch"], last["metrics"], None):
        return
    wrap = prepare_model if world > 1 else (lambda model: model)
    try:
        model, final = run(job, get_device(), on_epoch, (rank, world), wrap, resume)  # final: incl. the final cost
    except StoppedAtRung:
        return
    except (DivergenceError, torch.OutOfMemoryError) as err:  # would happen again: report it instead of failing
        if isinstance(err, DivergenceError):  # the worker group, which Ray Train would retry
            key, message = DIVERGED, str(err)
        else:
            device = get_device()
            key, message = OUT_OF_MEMORY, out_of_memory_message(
                torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory,
                float(config.get("gpus_per_worker", 1.0)), job.batch_size)
        failed = {**constant_metrics, "val_acc": float("nan"), key: message}  # Tune wants every objective
        io.report(failed, None, last=True)
        return
    state = {"stage": DONE, "loop": None, "metrics": final, "trainable": model.trainable_state(), "initial": None}
    report(last["epoch"], {**last["metrics"], **final, COMPLETE: True}, state, final=True)
