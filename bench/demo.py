"""Wall time of the demo search, as a user runs it (`vpt-tune search` in a fresh directory).

Prints the trials, the wall time and, last, one line of JSON. The demo backbone and data come from
the cache (~/.cache/vpt-tune); delete it first to include the one-time conversion.

    python bench/demo.py [--spec demo] [--set key=value ...] [--compare-slots]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def run_search(spec: str, overrides: list[str]) -> tuple[float, pd.DataFrame]:
    """One search as a user runs it, in a fresh directory: its wall time and trial table."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "vpt_tune.cli", "search", spec, "--name", "bench"]
        command += [arg for override in overrides for arg in ("--set", override)]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"demo search failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return wall, pd.read_parquet(next(Path(tmp).glob("*/bench/trials.parquet")))


def summary(wall: float, table: pd.DataFrame) -> dict:
    finished = table[table["status"] == "finished"]
    return {"wall_s": round(wall, 1), "trials": len(table), "finished": len(finished),
            "best_val_acc": float(finished["val_acc"].max()), "front_size": int(finished["pareto"].sum()),
            "mean_overhead_s": round(float((table["wall_seconds"] - table["train_seconds"]).mean()), 1),
            "mean_train_s": round(float(table["train_seconds"].mean()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--compare-slots", action="store_true",
                        help="run the search twice, side by side: resources.slots false (a Ray Train run per trial), "
                             "then true (vpt-tune's default)")
    args = parser.parse_args()
    if args.compare_slots:
        runs = {label: summary(*run_search(args.spec, [*args.set, f"resources.slots={slots}"]))
                for label, slots in (("per_trial", "false"), ("slots", "true"))}
        print(f"{'':<10} {'wall s':>7} {'trials':>7} {'best val_acc':>13} {'overhead s/trial':>17} {'train s/trial':>14}")
        for label, f in runs.items():
            print(f"{label:<10} {f['wall_s']:>7.1f} {f['finished']:>3}/{f['trials']:<3} {f['best_val_acc']:>13.3f} "
                  f"{f['mean_overhead_s']:>17.1f} {f['mean_train_s']:>14.1f}")
        ratio = runs["slots"]["wall_s"] / runs["per_trial"]["wall_s"]
        print(f"slots / per-trial search wall: {ratio:.2f} (target <= 0.65)")
        print(json.dumps({"spec": args.spec, **{f"{label}_{k}": v for label, f in runs.items() for k, v in f.items()},
                          "wall_ratio_slots_vs_per_trial": round(ratio, 3)}))
        return
    wall, table = run_search(args.spec, args.set)
    finished = table[table["status"] == "finished"]
    columns = ["trial_id", "status", "val_acc", "val_acc_uncondensed", "val_acc_unpruned", "prompt_tokens", "gflops",
               "pareto", "config"]
    print(table[[c for c in columns if table[c].notna().any()]].to_string(index=False))
    print(f"\n{args.spec}: {len(finished)}/{len(table)} trials in {wall / 60:.1f} min, "
          f"best val_acc {finished['val_acc'].max():.3f}, front of {int(finished['pareto'].sum())}")
    print(json.dumps({"spec": args.spec, **summary(wall, table)}))


if __name__ == "__main__":
    main()
