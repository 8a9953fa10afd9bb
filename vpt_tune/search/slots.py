"""Slots: long-lived Ray Train worker groups that run a search's trials one after another.

Starting a Ray Train run costs a controller, a worker group and their torch/timm imports: about 18 s per
trial on a laptop (``bench/trial_overhead.py``), paid again by every trial, and on a GPU node a fresh CUDA
context and backbone each time. With ``resources.slots: true`` (the default) the search starts one
TorchTrainer run per trial it runs at once, sized as a trial's workers are, and keeps it for the whole search
(the search's trials, the reference points, the final retrains). Each Tune trial is then a thin driver
(:func:`~vpt_tune.search.slot_pool.relay`): it hands its trial, as Tune sampled it, to the
:class:`~vpt_tune.search.slot_pool.SlotPool`, relays the per-epoch reports to Tune and ends when its trial does.
The slot's workers (:mod:`vpt_tune.train.slot_worker`) make each trial's job and train trial after trial.

What a per-trial Ray Train run promised still holds:

* a killed worker or a lost node: Ray Train restarts the slot's worker group, which the pool hands the same
  trial again; it continues from its last epoch checkpoint (files of its own, keyed by trial), up to
  ``train.max_failures`` times per trial. A slot that stays down (a lost node took the resources its
  workers need, which the other slots hold) gives its trial up to the next free slot after ``ORPHAN_S``;
* a killed search driver: the pool, the slots' Train controllers and their workers are owned by this
  process and die with it, giving their resources back; ``vpt-tune resume`` continues every trial from its
  checkpoint on new slots;
* a trial stopped at a rung (early stopping) frees its slot at once; a trial whose driver is gone (stopped
  or killed) is dropped by the slot at its next report.

``ray status`` shows the slots as the search's Train workers: one group of ``workers_per_trial`` per slot,
held for the whole search, with the trials' drivers holding no CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vpt_tune.search.jobs import TrialSetup
from vpt_tune.search.slot_pool import SlotPool
from vpt_tune.train.slot_worker import slot_worker

log = logging.getLogger(__name__)
# Worker-group restarts a slot may take in all before the search gives it up; a trial's own restarts are limited
# by train.max_failures (counted by the pool), so this only ends a slot that cannot start at all.
SLOT_RESTARTS = 100


class Slots:
    """The search's ``count`` slots: a :class:`SlotPool` actor and one TorchTrainer run per slot (its Train run in
    ``storage``), each ``fit()`` in a thread of the search's driver; their workers make each trial's config with
    ``setup``. Both sit on the driver's node (Ray Train places a controller on its caller's node), a node that
    may run drivers: a lost worker node costs a worker-group restart only."""

    def __init__(self, setup: TrialSetup, count: int, storage: Path):
        spec = setup.spec
        res = spec.resources
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.pool = ray.remote(SlotPool).options(num_cpus=0, max_concurrency=1000, scheduling_strategy=here).remote(
            count, spec.train.max_failures)  # on this node: it lives and dies with the search's driver
        session = time.strftime("%Y%m%d-%H%M%S")
        self.trainers = [TorchTrainer(
            slot_worker,
            train_loop_config={"pool": self.pool, "slot": slot, "setup": setup},
            scaling_config=ScalingConfig(
                num_workers=res.workers_per_trial, use_gpu=res.gpus > 0, resources_per_worker=res.per_worker()),
            run_config=RunConfig(name=f"slot{slot}-{session}", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=SLOT_RESTARTS)),
        ) for slot in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(slot,), name=f"slot{slot}", daemon=True)
                        for slot in range(count)]
        for thread in self.threads:
            thread.start()
        log.info("%d slot(s): long-lived Ray Train worker groups of %d worker(s) each, trial after trial",
                 count, res.workers_per_trial)

    def _run(self, slot: int) -> None:
        error = None
        try:
            self.trainers[slot].fit()
        except Exception as err:  # noqa: BLE001 (reported to the pool: its trials fail with it)
            error = f"{type(err).__name__}: {err}"
            log.error("slot %d ended: %s", slot, error)
        try:
            ray.get(self.pool.slot_ended.remote(slot, error))
        except ray.exceptions.RayError:  # the pool is gone: the search is over
            pass

    def close(self, timeout: float = 30.0) -> None:
        """End every slot's Train run (its workers return between trials) and the pool."""
        try:
            ray.get(self.pool.close.remote(), timeout=timeout)
        except ray.exceptions.RayError:
            pass
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        ray.kill(self.pool)  # a slot still starting, or mid-epoch past the timeout, ends with it
