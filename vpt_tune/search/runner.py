"""Runs a search: checks the spec's inputs, then one Ray Tune experiment over every task, each task
driven by its own Optuna study (the reference points' trials first), then the final retrains.

Layout of an experiment directory ``<storage>/<name>/``::

    spec.yaml            the validated spec as run
    experiment.json      the MLflow URI and run ids (search, tasks), for `vpt-tune resume`
    optuna.journal       every task's Optuna study (one study per task, named after it)
    search/              the Tune experiment of every task's trials and reference points (trial states, results);
                         search.more1, ... hold the trials added by `vpt-tune resume --set search.trials_per_task=N`
                         (references1/, ...: experiments of earlier versions ran the reference points after the search)
    final1/              the final retrains of the Pareto configs and selected references (``final.seeds``); final2, ...
    train_runs/          each trial's epoch checkpoints (prompts, head, optimiser), in a folder named after it
    slots/               the Ray Train runs of the slots that trained the trials (resources.slots)
    base_models/         trained models before condensation, reused by trials differing only there
    tables/<task>.parquet  a finished task's trial table (<task>.final.parquet: its final retrains)
    trials.parquet       one row per trial of every task, with its metrics, `pareto` flag and (a reference
                         point's) `reference` and `selected`
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
import ray
import torch
import yaml
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.store.db.db_types import DATABASE_ENGINES
from ray import tune

from vpt_tune.cost import ViTShape
from vpt_tune.data.cache import cache_dir
from vpt_tune.data.demo import materialise
from vpt_tune.data.benchmarks import expand_tasks, find_task_dir, get_benchmark
from vpt_tune.data.tasks import decode_task_split, task_classes
from vpt_tune.errors import SearchInterrupted
from vpt_tune.models.backbone import ModelError, check_weights
from vpt_tune.search.driver import (
    DRIVER_RESOURCE, FINAL, RAY_TRAIN_POLL, REFERENCE, REFERENCE_TRIAL, is_reference, run_trial, trial_resources,
    trial_task, unwrap,
)
from vpt_tune.search.jobs import TrialSetup
from vpt_tune.search.packing import probe_on_a_gpu, resolve_gpus
from vpt_tune.search.pareto import pareto_mask
from vpt_tune.search.plan import make_plan, plan_lines, trials_at_once
from vpt_tune.search.router import TASK, TaskRouter
from vpt_tune.search.results import (
    METRIC_COLUMNS, PROMPTS_ARTIFACT, REFERENCE_COLUMN, SELECTED_COLUMN, STATE_FILE, STOPPED_AT, TABLE_FILE, TRAIN_RUNS,
    experiment_relative, read_table, search_trials,
)
from vpt_tune.search.slots import Slots
from vpt_tune.search.scheduler import RungJudge, Rungs, StudySearch
from vpt_tune.search.space import DefineByRun, make_sampler
from vpt_tune.search.summary import summary_markdown, summary_table
from vpt_tune.search.tracking import Tracker, TrialLogger, default_tracking_uri, error_summary
from vpt_tune.spec import OBJECTIVES, Param, Spec, SpecError, load_spec
from vpt_tune.train.job import resolve_weights
from vpt_tune.train.worker import COMPLETE, REUSED_BASE

TEST_OBJECTIVES = {"test_acc": "max", **{k: v for k, v in OBJECTIVES.items() if k != "val_acc"}}
log = logging.getLogger(__name__)
RESUME_OVERRIDES = ("search.trials_per_task", "search.max_concurrent_trials")
SLOT_RUNS = "slots"  # the experiment's folder of the slots' Ray Train runs
# A finished trial's driver process runs the next trial (all trials ask for the same bundle), which spares
# each later trial a process start and its torch/timm imports (0.87x search wall in bench/trial_overhead.py
# when trials started Train runs of their own; on slots a driver only relays, but still imports the job's modules).
REUSE_TRIAL_ACTORS = True
PLAN_TASK_LINES = 8  # a search's plan shows a line per task up to this many tasks, else only the totals


@dataclass
class SearchResult:
    """Where a finished search lives and its trial table."""

    experiment_dir: Path
    table: pd.DataFrame
    mlflow_uri: str
    mlflow_experiment_id: str
    parent_run_id: str


def task_dirs(spec: Spec) -> dict[str, Path]:
    """The folder of every task (groups expanded, folder aliases found), materialising built-in demo
    tasks; all missing tasks are reported at once."""
    data = spec.data
    if data.root is None:
        if data.benchmark != "vtab-1k":
            raise SpecError(f"data.root: the demo tasks use the VTAB-1k layout; set data.root for {data.benchmark}")
        root = cache_dir() / "datasets" / "demo"
        log.info("demo tasks under %s", root)
        return {task: materialise(task, root) for task in data.tasks}
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise SpecError(f"data.root: {root} does not exist; point it at your {data.benchmark} folder")
    tasks = expand_tasks(data.benchmark, data.tasks)
    found = {task: find_task_dir(root, data.benchmark, task) for task in tasks}
    missing = [task for task, folder in found.items() if folder is None]
    if missing:
        groups = ", ".join([*get_benchmark(data.benchmark).groups, "all"])
        raise SpecError(f"data.tasks: no folder for {', '.join(missing)} under {root} (looked for known aliases too); "
                        f"name a task folder there, a known task or a group ({groups})")
    return found


def check_data(spec: Spec, tasks: dict[str, Path]) -> None:
    """Read every list file and decode every image of the search splits, before Ray starts.

    Bad data (missing or corrupt image, label out of range, empty split) fails here with the file
    named; the decoded splits land in the node's cache, so trials on this node skip decoding.
    """
    benchmark = spec.data.benchmark
    for task, task_dir in tasks.items():
        classes = task_classes(benchmark, task_dir)
        for split in get_benchmark(benchmark).search_splits:
            started = time.monotonic()
            count = decode_task_split(benchmark, task_dir, split, spec.backbone.img_size, classes)
            log.info("%s/%s: %d images ready (%.1f s)", task, split, count, time.monotonic() - started)


def check_model(spec: Spec) -> None:
    """Fail early on an unknown model, a weights file that is missing or not a state dict of the model,
    or a depth beyond the model's blocks."""
    try:
        shape = ViTShape.for_model(spec.backbone.model, spec.backbone.img_size)
    except ModelError as err:
        raise SpecError(f"backbone.model: {err}") from None
    weights = spec.backbone.weights
    if weights not in ("demo", "hub", "random"):
        if not Path(weights).expanduser().is_file():
            raise SpecError(f"backbone.weights: file {weights} does not exist (or use demo, hub, random)")
        try:
            check_weights(spec.backbone.model, Path(weights).expanduser())
        except ModelError as err:
            raise SpecError(f"backbone.weights: {err}") from None
    depth = spec.space.depth
    high = depth.int_range[1] if isinstance(depth, Param) and depth.int_range else depth
    if isinstance(high, int) and high > shape.depth:
        raise SpecError(f"space.depth: {high} exceeds the {shape.depth} blocks of {spec.backbone.model}")


