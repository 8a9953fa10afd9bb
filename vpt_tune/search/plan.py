"""What a search will cost before it starts: ``vpt-tune plan`` and the summary atop every search.

Per task: trials, epochs per trial (with early stopping, the expected number and the most), images,
training and evaluation work from the cost model (:mod:`vpt_tune.cost`, multiply-adds), the final
protocol's retrains, and time: the work divided by a training step's throughput measured here on
the spec's model (:func:`vpt_tune.train.probe.measure_step`), or, for GPU trials planned on a machine
without one, by a stated device table; plus the start-up of Ray Train (once per search on slots, else per trial).

The work of a trial, per image and epoch, for a forward cost ``f`` whose first ``p`` multiply-adds
(patch embedding and the blocks before the first prompted one) no prompt reaches:
- training: ``f`` forward plus ``f - p`` backward (the backbone is frozen: backward computes the
  activations' gradients only, about one forward of each layer it passes through);
- evaluation: ``f``;
- with the frozen-prefix cache (``train.prefix_cache``, not for FGVC's augmented training), ``p`` is
  paid once per image of the trial instead of every epoch: ``2 (f - p)`` training, ``f - p`` evaluation.
Costs are averaged over configs drawn at random from the space (:func:`sample_configs`); base
training runs at the uncondensed cost, the E²VPT retraining and the condensation fine-tuning at the
final cost.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vpt_tune.cost import ViTShape, block_macs, prompted_cost
from vpt_tune.data.benchmarks import expand_tasks, find_task_dir, get_benchmark
from vpt_tune.data.demo import DEMO_CLASSES, DEMO_SIZES
from vpt_tune.data.tasks import TaskSize, task_size
from vpt_tune.errors import UserError
from vpt_tune.search.driver import FINAL, REFERENCE, REFERENCE_TRIAL
from vpt_tune.search.jobs import make_job
from vpt_tune.search.router import TASK
from vpt_tune.search.space import sample_configs
from vpt_tune.spec import Spec
from vpt_tune.train.job import Job, expected_cost
from vpt_tune.train.probe import StepRate, measure_step

SAMPLES = 256  # configs drawn from the space to average a trial's work over
# Measured by bench/plan_accuracy.py on the demo (2-core CPU): Ray Train's start-up and set-up per trial
# (24.6 s; bench/trial_overhead.py: 18.9 s on a quiet machine), a search's own time (Ray start, checks,
# MLflow, fronts: its wall time less its trials', 49 s), and how much slower a trial trains in a search than
# the isolated calibration step (1.3x on CPU: Ray's processes share the cores; data batching, evaluation
# and checkpoints between steps).
TRIAL_OVERHEAD_S = 24.0
SEARCH_OVERHEAD_S = 45.0
# On slots (resources.slots): a trial after its slot's first pays the hand-over, its model and data set-up and
# its reports (bench/trial_overhead.py: 1.3 s; the demo: 1.5 s); the slots' start-up (Ray Train run, worker
# processes, imports; their first trials' extra set-up) is paid once per search, by all slots at once (demo: 27 s).
SLOT_TRIAL_OVERHEAD_S = 2.0
SLOT_START_S = 27.0
IN_SEARCH_SLOWDOWN = 1.3
# Stated bf16 dense peak, TFLOP/s (2 FLOPs per multiply-add), of GPUs a plan may assume when none is here to
# measure (vendors' data sheets), and the fraction of it a prompted ViT training step is assumed to reach.
GPU_PEAK_TFLOPS = {"a10g": 125.0, "l4": 121.0, "a100": 312.0, "h100": 989.0, "h200": 989.0}
GPU_UTILISATION = 0.35
CALIBRATION_BATCH = 16  # at most: a short step still has a steady speed


@dataclass(frozen=True)
class Work:
    """Epochs and multiply-adds of training and evaluation."""

    epochs: float = 0.0
    train_macs: float = 0.0
    eval_macs: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.epochs + other.epochs, self.train_macs + other.train_macs, self.eval_macs + other.eval_macs)

    def __mul__(self, times: float) -> "Work":
        return Work(self.epochs * times, self.train_macs * times, self.eval_macs * times)

    @staticmethod
    def mean(works: Sequence["Work"]) -> "Work":
        """The average of ``works``."""
        return sum(works, Work()) * (1 / len(works))


@dataclass(frozen=True)
class Speed:
    """Multiply-adds per second of one trial's training and evaluation, and where the figure comes from."""

    train_macs_per_s: float
    eval_macs_per_s: float
    source: str  # e.g. "measured on cpu (1 thread)" or "stated: a10g at 35% of bf16 peak"

    def seconds(self, work: Work) -> float:
        return work.train_macs / self.train_macs_per_s + work.eval_macs / self.eval_macs_per_s


