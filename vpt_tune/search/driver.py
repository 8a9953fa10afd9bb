"""The per-trial Tune function: turns a sampled config into a training job and runs it on Ray Train workers
(a slot's, or a TorchTrainer run of the trial's own).

The trial itself holds no CPU (see :func:`trial_resources`): Train workers hold them, so a trial never
starves its workers on a small machine.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from vpt_tune.data.benchmarks import get_benchmark
from vpt_tune.search.router import TASK
from vpt_tune.search.slots import relay
from vpt_tune.spec import Space, Spec
from vpt_tune.train.job import Job, expected_cost
from vpt_tune.train.loop import DivergenceError
from vpt_tune.train.probe import GpuMemoryError
from vpt_tune.train.worker import DIVERGED, OUT_OF_MEMORY, RUNGS, STARTED_AT, train_worker

FINAL = "final"  # config key of a final retrain (see make_job)
REFERENCE = "reference"  # config key of a reference point's trial: the reference method (see make_job)
REFERENCE_TRIAL = "reference_trial"  # config key wrapping a reference point's config in its Tune experiment


def unwrap(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's own config: a final retrain's or a reference point's (each wrapped in its experiment), or as it is."""
    return config.get(FINAL) or config.get(REFERENCE_TRIAL) or config
# Ray Train's controller polls its workers every 2 s by default; 0.5 s ends a trial sooner
# (bench/trial_overhead.py: search wall 121 s vs 142 s for 4 one-epoch trials on 2 cores).
RAY_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
DRIVER_RESOURCE = "vpt_driver"  # custom resource of the nodes that may run trial drivers (cluster/aws.yaml)


def trial_task(config: dict[str, Any]) -> str:
    """The task a trial config (a search trial's, a reference point's or a final retrain's) trains on."""
    return unwrap(config)[TASK]


def make_job(spec: Spec, task_dir: str, config: dict[str, Any]) -> Job:
    """The training job of a trial config (sampled + fixed values) on one task.

    A final retrain's config is ``{FINAL: {**the Pareto trial's config, "seed": s, "source_trial": id}}``:
    it trains on the benchmark's final split with seed ``s`` and evaluates on test once, after training
    (reported as val_acc, the accuracy on the job's evaluation split). A reference point's config is
    ``{REFERENCE: method, "base_lr": lr, TASK: task}`` (in its experiment under ``REFERENCE_TRIAL``): that
    method, no prompts, the space's fixed weight decay (else none).
    """
    final = config.get(FINAL)
    config = unwrap(config)
    benchmark = get_benchmark(spec.data.benchmark)
    train_split, eval_split = benchmark.final_splits if final else benchmark.search_splits
    if config.get(REFERENCE):
        decay = spec.space.weight_decay if isinstance(spec.space.weight_decay, float) else 0.0
        method, params = config[REFERENCE], {"num_prompts": 0, "placement": "deep", "base_lr": config["base_lr"],
                                             "weight_decay": decay}
    else:
        method, params = spec.method, {k: config[k] for k in Space.model_fields if config.get(k) is not None}
    return Job(
        model=spec.backbone.model,
        weights=spec.backbone.weights,
        img_size=spec.backbone.img_size,
        task_dir=task_dir,
        benchmark=spec.data.benchmark,
        train_split=train_split,
        eval_split=eval_split,
        params=params,
        epochs=spec.train.epochs,
        batch_size=spec.train.batch_size,
        warmup_epochs=spec.train.warmup_epochs,
        optimizer=spec.train.optimizer,
        seed=final["seed"] if final else spec.train.seed,
        method=method,
        options=spec.job_options(),
        prefix_cache=spec.train.prefix_cache,
        evaluate_every_epoch=not final,  # the papers' protocol tests once, after training
    )


def trial_resources(driver_resource: str | None = None) -> tune.PlacementGroupFactory:
    """A trial bundle with no CPU and a token of memory: the Train workers hold the real resources.

    On a cluster whose stable nodes (the head) carry ``driver_resource`` (see cluster/aws.yaml), the
    bundle asks for a sliver of it, so trial drivers and their Train controllers never sit on a spot
    worker that can vanish: a lost worker node then costs a worker-group restart, never the trial.
    """
    sliver = {driver_resource: 0.001} if driver_resource else {}
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1 << 20, **sliver}])


def worker_config(spec: Spec, task_dirs: dict[str, str], config: dict[str, Any], trial_folder: Path,
                  base_store: str) -> dict[str, Any]:
    """What a trial's Train workers get (see :func:`vpt_tune.train.worker.train_trial`): its job, its cost known
    before training, the resources, where its rung decisions go (in ``trial_folder``, a fresh folder per start)."""
    job = make_job(spec, task_dirs[trial_task(config)], config)
    res = spec.resources
    rungs = [] if FINAL in config or REFERENCE_TRIAL in config else spec.search.early_stopping.rungs(spec.train.epochs)
    return {
        "job": asdict(job),
        "report": expected_cost(job).as_dict(),  # judged on its final cost while it trains
        "threads": res.cpus_per_worker,
        "gpus_per_worker": res.gpus,
        "checkpoint_every": spec.train.checkpoint_every,
        "base_store": base_store if spec.train.reuse_base else None,
        STARTED_AT: time.time(),
        RUNGS: {"epochs": rungs, "folder": str(trial_folder / "rung_decisions" / uuid.uuid4().hex)},
    }


def run_trial(
    config: dict[str, Any], spec_json: str, task_dirs: dict[str, str], train_storage: str, base_store: str,
    pool: ray.actor.ActorHandle | None = None,
) -> None:
    """Tune function trainable: one trial on the folder ``task_dirs`` gives for the config's task, on one of the
    search's slots (``pool``: see :mod:`vpt_tune.search.slots`) or, without one, on a TorchTrainer run of its own.

    A restarted trial (a resumed search) continues from its latest epoch checkpoint, which both keep under
    the trial's name in ``train_storage``; a killed worker or lost node restarts the worker group from there,
    up to ``train.max_failures`` times. A diverged loss is not retried (it would diverge again): the
    worker reports it and the trial fails with :class:`DivergenceError`; so does running out of GPU memory
    (:class:`GpuMemoryError`, saying what to set), and the search goes on.

    With early stopping, the workers wait at each rung for the search's decision in a folder of this
    driver's own (a fresh one per start: a resumed search, whose restored records may decide a rung
    anew, never reads a decision its interrupted run wrote).
    """
    spec = Spec.model_validate_json(spec_json)
    res = spec.resources
    trial_name = tune.get_context().get_trial_name()
    trial_config = worker_config(spec, task_dirs, config, Path(train_storage, trial_name), base_store)
    if pool is not None:
        metrics = relay(pool, trial_name, trial_config, str(Path(train_storage, trial_name)))
    else:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=trial_config,
            scaling_config=ScalingConfig(
                num_workers=res.workers_per_trial, use_gpu=res.gpus > 0, resources_per_worker=res.per_worker()
            ),
            run_config=RunConfig(
                name=trial_name,
                storage_path=train_storage,
                callbacks=[TuneReportCallback()],
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=spec.train.max_failures),
            ),
        )
        metrics = trainer.fit().metrics or {}
    for key, error in ((DIVERGED, DivergenceError), (OUT_OF_MEMORY, GpuMemoryError)):
        if metrics.get(key):
            raise error(metrics[key])
