"""Per-trial overhead of Tune + Ray Train on this machine, and the utilisation of a short search.

Runs a real search (local Ray, small random-init ViT on the demo digits task, 1 epoch per trial)
and compares, per trial, the wall time from trial start to its last report with the seconds spent
training and evaluating. Prints a table and, last, one line of JSON.

    python bench/trial_overhead.py [--trials 4] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray

from vpt_tune.search.runner import run_search
from vpt_tune.spec import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=56)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = validate({
            "name": "overhead",
            "backbone": {"model": "vit_small_patch14_dinov2", "weights": "random", "img_size": args.img_size},
            "space": {"num_prompts": {"int": [1, 16]}, "placement": "deep", "base_lr": 0.05},
            "train": {"epochs": args.epochs, "batch_size": 32},
            "search": {"sampler": "random", "trials_per_task": args.trials},
            "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow.db"},
            "storage": f"{tmp}/results",
        })
        started = time.monotonic()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init = time.monotonic() - started
        started = time.monotonic()
        table = run_search(spec, name="bench").table
        search_wall = time.monotonic() - started
        slots = int(ray.cluster_resources().get("CPU", 1))
        ray.shutdown()

    print(f"\n{'trial':<10} {'wall s':>8} {'train s':>8} {'overhead s':>11}")
    for row in table.itertuples():
        print(f"{row.trial_id:<10} {row.wall_seconds:>8.1f} {row.train_seconds:>8.1f} "
              f"{row.wall_seconds - row.train_seconds:>11.1f}")
    overhead = (table["wall_seconds"] - table["train_seconds"]).mean()
    train_total = table["train_seconds"].sum()
    utilisation = train_total / (search_wall * slots)
    print(f"\nray.init {ray_init:.1f} s | search wall {search_wall:.1f} s for {len(table)} trials on {slots} slots | "
          f"mean in-trial overhead {overhead:.1f} s | utilisation {utilisation:.0%} "
          f"(training seconds / (search wall x slots))")
    print(json.dumps({
        "trials": len(table), "epochs": args.epochs, "slots": slots, "ray_init_s": round(ray_init, 2),
        "search_wall_s": round(search_wall, 1), "mean_trial_wall_s": round(table["wall_seconds"].mean(), 1),
        "mean_train_s": round(table["train_seconds"].mean(), 1), "mean_in_trial_overhead_s": round(overhead, 1),
        "per_trial_search_overhead_s": round((search_wall * slots - train_total) / len(table), 1),
        "utilisation": round(utilisation, 3),
    }))


if __name__ == "__main__":
    main()