@dataclass(frozen=True)
class TaskPlan:
    """One task's planned trials (expected and at most) and final retrains."""

    task: str
    trials: int
    train_images: int
    eval_images: int
    search: Work  # all trials, expected with early stopping
    search_most: Work  # all trials, none stopped
    final_retrains: float  # expected front size x seeds (+ the reference points x seeds)
    final: Work
    seconds: float  # trial-seconds (one trial's wall time, summed), expected
    seconds_most: float


@dataclass(frozen=True)
class Plan:
    """A whole search's plan."""

    name: str
    model: str
    img_size: int
    tasks: list[TaskPlan]
    at_once: int  # trials at a time
    device: str  # "GPU" or "CPU": what a trial holds, as device_hours counts it
    per_trial_units: float  # GPUs (or CPUs) one trial holds
    speed: Speed
    assumptions: list[str] = field(default_factory=list)
    start_seconds: float = 0.0  # the slots' start-up, once (resources.slots)

    @property
    def wall_seconds(self) -> tuple[float, float]:
        """Expected and most wall time: the trials' seconds spread over ``at_once`` trials at a time, plus the
        slots' start-up and the search's own."""
        fixed = self.start_seconds + SEARCH_OVERHEAD_S
        expected = sum(t.seconds for t in self.tasks) / self.at_once + fixed
        most = sum(t.seconds_most for t in self.tasks) / self.at_once + fixed
        return expected, most

    @property
    def device_hours(self) -> tuple[float, float]:
        """Expected and most GPU-hours (CPU-hours for CPU trials) the trials hold."""
        return tuple(sum(getattr(t, k) for t in self.tasks) * self.per_trial_units / 3600
                     for k in ("seconds", "seconds_most"))

    def as_dict(self) -> dict[str, Any]:
        wall, hours = self.wall_seconds, self.device_hours
        return {
            "name": self.name, "model": self.model, "img_size": self.img_size, "at_once": self.at_once,
            "device": self.device, "speed": asdict(self.speed),
            "tasks": [{**asdict(t), "search": asdict(t.search), "search_most": asdict(t.search_most),
                       "final": asdict(t.final)} for t in self.tasks],
            "trials": sum(t.trials for t in self.tasks),
            "final_retrains": sum(t.final_retrains for t in self.tasks),
            "train_pflops": sum(t.search.train_macs + t.final.train_macs for t in self.tasks) / 1e15,
            "eval_pflops": sum(t.search.eval_macs + t.final.eval_macs for t in self.tasks) / 1e15,
            "wall_seconds": wall[0], "wall_seconds_most": wall[1],
            f"{self.device.lower()}_hours": hours[0], f"{self.device.lower()}_hours_most": hours[1],
            "assumptions": self.assumptions,
        }


def expected_front(trials: float) -> float:
    """Expected number of non-dominated points among ``trials`` points with three independent, continuous
    objectives (Bentley, Kung, Schkolnick & Thompson 1978): sum over i <= n of H_i / i."""
    harmonic, front = 0.0, 0.0
    for i in range(1, int(trials) + 1):
        harmonic += 1 / i
        front += harmonic / i
    return front


def reach(rungs: Sequence[int], epochs: int, reduction_factor: int) -> tuple[float, float]:
    """Expected base epochs of a trial under early stopping when each rung keeps 1/``reduction_factor``
    of the trials (ASHA's rate), and the fraction that trains to the end."""
    bounds = [0, *rungs, epochs]
    expected = sum((end - start) / reduction_factor**k for k, (start, end) in enumerate(itertools.pairwise(bounds)))
    return expected, 1 / reduction_factor ** len(rungs)


def prefix_macs(shape: ViTShape, first_prompted: int) -> int:
    """Multiply-adds of the patch embedding and the blocks before ``first_prompted``, which no prompt reaches."""
    tokens = shape.num_prefix_tokens + shape.num_patches
    embedding = shape.num_patches * shape.embed_dim * shape.in_chans * shape.patch_area
    return embedding + first_prompted * block_macs(tokens, shape)


