"""Per-trial overhead of a search's trials on this machine: a Ray Train run per trial vs slots, side by side.

Runs the same real search twice in one process (local Ray, small random-init ViT on the demo digits task,
``--trials`` trials of ``--epochs`` epochs each, about 30 s per epoch here): with ``resources.slots: false``
(each trial starts a TorchTrainer run of its own: controller, worker group, imports) and with slots
(long-lived worker groups that train trial after trial; vpt-tune's default). Per trial it splits the wall
time from the trial's start to its last report into training (epochs incl. evaluation), start-up (the
driver handing the trial over until the worker starts it), set-up (model, data, caches until the first
epoch) and the rest (reports, checkpoints); its overhead is everything but training. Per search: the
wall time, and the utilisation of the trial slots (training seconds / (slots x time)) over the whole
search and over its trial phase (first trial's start to last trial's end, i.e. without the search's fixed
start and end). Prints tables and, last, one line of JSON.

    python bench/trial_overhead.py [--trials 6] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray

from vpt_tune.cli import log_to_terminal
from vpt_tune.search import runner
from vpt_tune.spec import validate

PARTS = ("train_seconds", "startup_seconds", "setup_seconds", "other_seconds")
MODES = {"per-trial run": False, "slots": True}


def trial_phase(experiment: Path) -> float:
    """Seconds from the first trial's start to the last trial's last report (Tune's result files)."""
    starts, ends = [], []
    for results in (experiment / "search").glob("*/result.json"):
        last = json.loads(results.read_text().splitlines()[-1])
        ends.append(last["timestamp"])
        starts.append(last["timestamp"] - last["time_total_s"])
    return max(ends) - min(starts)


def measure(args: argparse.Namespace, slots: bool) -> tuple[pd.DataFrame, dict]:
    """One search with or without slots: its trial table and search-level figures."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = validate({
            "name": "overhead",
            "backbone": {"model": "vit_small_patch14_dinov2", "weights": "random", "img_size": args.img_size},
            "space": {"num_prompts": {"int": [1, 16]}, "placement": "deep", "base_lr": 0.05},
            "train": {"epochs": args.epochs, "batch_size": 32, "reuse_base": False},  # every trial trains
            "search": {"sampler": "random", "trials_per_task": args.trials},
            "resources": {"slots": slots},
            "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow.db"},
            "storage": f"{tmp}/results",
        })
        started = time.monotonic()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init = time.monotonic() - started
        started = time.monotonic()
        result = runner.run_search(spec, name="bench")
        search_wall = time.monotonic() - started
        phase = trial_phase(result.experiment_dir)
        parallel = runner.concurrency(spec)
        ray.shutdown()
    table = result.table
    table["other_seconds"] = table["wall_seconds"] - table[list(PARTS[:3])].sum(axis=1)
    table["overhead_seconds"] = table["wall_seconds"] - table["train_seconds"]
    train_total = table["train_seconds"].sum()
    later = table[table["slot_trial"] > 1] if slots else table
    first = table[table["slot_trial"] == 1] if slots else table
    return table, {
        "ray_init_s": ray_init, "search_wall_s": search_wall, "trial_phase_s": phase, "slots": parallel,
        "mean_train_s": table["train_seconds"].mean(),
        "first_trial_overhead_s": first["overhead_seconds"].mean(),
        "later_trial_overhead_s": later["overhead_seconds"].mean(),
        "max_later_trial_overhead_s": later["overhead_seconds"].max(),
        **{f"mean_{k}": table[k].mean() for k in PARTS},
        "utilisation_search": train_total / (search_wall * parallel),
        "utilisation_trials": train_total / (phase * parallel),
        "utilisation_later_trials": later["train_seconds"].sum() / later["wall_seconds"].sum(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (1: about 30 s here)")
    parser.add_argument("--img-size", type=int, default=56)
    args = parser.parse_args()
    log_to_terminal()  # the searches' progress, as the command line shows it
    runs = {label: measure(args, slots) for label, slots in MODES.items()}

    for label, (table, _) in runs.items():
        print(f"\n{label}\n{'trial':<10} {'slot':>4} {'#':>2} {'wall s':>7} {'train s':>8} {'startup s':>10} "
              f"{'setup s':>8} {'other s':>8} {'overhead s':>11}")
        for row in table.itertuples():
            slot = "-" if pd.isna(row.slot) else f"{row.slot:.0f}"
            nth = "-" if pd.isna(row.slot_trial) else f"{row.slot_trial:.0f}"
            print(f"{row.trial_id:<10} {slot:>4} {nth:>2} {row.wall_seconds:>7.1f} {row.train_seconds:>8.1f} "
                  f"{row.startup_seconds:>10.1f} {row.setup_seconds:>8.1f} {row.other_seconds:>8.1f} "
                  f"{row.overhead_seconds:>11.1f}")
    print("\n#: the how-manieth trial of its slot's workers; startup: the driver handing the trial over until the "
          "worker starts it; setup: model, data, caches until the first epoch; other: reports, checkpoints; "
          "overhead: wall - train\n")
    print(f"{'':<14} {'search s':>9} {'trials s':>9} {'overhead s: first':>18} {'later':>6} {'max later':>10} "
          f"{'util. search':>13} {'util. trials':>13} {'util. later':>12}")
    for label, (_, f) in runs.items():
        print(f"{label:<14} {f['search_wall_s']:>9.1f} {f['trial_phase_s']:>9.1f} {f['first_trial_overhead_s']:>18.1f} "
              f"{f['later_trial_overhead_s']:>6.1f} {f['max_later_trial_overhead_s']:>10.1f} "
              f"{f['utilisation_search']:>13.0%} {f['utilisation_trials']:>13.0%} {f['utilisation_later_trials']:>12.0%}")
    base, slots = runs["per-trial run"][1], runs["slots"][1]
    ratio = slots["search_wall_s"] / base["search_wall_s"]
    print(f"slots / per-trial run search wall: {ratio:.2f}. Utilisation = training seconds / (slots x seconds), over "
          "the search or its trial phase; util. later: trials after their slot's first, training / wall. Targets (slots): overhead <= 2 s for every trial after a slot's first, "
          "utilisation >= 90 %")
    print(json.dumps({
        "trials": args.trials, "epochs": args.epochs,
        **{f"{'slots' if label == 'slots' else 'per_trial'}_{k}": round(v, 3)
           for label, (_, f) in runs.items() for k, v in f.items()},
        "search_wall_ratio_slots_vs_per_trial": round(ratio, 3),
    }))


if __name__ == "__main__":
    main()
