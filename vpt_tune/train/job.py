"""One trial's training job, without Ray: backbone + data + prompted model from a flat description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpt_tune.condense import condense_, prompt_importance, select_prompts
from vpt_tune.cost import Cost, ViTShape, prompted_cost
from vpt_tune.data.vtab import ImageSplit, load_split, num_classes
from vpt_tune.models.backbone import create_backbone, normalisation
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import TrainConfig, evaluate, train
from vpt_tune.train.prefix_cache import cached_prefix


@dataclass(frozen=True)
class Job:
    """Everything one training run needs: backbone, task, sampled prompt/optimiser params, schedule."""

    model: str
    weights: str  # "demo", "hub", "random" or a local file
    img_size: int
    task_dir: str
    params: dict[str, Any]  # num_prompts, placement, depth, layers, base_lr, weight_decay, prompt_dropout, kv_prompts
    epochs: int
    batch_size: int
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"
    seed: int = 0
    train_split: str = "train800"
    eval_split: str = "val200"
    kv_shared: bool = True  # E²VPT: one tensor for keys and values
    kv_position: str = "prepend"
    prefix_cache: bool = True  # run frozen blocks before the first prompted block once (same logits)
    condense_epochs: int = 1  # fine-tuning after condensation (params["condensation_ratio"] > 0)
    condense_per_block: bool = False  # keep the top fraction of each block instead of globally

    @property
    def condensation_ratio(self) -> float:
        return float(self.params.get("condensation_ratio") or 0.0)

    @property
    def total_epochs(self) -> int:
        """Training epochs plus the condensation fine-tuning epochs, if any."""
        return self.epochs + (self.condense_epochs if self.condensation_ratio > 0 else 0)

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
        )


def resolve_weights(weights: str) -> str | None:
    """Map the spec's ``weights`` to what :func:`create_backbone` takes (``demo`` -> cached file)."""
    if weights == "demo":
        from vpt_tune.data.assets import ensure_demo_backbone

        return str(ensure_demo_backbone())
    return None if weights == "hub" else weights


def job_cost(job: Job) -> Cost:
    """Prompt tokens, trainable parameters and GFLOPs of ``job``'s model, without building it."""
    shape = ViTShape.for_model(job.model, job.img_size)
    return prompted_cost(
        shape, job.counts(shape.depth), num_classes(Path(job.task_dir)), job.kv_counts(shape.depth), job.kv_shared
    )


def build(job: Job) -> tuple[PromptedViT, ImageSplit, ImageSplit]:
    """The prompted model and the decoded train/eval splits of ``job``."""
    torch.manual_seed(job.seed)  # prompt and head initialisation
    vit = create_backbone(job.model, resolve_weights(job.weights), job.img_size)
    mean, std = normalisation(vit)
    task_dir = Path(job.task_dir)
    classes = num_classes(task_dir)
    train_split = load_split(task_dir, job.train_split, job.img_size, mean, std, classes)
    eval_split = load_split(task_dir, job.eval_split, job.img_size, mean, std, classes)
    depth = len(vit.blocks)
    model = PromptedViT(
        vit, classes, job.counts(depth), float(job.params.get("prompt_dropout", 0.0)),
        job.kv_counts(depth), job.kv_shared, job.kv_position,
    )
    return model, train_split, eval_split


def run(
    job: Job,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, metrics: None,
    shard: tuple[int, int] = (0, 1),
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model,
) -> tuple[PromptedViT, dict[str, float]]:
    """Build and train ``job``; ``wrap`` may wrap the model (e.g. DDP). Returns the model and final metrics.

    With a condensation ratio r > 0 (Prompt Condensation): after training, keep the
    ``ceil((1 - r) * T)`` most important prompts, fine-tune them and the head for ``condense_epochs``
    (epochs numbered on from ``epochs``), and report ``val_acc_uncondensed`` beside ``val_acc``.
    The metrics include the cost of the final (condensed) model.
    """
    model, train_split, eval_split = build(job)
    model.to(device)
    net, (train_split, eval_split) = (
        cached_prefix(model, [train_split, eval_split], job.batch_size, device)
        if job.prefix_cache else (model, [train_split, eval_split])
    )
    metrics = train(wrap(net), train_split, eval_split, job.train_config(), device, on_epoch, shard)
    if job.condensation_ratio > 0:
        scores = prompt_importance(net, model, train_split, job.batch_size, device)
        condense_(model, select_prompts(scores, job.condensation_ratio, job.condense_per_block))
        uncondensed = metrics["val_acc"]
        metrics = train(
            wrap(net), train_split, eval_split, job.train_config(job.condense_epochs), device,
            lambda epoch, m: on_epoch(job.epochs + epoch, m), shard,
        ) if job.condense_epochs > 0 else {**metrics, "val_acc": evaluate(net, eval_split, job.batch_size, device)}
        metrics["val_acc_uncondensed"] = uncondensed
    return model, {**metrics, **model_cost(model, job).as_dict()}


def model_cost(model: PromptedViT, job: Job) -> Cost:
    """Cost of a built (possibly condensed) model."""
    return prompted_cost(
        ViTShape.of(model.backbone), model.prompts.counts, model.head.out_features,
        model.kv_prompts.counts, job.kv_shared, model.prompts.fresh,
    )