def check_storage(experiment_dir: Path) -> None:
    """The experiment directory must be new and creatable."""
    if experiment_dir.exists():
        raise SpecError(f"--name: experiment {experiment_dir} exists already; continue it with "
                        f"`vpt-tune resume {experiment_dir}` or choose another --name")
    existing = next(p for p in experiment_dir.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"storage: cannot create {experiment_dir} ({existing} is not a writable directory)")


# The stores MLflow 3 opens: a server, Databricks, a database (SQLAlchemy URL: sqlite:///mlflow.db,
# postgresql+psycopg2://...). A folder (file store) it refuses unless MLFLOW_ALLOW_FILE_STORE=true.
TRACKING_SCHEMES = ("http", "https", "databricks", *DATABASE_ENGINES)


def check_tracking(uri: str) -> None:
    """The URI must name a store MLflow 3 opens, not a folder; an MLflow server must answer (5 s), a
    sqlite store's folder must be writable."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("", "file"):
        if not MLFLOW_ALLOW_FILE_STORE.get():
            path = uri.removeprefix("file://")
            store = f"sqlite:///{path}" if path.endswith(".db") else "sqlite:///path/mlflow.db"
            raise SpecError(f"tracking.mlflow_uri: {uri} is a file store (a folder), which MLflow 3 refuses; use a "
                            f"sqlite file ({store}) or a server URL (http://HOST:5000)")
    elif scheme.partition("+")[0] not in TRACKING_SCHEMES:
        raise SpecError(f"tracking.mlflow_uri: {uri}: MLflow has no tracking store for {scheme}://; use sqlite:///"
                        "path/mlflow.db, a server URL (http://HOST:5000) or a database URL (postgresql://...)")
    elif scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
        except OSError as err:
            raise SpecError(
                f"tracking.mlflow_uri: no MLflow server answers at {uri} ({err}); start one with "
                "`mlflow server --host 127.0.0.1 --port 5000` or use sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SpecError(f"tracking.mlflow_uri: {folder} is not a writable directory for the sqlite store")


def check_gpus(spec: Spec) -> None:
    """Trials that ask for GPUs need one here, unless they run on a Ray cluster (checked there)."""
    joining_cluster = ray.is_initialized() or os.environ.get("RAY_ADDRESS")
    if spec.resources.gpus > 0 and not joining_cluster and not torch.cuda.is_available():
        raise SpecError(
            "resources.gpus_per_worker: the trials ask for GPUs but this machine has none; "
            "set gpus_per_worker: 0 (--set resources.gpus_per_worker=0) or run on a GPU cluster"
        )


def local_resources(spec: Spec) -> dict[str, float]:
    """The CPUs (and GPUs, when the trials ask for some) that a local Ray will find on this machine."""
    # ray.init counts CPUs with this very function: the CPU count bounded by the cgroup's quota (a
    # container's limit); Ray ignores the affinity mask, so os.sched_getaffinity would disagree with it.
    cpus = ray._private.utils.get_num_cpus()
    # Ray and torch both see the GPUs CUDA_VISIBLE_DEVICES leaves; asked only when needed (CUDA start-up).
    gpus = torch.cuda.device_count() if spec.resources.gpus_per_worker != 0 else 0
    return {"CPU": cpus, "GPU": gpus}


def check_resources(spec: Spec, nodes: list[dict[str, float]], cluster: bool) -> None:
    """A trial's Train workers must fit on ``nodes`` (each node's resources): each worker on one node,
    as Ray places a worker's bundle whole, and all of them at once."""
    res = spec.resources
    need = res.per_worker()
    fits = [res.workers_on(node) for node in nodes]
    largest, whole = ("the largest node of the Ray cluster", "the Ray cluster") if cluster else ("this machine",) * 2
    if not any(fits):
        have = {kind: max((node.get(kind, 0) for node in nodes), default=0) for kind in need}
        kind = next((kind for kind in need if have[kind] < need[kind]), "CPU")
        key = f"resources.{kind.lower()}s_per_worker"
        fix = f"set {key}: {have[kind]:g} or less (--set {key}={have[kind]:g})" if have[kind] else f"add {kind} nodes"
        raise SpecError(f"{key}: a worker asks for {need[kind]:g} {kind}s but {largest} has {have[kind]:g} "
                        f"(Ray places each worker on one node); {fix}")
    if sum(fits) < res.workers_per_trial:
        each = ", ".join(f"{amount:g} {kind}" for kind, amount in need.items())
        total = ", ".join(f"{sum(node.get(kind, 0) for node in nodes):g} {kind}" for kind in need)
        raise SpecError(f"resources.workers_per_trial: {res.workers_per_trial} workers of {each} each do not fit "
                        f"on {whole} ({total}: {sum(fits)} at once); set workers_per_trial: {sum(fits)} or less, "
                        "or ask for less per worker")


