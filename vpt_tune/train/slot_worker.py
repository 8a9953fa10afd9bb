"""A slot's Ray Train workers: trial after trial from the search's slot pool, in processes that live on.

A slot is one long-lived Ray Train run (see :mod:`vpt_tune.search.slots`). Its workers ask the pool for a
trial, make its workers' config (the search's ``setup``: :class:`vpt_tune.search.jobs.TrialSetup`, so the
trial's driver needs none of the training code), train it with :func:`~vpt_tune.train.worker.train_trial`,
tell the pool it ended and ask for the next,
keeping their imports, CUDA context and in-memory caches between trials. A trial keeps nothing of the one
before: its model, prompts, head and optimiser are built afresh and every random generator is seeded from
its own job (``tests/test_slots.py`` checks that a config trained first and third on one slot gives the
same bits as in a fresh process).

A trial's epoch checkpoints are files of its own (``train_runs/<trial>/checkpoint_<epoch>``), not Ray Train
checkpoints, so that whatever trains the trial next (this slot's restarted worker group after a killed
worker or a lost node, or another slot after ``vpt-tune resume``) continues from its last epoch.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from vpt_tune.train.job import CHECKPOINT_FILE
from vpt_tune.train.slot_protocol import CLOSED, SLOT, SLOT_TRIAL
from vpt_tune.train.worker import train_trial

CHECKPOINT_PATH = "checkpoint_path"  # result key: a trial's newest checkpoint folder (as Ray Train's reports name it)
KEEP_CHECKPOINTS = 2
HEARTBEAT_S = 2.0  # how often a slot's rank 0 tells the pool it lives


class TrialAbandoned(Exception):
    """The trial's driver is gone (stopped or killed): the slot drops the trial and takes the next."""


class TrialCheckpoints:
    """The epoch checkpoints of one trial in its own folder, ``checkpoint_<epoch>/trainable.pt`` each: written
    whole (a temporary folder renamed into place, so a reader never sees half of one), the newest two kept."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        found = sorted(self.folder.glob("checkpoint_[0-9]*")) if self.folder.is_dir() else []
        return found[-1] if found else None

    def load(self) -> dict | None:
        """The state in the newest checkpoint (tensors and plain values only: loaded with weights_only)."""
        latest = self.latest()
        return None if latest is None else torch.load(latest / CHECKPOINT_FILE, weights_only=True)

    def save(self, state: dict, epoch: int) -> Path:
        """Write ``state`` as the checkpoint after ``epoch`` (1-based) and drop all but the newest two."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"checkpoint_{epoch:06d}"
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        torch.save(state, tmp / CHECKPOINT_FILE)
        if final.exists():  # the same epoch again (a trial restarted at a rung reports it twice)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in sorted(self.folder.glob("checkpoint_[0-9]*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final


class SlotIO:
    """A trial's reports and checkpoints on a slot: rank 0 writes the checkpoint and hands the report to the
    pool, which relays it to the trial's driver; a report the pool refuses (the driver is gone) ends the trial."""

    def __init__(self, pool: ray.actor.ActorHandle, trial_name: str, folder: str | Path, rank: int,
                 where: dict[str, int]):
        self.pool, self.trial_name, self.rank, self.where = pool, trial_name, rank, where
        self.slot = where[SLOT]
        self.checkpoints = TrialCheckpoints(folder)

    def restore(self) -> dict | None:
        return self.checkpoints.load()

    def report(self, metrics: dict[str, Any], state: dict | None, last: bool = False) -> None:
        if self.rank != 0:
            return
        metrics = {**metrics, **self.where}
        if state is not None:
            metrics = {**metrics, CHECKPOINT_PATH: str(self.checkpoints.save(state, int(metrics["epoch"])))}
        if not ray.get(self.pool.report.remote(self.slot, self.trial_name, metrics)):
            raise TrialAbandoned(self.trial_name)


def slot_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of a slot's TorchTrainer: trains the trials the pool hands this slot until the
    pool closes. A trial that raises fails the worker group (Ray Train restarts it, and the pool hands the
    restarted group the same trial again, up to ``train.max_failures`` times, from its last checkpoint)."""
    pool, slot, setup = config["pool"], config["slot"], config["setup"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    alive = threading.Event()
    if rank == 0:  # the pool hands the trial of a slot that stays down to another slot
        threading.Thread(target=_heartbeat, args=(pool, slot, alive), daemon=True).start()
    try:
        _train_trials(pool, slot, rank, world, setup)
    finally:
        alive.set()


def _heartbeat(pool: ray.actor.ActorHandle, slot: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            ray.get(pool.heartbeat.remote(slot), timeout=HEARTBEAT_S * 5)
        except ray.exceptions.RayError:  # the pool is gone (the search is over) or busy: the next beat
            continue


def _train_trials(pool: ray.actor.ActorHandle, slot: int, rank: int, world: int, setup: Any) -> None:
    """Take, train and end trials until the pool closes; ``setup`` makes a leased trial's workers' config
    (``setup.worker_config``) and names its checkpoint folder (``setup.checkpoints``)."""
    previous = None  # the trial this worker trained last (None: the worker group has just started)
    trained = 0  # trials this process has trained
    while (lease := ray.get(pool.take.remote(slot, rank, previous))) != CLOSED:
        if lease is None:  # nothing to train yet: ask again
            continue
        trial, previous, trained = lease["trial"], lease["trial"], trained + 1
        try:
            config = setup.worker_config(lease["config"], trial, lease["started_at"], lease["start_id"])
            train_trial(config, SlotIO(pool, trial, setup.checkpoints(trial), rank, {SLOT: slot, SLOT_TRIAL: trained}))
        except TrialAbandoned:
            ray.get(pool.finish.remote(slot, trial))
            if world > 1:  # the other ranks wait in DDP's next all-reduce: a fresh worker group frees them
                raise
            continue
        except BaseException:
            ray.get(pool.failed.remote(slot, trial, traceback.format_exc()))
            raise
        finally:  # nothing of this trial stays on the device for the next one
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if rank == 0:
            ray.get(pool.finish.remote(slot, trial))