def epoch_work(forward: float, prefix: float, images: tuple[int, int], cached: bool, evaluated: bool = True) -> Work:
    """One epoch on ``images`` (train, eval; no evaluation unless ``evaluated``) at ``forward``
    multiply-adds per image, ``prefix`` of them before any prompt (skipped when ``cached``)."""
    train_images, eval_images = images
    skipped = prefix if cached else 0
    evaluation = eval_images * (forward - skipped) if evaluated else 0
    return Work(1, train_images * (2 * forward - prefix - skipped), evaluation)


def trial_work(job: Job, shape: ViTShape, classes: int, images: tuple[int, int], rungs: Sequence[int] = (),
               reduction_factor: int = 3, cached: bool = True) -> tuple[Work, Work]:
    """The work of one trial of ``job``: expected under early stopping at ``rungs``, and the most."""
    counts = job.model_arguments(shape.depth)["counts"]  # in the sequence
    first = min([next((i for i, count in enumerate(counts) if count), shape.depth)]
                + [method.first_block(job, shape.depth) for method in job.methods()])  # the first block that trains
    cached = cached and first > 0
    prefix = prefix_macs(shape, first)
    base = expected_cost(job, shape, classes, stages=False).gflops * 1e9
    final = expected_cost(job, shape, classes).gflops * 1e9
    once = Work(0, 0, sum(images) * prefix) if cached else Work()
    every = job.evaluate_every_epoch  # else the evaluation split once after each phase (a final retrain's test)
    after = epoch_work(final, prefix, images, cached, every) * (job.total_epochs - job.epochs)  # prune, condense
    if not every:
        phases = len(job.stages()) - 1
        once = once + Work(0, 0, epoch_work(base, prefix, images, cached).eval_macs
                           + phases * epoch_work(final, prefix, images, cached).eval_macs)
    base_epochs, finishing = reach(rungs, job.epochs, reduction_factor)
    per_epoch = epoch_work(base, prefix, images, cached, every)
    expected = once + per_epoch * base_epochs + after * finishing
    most = once + per_epoch * job.epochs + after
    return expected, most


def planned_tasks(spec: Spec) -> dict[str, Path | None]:
    """Every task of the spec with its folder, or None where there is none yet (not downloaded, or
    ``data.root`` names an unset environment variable)."""
    if spec.data.root is None:
        return {task: None for task in spec.data.tasks}
    root = Path(spec.data.root).expanduser()
    tasks = expand_tasks(spec.data.benchmark, spec.data.tasks)
    return {task: find_task_dir(root, spec.data.benchmark, task) if root.is_dir() else None for task in tasks}


def task_sizes(spec: Spec, task_dirs: dict[str, Path | None]) -> dict[str, TaskSize]:
    """Classes and split sizes of every task: counted in its folder when it has one, else known figures."""
    if spec.data.root is None:
        unknown = [task for task in task_dirs if task not in DEMO_SIZES]
        if unknown:
            raise UserError(f"data.tasks: {', '.join(unknown)}: not a demo task ({', '.join(DEMO_SIZES)}); "
                            "set data.root to plan a search on your own tasks")
        return {task: TaskSize(DEMO_CLASSES, DEMO_SIZES[task]) for task in task_dirs}
    return {task: task_size(spec.data.benchmark, task, folder) for task, folder in task_dirs.items()}


def measured_speed(spec: Spec, shape: ViTShape, tokens: int, classes: int, device: torch.device) -> Speed:
    """A trial's training and evaluation speed on ``device``, measured with ``tokens`` deep prompts on the
    spec's model at a batch of at most :data:`CALIBRATION_BATCH` (CPU: ``cpus_per_worker`` threads)."""
    res = spec.resources
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(res.cpus_per_worker)))
    try:
        rate = measure_step(spec.backbone.model, spec.backbone.img_size, [tokens] * shape.depth, classes,
                            min(spec.train.batch_size, CALIBRATION_BATCH), device)
    finally:
        torch.set_num_threads(threads)
    forward = prompted_cost(shape, [tokens] * shape.depth, classes).gflops * 1e9
    cpu = device.type == "cpu"
    return speed_of(rate, forward, res.workers_per_trial, threads=int(res.cpus_per_worker) if cpu else None,
                    slowdown=IN_SEARCH_SLOWDOWN if cpu else 1.0)


def speed_of(rate: StepRate, forward: float, workers: int, threads: int | None = None,
             slowdown: float = 1.0) -> Speed:
    """Multiply-adds per second of a trial of ``workers`` data-parallel workers, from one worker's
    measured ``rate`` with a model of ``forward`` multiply-adds per image (a full training step: 2x),
    ``slowdown`` times slower in a search."""
    where = f"measured on {rate.device}" + (f" ({threads} thread{'s' * (threads != 1)})" if threads else "")
    scale = workers / slowdown
    return Speed(rate.train_images_per_s * 2 * forward * scale, rate.eval_images_per_s * forward * scale,
                 where + (f" x {workers} workers" if workers > 1 else "")
                 + (f", /{slowdown:g} in a search" if slowdown != 1 else ""))