def start_ray() -> None:
    """Join the cluster ``RAY_ADDRESS`` names (``--address``, or set by Ray in a Ray Job), else start a
    local Ray of our own (never silently join some other cluster running on this machine)."""
    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"address": "local", "include_dashboard": False}
    try:
        ray.init(log_to_driver=False, configure_logging=False, **local)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        raise SpecError(
            f"--address {address}: cannot join the Ray cluster ({str(err).splitlines()[0]}); check the address "
            "(HEAD:6379, or auto on the head) and, with token authentication, that the cluster's token is in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN"
        ) from None


def log_plan(spec: Spec, tasks: dict[str, Path], parallel: int) -> None:
    """Log the search's plan (:mod:`vpt_tune.search.plan`). GPU trials are planned from the stated GPU
    table: a measurement here would hold a CUDA context in the driver for the whole search."""
    try:
        plan = make_plan(spec, tasks, parallel, measure_gpu=False)
    except Exception as err:  # noqa: BLE001 - a plan is a courtesy: never the reason a search does not run
        log.warning("no plan for this search (%s: %s); `vpt-tune plan` shows it", type(err).__name__, err)
        return
    for line in plan_lines(plan, per_task=len(tasks) <= PLAN_TASK_LINES):
        log.info("%s", line)


def concurrency(spec: Spec) -> int:
    """How many trials fit at once: by GPUs when trials use GPUs, else by CPUs."""
    total = ray.cluster_resources()
    fit = trials_at_once(spec, total)
    if fit < 1 and spec.resources.gpus > 0:
        raise SpecError(f"resources.gpus_per_worker: the trials ask for GPUs but the Ray cluster has "
                        f"{total.get('GPU', 0):g}; set gpus_per_worker: 0 to train on CPU")
    if fit < 1:
        raise SpecError(f"resources: a trial needs more CPUs than the Ray cluster has ({total.get('CPU', 0):g})")
    return fit


