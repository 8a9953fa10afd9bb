"""A live search with and without early stopping, side by side: the `demo_asha` spec as a user runs it.

Runs `vpt-tune search demo_asha` (16 trials of 9 epochs on the demo digits task, `known_cost` rule,
rungs at epochs 1 and 3) and the same spec with `--set search.early_stopping.rule=off`, one after the
other in fresh directories, same seeds. Prints per run: wall time, trials finished / stopped, epochs
trained, best accuracy and the front; then how close the early-stopping front comes to the full one:
the additive epsilon indicator (the accuracy that must be added to the early-stopping front so that
it weakly dominates every point of the full front; inf when no trial of it is as cheap), and the
hypervolume ratio against a common reference point. Target: epsilon <= 0.01 (1 accuracy point) in
less wall time. Last line: JSON.

    python bench/early_stopping.py [--rule known_cost] [--set key=value ...]
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

from vpt_tune.search.hypervolume import hypervolume, reference_point


def search(rule: str, overrides: list[str]) -> tuple[pd.DataFrame, float]:
    """Run the demo_asha search with ``rule`` in a fresh directory: its trial table and wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "vpt_tune.cli", "search", "demo_asha", "--name", "bench",
                   "--set", f"search.early_stopping.rule={rule}"]
        command += [arg for override in overrides for arg in ("--set", override)]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"demo_asha search ({rule}) failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("[")), flush=True)
        return pd.read_parquet(next(Path(tmp).glob("*/bench/trials.parquet"))), wall


def epsilon(front: pd.DataFrame, reference: pd.DataFrame) -> float:
    """Additive epsilon indicator on accuracy: the least ``e`` such that each point of ``reference`` has a
    point of ``front`` with no more tokens and GFLOPs and accuracy + ``e`` at least its own."""
    worst = 0.0
    for point in reference.itertuples():
        cheaper = front[(front["prompt_tokens"] <= point.prompt_tokens) & (front["gflops"] <= point.gflops)]
        worst = max(worst, point.val_acc - cheaper["val_acc"].max() if len(cheaper) else float("inf"))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="known_cost", choices=["mo_asha", "known_cost"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    runs = {}
    for rule in ("off", args.rule):
        print(f"--- demo_asha, early_stopping.rule={rule}", flush=True)
        runs[rule] = search(rule, args.set)
    finished = {rule: table[table["status"] == "finished"] for rule, (table, _) in runs.items()}
    reference = reference_point(pd.concat(finished.values()))
    full_hv = hypervolume(finished["off"], reference)
    summary = {}
    print(f"\n{'rule':11s} {'wall min':>8s} {'finished':>8s} {'stopped':>7s} {'epochs':>6s} {'best acc':>8s} "
          f"{'front':>5s} {'HV/off':>6s}")
    for rule, (table, wall) in runs.items():
        done = finished[rule]
        row = {
            "wall_s": round(wall, 1), "trials": len(table), "finished": len(done),
            "stopped": int((table["status"] == "stopped").sum()), "epochs": int(table["epoch"].sum()),
            "best_val_acc": float(done["val_acc"].max()), "front_size": int(done["pareto"].sum()),
            "hv_ratio": hypervolume(done, reference) / full_hv,
            "front": done[done["pareto"]][["val_acc", "prompt_tokens", "gflops"]].round(4).values.tolist(),
        }
        summary[rule] = row
        print(f"{rule:11s} {wall / 60:8.1f} {row['finished']:8d} {row['stopped']:7d} {row['epochs']:6d} "
              f"{row['best_val_acc']:8.3f} {row['front_size']:5d} {row['hv_ratio']:6.3f}")
    front = {rule: done[done["pareto"]] for rule, done in finished.items()}
    eps = epsilon(front[args.rule], front["off"])
    speedup = summary["off"]["wall_s"] / summary[args.rule]["wall_s"]
    print(f"\nepsilon ({args.rule} front vs full front): {eps:.3f} accuracy; wall time x{speedup:.2f} faster; "
          f"epochs {summary[args.rule]['epochs']} vs {summary['off']['epochs']}")
    print(json.dumps({"runs": summary, "epsilon": eps, "wall_speedup": round(speedup, 3),
                      "target_met": bool(eps <= 0.01 and speedup > 1)}))


if __name__ == "__main__":
    main()
