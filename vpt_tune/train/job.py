"""One trial's training job, without Ray: backbone + data + prompted model from a flat description."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vpt_tune.cost import Cost, ViTShape, prompted_cost
from vpt_tune.data.tasks import task_classes, task_split
from vpt_tune.data.splits import Batched
from vpt_tune.models.backbone import create_backbone, normalisation
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.methods import MAIN_METHODS, METHODS, REFERENCES, Method, StageContext, get_method
from vpt_tune.train.loop import LoopState, TrainConfig, evaluate, train
from vpt_tune.train.prefix_cache import cached_prefix


# Fields of jobs saved before methods carried their own options (checkpoints, exported files): the option they are now.
_LEGACY_OPTIONS = {"kv_shared": ("e2vpt", "kv_shared"), "kv_position": ("e2vpt", "kv_position"),
                   "prune_scoring": ("e2vpt", "prune_scoring"), "prune_epochs": ("e2vpt", "prune_epochs"),
                   "condense_epochs": ("condensation", "epochs"), "condense_per_block": ("condensation", "per_block")}


@dataclass(frozen=True)
class Job:
    """Everything one training run needs: backbone, task, sampled prompt/optimiser params, schedule,
    the main ``method`` and the options of each method by name (a method's defaults when absent)."""

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
    method: str = "vpt"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    prefix_cache: bool = True  # run frozen blocks before the first prompted block once (same logits)
    evaluate_every_epoch: bool = True  # False: the evaluation split once, after each stage (a final retrain's test)

    def __post_init__(self) -> None:
        if not (get_method(self.method).main or get_method(self.method).reference):
            raise ValueError(f"{self.method!r} is not a method a job can use alone; choose one of "
                             f"{', '.join(MAIN_METHODS + REFERENCES)}")
        for name, given in self.options.items():
            get_method(name).options.model_validate(given)  # a ValueError naming the option

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "Job":
        """A job from :func:`dataclasses.asdict`, also of a version that kept methods' options as its own fields."""
        fields, options = dict(fields), {k: dict(v) for k, v in fields.get("options", {}).items()}
        for key, (method, option) in _LEGACY_OPTIONS.items():
            if key in fields:
                options.setdefault(method, {})[option] = fields.pop(key)
        if "method" not in fields:  # those versions knew VPT and E²VPT only
            fields["method"] = "e2vpt" if any(fields["params"].get(k) for k in get_method("e2vpt").space) else "vpt"
        return cls(**{**fields, "options": options})

    def methods(self) -> list[Method]:
        """The methods this job uses (the main one and its add-ons), in the registry's order."""
        return [m for m in METHODS.values() if m.used(self)]

    def stages(self) -> list[tuple[str, Method | None, int]]:
        """(name, method, training epochs) of every stage that runs, base training (``train``) first."""
        after = [(stage, m, m.stage_epochs(stage, self)) for m in self.methods() for stage in m.stages
                 if m.runs_stage(stage, self)]
        return [("train", None, self.epochs), *after]

    @property
    def total_epochs(self) -> int:
        """Epochs of every stage: base training, then e.g. retraining after pruning and condensation fine-tuning."""
        return sum(epochs for _, _, epochs in self.stages())

    @property
    def base_epochs(self) -> int:
        """Epochs before the stages of methods acting after base training (condensation): the state after
        them does not depend on those methods' settings."""
        return sum(epochs for _, method, epochs in self.stages() if method is None or not method.after_base)

    def base_key(self) -> str:
        """Identifies the state after :attr:`base_epochs`: a hash of everything but the settings of methods that
        act after base training, so jobs that differ only in those can start from one trained (and pruned) model."""
        later = [m for m in METHODS.values() if m.after_base]
        fields = asdict(self)
        fields["params"] = {k: v for k, v in self.params.items() if not any(k in m.space for m in later)}
        fields["options"] = {k: v for k, v in self.options.items() if not any(k == m.name for m in later)}
        fields.pop("evaluate_every_epoch")  # (evaluation draws no RNG)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def counts(self, num_blocks: int) -> list[int]:
        """Fresh prompts per block for this job's placement."""
        p = self.params
        return prompt_counts(p["num_prompts"], p["placement"], num_blocks, p.get("depth"), p.get("layers"))

    def model_arguments(self, depth: int) -> dict[str, Any]:
        """The keyword arguments of its :class:`PromptedViT` (of ``depth`` blocks): the placement's prompts in
        the sequence and the prompt dropout, as its methods set them."""
        arguments = {"counts": self.counts(depth), "prompt_dropout": float(self.params.get("prompt_dropout", 0.0))}
        for method in self.methods():
            arguments.update(method.model_arguments(self, depth))
        return arguments

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


def expected_cost(job: Job, shape: ViTShape | None = None, classes: int | None = None, stages: bool = True) -> Cost:
    """The cost ``job``'s model will have after its stages (E²VPT token pruning, condensation), known
    before it trains: what its objectives are judged on while it trains (early stopping); see each
    method's :meth:`~vpt_tune.methods.Method.expected_counts`. ``stages=False``: the model as built.
    ``shape`` and ``classes`` (default: read off the model name and the task's folder) spare the lookups."""
    shape = shape or ViTShape.for_model(job.model, job.img_size)
    classes = task_classes(job.benchmark, Path(job.task_dir)) if classes is None else classes
    counts = job.model_arguments(shape.depth)["counts"]
    fresh = [count > 0 for count in counts]
    methods = job.methods()
    for method in methods if stages else ():
        counts = method.expected_counts(job, counts)
    terms = [method.cost_terms(job, shape, counts, fresh) for method in methods]
    return prompted_cost(shape, counts, classes, fresh=fresh, terms=terms)


def build_model(job: Job, classes: int, weights: str | None = None) -> PromptedViT:
    """``job``'s prompted model with freshly initialised prompts and head (``weights``: the backbone
    file to load instead of the job's own ``weights`` setting), its methods installed."""
    torch.manual_seed(job.seed)  # prompt and head initialisation
    vit = create_backbone(job.model, weights or resolve_weights(job.weights), job.img_size)
    depth = len(vit.blocks)
    model = PromptedViT(vit, classes, **job.model_arguments(depth))
    for method in job.methods():
        method.install(model, job)
    model.first_changed_block = min([depth] + [method.first_block(job, depth) for method in job.methods()])
    return model


def build(job: Job) -> tuple[PromptedViT, Batched, Batched]:
    """The prompted model, initialised by its methods, and the decoded train/eval splits of ``job``."""
    task_dir = Path(job.task_dir)
    classes = task_classes(job.benchmark, task_dir)
    model = build_model(job, classes)
    mean, std = normalisation(model.backbone)
    train_split = task_split(job.benchmark, task_dir, job.train_split, job.img_size, mean, std, classes, train=True)
    eval_split = task_split(job.benchmark, task_dir, job.eval_split, job.img_size, mean, std, classes, train=False)
    initialise(model, job, train_split, job.seed)
    return model, train_split, eval_split


def initialise(model: PromptedViT, job: Job, train_split: Batched, seed: int) -> None:
    """The methods' data-dependent initialisation (SPT prototypes over images shuffled with ``seed``)."""
    for method in job.methods():
        method.initialise(model, job, train_split, seed)


DONE = "done"  # the stage a finished run's checkpoint names
LEGACY_STAGES = ("train", "prune", "condense", DONE)  # checkpoints of earlier versions give an index into these
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

    Its stages (:meth:`Job.stages`) run in order, epochs numbered on across them: base training
    (``train``), then each method's, e.g. E²VPT's ``prune`` (score the gates, rewind, prune, retrain;
    ``val_acc_unpruned`` reports the model before) and Prompt Condensation's ``condense`` (keep the most
    important prompts, fine-tune; ``val_acc_uncondensed``). A stage without epochs is evaluated once.
    ``on_epoch(epoch, metrics, checkpoint)``: ``checkpoint()`` returns everything needed to continue
    exactly after that epoch, naming its stage; ``run(..., resume=that)`` does so (same result as an
    uninterrupted run). The metrics include the cost of the final (pruned, condensed) model.
    """
    model, train_images, eval_split = build(job)
    if resume is not None:
        model.load_trainable(resume["trainable"])
    model.to(device)
    net, (train_split, eval_split) = (
        cached_prefix(model, [train_images, eval_split], job.batch_size, device)
        if job.prefix_cache else (model, [train_images, eval_split])
    )
    stages = job.stages()
    names = [name for name, _, _ in stages]
    if resume is None:
        position, loop, metrics = 0, LoopState(), {}
        keep = any(method.keeps_initial(job) for method in job.methods())
        initial = model.trainable_state() if keep else None  # a rewind point
    else:
        position, loop, metrics = resumed_position(resume, names), LoopState(**(resume["loop"] or {})), resume["metrics"]
        initial = resume["initial"]

    def checkpoint() -> dict:
        return {"stage": (*names, DONE)[position], "loop": copy.deepcopy(loop.as_dict()), "metrics": dict(metrics),
                "trainable": model.trainable_state(), "initial": initial if position == 0 else None}

    def reinitialise(seed: int) -> None:
        torch.manual_seed(seed)
        model.reset_parameters()
        initialise(model, job, train_images, seed)

    while position < len(stages):  # a resumed finished run (stage DONE) only rebuilds the model
        epochs = stages[position][2]
        if epochs > 0:
            offset = sum(e for _, _, e in stages[:position])

            def report(epoch: int, m: dict[str, float]) -> None:
                metrics.update(m)
                on_epoch(offset + epoch, m, checkpoint)

            train(wrap(net), train_split, eval_split, job.train_config(epochs), device, report, shard, loop)
        position += 1
        if position == len(stages):
            break
        loop = LoopState()
        name, method, epochs = stages[position]
        method.run_stage(name, StageContext(net, model, job, train_split, train_images, job.batch_size, device,
                                            metrics, initial, reinitialise))
        if epochs == 0:
            metrics["val_acc"] = evaluate(net, eval_split, job.batch_size, device)
    return model, {**metrics, **model_cost(model, job).as_dict()}


def resumed_position(resume: dict, names: list[str]) -> int:
    """Where in a job's stages ``names`` (``len(names)``: done) a checkpoint was taken."""
    stage = resume["stage"] if "stage" in resume else LEGACY_STAGES[int(resume["phase"])]
    known = [*names, DONE]
    if stage not in known:
        raise ValueError(f"a checkpoint of training stage {stage!r}, which this job does not have (its stages: "
                         f"{', '.join(known)}); it was written by another version of vpt-tune or for another job")
    return known.index(stage)


def model_cost(model: PromptedViT, job: Job) -> Cost:
    """Cost of a built (possibly pruned or condensed) model of ``job``."""
    terms = [method.model_cost_terms(model, job) for method in job.methods()]
    return prompted_cost(ViTShape.of(model.backbone), model.prompts.counts, model.head.out_features,
                         fresh=model.prompts.fresh, terms=terms)