class ProgressPrinter(tune.Callback):
    """Logs one line per finished trial: the task's done/total, the trial's objectives, the task's
    front size, and over all tasks done/total and the ETA. A reference point's trial (``references[task]``
    of them per task) is counted apart, under ``[task reference]``.

    Counts come from Tune's trial list (plus ``earlier[task]``: trials of the previous experiments),
    so a restored experiment keeps counting right.
    """

    references: dict[str, int] = {}  # none in a printer an earlier version pickled with its experiment

    def __init__(self, totals: dict[str, int], earlier: dict[str, int], accuracy: str = "val_acc", label: str = "",
                 references: dict[str, int] | None = None):
        # Logs through the module's logger: Tune pickles its callbacks with the experiment state, so no
        # function attributes.
        self.totals, self.earlier, self.accuracy, self.label = totals, earlier, accuracy, label
        self.references = references or {}
        self.started = time.monotonic()
        self.new = 0  # trials finished since this process started (for the ETA)

    def _line(self, trials, trial, outcome: str) -> None:
        self.new += 1
        task, reference = trial_task(trial.config), is_reference(trial.config)
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial]  # this one ends now
        of_task = [t for t in ended if trial_task(t.config) == task]
        mine = [t for t in of_task if is_reference(t.config) == reference]
        searched = [t for t in of_task if not is_reference(t.config)]
        finished = [{k: t.last_result[k] for k in OBJECTIVES} for t in searched
                    if (t.status == "TERMINATED" or (t is trial and outcome != "FAILED"))
                    and all(k in t.last_result for k in OBJECTIVES) and not t.last_result.get(STOPPED_AT)]
        front = int(pareto_mask(pd.DataFrame(finished)).sum()) if finished else 0
        done = sum(self.earlier.values()) + len(ended)
        total = sum(self.totals.values()) + sum(self.references.values())
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.new * max(0, total - done)
        overall = f"all tasks {done}/{total} | " if len(self.totals) > 1 else ""
        # (an earlier version's printer of a references experiment counted them in its totals)
        count = f"{len(mine)}/{self.references.get(task) or self.totals.get(task, 0)}" if reference else \
            f"{self.earlier.get(task, 0) + len(mine)}/{self.totals[task]}"
        log.info(
            f"[{task}{' reference' if reference else self.label}] {count} trials | "
            f"{trial.trial_id}: {outcome} | front: {front} pts | "
            f"{overall}{elapsed / 60:.1f} min elapsed, ~{eta / 60:.1f} min left"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        outcome = f"{self.accuracy} {r['val_acc']:.3f}, {r['prompt_tokens']:.1f} tokens, {r['gflops']:.2f} GFLOPs"
        if r.get(STOPPED_AT):
            outcome = f"stopped at epoch {r[STOPPED_AT]} ({outcome})"
        self._line(trials, trial, outcome)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "FAILED")


def reference_key(config: dict) -> tuple:
    """What tells a reference point's trials apart: (task, reference method, lr); ``config`` wrapped or not."""
    config = unwrap(config)
    return config[TASK], config[REFERENCE], config["base_lr"]


RunOf = Callable[[str, str], "str | None"]  # (task, trial id) -> the trial's MLflow run id


def trial_status(result: tune.Result) -> str:
    """``finished``, ``failed``, ``stopped`` (early, at a rung: see :mod:`~vpt_tune.search.scheduler`), or
    ``interrupted``: stopped by Ctrl-C before its last report (Tune ends such trials as TERMINATED too,
    and a restored experiment does not keep Tune's ``done`` flag, so the worker marks its last report
    itself)."""
    metrics = result.metrics or {}
    if result.error:
        return "failed"
    if metrics.get(COMPLETE):
        return "finished"
    return "stopped" if metrics.get(STOPPED_AT) else "interrupted"


def trial_ref(result: tune.Result) -> tuple[str, str]:
    """A search trial's, reference point's or final retrain's (task, trial id)."""
    config = result.config or {}
    return trial_task(config), (result.metrics or {}).get("trial_id") or Path(result.path).name


def results_table(grids: list[tune.ResultGrid], run_of: RunOf) -> pd.DataFrame:
    """One row per search trial of ``grids``: task, ids, status, config (JSON), metrics, MLflow run id;
    the ``pareto`` flag marks each task's front (finished search trials only); a reference point's trial names
    its method in ``reference`` and, if it is its method's most accurate on the task, is ``selected``."""
    rows = []
    for result in (r for grid in grids for r in grid):
        metrics = result.metrics or {}
        task, trial_id = trial_ref(result)
        config = {k: v for k, v in unwrap(result.config or {}).items() if k != TASK}
        rows.append({
            "task": task,
            "trial_id": trial_id,
            REFERENCE_COLUMN: config.get(REFERENCE, ""),
            "status": trial_status(result),
            "error": error_summary(str(result.error)) if result.error else "",
            "config": json.dumps(config, sort_keys=True),
            **{k: metrics.get(k) for k in METRIC_COLUMNS},
            "wall_seconds": metrics.get("time_total_s"),  # trial start to its last report
            "mlflow_run_id": run_of(task, trial_id) or "",
            "checkpoint": experiment_relative(metrics.get("checkpoint_path") or ""),  # the trained prompts + head
            "reused_base_from": metrics.get(REUSED_BASE) or "",
        })
    table = pd.DataFrame(rows)
    table["pareto"] = table[SELECTED_COLUMN] = False
    finished = table[(table["status"] == "finished") & table["val_acc"].notna()]
    for _, rows_of_task in search_trials(finished).groupby("task", sort=False):
        table.loc[rows_of_task.index, "pareto"] = pareto_mask(rows_of_task)
    references = finished[finished[REFERENCE_COLUMN] != ""]
    table.loc[references.groupby(["task", REFERENCE_COLUMN])["val_acc"].idxmax().values, SELECTED_COLUMN] = True
    return table


