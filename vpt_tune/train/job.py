"""One trial's training job, without Ray: backbone + data + prompted model from a flat description."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vpt_tune.condense import condense_, prompt_importance, removed_count, select_prompts
from vpt_tune.cost import Cost, ViTShape, prompted_cost
from vpt_tune.data.tasks import task_classes, task_split
from vpt_tune.data.splits import Batched
from vpt_tune.models.backbone import create_backbone, normalisation
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.models.prototype_init import prototype_init_
from vpt_tune.prune import MAX_PRUNED_SEGMENTS, PRUNE_SCORINGS, gate_importance, masked_entries, prune_, select_gates
from vpt_tune.train.loop import LoopState, TrainConfig, evaluate, train
from vpt_tune.train.prefix_cache import cached_prefix


@dataclass(frozen=True)
class Job:
    """Everything one training run needs: backbone, task, sampled prompt/optimiser params, schedule."""

    model: str
    weights: str  # "demo", "hub", "random" or a local file
    img_size: int
    task_dir: str
    params: dict[str, Any]  # the sampled and fixed values of the spec's space (see Space)
    epochs: int
    batch_size: int
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"
    seed: int = 0
    benchmark: str = "vtab-1k"  # the task folder's layout: vtab-1k or fgvc (see vpt_tune.data.benchmarks)
    train_split: str = "train800"
    eval_split: str = "val200"
    kv_shared: bool = True  # E²VPT: one tensor for keys and values
    kv_position: str = "prepend"
    prefix_cache: bool = True  # run frozen blocks before the first prompted block once (same logits)
    condense_epochs: int = 1  # fine-tuning after condensation (params["condensation_ratio"] > 0)
    condense_per_block: bool = False  # keep the top fraction of each block instead of globally
    prune_epochs: int | None = None  # E²VPT retraining after pruning; None: ``epochs``
    prune_scoring: str = "authors"  # E²VPT pruning: the authors' gates, scores and rewind, or ours (vpt_tune.prune)
    evaluate_every_epoch: bool = True  # False: the evaluation split once, after each phase (a final retrain's test)

    def __post_init__(self) -> None:
        if self.prune_scoring not in PRUNE_SCORINGS:
            raise ValueError(f"unknown prune_scoring {self.prune_scoring!r}; choose one of {', '.join(PRUNE_SCORINGS)}")

    @property
    def condensation_ratio(self) -> float:
        return float(self.params.get("condensation_ratio") or 0.0)

    @property
    def prune_ratios(self) -> tuple[float, float]:
        """E²VPT (token, segment) prune ratios; (0, 0) when the job does not prune."""
        return float(self.params.get("token_prune_ratio") or 0.0), float(self.params.get("segment_prune_ratio") or 0.0)

    @property
    def retrain_epochs(self) -> int:
        """Epochs of retraining after E²VPT pruning (0 when the job does not prune)."""
        return (self.epochs if self.prune_epochs is None else self.prune_epochs) if any(self.prune_ratios) else 0

    @property
    def gated(self) -> bool:
        """Whether E²VPT gates train with the prompts before pruning (the authors' scoring)."""
        return self.prune_scoring == "authors" and self.retrain_epochs > 0

    @property
    def total_epochs(self) -> int:
        """Training epochs plus the pruning retraining and condensation fine-tuning epochs, if any."""
        return self.epochs + self.retrain_epochs + (self.condense_epochs if self.condensation_ratio > 0 else 0)

    @property
    def base_epochs(self) -> int:
        """Epochs before condensation: the state after them does not depend on the condensation ratio."""
        return self.epochs + self.retrain_epochs

    def base_key(self) -> str:
        """Identifies the state after :attr:`base_epochs`: a hash of everything but the condensation settings,
        so jobs that differ only in those can start from one trained (and pruned) model."""
        fields = asdict(self)
        fields["params"] = {k: v for k, v in self.params.items() if k != "condensation_ratio"}
        for name in ("condense_epochs", "condense_per_block", "evaluate_every_epoch"):  # (evaluation draws no RNG)
            fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def counts(self, num_blocks: int) -> list[int]:
        """Fresh prompts per block for this job's placement."""
        p = self.params
        return prompt_counts(p["num_prompts"], p["placement"], num_blocks, p.get("depth"), p.get("layers"))

    def kv_counts(self, num_blocks: int) -> list[int]:
        """E²VPT key/value prompts per block: ``kv_prompts`` in every block (0: none)."""
        return [int(self.params.get("kv_prompts", 0))] * num_blocks

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            base_lr=float(self.params["base_lr"]),
            weight_decay=float(self.params.get("weight_decay", 0.0)),
            warmup_epochs=self.warmup_epochs,
            optimizer=self.optimizer,
            seed=self.seed,
            evaluate_every_epoch=self.evaluate_every_epoch,
        )


