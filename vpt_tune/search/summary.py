"""The papers' summary of a search: per task, per benchmark group and overall, for two points of each front.

For every task: the most accurate point, and the cheapest point (fewest GFLOPs) within 1 accuracy
point of it. Accuracy is ``test_acc`` (the final protocol's mean over seeds) where the task has it,
else ``val_acc``. Group rows average their tasks (VTAB-1k: natural, specialized, structured; FGVC:
its five), and ``vtab-1k`` averages the VTAB group means, as the papers report. Reference points
(``search.references``) get columns of their own: the accuracy and GFLOPs of each one's selected trial.
"""

from __future__ import annotations

import pandas as pd

from vpt_tune.data.benchmarks import BENCHMARKS
from vpt_tune.search.results import REFERENCE_COLUMN, search_trials, selected_references

POINTS = ("best", "cheap")
WITHIN = 0.01  # "cheap": the fewest GFLOPs within this accuracy of the best point


def _group_of(task: str) -> str | None:
    """The group a task is averaged in: its VTAB-1k group, or ``fgvc-all``; None for other tasks."""
    for bench in BENCHMARKS.values():
        for group, tasks in bench.groups.items():
            if task in tasks and group != "vtab-all":
                return group
    return None


def task_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per task: its best and cheap points' accuracy, GFLOPs and prompt tokens."""
    rows = []
    finished = table[table["status"] == "finished"]
    references = selected_references(finished)
    for task, trials in search_trials(finished).groupby("task", sort=False):
        accuracy = "test_acc" if "test_acc" in trials and trials["test_acc"].notna().any() else "val_acc"
        scored = trials[trials[accuracy].notna()]
        best = scored.loc[scored[accuracy].idxmax()]
        near = scored[scored[accuracy] >= best[accuracy] - WITHIN]
        cheap = near.loc[near["gflops"].idxmin()]
        row = {"task": task, "group": _group_of(task) or "", "accuracy": accuracy}
        for name, point in zip(POINTS, (best, cheap)):
            row.update({f"{name}_acc": point[accuracy], f"{name}_gflops": point["gflops"],
                        f"{name}_tokens": point["prompt_tokens"], f"{name}_trial": point["trial_id"]})
        for point in references[references["task"] == task].to_dict("records"):
            name = point[REFERENCE_COLUMN]
            row.update({f"{name}_acc": point.get(accuracy), f"{name}_gflops": point["gflops"]})
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """The task rows followed by group means and the VTAB-1k mean of group means."""
    tasks = task_summary(table)
    if tasks.empty:
        return tasks
    numbers = [c for c in tasks.columns if c.endswith(("_acc", "_gflops", "_tokens"))]
    means = []
    for group, members in tasks[tasks["group"] != ""].groupby("group", sort=False):
        means.append({"task": f"mean {group}", "group": group, **members[numbers].mean().to_dict()})
    vtab = [m for m in means if m["group"].startswith("vtab-")]
    if len(vtab) > 1:
        means.append({"task": "mean vtab-1k (of group means)", "group": "vtab-1k",
                      **pd.DataFrame(vtab)[numbers].mean().to_dict()})
    return pd.concat([tasks, pd.DataFrame(means)], ignore_index=True) if means else tasks


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table (accuracy in %, GFLOPs, prompt tokens; each reference point's
    accuracy % with its GFLOPs)."""
    others = [c.removesuffix("_acc") for c in summary.columns
              if c.endswith("_acc") and c.removesuffix("_acc") not in POINTS]
    lines = [
        "| task | accuracy on | best acc % | best GFLOPs | best tokens | cheap acc % | cheap GFLOPs | cheap tokens |"
        + "".join(f" {name} acc % (GFLOPs) |" for name in others),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for row in summary.to_dict("records"):
        on = row.get("accuracy") if isinstance(row.get("accuracy"), str) else ""
        cells = [f"{100 * row[f'{p}_acc']:.1f} | {row[f'{p}_gflops']:.2f} | {row[f'{p}_tokens']:.1f}" for p in POINTS]
        cells += [f"{100 * row[f'{n}_acc']:.1f} ({row[f'{n}_gflops']:.2f})" if pd.notna(row.get(f"{n}_acc")) else "-"
                  for n in others]
        lines.append(f"| {row['task']} | {on} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