def final_table(grids: list[tune.ResultGrid], run_of: RunOf) -> pd.DataFrame:
    """One row per final retrain: the Pareto trial it repeats, its seed, its test accuracy and cost."""
    rows = []
    for result in (r for grid in grids for r in grid):
        metrics, final = result.metrics or {}, result.config[FINAL]
        _, trial_id = trial_ref(result)
        rows.append({
            "task": final[TASK], "source_trial": final["source_trial"], "seed": final["seed"], "trial_id": trial_id,
            "status": trial_status(result),
            "test_acc": metrics.get("val_acc"),  # a final retrain evaluates on test
            **{k: metrics.get(k) for k in ("prompt_tokens", "gflops", "train_seconds")},
            "mlflow_run_id": run_of(final[TASK], trial_id) or "",
        })
    return pd.DataFrame(rows, columns=["task", "source_trial", "seed", "trial_id", "status", "test_acc",
                                       "prompt_tokens", "gflops", "train_seconds", "mlflow_run_id"])


def with_test_results(table: pd.DataFrame, finals: pd.DataFrame) -> pd.DataFrame:
    """The trial table with each Pareto trial's test accuracy (mean and std over seeds) and each task's
    test front."""
    tested = finals[finals["status"] == "finished"].groupby("source_trial")["test_acc"]
    table = table.assign(
        test_acc=table["trial_id"].map(tested.mean()),
        test_acc_std=table["trial_id"].map(tested.std(ddof=0)),
        test_seeds=table["trial_id"].map(tested.count()).fillna(0).astype(int),
        test_pareto=False,
    )
    for _, rows_of_task in search_trials(table[table["test_acc"].notna()]).groupby("task", sort=False):
        table.loc[rows_of_task.index, "test_pareto"] = pareto_mask(rows_of_task, TEST_OBJECTIVES)
    return table


EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # Spec.name's pattern: a folder name, never a path


def experiment_dir_of(spec: Spec, name: str | None, storage: str | None) -> Path:
    """``<storage>/<name>``: the experiment directory a new search writes, always directly in the storage
    folder."""
    if name is not None and (not EXPERIMENT_NAME.fullmatch(name) or name in (".", "..")):
        raise SpecError(f"--name {name!r}: an experiment name is one folder name of letters, digits, '_', '.' "
                        "and '-' (no '/', not . or ..); choose where it goes with --storage")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage or spec.storage
    if "://" in storage:
        raise SpecError(f"storage: {storage}: URIs are not supported yet; use a directory, on a cluster one shared "
                        "by every node at the same path (NFS, EFS, FSx)")
    root = Path(storage).expanduser().resolve()
    if (root / name).resolve().parent != root:  # a symlink of that name, even a dangling one
        raise SpecError(f"--name {name}: {root / name} is a link to {(root / name).resolve()}, outside the "
                        f"storage folder {root}; choose another --name")
    return root / name


def run_search(
    spec: Spec,
    name: str | None = None,
    storage: str | None = None,
    mlflow_uri: str | None = None,
) -> SearchResult:
    """Run the whole search of ``spec`` in a new experiment directory; return it and the trial table."""
    experiment_dir = experiment_dir_of(spec, name, storage)
    uri = mlflow_uri or spec.tracking.mlflow_uri or default_tracking_uri()
    check_storage(experiment_dir)  # refuses an existing experiment: `vpt-tune resume` continues those
    return _run(spec, experiment_dir, {"mlflow_uri": uri})


def resume_search(experiment: str | Path, overrides: list[str] = ()) -> SearchResult:
    """Continue the interrupted (or, with ``--set search.trials_per_task=N``, extend the finished)
    search in ``experiment``: finished trials are kept, running ones continue from their last
    checkpoint, the Optuna studies and MLflow runs go on where they stopped."""
    experiment_dir = Path(experiment).expanduser().resolve()
    state_file = experiment_dir / STATE_FILE
    if not state_file.is_file():
        raise SpecError(f"{experiment_dir}: not a vpt-tune experiment directory (no {STATE_FILE}); "
                        f"start a search with `vpt-tune search SPEC`")
    for override in overrides:
        if override.partition("=")[0] not in RESUME_OVERRIDES:
            raise SpecError(f"--set {override!r}: a resumed search keeps its spec; only "
                            f"{', '.join(RESUME_OVERRIDES)} can change")
    spec = load_spec(experiment_dir / "spec.yaml", overrides)
    return _run(spec, experiment_dir, json.loads(state_file.read_text()))


def _save_state(experiment_dir: Path, state: dict) -> None:
    tmp = experiment_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, experiment_dir / STATE_FILE)  # atomic: a killed driver never leaves half a file


