"""Per-trial overhead of Tune + Ray Train on this machine, and the utilisation of a short search.

Runs the same real search twice, side by side (local Ray, small random-init ViT on the demo digits
task, 1 epoch per trial): with trial drivers reused across trials (vpt-tune's default) and with a
fresh driver process per trial. Per trial it splits the wall time from trial start to its last report
into training, Ray Train start-up (driver starts the TorchTrainer until the worker function runs),
set-up (worker function to first epoch) and the rest. Prints tables and, last, one line of JSON.

    python bench/trial_overhead.py [--trials 4] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import pandas as pd
import ray

from vpt_tune.cli import log_to_terminal
from vpt_tune.search import runner
from vpt_tune.spec import validate

PARTS = ("train_seconds", "startup_seconds", "setup_seconds", "other_seconds")


def measure(args: argparse.Namespace, reuse: bool) -> tuple[pd.DataFrame, dict]:
    """One search with trial-driver reuse on or off: its trial table and search-level figures."""
    runner.REUSE_TRIAL_ACTORS = reuse
    with tempfile.TemporaryDirectory() as tmp:
        spec = validate({
            "name": "overhead",
            "backbone": {"model": "vit_small_patch14_dinov2", "weights": "random", "img_size": args.img_size},
            "space": {"num_prompts": {"int": [1, 16]}, "placement": "deep", "base_lr": 0.05},
            "train": {"epochs": args.epochs, "batch_size": 32, "reuse_base": False},  # every trial trains
            "search": {"sampler": "random", "trials_per_task": args.trials},
            "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow.db"},
            "storage": f"{tmp}/results",
        })
        started = time.monotonic()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init = time.monotonic() - started
        started = time.monotonic()
        table = runner.run_search(spec, name="bench").table
        search_wall = time.monotonic() - started
        slots = int(ray.cluster_resources().get("CPU", 1))
        ray.shutdown()
    table["other_seconds"] = table["wall_seconds"] - table[list(PARTS[:3])].sum(axis=1)
    train_total = table["train_seconds"].sum()
    return table, {
        "ray_init_s": ray_init, "search_wall_s": search_wall, "slots": slots,
        "mean_in_trial_overhead_s": (table["wall_seconds"] - table["train_seconds"]).mean(),
        **{f"mean_{k}": table[k].mean() for k in PARTS},
        "per_trial_search_overhead_s": (search_wall * slots - train_total) / len(table),
        "utilisation": train_total / (search_wall * slots),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=56)
    args = parser.parse_args()
    log_to_terminal()  # the searches' progress, as the command line shows it
    runs = {label: measure(args, reuse) for label, reuse in (("fresh drivers", False), ("reused drivers", True))}

    for label, (table, _) in runs.items():
        print(f"\n{label}\n{'trial':<10} {'wall s':>7} {'train s':>8} {'startup s':>10} {'setup s':>8} {'other s':>8}")
        for row in table.itertuples():
            print(f"{row.trial_id:<10} {row.wall_seconds:>7.1f} {row.train_seconds:>8.1f} {row.startup_seconds:>10.1f} "
                  f"{row.setup_seconds:>8.1f} {row.other_seconds:>8.1f}")
    print("\nstartup: the trial's driver starting its TorchTrainer until the worker function runs (Ray Train's "
          "controller, worker group, their processes and imports); setup: worker function to first epoch (model, "
          "data, caches); other: the rest of the trial's wall time (reports, checkpoints)\n")
    print(f"{'':<16} {'ray.init s':>10} {'search s':>9} {'in-trial overhead s':>20} {'startup s':>10} "
          f"{'per-trial search overhead s':>28} {'utilisation':>12}")
    for label, (_, f) in runs.items():
        print(f"{label:<16} {f['ray_init_s']:>10.1f} {f['search_wall_s']:>9.1f} {f['mean_in_trial_overhead_s']:>20.1f} "
              f"{f['mean_startup_seconds']:>10.1f} {f['per_trial_search_overhead_s']:>28.1f} {f['utilisation']:>12.0%}")
    fresh, reused = runs["fresh drivers"][1], runs["reused drivers"][1]
    print(f"reused / fresh search wall: {reused['search_wall_s'] / fresh['search_wall_s']:.2f} "
          f"(utilisation = training seconds / (search wall x slots); target: overhead <= 5 s, utilisation >= 90 %)")
    print(json.dumps({
        "trials": args.trials, "epochs": args.epochs,
        **{f"{label.split()[0]}_{k}": round(v, 3) for label, (_, f) in runs.items() for k, v in f.items()},
        "search_wall_ratio_reused_vs_fresh": round(reused["search_wall_s"] / fresh["search_wall_s"], 3),
    }))


if __name__ == "__main__":
    main()
