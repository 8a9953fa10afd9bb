"""How close `vpt-tune plan` comes to a real search: the plan's wall time and per-trial seconds next to
the measured ones of the same search, run right after it on this machine (target: within 30 %).

The search is the spec's (default: the built-in demo), run in-process as `vpt-tune search` runs it,
into a temporary folder. Prints a table, then one line of JSON.

    python bench/plan_accuracy.py [--spec demo] [--set key.path=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from vpt_tune.cli import log_to_terminal
from vpt_tune.search import runner
from vpt_tune.search.plan import make_plan, plan_lines, planned_tasks, trial_overhead, trials_at_once
from vpt_tune.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    log_to_terminal()
    spec = load_spec(args.spec, args.set)
    started = time.monotonic()
    plan = make_plan(spec, planned_tasks(spec), trials_at_once(spec, runner.local_resources(spec)))
    plan_seconds = time.monotonic() - started
    print("\n".join(plan_lines(plan)), f"\n(plan made in {plan_seconds:.1f} s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        table = runner.run_search(spec, name="bench", storage=f"{tmp}/results",
                                  mlflow_uri=f"sqlite:///{tmp}/mlflow.db").table
        wall = time.monotonic() - started
    trials = len(table)
    planned_trial = sum(t.seconds for t in plan.tasks) / trials
    measured_trial = table["wall_seconds"].mean()
    rows = [
        ("search wall s", plan.wall_seconds[0], wall),
        ("trial wall s (mean)", planned_trial, measured_trial),
        ("trial training s (mean)", planned_trial - trial_overhead(spec), table["train_seconds"].mean()),
        ("trial start-up + set-up s", trial_overhead(spec), (table["startup_seconds"] + table["setup_seconds"]).mean()),
    ]
    print(f"\n{'':<28}{'planned':>10}{'measured':>10}{'planned/measured':>18}")
    for label, planned, measured in rows:
        print(f"{label:<28}{planned:>10.1f}{measured:>10.1f}{planned / measured:>18.2f}")
    ratio = plan.wall_seconds[0] / wall
    print(f"search wall: planned/measured {ratio:.2f} (target: within 0.70-1.30)")
    print(json.dumps({"spec": spec.name, "trials": trials, "at_once": plan.at_once,
                      "planned_wall_s": round(plan.wall_seconds[0], 1), "measured_wall_s": round(wall, 1),
                      "wall_ratio": round(ratio, 3), "planned_trial_s": round(planned_trial, 1),
                      "measured_trial_s": round(float(measured_trial), 1), "plan_seconds": round(plan_seconds, 2),
                      "speed": plan.speed.source}))


if __name__ == "__main__":
    main()