def _run(spec: Spec, experiment_dir: Path, state: dict) -> SearchResult:
    """Checks, then every task's search; ``state`` holds the MLflow URI and the run ids of a resumed search."""
    uri = state["mlflow_uri"]
    # Every check before anything is written or Ray starts: a mistake costs seconds, not a cluster.
    check_tracking(uri)
    check_gpus(spec)
    cluster = bool(ray.is_initialized() or os.environ.get("RAY_ADDRESS"))
    if not cluster:
        check_resources(spec, [local_resources(spec)], cluster)
    check_model(spec)
    tasks = task_dirs(spec)
    check_data(spec, tasks)
    if spec.backbone.weights == "demo":
        resolve_weights("demo")  # download + convert once, before any trial needs it

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console tables off: we log progress
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # experiment state at most 1 s old when killed
    os.environ.update(RAY_TRAIN_POLL)  # a local Ray's workers inherit it (a Ray Job gets it from its runtime env)
    if not ray.is_initialized():
        start_ray()
    spec = resolve_gpus(spec, ray.cluster_resources().get("GPU", 0), probe_on_a_gpu, cluster)  # gpus: auto
    parallel = concurrency(spec)
    if cluster:  # a cluster's nodes are known once joined
        try:
            check_resources(spec, [node["Resources"] for node in ray.nodes() if node["Alive"]], cluster)
        except SpecError as err:  # a search sized for an autoscaling cluster waits for its nodes
            if not spec.search.max_concurrent_trials:  # no telling how far an autoscaler would go
                raise SpecError(f"{err}; if the cluster autoscales, set search.max_concurrent_trials to the trials "
                                "its largest size holds (vpt-tune search --cluster does so)") from None
            log.warning("no node of the Ray cluster holds a trial's workers yet: the trials wait for its autoscaler "
                        "to start some")
    tracker = Tracker(uri, spec.tracking.experiment)  # creates the store (mlflow.db): only once all checks pass
    resumed = "parent_run_id" in state
    if not resumed:
        experiment_dir.mkdir(parents=True)
        (experiment_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(by_alias=True, exclude_none=True)))
    log.info("experiment: %s%s", experiment_dir, " (resumed)" if resumed else "")
    log.info("%d task(s) x %d trials, %d at a time", len(tasks), spec.search.trials_per_task, parallel)
    if not resumed:
        log_plan(spec, tasks, parallel)

    if resumed:
        parent = tracker.reopen(state["parent_run_id"])
    else:
        parent = tracker.start_run(experiment_dir.name, tags={"experiment_dir": str(experiment_dir)})
        tracker.log_params(parent, {
            "model": spec.backbone.model, "img_size": spec.backbone.img_size, "tasks": ",".join(tasks),
            "sampler": spec.search.sampler,
        })
        tracker.client.log_artifact(parent, str(experiment_dir / "spec.yaml"))
        state = {**state, "parent_run_id": parent, "task_runs": {}}
        _save_state(experiment_dir, state)
    tracker.set_tags(parent, {"trials_per_task": spec.search.trials_per_task})
    tracker.log_plotly(parent)  # once per search (on resume too: a search begun before fronts lacks it)
    for task in tasks:
        if task not in state["task_runs"]:
            state["task_runs"][task] = tracker.start_run(task, parent, {"task": task})
    _save_state(experiment_dir, state)
    try:
        table = Search(spec, tasks, experiment_dir, tracker, state["task_runs"]).run(parent, parallel)
    except BaseException as err:
        tracker.end_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    table.to_parquet(experiment_dir / TABLE_FILE, index=False)
    summary = summary_table(table)
    if not summary.empty:
        tracker.log_table(parent, summary, "summary")
        tracker.client.log_text(parent, summary_markdown(summary), "summary.md")
    tracker.end_run(parent)
    return SearchResult(experiment_dir, table, uri, tracker.experiment_id, parent)


