"""The per-trial Tune function, a trial's driver: hands the trial, as Tune sampled it, to one of the search's
slots (:mod:`vpt_tune.search.slot_pool`) or to a TorchTrainer run of its own, and relays its epochs to Tune.

A driver holds no CPU (see :func:`trial_resources`): Train workers hold them, so a trial never starves its
workers on a small machine. On slots it imports neither torch nor the training code (this module and what it
imports stay light): its process, one per trial running at once, costs Ray and Tune only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import tune

from vpt_tune.errors import raise_trial_error
from vpt_tune.search.router import TASK
from vpt_tune.search.slot_pool import relay

FINAL = "final"  # config key of a final retrain (see jobs.make_job)
REFERENCE = "reference"  # config key of a reference point's trial: the reference method (see jobs.make_job)
REFERENCE_TRIAL = "reference_trial"  # config key wrapping a reference point's config among the search's trials
# Ray Train's controller polls its workers every 2 s by default; 0.5 s ends a trial sooner
# (bench/trial_overhead.py: search wall 121 s vs 142 s for 4 one-epoch trials on 2 cores).
RAY_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
DRIVER_RESOURCE = "vpt_driver"  # custom resource of the nodes that may run trial drivers (cluster/aws.yaml)


def unwrap(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's own config: a final retrain's or a reference point's (each wrapped in its experiment), or as it is."""
    return config.get(FINAL) or config.get(REFERENCE_TRIAL) or config


def is_reference(config: dict[str, Any]) -> bool:
    """Whether a trial config is a reference point's (see :data:`REFERENCE_TRIAL`)."""
    return REFERENCE_TRIAL in config


def trial_task(config: dict[str, Any]) -> str:
    """The task a trial config (a search trial's, a reference point's or a final retrain's) trains on."""
    return unwrap(config)[TASK]


def trial_resources(driver_resource: str | None = None) -> tune.PlacementGroupFactory:
    """A trial bundle with no CPU and a token of memory: the Train workers hold the real resources.

    On a cluster whose stable nodes (the head) carry ``driver_resource`` (see cluster/aws.yaml), the
    bundle asks for a sliver of it, so trial drivers and their Train controllers never sit on a spot
    worker that can vanish: a lost worker node then costs a worker-group restart, never the trial.
    """
    sliver = {driver_resource: 0.001} if driver_resource else {}
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1 << 20, **sliver}])


def run_trial(config: dict[str, Any], pool: ray.actor.ActorHandle | None = None,
              train_alone: Callable[[dict, str, float, str], dict] | None = None) -> None:
    """Tune function trainable: one trial, on one of the search's slots (``pool``: see
    :mod:`vpt_tune.search.slots`) or, without slots, on a TorchTrainer run of its own (``train_alone``:
    :meth:`vpt_tune.search.jobs.TrialSetup.train_alone`).

    A restarted trial (a resumed search) continues from its latest epoch checkpoint, which both keep under
    the trial's name; a killed worker or lost node restarts the worker group from there, up to
    ``train.max_failures`` times. A diverged loss is not retried (it would diverge again): the worker
    reports it and the trial fails with :class:`~vpt_tune.errors.DivergenceError`; so does running out of GPU
    memory (:class:`~vpt_tune.errors.GpuMemoryError`, saying what to set), and the search goes on.

    With early stopping, the workers wait at each rung for the search's decision in a folder of this
    driver's own (a fresh one per start: a resumed search, whose restored records may decide a rung
    anew, never reads a decision its interrupted run wrote).
    """
    trial = tune.get_context().get_trial_name()
    if pool is not None:
        metrics = relay(pool, trial, config)
    else:
        metrics = train_alone(config, trial, time.time(), uuid.uuid4().hex)
    raise_trial_error(metrics)
