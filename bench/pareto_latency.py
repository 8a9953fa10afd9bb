"""How long `vpt-tune pareto` takes to answer for a finished experiment the size of a VTAB-1k search.

Writes the trial table of a finished 19-task search (32 trials per task, the final protocol's test
columns on each front) into a temporary experiment folder, then runs each command as a new process, as a
user would, several times, interleaved: the front table, all trials, JSON, the summary. Side by side, in
the same run, the import that the command paid before it read the table without the search's modules
(``vpt_tune.search.runner``: Ray, MLflow, Optuna, torch). Prints a table and, last, one line of JSON.

    python bench/pareto_latency.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vpt_tune.data.benchmarks import BENCHMARKS
from vpt_tune.search.pareto import pareto_mask
from vpt_tune.search.results import TABLE_FILE

TRIALS = 32


def experiment(folder: Path) -> Path:
    """A finished 19-task experiment's trial table (random but plausible values) in ``folder``."""
    rng = np.random.default_rng(0)
    tasks = BENCHMARKS["vtab-1k"].groups["vtab-all"]
    rows = []
    for task in tasks:
        for i in range(TRIALS):
            prompts = int(rng.integers(1, 200))
            config = {"num_prompts": prompts, "placement": "deep", "base_lr": float(rng.uniform(0.01, 10)),
                      "weight_decay": float(rng.choice([0, 1e-4, 1e-3])), "condensation_ratio": 0.5}
            rows.append({"task": task, "trial_id": f"{len(rows):05x}_{i:05d}", "status": "finished",
                         "config": json.dumps(config), "val_acc": float(rng.uniform(0.3, 0.95)),
                         "prompt_tokens": prompts / 2, "gflops": 17.6 + prompts * 0.05, "epoch": 100,
                         "checkpoint": f"train_runs/run_trial_{i}/checkpoint_000099"})
    table = pd.DataFrame(rows)
    table["pareto"] = False
    for _, trials in table.groupby("task"):
        table.loc[trials.index, "pareto"] = pareto_mask(trials)
    table["test_acc"] = np.where(table["pareto"], table["val_acc"] - 0.01, np.nan)
    table["test_acc_std"] = np.where(table["pareto"], 0.004, np.nan)
    table["test_seeds"] = np.where(table["pareto"], 5, 0)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / TABLE_FILE, index=False)
    return folder


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(experiment(Path(tmp, "vtab")))
        cli = [sys.executable, "-m", "vpt_tune.cli", "pareto", folder]
        commands = {
            "pareto": cli,
            "pareto --all": [*cli, "--all"],
            "pareto --format json": [*cli, "--format", "json"],
            "pareto --summary": [*cli, "--summary"],
            "import vpt_tune.search.runner (before)": [sys.executable, "-c", "import vpt_tune.search.runner"],
        }
        times = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved: a noisy moment hits every command alike
            for name, command in commands.items():
                times[name].append(seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    before = medians["import vpt_tune.search.runner (before)"]
    print(f"`vpt-tune pareto` on a finished 19-task x {TRIALS}-trial experiment, median of {args.repeats} runs")
    print(f"{'command':42s} {'seconds':>8s} {'x before':>9s}")
    for name, median in medians.items():
        print(f"{name:42s} {median:8.2f} {median / before:9.2f}")
    print(json.dumps({"trials": 19 * TRIALS, "repeats": args.repeats,
                      "median_seconds": {k: round(v, 3) for k, v in medians.items()}}))


if __name__ == "__main__":
    main()