@dataclass
class Search:
    """Every task's trials in one Tune experiment (``search``, plus ``search.more1``, ... per extension of
    the budget), each task driven by its own Optuna study through a :class:`TaskRouter`; then the final
    retrains (``final1``, ...). Restores the experiments an interrupted driver left behind."""

    spec: Spec
    tasks: dict[str, Path]
    experiment_dir: Path
    tracker: Tracker
    task_runs: dict[str, str]  # task -> its MLflow run
    slots: Slots | None = field(default=None, init=False)  # while it runs trials (resources.slots)

    def __post_init__(self):
        self.setup = TrialSetup(self.spec, {task: str(folder) for task, folder in self.tasks.items()},
                                str(self.experiment_dir / TRAIN_RUNS), str(self.experiment_dir / "base_models"))
        self.journal = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(self.experiment_dir / "optuna.journal"))
        )

    def run(self, parent: str, parallel: int) -> pd.DataFrame:
        """Finish (or extend) every task's trials and final retrains, log each task's fronts; the trial
        table of all tasks."""
        budget = self.spec.search.trials_per_task
        tables = self.experiment_dir / "tables"
        done_before = {task: read_table(tables / f"{task}.parquet") for task in self.tasks
                       if (tables / f"{task}.parquet").is_file()}
        references = len(self._reference_configs()) // len(self.tasks)  # per task
        if len(done_before) == len(self.tasks) and all(len(search_trials(t)) >= budget
                                                       and len(t) - len(search_trials(t)) >= references
                                                       for t in done_before.values()):
            return pd.concat(done_before.values(), ignore_index=True)  # finished before the interruption
        for run_id in self.task_runs.values():
            self.tracker.reopen(run_id)
        grids: list[tune.ResultGrid] = []
        table = None
        self.slots = Slots(self.setup, parallel, self.experiment_dir / SLOT_RUNS) if self.spec.resources.slots else None
        try:
            total = budget * len(self.tasks) + len(self._reference_configs())
            self._restore("search", grids, total)  # finished trials kept, running ones continue
            searches = len(grids)
            self._restore("references", grids, total)  # an earlier version's experiment: references after the search
            done = dict.fromkeys(self.tasks, 0)
            for result in (r for grid in grids for r in grid if not is_reference(r.config)):
                done[result.config[TASK]] += 1
            todo = {task: budget - count for task, count in done.items() if count < budget}
            trained = {reference_key(r.config) for grid in grids for r in grid if is_reference(r.config)}
            untrained = [c for c in self._reference_configs() if reference_key(c) not in trained]
            if untrained:
                log.info("reference points: %d trial(s) of %s, first among the trials", len(untrained),
                         ", ".join(self.spec.search.references))
            if todo or untrained:
                self._fit(self._tuner(todo, done, untrained, parallel, searches), grids, total)
            self._fail_orphans()  # not after a Ctrl-C: its stopped trials are still running in their studies
            table = results_table(grids, self._run_of)
            finals = self._final(table, parallel) if self.spec.final.seeds else None
        except BaseException as err:
            if isinstance(err, SearchInterrupted):  # what finished so far, for `vpt-tune pareto`; never a front
                (table if table is not None else results_table(grids, self._run_of)).to_parquet(
                    self.experiment_dir / TABLE_FILE, index=False)
            for run_id in self.task_runs.values():
                self.tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if self.slots is not None:
                self.slots.close()
        if finals is not None:
            table = with_test_results(table, finals)
        tables.mkdir(exist_ok=True)
        for task in self.tasks:
            task_finals = None if finals is None else finals[finals["task"] == task]
            self._log_task(task, table[table["task"] == task].reset_index(drop=True), task_finals, parent)
        return table

    def _log_task(self, task: str, table: pd.DataFrame, finals: pd.DataFrame | None, parent: str) -> None:
        """Tag the task's trials, save its Pareto prompts, log its fronts, summary metrics and tables."""
        task_run = self.task_runs[task]
        for row in table.itertuples():
            if row.mlflow_run_id:
                self.tracker.set_tags(row.mlflow_run_id, {"pareto": str(bool(row.pareto)).lower()})
            if row.pareto and row.mlflow_run_id and row.checkpoint:
                self.tracker.client.log_artifacts(  # the prompts and head, never the backbone
                    row.mlflow_run_id, str(self.experiment_dir / row.checkpoint), PROMPTS_ARTIFACT)
        destinations = [(task_run, None), (parent, task)]
        self.tracker.log_fronts(table, task, destinations, parent)
        self.tracker.log_summary(table, [(task_run, ""), (parent, f"{task}/")])  # the search run: every task's
        if finals is not None:
            self.tracker.log_fronts(table, task, destinations, parent, accuracy="test_acc", table_name=None)
            self.tracker.log_table(task_run, finals, "final_runs")
            finals.to_parquet(self.experiment_dir / "tables" / f"{task}.final.parquet", index=False)
        self.tracker.end_run(task_run)
        table.to_parquet(self.experiment_dir / "tables" / f"{task}.parquet", index=False)  # last: the task is done

    def _restore(self, kind: str, grids: list[tune.ResultGrid], total: int) -> None:
        """Restore and finish the Tune experiments so far, appending their grids to ``grids``: the search's
        ``search``, ``search.more1``, ..., or with ``kind="final"`` the final retrains' ``final1``, ..."""
        names = [f"{kind}{i}" for i in range(1, 100)] if kind in ("final", "references") else \
            ["search"] + [f"search.more{i}" for i in range(1, 100)]
        for path in (self.experiment_dir / n for n in names):
            if path.is_dir() and tune.Tuner.can_restore(str(path)):
                log.info("restoring %s", path.name)
                tuner = tune.Tuner.restore(str(path), self._trainable(), resume_unfinished=True, resume_errored=False)
                self._fit(tuner, grids, total)

    def _fit(self, tuner: tune.Tuner, grids: list[tune.ResultGrid], total: int) -> None:
        """Run ``tuner`` to its end and append its grid to ``grids`` (of ``total`` trials in all).

        On Ctrl-C, Tune stops the running trials, saves the experiment's state and returns: the stopped
        trials' MLflow runs are marked interrupted (KILLED) and :class:`SearchInterrupted` says how far the
        search got and how to continue it.
        """
        grids.append(tuner.fit())
        stopped = [result for result in grids[-1] if trial_status(result) == "interrupted"]
        if not stopped:
            return
        for result in stopped:
            run_id = self._run_of(*trial_ref(result))
            if run_id:
                self.tracker.set_tags(run_id, {"status": "interrupted"})
                self.tracker.end_run(run_id, "KILLED")
        finished = sum(trial_status(r) == "finished" for grid in grids for r in grid)
        raise SearchInterrupted(
            f"interrupted: {finished} of {total} trials finished, {len(stopped)} stopped before their end; "
            f"continue with `vpt-tune resume {self.experiment_dir}`"
        )

    def _run_of(self, task: str, trial_id: str) -> str | None:
        return self.tracker.child_run(self.task_runs[task], "trial_id", trial_id)

    def _final(self, table: pd.DataFrame, parallel: int) -> pd.DataFrame:
        """Retrain every Pareto-optimal config once per final seed on the final split, test once.

        Retrains of an interrupted search are restored; Pareto trials new since (an extended search) get
        a further experiment; each (trial, seed) runs once.
        """
        pareto = table[table["pareto"] | table[SELECTED_COLUMN]]  # with the reference points picked on val
        total = len(pareto) * len(self.spec.final.seeds)
        grids: list[tune.ResultGrid] = []
        self._restore("final", grids, total)
        done = {(r.config[FINAL]["source_trial"], r.config[FINAL]["seed"]) for grid in grids for r in grid}
        todo = [{**json.loads(config), TASK: task, "source_trial": trial, "seed": seed}
                for task, trial, config in zip(pareto["task"], pareto["trial_id"], pareto["config"])
                for seed in self.spec.final.seeds if (trial, seed) not in done]
        if todo:
            log.info("final protocol: %d retrain(s) of the Pareto configs on %s, tested on test", len(todo),
                     get_benchmark(self.spec.data.benchmark).final_splits[0])
            totals = pd.Series([f[TASK] for f in todo]).value_counts().to_dict()
            self._fit(tune.Tuner(
                self._trainable(),
                param_space={FINAL: tune.grid_search(todo)},
                tune_config=tune.TuneConfig(max_concurrent_trials=parallel, reuse_actors=REUSE_TRIAL_ACTORS),
                run_config=tune.RunConfig(
                    name=f"final{len(grids) + 1}",
                    storage_path=str(self.experiment_dir),
                    verbose=0,
                    callbacks=[TrialLogger(self.tracker, self.task_runs, final=True),
                               ProgressPrinter(totals, {}, accuracy="test_acc", label=" final")],
                ),
            ), grids, total)
        return final_table(grids, self._run_of)

    def _reference_configs(self) -> list[dict]:
        """Every reference point's trial of the search: per task, per reference, per lr of its grid."""
        return [{TASK: task, REFERENCE: name, "base_lr": lr} for task in self.tasks for name in self.spec.search.references
                for lr in self.spec.method_options(name).base_lrs]

    def _trainable(self):
        on = {"pool": self.slots.pool} if self.slots is not None else {"train_alone": self.setup.train_alone}
        return tune.with_resources(
            tune.with_parameters(run_trial, **on),
            trial_resources(DRIVER_RESOURCE if DRIVER_RESOURCE in ray.cluster_resources() else None),
        )

    def _tuner(self, todo: dict[str, int], done: dict[str, int], references: list[dict], parallel: int,
               index: int) -> tune.Tuner:
        """A new Tune experiment of ``todo[task]`` more trials per task, each on the task's (possibly
        continued) Optuna study, and the reference points' trials ``references`` (first: they are on the
        fronts from early on, and they share the slots with the search instead of waiting for its end)."""
        metric, mode = list(OBJECTIVES), list(OBJECTIVES.values())
        searchers = {
            task: StudySearch(
                space=DefineByRun(self.spec.space), metric=metric, mode=mode,
                sampler=make_sampler(self.spec.search, self.spec.space),
                study_name=task,
                storage=self.journal,  # load_if_exists: an extension continues the study's history
            )
            for task in todo
        }
        totals = dict.fromkeys(self.tasks, self.spec.search.trials_per_task)
        stopping = self.spec.search.early_stopping
        judge = RungJudge(Rungs(stopping.rule, stopping.min_epochs, stopping.reduction_factor,
                                self.spec.train.epochs)) if stopping.rule != "off" else None
        return tune.Tuner(
            self._trainable(),
            tune_config=tune.TuneConfig(
                search_alg=TaskRouter(searchers, todo, metric, mode, [{REFERENCE_TRIAL: c} for c in references]),
                num_samples=sum(todo.values()) + len(references),
                max_concurrent_trials=parallel,
                reuse_actors=REUSE_TRIAL_ACTORS,
            ),
            run_config=tune.RunConfig(
                name="search" if index == 0 else f"search.more{index}",
                storage_path=str(self.experiment_dir),
                verbose=0,
                callbacks=[*([judge] if judge else []), TrialLogger(self.tracker, self.task_runs),
                           ProgressPrinter(totals, done, references=Counter(c[TASK] for c in references))],
            ),
        )

    def _fail_orphans(self) -> None:
        """Optuna trials asked for by a driver that was killed before Tune recorded them never ran:
        mark them failed so each study counts only real trials."""
        for task in self.tasks:
            try:
                study = optuna.load_study(study_name=task, storage=self.journal)
            except KeyError:  # the task's study was never created (no trial asked yet)
                continue
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
