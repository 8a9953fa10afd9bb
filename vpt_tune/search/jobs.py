"""From a trial's config, as Tune sampled it, to its training job and the config its Ray Train workers get.

The search's trial drivers never import this module (it imports the training code: torch, timm): on slots
the slot's workers make each trial's config with the search's :class:`TrialSetup`; a trial on a Train run of
its own (``resources.slots: false``) is started by :meth:`TrialSetup.train_alone`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from vpt_tune.data.benchmarks import get_benchmark
from vpt_tune.search.driver import FINAL, REFERENCE, is_reference, trial_task, unwrap
from vpt_tune.spec import Space, Spec
from vpt_tune.train.job import Job, expected_cost
from vpt_tune.train.worker import RUNGS, STARTED_AT, train_worker


def make_job(spec: Spec, task_dir: str, config: dict[str, Any]) -> Job:
    """The training job of a trial config (sampled + fixed values) on one task.

    A final retrain's config is ``{FINAL: {**the Pareto trial's config, "seed": s, "source_trial": id}}``:
    it trains on the benchmark's final split with seed ``s`` and evaluates on test once, after training
    (reported as val_acc, the accuracy on the job's evaluation split). A reference point's config is
    ``{REFERENCE: method, "base_lr": lr, TASK: task}`` (among the search's trials under ``REFERENCE_TRIAL``): that
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


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: the spec, each task's folder, where trials keep their epoch
    checkpoints and rung decisions (``train_storage/<trial>``) and trained base models (``base_store``)."""

    spec: Spec
    task_dirs: dict[str, str]
    train_storage: str
    base_store: str

    def checkpoints(self, trial: str) -> str:
        """The folder of ``trial``'s own epoch checkpoints (on a slot)."""
        return str(Path(self.train_storage, trial))

    def worker_config(self, config: dict[str, Any], trial: str, started_at: float, start_id: str) -> dict[str, Any]:
        """What ``trial``'s Train workers get (see :func:`vpt_tune.train.worker.train_trial`): its job, its cost
        known before training, the resources, and where its rung decisions go (a folder of the driver's hand-over
        ``start_id`` of ``started_at``, so a resumed search never reads a decision its interrupted run wrote)."""
        spec = self.spec
        job = make_job(spec, self.task_dirs[trial_task(config)], config)
        res = spec.resources
        rungs = [] if FINAL in config or is_reference(config) else spec.search.early_stopping.rungs(spec.train.epochs)
        return {
            "job": asdict(job),
            "report": expected_cost(job).as_dict(),  # judged on its final cost while it trains
            "threads": res.cpus_per_worker,
            "gpus_per_worker": res.gpus,
            "checkpoint_every": spec.train.checkpoint_every,
            "base_store": self.base_store if spec.train.reuse_base else None,
            STARTED_AT: started_at,
            RUNGS: {"epochs": rungs, "folder": str(Path(self.train_storage, trial, "rung_decisions", start_id))},
        }

    def train_alone(self, config: dict[str, Any], trial: str, started_at: float, start_id: str) -> dict[str, Any]:
        """Train ``trial`` on a TorchTrainer run of its own (``resources.slots: false``), reporting each epoch to
        Tune; its last report. Ray Train keeps its checkpoints (in ``train_storage/<trial>``) and restarts its
        worker group up to ``train.max_failures`` times."""
        res = self.spec.resources
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=self.worker_config(config, trial, started_at, start_id),
            scaling_config=ScalingConfig(
                num_workers=res.workers_per_trial, use_gpu=res.gpus > 0, resources_per_worker=res.per_worker()
            ),
            run_config=RunConfig(
                name=trial,
                storage_path=self.train_storage,
                callbacks=[TuneReportCallback()],
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=self.spec.train.max_failures),
            ),
        )
        return trainer.fit().metrics or {}
