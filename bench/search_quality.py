"""Search quality of the samplers on a tabular benchmark recorded from real demo trials.

Recording: every point of a grid over the demo space (num_prompts x placement x base_lr, last_k
meaning the last 6 blocks, weight decay 0, 1 epoch) is trained once for real, exactly as a search
trial would build it (``make_job`` from the demo spec), in this process, one after the other. The
table (config, val_acc, prompt_tokens, gflops, seconds) is stored as parquet outside the repo and
reused on later runs.

Comparison: for each sampler, as ``make_sampler`` builds it for a budget of 25 % of the grid, and
each seed, an Optuna study (val_acc max, prompt_tokens min, gflops min) asks configs of the same
grid space; each is answered from the table (repeated configs count as trials, as a real search
pays for them). Figure: the hypervolume of the sampled trials relative to that of the whole grid,
both against the grid's reference point (worst values + 10 % of their range). Target: TPE or
NSGA-II median >= 0.95, and ahead of random. Prints a table and, last, one line of JSON.

    python bench/search_quality.py [--record] [--table PATH] [--seeds 20] [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from vpt_tune.data.cache import cache_dir
from vpt_tune.data.demo import materialise
from vpt_tune.search.jobs import make_job
from vpt_tune.search.hypervolume import hypervolume, reference_point
from vpt_tune.search.space import DefineByRun, make_sampler
from vpt_tune.spec import OBJECTIVES, SearchSpec, Spec, load_spec
from vpt_tune.train.job import run

GRID = [  # --set overrides of the demo spec: every searched entry a choice list, so the grid is their product
    "space.num_prompts={choice: [1, 2, 4, 8, 16]}",
    "space.placement={choice: [shallow, deep, last_k]}",
    "space.depth=6",  # used by last_k only
    "space.base_lr={choice: [0.02, 0.05, 0.1, 0.2]}",
    "space.weight_decay=0.0",
    "train.epochs=1",
]
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")


def record(spec: Spec, path: Path) -> pd.DataFrame:
    """Train every grid point once (CPU, no Ray) and store the table at ``path``."""
    task_dir = str(materialise(spec.data.tasks[0], cache_dir() / "datasets" / "demo"))
    searched = spec.space.searched()
    fixed = {name: value for name, value in spec.space if name not in searched and value is not None}
    points = list(itertools.product(*(param.choice for param in searched.values())))
    rows = []
    for i, values in enumerate(points, 1):
        config = dict(zip(searched, values))
        started = time.monotonic()
        _, metrics = run(make_job(spec, task_dir, {**fixed, **config}), torch.device("cpu"))
        rows.append({**config, **{k: metrics[k] for k in OBJECTIVES}, "seconds": time.monotonic() - started})
        print(f"[{i}/{len(points)}] {config} val_acc {metrics['val_acc']:.3f} "
              f"tokens {metrics['prompt_tokens']:g} gflops {metrics['gflops']:.3f} {rows[-1]['seconds']:.1f} s",
              flush=True)
    table = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    return table


def search_ratio(spec: Spec, table: pd.DataFrame, sampler: str, seed: int, budget: int, reference: dict) -> float:
    """Hypervolume of ``budget`` trials of ``sampler`` answered from ``table``, relative to the whole grid's."""
    names = list(spec.space.searched())
    oracle = table.set_index(names)
    study = optuna.create_study(
        directions=["maximize" if mode == "max" else "minimize" for mode in OBJECTIVES.values()],
        sampler=make_sampler(SearchSpec(sampler=sampler, trials_per_task=budget, seed=seed), spec.space),
    )
    define = DefineByRun(spec.space)
    sampled = []
    for _ in range(budget):
        trial = study.ask()
        define(trial)
        row = oracle.loc[tuple(trial.params[n] for n in names)]
        study.tell(trial, [row[k] for k in OBJECTIVES])
        sampled.append(row)
    return hypervolume(pd.DataFrame(sampled), reference) / hypervolume(table, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=Path("~/.cache/vpt-tune/bench/demo_grid.parquet"))
    parser.add_argument("--record", action="store_true", help="record the table again even if it exists")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.25, help="trials per search, as a fraction of the grid")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    args = parser.parse_args()
    spec = load_spec("demo", GRID)
    path = args.table.expanduser()
    table = record(spec, path) if args.record or not path.exists() else pd.read_parquet(path)
    grid_size = int(np.prod([len(param.choice) for param in spec.space.searched().values()]))
    if len(table) != grid_size:
        raise SystemExit(f"{path} holds {len(table)} rows, the grid has {grid_size} points: rerun with --record")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    budget = max(1, round(args.fraction * grid_size))
    reference = reference_point(table)
    ratios = {}
    for sampler in args.samplers:
        started = time.monotonic()
        ratios[sampler] = np.array([search_ratio(spec, table, sampler, seed, budget, reference)
                                    for seed in range(args.seeds)])
        print(f"{sampler}: {args.seeds} searches in {time.monotonic() - started:.1f} s", flush=True)

    random_median = float(np.median(ratios["random"])) if "random" in ratios else None
    summary = {}
    print(f"\ndemo grid: {grid_size} points recorded in {table['seconds'].sum() / 60:.1f} min; budget {budget} trials "
          f"({args.fraction:.0%}), {args.seeds} seeds; reference {json.dumps(reference)}")
    print(f"{'sampler':8s} {'median':>7s} {'p25':>7s} {'p75':>7s} {'min':>7s} {'> random median':>16s}")
    for sampler, r in ratios.items():
        summary[sampler] = {
            "median": float(np.median(r)), "p25": float(np.percentile(r, 25)), "p75": float(np.percentile(r, 75)),
            "min": float(r.min()),
            "beats_random_median": None if random_median is None else float(np.mean(r > random_median)),
        }
        beats = "-" if random_median is None else f"{summary[sampler]['beats_random_median']:.0%}"
        print(f"{sampler:8s} {np.median(r):7.3f} {np.percentile(r, 25):7.3f} {np.percentile(r, 75):7.3f} "
              f"{r.min():7.3f} {beats:>16s}")
    target_met = random_median is not None and any(
        summary[s]["median"] >= 0.95 and summary[s]["median"] > random_median for s in ("tpe", "nsga2") if s in summary
    )
    print(json.dumps({"grid_points": grid_size, "budget": budget, "seeds": args.seeds, "reference": reference,
                      "samplers": summary, "target_met": target_met}))


if __name__ == "__main__":
    main()