def resolve_weights(weights: str) -> str | None:
    """Map the spec's ``weights`` to what :func:`create_backbone` takes (``demo`` -> cached file)."""
    if weights == "demo":
        from vpt_tune.data.assets import ensure_demo_backbone

        return str(ensure_demo_backbone())
    return None if weights == "hub" else weights


def expected_cost(job: Job, shape: ViTShape | None = None, classes: int | None = None) -> Cost:
    """The cost ``job``'s model will have after E²VPT token pruning and condensation, known before it
    trains: what its objectives are judged on while it trains (early stopping). Exact for pruning and
    per-block condensation; global condensation removes an exact number of prompts, shared out here
    among the blocks in proportion to their prompts (the trained scores decide the real split).
    ``shape`` and ``classes`` (default: read off the model name and the task's folder) spare the lookups."""
    shape = shape or ViTShape.for_model(job.model, job.img_size)
    classes = classes or task_classes(job.benchmark, Path(job.task_dir))
    counts = job.counts(shape.depth)
    fresh = [count > 0 for count in counts]
    if job.retrain_epochs and job.prune_ratios[0]:  # the same token indices go in every block
        counts = [count - removed_count(count, job.prune_ratios[0]) for count in counts]
    ratio = job.condensation_ratio
    if ratio > 0 and job.condense_per_block:
        counts = [count - removed_count(count, ratio) for count in counts]
    elif ratio > 0:
        counts = _apportion(counts, sum(counts) - removed_count(sum(counts), ratio))
    return prompted_cost(shape, counts, classes, job.kv_counts(shape.depth), job.kv_shared, fresh)


def _apportion(counts: list[int], total: int) -> list[int]:
    """``total`` shared out in proportion to ``counts`` (largest remainders, ties to the earlier block)."""
    whole = sum(counts)
    shares = [count * total / whole for count in counts]
    result = [int(share) for share in shares]
    by_remainder = sorted(range(len(counts)), key=lambda i: (result[i] - shares[i], i))
    for i in by_remainder[: total - sum(result)]:
        result[i] += 1
    return result


def build_model(job: Job, classes: int, weights: str | None = None) -> PromptedViT:
    """``job``'s prompted model with freshly initialised prompts and head (``weights``: the backbone
    file to load instead of the job's own ``weights`` setting)."""
    torch.manual_seed(job.seed)  # prompt and head initialisation
    vit = create_backbone(job.model, weights or resolve_weights(job.weights), job.img_size)
    depth = len(vit.blocks)
    return PromptedViT(
        vit, classes, job.counts(depth), float(job.params.get("prompt_dropout", 0.0)),
        job.kv_counts(depth), job.kv_shared, job.kv_position, job.gated,
    )


def build(job: Job) -> tuple[PromptedViT, Batched, Batched]:
    """The prompted model and the decoded train/eval splits of ``job``."""
    task_dir = Path(job.task_dir)
    classes = task_classes(job.benchmark, task_dir)
    model = build_model(job, classes)
    mean, std = normalisation(model.backbone)
    train_split = task_split(job.benchmark, task_dir, job.train_split, job.img_size, mean, std, classes, train=True)
    eval_split = task_split(job.benchmark, task_dir, job.eval_split, job.img_size, mean, std, classes, train=False)
    spt_init_(model, job, train_split, job.seed)
    return model, train_split, eval_split


def spt_init_(model: PromptedViT, job: Job, train_split: Batched, seed: int) -> None:
    """SPT ``prompt_init``: prototypes of each block's input tokens over training images shuffled with
    ``seed`` (nothing for ``uniform``)."""
    init = job.params.get("prompt_init", "uniform")
    if init != "uniform":
        generator = torch.Generator().manual_seed(seed)
        images = (x for x, _ in train_split.batches(job.batch_size, generator))
        prototype_init_(model, images, init.removeprefix("spt_"), generator)


def rewind_(model: PromptedViT, job: Job, initial: dict | None, train_split: Batched) -> None:
    """E²VPT's rewind before the pruned model retrains. ``authors``: their code rebuilds the model
    without reseeding, i.e. draws prompts, KV prompts and head afresh from the initial distributions
    (uniform or SPT, gates 1); here from a seed derived from the job's, so a resumed run draws the same.
    ``ours``: every trained tensor back to its ``initial`` value, lottery-ticket style."""
    if job.prune_scoring == "ours":
        model.load_state_dict(initial, strict=False)
        return
    seed = int(hashlib.sha256(f"e2vpt rewind {job.seed}".encode()).hexdigest()[:15], 16)
    torch.manual_seed(seed)
    model.reset_parameters()
    spt_init_(model, job, train_split, seed)


PHASES = ("train", "prune", "condense")  # in order; a checkpoint names the one it was taken in, or DONE
DONE = "done"
CHECKPOINT_FILE = "trainable.pt"  # in a trial checkpoint: run()'s resume state + the job, never the backbone


