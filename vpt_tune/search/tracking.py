"""MLflow tracking: search run -> task runs -> trial runs, fronts and tables as artifacts.

All writes happen in the search driver process (Tune callbacks run there), so one writer talks to
the store: no sqlite locking between trial processes.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray import tune

from vpt_tune.search.hypervolume import box_volume, hypervolume_history, reference_point
from vpt_tune.search.pareto import front_page, front_png
from vpt_tune.search.driver import FINAL, trial_task, unwrap
from vpt_tune.search.router import TASK
from vpt_tune.search.results import (
    COST_METRICS, EPOCH_METRICS, MLFLOW_RUN_ID, STOPPED_AT, search_trials, selected_references, short_config,
)
from vpt_tune.train.slot_protocol import SLOT, SLOT_TRIAL
from vpt_tune.train.worker import NODE, REUSED_BASE

FRONT_COSTS = ("prompt_tokens", "gflops")
# plotly.js, logged once on the search run for every front page. ".mjs", not ".js": MLflow's server sends
# ".js" artifacts as text/plain with nosniff, which browsers refuse to run, and ".mjs" as text/javascript.
PLOTLY_JS = "plotly.min.mjs"
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI shows a "custom_model_development" experiment's runs


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db`` as an absolute URI."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_page(server: str, experiment_id: str, run_id: str) -> str:
    """The address of a run's page in the MLflow UI at ``server``, in its model-training view: MLflow 3.17's
    UI opens in its GenAI view whatever the experiment's kind tag, unless the address asks."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def error_summary(trace: str) -> str:
    """The telling line of a trial's error trace: the last ``SomeError: message`` line."""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (named or lines or ["trial failed"])[-1][:500]


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go in ``mlruns/`` beside the database file (MLflow's default is the
    current directory, which scatters them); servers choose their own (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def _write_table(table: pd.DataFrame, folder: Path, name: str) -> None:
    table.to_parquet(folder / f"{name}.parquet", index=False)
    table.to_csv(folder / f"{name}.csv", index=False)


class Tracker:
    """Creates and fills the MLflow runs of one search."""

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location(uri))
        if not (found and EXPERIMENT_KIND in found.tags):  # the UI opens on runs, not on GenAI traces
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, "custom_model_development")

    def start_run(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (nested under ``parent``) and return its id."""
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def child_run(self, parent: str, tag: str, value: str) -> str | None:
        """The id of the run under ``parent`` whose tag ``tag`` is ``value`` (a resumed search reuses it)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.`{tag}` = '{value}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def reopen(self, run_id: str) -> str:
        """Mark a run of an interrupted search as running again; returns its id."""
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        """Log the finite numeric entries of ``metrics``."""
        now = int(pd.Timestamp.now().timestamp() * 1000)
        numeric = [
            Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if numeric:
            self.client.log_batch(run_id, metrics=numeric)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_plotly(self, run_id: str) -> None:
        """plotly.js as the artifact ``PLOTLY_JS`` of the search run, where every front page loads it from
        (once: a resumed search whose run has it already sends nothing)."""
        from plotly.offline import get_plotlyjs

        if any(a.path == PLOTLY_JS for a in self.client.list_artifacts(run_id)):
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
            self.client.log_artifact(run_id, str(Path(tmp) / PLOTLY_JS))

    def log_fronts(self, table: pd.DataFrame, title: str, destinations: list[tuple[str, str | None]],
                   plotly_run: str, accuracy: str = "val_acc", table_name: str | None = "trials") -> None:
        """Render the ``accuracy``-vs-cost fronts (one small HTML page, a PNG per cost) and the table once,
        and log them to every ``(run_id, artifact_path)`` of ``destinations``. The page loads plotly.js from
        the run ``plotly_run`` (see :meth:`log_plotly`): through the MLflow server in its UI, or beside the
        page in the artifact store (the search run's ``<task>/`` and the task runs' root)."""
        sources = [("server", f"get-artifact?path={PLOTLY_JS}&run_uuid={plotly_run}"), ("page", "plotly.min.js"),
                   ("page", f"../{PLOTLY_JS}"), ("page", f"../../{plotly_run}/artifacts/{PLOTLY_JS}")]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            finished = table[(table["status"] == "finished") & table[accuracy].notna()]
            references = selected_references(finished)
            finished = search_trials(finished)
            page = front_page(finished, FRONT_COSTS, title, accuracy, sources, references)
            (out / f"front_{accuracy}.html").write_text(page, encoding="utf-8")
            for cost in FRONT_COSTS:
                front_png(finished, cost, f"{title}: {accuracy} vs {cost}", out / f"front_{accuracy}_vs_{cost}.png",
                          accuracy, references)
            if table_name:
                _write_table(table, out, table_name)
            for run_id, artifact_path in destinations:
                self.client.log_artifacts(run_id, tmp, artifact_path)

    def log_table(self, run_id: str, table: pd.DataFrame, name: str) -> None:
        """``table`` as the artifacts ``name``.parquet and ``name``.csv of the run (MLflow's UI shows CSV)."""
        with tempfile.TemporaryDirectory() as tmp:
            _write_table(table, Path(tmp), name)
            self.client.log_artifacts(run_id, tmp)

    def log_summary(self, table: pd.DataFrame, destinations: list[tuple[str, str]]) -> None:
        """A task's results as metrics of every ``(run_id, name prefix)`` of ``destinations``, computed once:
        ``finished_trials``, ``front_size``, ``best_val_acc`` (and ``best_test_acc`` after the final
        protocol), and ``hypervolume``: after each finished trial (in the order trials were created; the
        trial count is the step), as a fraction of the box between the task's ideal point and its reference
        (the worst values + 10 % of their range), so in [0, 1] and comparable across tasks and searches."""
        finished = search_trials(table[table["status"] == "finished"]).reset_index(drop=True)
        values = [("finished_trials", len(finished), 0)]
        if not finished.empty:
            reference = reference_point(finished)
            history = hypervolume_history(finished.rename_axis("order").reset_index(), reference, "order")
            box = box_volume(finished, reference)
            values += [("hypervolume", v / box if box > 0 else 0.0, i) for i, v in enumerate(history, 1)]
            values += [("front_size", int(finished["pareto"].sum()), 0),
                       ("best_val_acc", float(finished["val_acc"].max()), 0)]
            if "test_acc" in finished and finished["test_acc"].notna().any():
                values.append(("best_test_acc", float(finished["test_acc"].max()), 0))
        now = int(pd.Timestamp.now().timestamp() * 1000)
        for run_id, prefix in destinations:
            metrics = [Metric(f"{prefix}{name}", value, now, step) for name, value, step in values]
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(run_id, metrics=metrics[start:start + 1000])


class TrialLogger(tune.Callback):
    """Tune callback: one MLflow run per trial under its task's run (``task_runs[task]``), per-epoch
    metrics, final status."""

    def __init__(self, tracker: Tracker, task_runs: dict[str, str], final: bool = False):
        self.tracker = tracker
        self.task_runs = task_runs
        self.final = final  # final retrains: tagged, their evaluation (on test) logged as test_acc
        self.run_ids: dict[str, str] = {}
        self.nodes: dict[str, set[str]] = {}  # trial id -> Ray nodes its workers trained on
        self.reused: set[str] = set()  # trials tagged with the base model they reused
        self.costs: dict[str, dict] = {}  # trial id -> the cost metrics last logged

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.run_ids:  # a restarted trial of a resumed search continues its run
            task = trial_task(trial.config)
            task_run = self.task_runs[task]
            run_id = self.tracker.child_run(task_run, "trial_id", trial.trial_id)
            if run_id is None:
                config = {k: v for k, v in unwrap(trial.config).items() if k != TASK}
                tags = {"task": task, "trial_id": trial.trial_id}
                if self.final:
                    final = trial.config[FINAL]
                    config = {k: v for k, v in final.items() if k not in ("seed", "source_trial", TASK)}
                    tags.update(final="true", source_trial=final["source_trial"], seed=str(final["seed"]))
                name = f"{task} · final {tags['source_trial']} · seed {tags['seed']}" if self.final else \
                    f"{task} · {short_config(config)}"
                run_id = self.tracker.start_run(name, task_run, tags)
                self.tracker.log_params(run_id, config)
            self.run_ids[trial.trial_id] = run_id
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        result[MLFLOW_RUN_ID] = self._run_id(trial)  # the trial's last result names it (for its Optuna trial)
        # per epoch; the costs, constant over a trial, once (again only if they change); not Tune's own keys
        metrics = {k: result[k] for k in EPOCH_METRICS if k in result}
        metrics["wall_seconds"] = result.get("time_total_s")
        if self.final and "val_acc" in metrics:  # a final retrain evaluates on test
            metrics["test_acc"] = metrics.pop("val_acc")
        self.tracker.log_metrics(self._run_id(trial), metrics, step=int(result.get("epoch", 0)))
        logged = self.costs.setdefault(trial.trial_id, {})
        changed = {k: result[k] for k in COST_METRICS  # the planned cost and the one measured after condensing
                   if k in result and not (k in logged and math.isclose(logged[k], result[k], rel_tol=1e-9))}
        if changed:
            logged.update(changed)
            self.tracker.log_metrics(self._run_id(trial), changed)
        if result.get(REUSED_BASE) and trial.trial_id not in self.reused:  # the trained model it started from
            self.reused.add(trial.trial_id)
            self.tracker.set_tags(self._run_id(trial), {REUSED_BASE: result[REUSED_BASE]})
        if SLOT in result and trial.trial_id not in self.nodes:  # once per driver: the slot that trains it
            self.tracker.set_tags(self._run_id(trial), {SLOT: f"{result[SLOT]} (trial {result[SLOT_TRIAL]} of its workers)"})
        if trial.trial_id not in self.nodes:  # a resumed search keeps the nodes tagged before
            tagged = self.tracker.client.get_run(self._run_id(trial)).data.tags.get("ray_nodes")
            self.nodes[trial.trial_id] = set(tagged.split(",")) if tagged else set()
        nodes = self.nodes[trial.trial_id]
        if result.get(NODE) and result[NODE] not in nodes:  # a restarted worker group may move to another node
            nodes.add(result[NODE])
            self.tracker.set_tags(self._run_id(trial), {"ray_nodes": ",".join(sorted(nodes))})

    def on_trial_complete(self, iteration, trials, trial, **info):
        stopped_at = trial.last_result.get(STOPPED_AT)
        if stopped_at:  # stopped early at a rung: its last accuracy is not a final one
            self.tracker.set_tags(self._run_id(trial), {"status": "stopped", STOPPED_AT: str(stopped_at)})
            self.tracker.log_metrics(self._run_id(trial), {STOPPED_AT: stopped_at})
        else:
            self.tracker.set_tags(self._run_id(trial), {"status": "finished"})
        self.tracker.end_run(self._run_id(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        error_file = trial.error_file  # written locally just before this callback, synced to storage later
        error = error_summary(Path(error_file).read_text() if error_file and Path(error_file).is_file() else "")
        self.tracker.set_tags(self._run_id(trial), {"status": "failed", "error": error})
        self.tracker.end_run(self._run_id(trial), "FAILED")
