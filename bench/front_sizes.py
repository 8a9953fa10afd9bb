"""How many bytes a VTAB-1k search's front pages take in MLflow, against one self-contained plotly HTML per
front as before.

Logs the fronts of a finished 19-task search (32 trials per task, with the final protocol's test fronts)
through the real ``Tracker`` into a temporary sqlite MLflow store, exactly as a search does: a val front page
and a test front page per task, each to its task run and to the search run, and plotly.js once on the search
run. Side by side, in the same run, the former artifacts: one HTML per front and cost, each with plotly.js
inside, logged to the same two runs. Prints a table and, last, one line of JSON.

    python bench/front_sizes.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pareto_latency import experiment  # the same synthetic 19-task table

from vpt_tune.search.pareto import front_figure
from vpt_tune.search.results import TABLE_FILE, read_table
from vpt_tune.search.tracking import FRONT_COSTS, PLOTLY_JS, Tracker


def html_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*.html"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = read_table(experiment(tmp / "vtab") / TABLE_FILE)
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "front-sizes")
        search = tracker.start_run("search")
        tracker.log_plotly(search)
        pages = {}
        for task, trials in table.groupby("task"):
            task_run = tracker.start_run(task, search)
            for accuracy in ("val_acc", "test_acc"):
                tracker.log_fronts(trials, task, [(task_run, None), (search, task)], search, accuracy, None)
            pages[task] = (_artifacts(tracker, task_run) / "front_val_acc.html").stat().st_size
        plotly_bytes = (_artifacts(tracker, search) / PLOTLY_JS).stat().st_size
        now = html_bytes(tmp / "mlruns") + plotly_bytes

        # before: a self-contained HTML per front and cost (plotly.js inside), to the same two runs
        one = tmp / "before.html"
        task, trials = next(iter(table.groupby("task")))
        front_figure(trials, FRONT_COSTS[0], task).write_html(one, include_plotlyjs=True)
        before_each = one.stat().st_size
        before = before_each * len(FRONT_COSTS) * 2 * 2 * len(pages)  # costs x (val, test) x two runs x tasks

    largest = max(pages.values())
    print(f"{'artifact':<44}{'bytes':>14}")
    print(f"{'front page per task (val), median':<44}{sorted(pages.values())[len(pages) // 2]:>14,}")
    print(f"{'front page per task (val), largest':<44}{largest:>14,}")
    print(f"{'plotly.js, once per search':<44}{plotly_bytes:>14,}")
    print(f"{'19 tasks, all front HTML + plotly.js, now':<44}{now:>14,}")
    print(f"{'one self-contained front HTML, before':<44}{before_each:>14,}")
    print(f"{'19 tasks, all front HTML, before':<44}{before:>14,}")
    print(json.dumps({"tasks": len(pages), "trials_per_task": len(table) // len(pages), "page_bytes_max": largest,
                      "page_bytes_median": sorted(pages.values())[len(pages) // 2], "search_bytes_now": now,
                      "search_bytes_before": before, "ratio": round(now / before, 4)}))


def _artifacts(tracker: Tracker, run_id: str) -> Path:
    return Path(urllib.parse.urlsplit(tracker.client.get_run(run_id).info.artifact_uri).path)


if __name__ == "__main__":
    main()
