"""``resources.gpus_per_worker: auto``: how many trials share a GPU, from one trial's measured memory.

Ray's fractional GPUs are logical only (ray#5902, ray#20563): 0.25 lets four trials onto a GPU whether
or not their memory fits. Before the search starts, a probe on one GPU (:func:`probe_memory`) measures a
trial's peak memory at the spec's batch with the space's largest prompt count, and the training
throughput at 2, 4, ... times that batch, a stand-in for as many trials sharing the GPU's SMs. A GPU
then holds as many trials as fit in its memory with a safety margin, and no more than keep raising
the throughput by :data:`MIN_RISE`. On a machine without GPUs the trials train on CPU; a cluster
may start a GPU node for the probe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import ray

from vpt_tune.cost import ViTShape
from vpt_tune.errors import UserError
from vpt_tune.search.jobs import make_job
from vpt_tune.search.space import sample_configs
from vpt_tune.spec import Spec
from vpt_tune.train.probe import MemoryProbe, probe_memory

log = logging.getLogger(__name__)
SAFETY = 0.10  # of the GPU's memory kept free: allocator fragmentation, other processes
CUDA_CONTEXT_BYTES = 600 * 1024**2  # each trial's CUDA context and kernels, outside torch's allocator
MIN_RISE = 0.10  # one more trial on a GPU must raise its throughput by this fraction to be worth it
PROBE_TIMEOUT_S = 900  # an autoscaler's GPU node takes minutes to start


def trials_per_gpu(probe: MemoryProbe, safety: float = SAFETY, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
    """Trials that share one GPU: as many as fit in ``(1 - safety)`` of its memory (each its peak plus a
    CUDA context), capped where the measured throughput stops rising by :data:`MIN_RISE` (at least 1)."""
    fit = math.floor(probe.total_bytes * (1 - safety) / (probe.peak_bytes + context_bytes))
    useful, previous = 1, probe.images_per_s[1]
    for k in sorted(probe.images_per_s)[1:]:
        if probe.images_per_s[k] < previous * (1 + MIN_RISE):
            break
        useful, previous = k, probe.images_per_s[k]
    return max(1, min(fit, useful))


def gpu_share(trials: int) -> float:
    """The ``gpus_per_worker`` that puts ``trials`` on a GPU, rounded down to Ray's resource unit (1e-4)
    so that ``trials`` of them add up to at most one GPU."""
    return math.floor(10_000 / trials) / 10_000


def largest_counts(spec: Spec) -> list[int]:
    """The prompts per block of the space's config with the most prompts (the most memory)."""
    depth = ViTShape.for_model(spec.backbone.model, spec.backbone.img_size).depth
    jobs = [make_job(spec, "", config) for config in sample_configs(spec.space, 256, spec.search.seed)]
    return max((job.counts(depth) for job in jobs), key=sum)


def probe_on_a_gpu(spec: Spec) -> MemoryProbe:
    """:func:`probe_memory` of the space's largest config, run as a Ray task on one whole GPU (on an
    autoscaling cluster it waits up to :data:`PROBE_TIMEOUT_S` for a GPU node to start)."""
    probe = ray.remote(num_gpus=1, num_cpus=0)(probe_memory)
    task = probe.remote(spec.backbone.model, spec.backbone.img_size, largest_counts(spec), 1000, spec.train.batch_size)
    try:
        return ray.get(task, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(task, force=True)
        raise UserError(f"resources.gpus_per_worker: auto: no GPU of the Ray cluster took the memory probe in "
                        f"{PROBE_TIMEOUT_S // 60} min; set gpus_per_worker to a number (0: CPU) or add GPU "
                        "nodes") from None


def resolve_gpus(
    spec: Spec, gpus: float, probe: Callable[[Spec], MemoryProbe] | None, cluster: bool = False
) -> Spec:
    """``spec`` with ``gpus_per_worker: auto`` decided for a machine or cluster of ``gpus`` GPUs now: the
    share :func:`trials_per_gpu` gives from ``probe(spec)``, or 0 (CPU) on a machine without GPUs (a
    ``cluster`` may start GPU nodes for the probe); other specs unchanged."""
    res = spec.resources
    if res.gpus_per_worker != "auto":
        return spec
    if gpus <= 0 and not cluster:
        log.info("resources.gpus_per_worker: auto: no GPUs here, the trials train on CPU")
        share = 0.0
    else:
        measured = probe(spec)
        trials = trials_per_gpu(measured)
        share = gpu_share(trials)
        log.info("resources.gpus_per_worker: auto: %d trial(s) per GPU (%.4g each): a trial's peak %.1f GiB of "
                 "%.0f GiB; throughput at 1..%d trials' batches: %s images/s", trials, share,
                 measured.peak_bytes / 1024**3, measured.total_bytes / 1024**3, max(measured.images_per_s),
                 ", ".join(f"{v:.0f}" for v in measured.images_per_s.values()))
    return spec.model_copy(update={"resources": res.model_copy(update={"gpus_per_worker": share})})
