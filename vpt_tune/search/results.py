"""An experiment's trial table as its readers see it: the columns, reading it back, and showing it.

Light on purpose (pandas only): ``vpt-tune pareto`` and ``vpt-tune export`` read a finished experiment
without starting Ray, MLflow or torch. Every path the table stores is relative to the experiment folder,
so an experiment moved or copied elsewhere (another folder, cluster or laptop) still reads, exports and
resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePath

import pandas as pd

from vpt_tune.methods import METHODS
from vpt_tune.spec import Space, SpecError
from vpt_tune.train.slot_protocol import SLOT, SLOT_TRIAL

TABLE_FILE = "trials.parquet"
STATE_FILE = "experiment.json"  # MLflow URI and run ids, so `vpt-tune resume` continues the same runs
TRAIN_RUNS = "train_runs"  # the experiment's folder of Ray Train runs (epoch checkpoints of every trial)
MLFLOW_RUN_ID = "mlflow_run_id"  # a trial's MLflow run: a table column, and a key of its results
PROMPTS_ARTIFACT = "prompts"  # MLflow artifact folder of a Pareto trial's trained prompts and head
STOPPED_AT = "stopped_at_epoch"  # result key of a stopped trial's last result: the rung it stopped at
# The metric schema of a trial, in one place: the trial table's columns and what its MLflow run records.
ACCURACY_METRICS = ("val_acc", *(metric for method in METHODS.values() for metric in method.metrics))
COST_METRICS = ("prompt_tokens", "kv_tokens", "gflops", "trainable_params")  # known before training
TIMING_METRICS = ("train_seconds", "startup_seconds", "setup_seconds")
EPOCH_METRICS = (*ACCURACY_METRICS, "train_loss", "lr", "epoch_seconds", *TIMING_METRICS)  # logged every epoch
SLOT_COLUMNS = (SLOT, SLOT_TRIAL)  # the slot that trained a trial, and its how-manieth trial (resources.slots)
METRIC_COLUMNS = (*ACCURACY_METRICS, *COST_METRICS, "train_loss", "epoch", *TIMING_METRICS, *SLOT_COLUMNS, STOPPED_AT)
FINAL_COLUMNS = ("test_acc", "test_acc_std", "test_seeds")  # the final protocol's, on Pareto trials

# Short names of the space's keys in one-line configs, in the order shown; other keys keep their name.
SHORT_KEYS = {
    "base_lr": "lr", "weight_decay": "wd", "prompt_dropout": "drop", "prompt_init": "init", "kv_prompts": "kv",
    "token_prune_ratio": "prune-tok", "segment_prune_ratio": "prune-seg", "condensation_ratio": "cond",
}


REFERENCE_COLUMN = "reference"  # a reference point's method (linear, ssf, full); "" for the search's trials
SELECTED_COLUMN = "selected"  # a reference point's trial picked on val accuracy (its method's best lr)


def search_trials(table: pd.DataFrame) -> pd.DataFrame:
    """The search's own trials: the rows that are not reference points (all rows of an older table)."""
    return table[table[REFERENCE_COLUMN].fillna("") == ""] if REFERENCE_COLUMN in table else table


def selected_references(table: pd.DataFrame) -> pd.DataFrame:
    """The reference points' selected trials (one per task and reference method)."""
    return table[table[SELECTED_COLUMN].fillna(False).astype(bool)] if SELECTED_COLUMN in table else table.iloc[:0]


def experiment_relative(path: str) -> str:
    """A Train checkpoint path relative to its experiment folder (``train_runs/<run>/<checkpoint>``), from
    the absolute path Ray Train reports: the part from the experiment's ``train_runs`` folder on. Relative
    paths and "" are returned as they are."""
    parts = PurePath(path).parts
    if not PurePath(path).is_absolute() or TRAIN_RUNS not in parts:
        return path
    last = len(parts) - 1 - parts[::-1].index(TRAIN_RUNS)
    return str(PurePath(*parts[last:]))


def read_table(path: str | Path) -> pd.DataFrame:
    """A trial table file, its checkpoint paths relative to the experiment (tables written before
    experiments could move hold absolute ones)."""
    table = pd.read_parquet(path)
    if "checkpoint" in table:
        table["checkpoint"] = [experiment_relative(p or "") for p in table["checkpoint"]]
    return table