def run(
    job: Job,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict]], None] = lambda epoch, metrics, checkpoint: None,
    shard: tuple[int, int] = (0, 1),
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model,
    resume: dict | None = None,
) -> tuple[PromptedViT, dict[str, float]]:
    """Build and train ``job``; ``wrap`` may wrap the model (e.g. DDP). Returns the model and final metrics.

    Up to three phases, epochs numbered on across them:
    1. ``train``: training for ``epochs``;
    2. ``prune`` (E²VPT, with prune ratios): score the token and segment gates (trained in phase 1 with
       ``prune_scoring: authors``), rewind (:func:`rewind_`), remove the pruned prompts, fix the
       segment masks and retrain for ``retrain_epochs``; ``val_acc_unpruned`` reports phase 1;
    3. ``condense`` (Prompt Condensation, ratio r > 0): keep the ``ceil((1 - r) * T)`` most important
       prompts and fine-tune them and the head for ``condense_epochs``; ``val_acc_uncondensed``
       reports the model before.
    ``on_epoch(epoch, metrics, checkpoint)``: ``checkpoint()`` returns everything needed to continue
    exactly after that epoch; ``run(..., resume=that)`` does so (same result as an uninterrupted run).
    The metrics include the cost of the final (pruned, condensed) model.
    """
    model, train_images, eval_split = build(job)
    if resume is not None:
        model.load_trainable(resume["trainable"])
    model.to(device)
    net, (train_split, eval_split) = (
        cached_prefix(model, [train_images, eval_split], job.batch_size, device)
        if job.prefix_cache else (model, [train_images, eval_split])
    )
    lengths = [job.epochs, job.retrain_epochs, job.condense_epochs if job.condensation_ratio > 0 else 0]
    active = [True, job.retrain_epochs > 0, job.condensation_ratio > 0]
    if resume is None:
        phase, loop, metrics = 0, LoopState(), {}
        initial = model.trainable_state() if active[1] and job.prune_scoring == "ours" else None  # ours' rewind point
    else:
        phase, loop, metrics = resumed_phase(resume), LoopState(**(resume["loop"] or {})), resume["metrics"]
        initial = resume["initial"]

    def checkpoint() -> dict:
        return {"stage": (*PHASES, DONE)[phase], "loop": copy.deepcopy(loop.as_dict()), "metrics": dict(metrics),
                "trainable": model.trainable_state(), "initial": initial if phase == 0 else None}

    while phase < len(PHASES):  # a resumed finished run (stage DONE) only rebuilds the model
        if active[phase] and lengths[phase] > 0:
            offset = sum(lengths[:phase])

            def report(epoch: int, m: dict[str, float]) -> None:
                metrics.update(m)
                on_epoch(offset + epoch, m, checkpoint)

            train(wrap(net), train_split, eval_split, job.train_config(lengths[phase]), device, report, shard, loop)
        phase += 1
        if phase == len(PHASES):
            break
        loop = LoopState()
        if not active[phase]:
            continue
        if PHASES[phase] == "prune":
            scores = gate_importance(net, model, train_split, job.batch_size, device)
            rewind_(model, job, initial, train_images)
            cap = MAX_PRUNED_SEGMENTS if job.prune_scoring == "authors" else None
            prune_(model, *select_gates(scores, *job.prune_ratios, cap))
            metrics["val_acc_unpruned"] = metrics["val_acc"]
        else:
            scores = prompt_importance(net, model, train_split, job.batch_size, device)
            condense_(model, select_prompts(scores, job.condensation_ratio, job.condense_per_block))
            metrics["val_acc_uncondensed"] = metrics["val_acc"]
        if lengths[phase] == 0:
            metrics["val_acc"] = evaluate(net, eval_split, job.batch_size, device)
    return model, {**metrics, **model_cost(model, job).as_dict()}


def resumed_phase(resume: dict) -> int:
    """The index in :data:`PHASES` (``len(PHASES)``: done) of the stage a checkpoint names; checkpoints of
    earlier versions give the index as ``phase``."""
    if "stage" not in resume:
        return int(resume["phase"])
    stages = (*PHASES, DONE)
    if resume["stage"] not in stages:
        raise ValueError(f"a checkpoint of an unknown training stage {resume['stage']!r} (known: {', '.join(stages)}); "
                         "it was written by another version of vpt-tune")
    return stages.index(resume["stage"])


def model_cost(model: PromptedViT, job: Job) -> Cost:
    """Cost of a built (possibly pruned or condensed) model; segment-masked entries are not trainable."""
    cost = prompted_cost(
        ViTShape.of(model.backbone), model.prompts.counts, model.head.out_features,
        model.kv_prompts.counts, job.kv_shared, model.prompts.fresh,
    )
    return replace(cost, trainable_params=cost.trainable_params - masked_entries(model))