def stated_speed(gpu: str, workers: int) -> Speed:
    """A trial's speed on ``workers`` GPUs of kind ``gpu`` from :data:`GPU_PEAK_TFLOPS`."""
    if gpu not in GPU_PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu}: no stated speed for it; choose one of {', '.join(GPU_PEAK_TFLOPS)}")
    macs = GPU_PEAK_TFLOPS[gpu] * 1e12 / 2 * GPU_UTILISATION * workers
    return Speed(macs, macs, f"stated: {gpu} at {GPU_UTILISATION:.0%} of its bf16 peak"
                 + (f" x {workers} workers" if workers > 1 else ""))


def trials_at_once(spec: Spec, resources: dict[str, float]) -> int:
    """Trials that run at once on ``resources`` (total CPUs and GPUs): ``search.max_concurrent_trials``,
    else by GPUs when trials use them (``auto``: one each), else by CPUs (0: not even one fits)."""
    res = spec.resources
    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    gpus = 1.0 if res.gpus_per_worker == "auto" else res.gpus  # auto, not decided yet: at least a GPU each
    if gpus > 0:
        return int(resources.get("GPU", 0) // (gpus * res.workers_per_trial))
    return int(resources.get("CPU", 0) // (res.cpus_per_worker * res.workers_per_trial))


def trial_overhead(spec: Spec) -> float:
    """Seconds a trial spends beyond its training: on a slot, or starting a Ray Train run of its own."""
    return SLOT_TRIAL_OVERHEAD_S if spec.resources.slots else TRIAL_OVERHEAD_S


def make_plan(spec: Spec, task_dirs: dict[str, Path | None], at_once: int, gpu: str = "a10g",
              speed: Speed | None = None, measure_gpu: bool = True) -> Plan:
    """The plan of ``spec``'s search on ``task_dirs`` (None: not downloaded yet), ``at_once`` trials at a
    time (see :func:`trials_at_once`). Trials' speed: ``speed`` if given, else measured here when this
    machine has the trials' kind of device (a GPU only with ``measure_gpu``), else stated for ``gpu``."""
    if gpu not in GPU_PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu}: no stated speed for it; choose one of {', '.join(GPU_PEAK_TFLOPS)}")
    shape = ViTShape.for_model(spec.backbone.model, spec.backbone.img_size)
    sizes = task_sizes(spec, task_dirs)
    bench = get_benchmark(spec.data.benchmark)
    configs = sample_configs(spec.space, SAMPLES, spec.search.seed)
    stopping = spec.search.early_stopping
    rungs = stopping.rungs(spec.train.epochs)
    cached = spec.train.prefix_cache and spec.data.benchmark != "fgvc"  # FGVC's training crops anew every epoch
    res = spec.resources
    uses_gpu = res.gpus_per_worker != 0  # auto: packed GPUs, planned here as one GPU per worker
    assumptions = [f"work averaged over {SAMPLES} configs drawn at random from the space"]
    if any(folder is None for folder in task_dirs.values()) and spec.data.root is not None:
        assumptions.append(f"no folder yet for {sum(f is None for f in task_dirs.values())} task(s): "
                           f"{spec.data.benchmark}'s published split sizes")
    if speed is None:
        tokens = round(statistics.mean(sum(make_job(spec, "", c).counts(shape.depth)) / shape.depth for c in configs))
        if uses_gpu and not (measure_gpu and torch.cuda.is_available()):
            speed = stated_speed(gpu, res.workers_per_trial)
        else:
            device = torch.device("cuda" if uses_gpu else "cpu")
            speed = measured_speed(spec, shape, tokens, max(s.classes for s in sizes.values()), device)
    if at_once < 1:
        at_once = 1
        assumptions.append("one trial at a time: this machine holds none (set search.max_concurrent_trials)")
    if res.gpus_per_worker == "auto":
        assumptions.append("gpus_per_worker: auto, planned as a GPU per worker; the search packs more if they fit")
    if rungs:
        assumptions.append(f"early stopping keeps 1/{stopping.reduction_factor} of the trials at each rung "
                           f"({', '.join(map(str, rungs))}); at most: none stopped")
    tasks = []
    for task, size in sizes.items():
        search_images = tuple(size.images[split] for split in bench.search_splits)
        final_images = tuple(size.images[split] for split in bench.final_splits)
        works = [trial_work(make_job(spec, str(task_dirs[task] or task), c), shape, size.classes, search_images,
                            rungs, stopping.reduction_factor, cached) for c in configs]
        expected, most = Work.mean([w[0] for w in works]), Work.mean([w[1] for w in works])
        retrains = expected_front(spec.search.trials_per_task) * len(spec.final.seeds)
        final_jobs = [make_job(spec, "", {FINAL: {**c, "seed": 0}}) for c in configs]
        final = Work.mean([trial_work(j, shape, size.classes, final_images, cached=cached)[1] for j in final_jobs])
        trials = spec.search.trials_per_task
        search_work, search_most, final_work = expected * trials, most * trials, final * retrains
        for name in spec.search.references:  # every lr of its grid, then its selected trial's retrains
            for lr in spec.method_options(name).base_lrs:
                config = {TASK: task, REFERENCE: name, "base_lr": lr}
                work = trial_work(make_job(spec, str(task_dirs[task] or task), {REFERENCE_TRIAL: config}), shape,
                                  size.classes, search_images, cached=cached)[1]
                search_work, search_most, trials = search_work + work, search_most + work, trials + 1
            job = make_job(spec, "", {FINAL: {**config, "seed": 0}})
            final_work += trial_work(job, shape, size.classes, final_images, cached=cached)[1] * len(spec.final.seeds)
            retrains += len(spec.final.seeds)
        overhead = trial_overhead(spec) * (trials + retrains)
        tasks.append(TaskPlan(
            task, trials, search_images[0], search_images[1], search_work, search_most, retrains, final_work,
            overhead + speed.seconds(search_work) + speed.seconds(final_work),
            overhead + speed.seconds(search_most) + speed.seconds(final_work),
        ))
    if spec.final.seeds:
        assumptions.append("final retrains: the expected front of independent objectives x seeds")
    if spec.search.references:
        lrs = sum(len(spec.method_options(name).base_lrs) for name in spec.search.references)
        assumptions.append(f"trials include {lrs} per task of the reference points ({', '.join(spec.search.references)})")
    return Plan(spec.name, spec.backbone.model, spec.backbone.img_size, tasks, at_once, "GPU" if uses_gpu else "CPU",
                (res.gpus or 1.0 if uses_gpu else res.cpus_per_worker) * res.workers_per_trial, speed,
                assumptions, SLOT_START_S if res.slots else 0.0)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _range(low: float, high: float, fmt: str = "{:.3g}") -> str:
    return fmt.format(low) if math.isclose(low, high, rel_tol=1e-3) else f"{fmt.format(low)}-{fmt.format(high)}"


def plan_lines(plan: Plan, per_task: bool = True) -> list[str]:
    """The plan as terminal lines (each under 100 columns): a line per task, then totals."""
    lines = [(f"plan: {plan.name} · {plan.model} @ {plan.img_size} px · {len(plan.tasks)} task(s) · "
              f"{plan.at_once} trial(s) at a time")]
    if per_task:
        lines.append(f"{'task':<22}{'trials':>7}{'epochs/trial':>14}{'images':>11}{'search PFLOPs':>16}"
                     f"{'retrains':>10}{'final PFLOPs':>14}")
        for t in plan.tasks:
            pflops = _range(*((w.train_macs + w.eval_macs) / 1e15 for w in (t.search, t.search_most)))
            epochs = _range(t.search.epochs / t.trials, t.search_most.epochs / t.trials, "{:.1f}")
            final = (t.final.train_macs + t.final.eval_macs) / 1e15
            lines.append(f"{t.task[:21]:<22}{t.trials:>7}{epochs:>14}{f'{t.train_images}/{t.eval_images}':>11}"
                         f"{pflops:>16}{t.final_retrains:>10.1f}{final:>14.3g}")
    summary = plan.as_dict()
    wall, hours = plan.wall_seconds, plan.device_hours
    lines.append(f"work: {summary['trials']} trials + {summary['final_retrains']:.0f} retrains · "
                 f"{summary['train_pflops']:.3g} PFLOPs training + {summary['eval_pflops']:.3g} evaluation "
                 "(multiply-adds)")
    most = f" (at most {_duration(wall[1])})" if wall[1] > wall[0] * 1.001 else ""
    lines.append(f"time: {_range(*hours)} {plan.device}-hours, wall {_duration(wall[0])}{most}; "
                 f"speed {plan.speed.source}")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    return lines