def load_table(experiment: str | Path) -> pd.DataFrame:
    """The trial table of an experiment directory (a finished or interrupted search)."""
    path = Path(experiment).expanduser() / TABLE_FILE
    if not path.is_file():
        raise SpecError(f"{path}: no trial table; is {experiment} a finished vpt-tune experiment directory?")
    return read_table(path)


def short_config(config: dict) -> str:
    """A trial config on one line, e.g. ``15 deep · lr 0.093 · wd 0.0001 · cond 0.5`` (numbers to 3
    significant digits): prompts per block and their placement first (``5 last_k=3``, ``8 layers=0,3``), then
    the other keys; keys at the space's default value (``wd 0``, ``init uniform``...) are left out."""
    config = {k: v for k, v in config.items() if k not in Space.model_fields or v != Space.model_fields[k].default
              or k in ("num_prompts", "placement", "base_lr")}
    prompts, placement = config.pop("num_prompts", None), config.pop("placement", None)
    depth, layers = config.pop("depth", None), config.pop("layers", None)
    if placement is not None and (depth is not None or layers is not None):
        placement = f"{placement}={_short(depth if depth is not None else layers)}"
    head = " ".join(str(v) for v in (prompts, placement) if v is not None)
    keys = [k for k in SHORT_KEYS if k in config] + sorted(k for k in config if k not in SHORT_KEYS)
    items = [f"{SHORT_KEYS.get(k, k)} {_short(config[k])}" for k in keys]
    return " · ".join([head, *items] if head else items)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(_short, value))
    return str(value)


def _number(value, form: str, scale: float = 1) -> str:
    return "" if value is None or pd.isna(value) else format(scale * value, form)


def sort_table(table: pd.DataFrame) -> pd.DataFrame:
    """Trials by task (in the order tasks first appear), then by accuracy, best first (test accuracy where
    the final protocol ran)."""
    order = {task: i for i, task in enumerate(dict.fromkeys(table["task"]))}
    keys = pd.DataFrame({"task": table["task"].map(order)}, index=table.index)
    for column in ("test_acc", "val_acc"):  # missing accuracies (failed trials) last
        if column in table:
            keys[column] = (-table[column].astype(float)).fillna(math.inf)
    return table.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def format_table(table: pd.DataFrame, width: int = 100) -> str:
    """The trials as a table of at most ``width`` columns: task, trial, accuracy in %, prompt tokens (mean
    per block), GFLOPs per image and the config on one line (cut with ``…`` where it does not fit). When
    not every trial is on its task's front, also the status (``stopped@N``: stopped early at epoch N) and
    ``*`` marking the front."""
    tested = "test_acc" in table and table["test_acc"].notna().any()
    everyone = not table["pareto"].all()
    rows = []
    for row in sort_table(table).to_dict("records"):
        cells = [row["task"], row["trial_id"]]
        if everyone:
            rung = _number(row.get(STOPPED_AT), ".0f")
            cells.append(f"stopped@{rung}" if row["status"] == "stopped" and rung else row["status"])
        cells.append(_number(row["val_acc"], ".1f", 100))
        if tested:
            test, std = _number(row.get("test_acc"), ".1f", 100), _number(row.get("test_acc_std"), ".1f", 100)
            cells.append(f"{test}±{std}" if test and std else test)
        cells += [_number(row.get("prompt_tokens"), ".4g"), _number(row.get("gflops"), ".2f")]
        cells += ["*" if row.get("pareto") else ""] if everyone else []
        rows.append([*cells, short_config(json.loads(row["config"]))])
    header = ["task", "trial", *(["status"] if everyone else []), "val %", *(["test %"] if tested else []),
              "tokens", "GFLOPs", *(["front"] if everyone else []), "config"]
    right = {"val %", "test %", "tokens", "GFLOPs"}
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header) - 1)]
    room = max(width - sum(widths) - 2 * len(widths), len("config"))

    def line(cells: list[str]) -> str:
        fixed = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)]
        config = cells[-1] if len(cells[-1]) <= room else cells[-1][: room - 1] + "…"
        return "  ".join([*fixed, config]).rstrip()

    return "\n".join(line(cells) for cells in [header, *rows])


def wide_table(table: pd.DataFrame) -> str:
    """Every column of the trials, the config as its full JSON (for a wide terminal or a file)."""
    return sort_table(table).to_string(index=False, float_format=lambda v: f"{v:.4g}")
