"""The ``vpt-tune`` command line: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
import traceback
import urllib.parse
from pathlib import Path

from vpt_tune.errors import UserError

EPILOG = """examples:
  vpt-tune search                                   # the built-in demo search (CPU, offline, minutes)
  vpt-tune search search_spaces/demo.yaml --set search.trials_per_task=16
  vpt-tune search demo_asha                         # the demo, 9 epochs, hopeless trials stopped early
  vpt-tune resume vpt_results/demo-20261123-101500  # continue an interrupted search
  vpt-tune search search_spaces/vtab_pc.yaml --cluster cluster/aws.yaml   # ray up + submit as a Ray Job
  vpt-tune search SPEC.yaml --address http://HEAD:8265 --storage /shared/vpt_results   # existing cluster
  vpt-tune resume vpt_results/demo-20261123-101500 --set search.trials_per_task=32   # more trials
  vpt-tune pareto vpt_results/demo-20261123-101500 --format json
  vpt-tune export vpt_results/demo-20261123-101500 --task digits --trial 1a2b3c4d best.pt
  vpt-tune plan search_spaces/vtab_pc.yaml --cluster cluster/aws.yaml   # PFLOPs, GPU-hours, wall time
  vpt-tune cost --model vit_base_patch16_224 --img-size 224 --prompts 50 --placement deep
  vpt-tune cost --prompts 10 --kv-prompts 5        # E²VPT, ViT-B/16: 18.51 GFLOPs
  vpt-tune cost --method cvpt --prompts 10         # CVPT: prompts read by cross-attention
  mlflow ui --backend-store-uri sqlite:///mlflow.db  # browse runs, fronts and tables
"""


class _Terminal(logging.Handler):
    """vpt-tune's log records as plain lines on the current ``sys.stdout`` (looked up per record, so a
    redirected or captured stdout gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def log_to_terminal(level: int = logging.INFO) -> None:
    """Show the library's progress and notices (``level`` and up) on stdout, one plain line each, as the
    command line does; for scripts that run searches in-process. Calling it again changes nothing."""
    logger = logging.getLogger("vpt_tune")
    if not any(isinstance(h, _Terminal) for h in logger.handlers):
        logger.addHandler(_Terminal())
    logger.setLevel(level)
    logger.propagate = False  # once on the terminal, not again through a root handler


def _search(args: argparse.Namespace) -> None:
    from vpt_tune.spec import load_spec

    spec = load_spec(args.spec, args.set or [])  # before the heavy imports: spec errors come at once
    if args.cluster:
        from vpt_tune.cluster import size_for_cluster

        spec = size_for_cluster(spec, args.cluster)  # before the cluster starts: a mistake costs seconds
    address = _job_address(args)
    if address:
        from vpt_tune.cluster import submit_search

        _follow(submit_search(spec, address, args.name, args.storage, args.mlflow_uri, bool(args.cluster)), args)
        return
    from vpt_tune.search.runner import run_search

    started = time.monotonic()
    _summary(run_search(spec, name=args.name, storage=args.storage, mlflow_uri=args.mlflow_uri), started)


def _plan(args: argparse.Namespace) -> None:
    from vpt_tune.spec import load_spec

    with contextlib.redirect_stdout(sys.stderr if args.format == "json" else sys.stdout):  # notices off the JSON
        spec = load_spec(args.spec, args.set or [], require_env=False)
        if args.cluster:
            from vpt_tune.cluster import size_for_cluster

            spec = size_for_cluster(spec, args.cluster)
        from vpt_tune.search.packing import resolve_gpus
        from vpt_tune.search.plan import make_plan, plan_lines, planned_tasks, trials_at_once
        from vpt_tune.search.runner import local_resources

        here = local_resources(spec)
        if not args.cluster and not here["GPU"]:  # as a search here would: auto trains on CPU
            spec = resolve_gpus(spec, 0, probe=None)
        plan = make_plan(spec, planned_tasks(spec), trials_at_once(spec, here), args.gpu)
    if args.format == "json":
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan_lines(plan)))


def _resume(args: argparse.Namespace) -> None:
    address = _job_address(args)
    if address:
        from vpt_tune.cluster import submit_resume

        _follow(submit_resume(address, args.experiment, args.set or []), args)
        return
    from vpt_tune.search.runner import resume_search

    started = time.monotonic()
    _summary(resume_search(args.experiment, args.set or []), started)


def _job_address(args: argparse.Namespace) -> str | None:
    """The job-submission address to submit to (launching --cluster first), or None to drive the
    search from this process (joining the cluster of a GCS --address)."""
    from vpt_tune.cluster import is_job_address, join, launch

    if args.cluster:
        return launch(args.cluster)
    if args.address and is_job_address(args.address):
        return args.address
    if args.address:
        join(args.address)
    return None


def _follow(submission, args: argparse.Namespace) -> None:
    """Print where a submitted search goes, then stream its log until it ends (unless --no-follow)."""
    from vpt_tune.cluster import follow, teardown_command

    address, job = submission.address, submission.job_id
    print(f"submitted Ray Job {job} to {address}")
    print(f"experiment: {submission.experiment}")
    if submission.mlflow_uri:
        head = urllib.parse.urlsplit(address).hostname  # the job's 127.0.0.1 is the head
        print(f"MLflow:     {submission.mlflow_uri.replace('127.0.0.1', head)}")
    print(f"follow:     ray job logs --follow {job} --address {address}")
    print(f"resume:     vpt-tune resume {submission.experiment} --address {address}")
    if args.cluster:
        print(f"tear down:  {teardown_command(args.cluster)}")
    if args.no_follow:
        return
    status = follow(address, job, lambda lines: print(lines, end="", flush=True))
    if status is None:
        print(f"\nstopped following; the search goes on. Follow it again with `ray job logs --follow {job} "
              f"--address {address}`, stop it with `ray job stop {job} --address {address}`")
        return
    print(f"Ray Job {job}: {status}")
    if status in ("FAILED", "STOPPED"):
        raise UserError(f"the search job {job} {status.lower()}; its log above says why "
                        f"(again: ray job logs {job} --address {address})")


def _summary(result, started: float) -> None:
    from vpt_tune.search.results import format_table
    from vpt_tune.search.tracking import run_page

    table = result.table
    finished, stopped = table[table["status"] == "finished"], int((table["status"] == "stopped").sum())
    early = f" ({stopped} stopped early)" if stopped else ""
    print(f"\nfinished {len(finished)}/{len(table)} trials{early} in {(time.monotonic() - started) / 60:.1f} min")
    if not finished.empty:
        print(format_table(table[table["pareto"]], _width(None)))
    if "test_acc" in table:
        from vpt_tune.search.summary import summary_markdown, summary_table

        print(f"\n{summary_markdown(summary_table(table))}")
    print(f"\nexperiment: {result.experiment_dir}")
    print(f"fronts:     vpt-tune pareto {result.experiment_dir}")
    ids = result.mlflow_experiment_id, result.parent_run_id
    if result.mlflow_uri.startswith(("http://", "https://")):
        print(f"MLflow:     {run_page(result.mlflow_uri, *ids)}")
    else:
        print(f"MLflow:     mlflow ui --backend-store-uri {result.mlflow_uri}")
        print(f"            then {run_page('http://127.0.0.1:5000', *ids)}")
    print(f"more:       vpt-tune resume {result.experiment_dir} --set search.trials_per_task=N")


def _export(args: argparse.Namespace) -> None:
    from vpt_tune.export import export_trial
    from vpt_tune.search.results import load_table

    table = load_table(args.experiment)
    rows = table[(table["task"] == args.task) & (table["trial_id"] == args.trial)]
    if rows.empty:
        known = ", ".join(f"{t}/{i}" for t, i in zip(table["task"], table["trial_id"]))
        raise UserError(f"no trial {args.task}/{args.trial} in {args.experiment}; trials: {known}")
    out = export_trial(Path(args.experiment).expanduser(), rows.iloc[0].to_dict(), args.out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); load it with vpt_tune.load({str(out)!r})")


def _pareto(args: argparse.Namespace) -> None:
    from vpt_tune.search import results

    output = Path(args.output) if args.output else None
    if output and not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist; create it or write elsewhere")
    if args.format == "parquet" and not output:
        raise UserError("--format parquet needs --output FILE.parquet")
    if args.summary and (args.all or args.wide):
        raise UserError("--summary reads every finished trial already; drop --all / --wide")
    from vpt_tune.search.summary import summary_markdown, summary_table

    table = results.load_table(args.experiment)
    if args.summary:
        table = summary_table(table)
    else:
        table = results.sort_table(table if args.all else table[table["pareto"]])
    if args.format == "parquet":
        table.to_parquet(output, index=False)
        print(f"wrote {len(table)} rows to {output}")
        return
    if args.format == "json":
        text = json.dumps(_records(table, args.summary), indent=2, default=float)
    elif args.format == "csv":
        text = table.to_csv(index=False)
    elif args.summary:
        text = summary_markdown(table)
    else:
        text = results.wide_table(table) if args.wide else results.format_table(table, _width(output))
    text = text if text.endswith("\n") else text + "\n"
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
        print(f"wrote {len(table)} rows to {output}")


def _width(output) -> int:
    """The table width: the terminal's (100 when it is not one), unlimited in a file."""
    return 10**6 if output else shutil.get_terminal_size((100, 24)).columns


def _records(table, summary: bool) -> list[dict]:
    """``pareto --format json``: a summary's rows as they are; a trial as task, id, status, config (an
    object), metrics (the ones it has) and its front flag."""
    import pandas as pd

    from vpt_tune.search.results import FINAL_COLUMNS, METRIC_COLUMNS

    if summary:
        return table.to_dict("records")
    return [
        {
            "task": row["task"],
            "trial_id": row["trial_id"],
            "status": row["status"],
            "config": json.loads(row["config"]),
            "metrics": {k: row[k] for k in (*METRIC_COLUMNS, *FINAL_COLUMNS) if k in row and pd.notna(row[k])},
            "pareto": bool(row["pareto"]),
        }
        for row in table.to_dict("records")
    ]


def _cost(args: argparse.Namespace) -> None:
    from vpt_tune.cost import ViTShape, prompted_cost
    from vpt_tune.models.placement import prompt_counts

    method = args.method or ("e2vpt" if args.kv_prompts else "vpt")
    if method not in ("vpt", "e2vpt") and (args.counts or args.kv_prompts or args.kv_separate):
        raise UserError(f"--counts and --kv-prompts describe VPT / E²VPT prompts; --method {method} takes --prompts "
                        "and --placement")
    shape = ViTShape.for_model(args.model, args.img_size)
    try:
        counts = args.counts or prompt_counts(args.prompts, args.placement, shape.depth, args.depth, args.layers)
    except ValueError as err:
        raise UserError(f"--placement {args.placement}: {err}") from None
    if args.counts:  # per-block counts: the cost model directly
        try:
            cost = prompted_cost(shape, counts, args.num_classes, [args.kv_prompts] * shape.depth, not args.kv_separate)
        except ValueError as err:  # a --counts of the wrong length, or a negative count
            raise UserError(f"{err} (--counts / --kv-prompts)") from None
    else:  # the cost a trial of the method reports for this configuration, before its stages
        from vpt_tune.train.job import Job, expected_cost

        params = {"num_prompts": args.prompts, "placement": args.placement, "depth": args.depth, "layers": args.layers,
                  "base_lr": 0.0, "kv_prompts": args.kv_prompts}
        job = Job(model=args.model, weights="random", img_size=args.img_size, task_dir="", params=params, epochs=1,
                  batch_size=1, method=method, options={"e2vpt": {"kv_shared": not args.kv_separate}})
        cost = expected_cost(job, shape, args.num_classes, stages=False)
    print(f"model            {args.model} @ {args.img_size}px ({shape.depth} blocks, width {shape.embed_dim})")
    print(f"method           {method}")
    print(f"prompts/block    {counts}{' (read by cross-attention, not in the sequence)' if method == 'cvpt' else ''}")
    print(f"prompt tokens    {cost.prompt_tokens:g} (mean over blocks, in the sequence)")
    print(f"KV tokens        {cost.kv_tokens:g} (mean over blocks; attended to, not in the sequence: "
          "E²VPT key/value prompts, CVPT prompts)")
    print(f"trainable params {cost.trainable_params:,} (prompts + {args.num_classes}-class head)")
    print(f"GFLOPs           {cost.gflops:.2f} per image (multiply-adds)")


def _cluster_options(command: argparse.ArgumentParser) -> None:
    where = command.add_argument_group("where it runs (default: a local Ray on this machine)")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument("--cluster", metavar="YAML",
                        help="bring up the Ray cluster of a cluster launcher YAML (e.g. cluster/aws.yaml) and "
                        "submit the search to it as a Ray Job")
    choice.add_argument("--address", metavar="ADDR",
                        help="an existing Ray cluster: http://HEAD:8265 submits the search as a Ray Job (it "
                        "survives this machine disconnecting); auto or HEAD:6379 drives it from this process")
    where.add_argument("--no-follow", action="store_true",
                       help="with a Ray Job: return after submitting instead of streaming its log")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vpt-tune``."""
    from vpt_tune.methods import MAIN_METHODS  # (light: no torch)

    parser = argparse.ArgumentParser(
        prog="vpt-tune",
        description="Multi-objective hyperparameter search for visual prompt tuning of frozen timm ViTs "
        "(accuracy vs prompt tokens vs GFLOPs), on Ray Tune + Optuna, tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = sub.add_parser("search", help="run a search described by a spec YAML",
                            description="Run a prompt-tuning search; prints progress and where results go.")
    search.add_argument("spec", nargs="?", default="demo",
                        help="spec YAML file, or a built-in spec name (default: demo)")
    search.add_argument("--name", help="experiment name (default: <spec name>-<timestamp>)")
    search.add_argument("--storage", help="directory holding experiments (default: the spec's `storage`)")
    search.add_argument("--mlflow-uri", help="MLflow tracking URI (default: spec, else sqlite:///./mlflow.db)")
    search.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a spec value, e.g. --set search.trials_per_task=16 (repeatable)")
    _cluster_options(search)
    search.set_defaults(func=_search)

    plan = sub.add_parser(
        "plan", help="what a search will cost before it starts: trials, epochs, PFLOPs, device-hours, wall time",
        description="Plan SPEC's search without running it: per task the trials, epochs per trial (with early "
        "stopping: expected-most), images, training and evaluation PFLOPs from the cost model (multiply-adds), "
        "the final protocol's retrains; then GPU- (or CPU-) hours and wall time, from a short training step "
        "measured here, or for GPU trials on a machine without one, a stated GPU (--gpu). Works before the data "
        "is downloaded (the benchmarks' split sizes are known) and without a GPU.",
    )
    plan.add_argument("spec", nargs="?", default="demo", help="spec YAML file, or a built-in spec name (default: demo)")
    plan.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec value (repeatable)")
    plan.add_argument("--cluster", metavar="YAML",
                      help="size the trials at a time for this cluster launcher YAML (nothing is started)")
    plan.add_argument("--gpu", default="a10g", metavar="NAME",
                      help="GPU assumed for GPU trials when this machine has none: a10g (default, cluster/aws.yaml's), "
                      "l4, a100, h100 or h200")
    plan.add_argument("--format", choices=["table", "json"], default="table")
    plan.set_defaults(func=_plan)

    resume = sub.add_parser(
        "resume", help="continue an interrupted search, or extend a finished one",
        description="Continue the search in EXPERIMENT where it stopped: finished trials are kept, running "
        "ones continue from their last epoch checkpoint, Optuna studies and MLflow runs go on. "
        "--set search.trials_per_task=N adds trials to every task's study.",
    )
    resume.add_argument("experiment", help="experiment directory printed by `vpt-tune search`")
    resume.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="search.trials_per_task=N (more trials) or search.max_concurrent_trials=K")
    _cluster_options(resume)
    resume.set_defaults(func=_resume)

    pareto = sub.add_parser(
        "pareto", help="print the Pareto fronts of a finished experiment",
        description="The trials on each task's front (all trials with --all), by task, most accurate first: "
        "accuracy in %, prompt tokens (mean per block), GFLOPs per image, * on the front, the config on one line. "
        "stopped@N: stopped early at epoch N.")
    pareto.add_argument("experiment", help="experiment directory printed by `vpt-tune search`")
    pareto.add_argument("--all", action="store_true", help="all trials, not only Pareto-optimal ones")
    pareto.add_argument("--summary", action="store_true",
                        help="per task, group and benchmark: the most accurate point and the cheapest within 1 "
                        "point of it (test accuracy where the final protocol ran, else validation)")
    pareto.add_argument("--wide", action="store_true", help="table: every column, the config as JSON (wide)")
    pareto.add_argument("--format", choices=["table", "json", "csv", "parquet"], default="table")
    pareto.add_argument("--output", "-o", metavar="FILE",
                        help="write to FILE instead of printing (required for parquet)")
    pareto.set_defaults(func=_pareto)

    export = sub.add_parser(
        "export", help="write one trained trial to a small file that vpt_tune.load() turns into a model",
        description="Write the prompts, head and configuration of one finished trial (never the backbone) "
        "to OUT; in Python, vpt_tune.load(OUT) rebuilds the model for inference.",
    )
    export.add_argument("experiment", help="experiment directory printed by `vpt-tune search`")
    export.add_argument("--task", required=True, help="task of the trial")
    export.add_argument("--trial", required=True, help="trial id (see `vpt-tune pareto EXPERIMENT`)")
    export.add_argument("out", help="file to write, e.g. digits-best.pt")
    export.set_defaults(func=_export)

    cost = sub.add_parser("cost", help="prompt tokens, trainable parameters and GFLOPs of a configuration")
    cost.add_argument("--method", choices=MAIN_METHODS, help="the method (default: vpt, or e2vpt with --kv-prompts)")
    cost.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    cost.add_argument("--img-size", type=int, default=224)
    visual = cost.add_mutually_exclusive_group()
    visual.add_argument("--prompts", type=int, default=0, help="prompts per prompted block")
    visual.add_argument("--counts", type=int, nargs="+", metavar="T",
                        help="fresh prompts of every block, one number per block (instead of --prompts/--placement)")
    cost.add_argument("--placement", default="deep", help="shallow | deep | first_k | last_k | layers")
    cost.add_argument("--depth", type=int, help="k for first_k / last_k")
    cost.add_argument("--layers", type=int, nargs="+", help="block indices for placement 'layers'")
    cost.add_argument("--kv-prompts", type=int, default=0, metavar="T_KV",
                      help="E²VPT key/value prompts in every block (default 0)")
    cost.add_argument("--kv-separate", action="store_true",
                      help="separate key and value prompt tensors (default: one shared tensor; counts params)")
    cost.add_argument("--num-classes", type=int, default=0, help="head classes (counts head params/FLOPs)")
    cost.set_defaults(func=_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vpt-tune`` console script."""
    args = build_parser().parse_args(argv)
    log_to_terminal()
    try:
        args.func(args)
    except KeyboardInterrupt as err:  # a SearchInterrupted says how far the search got and how to resume it
        print(f"vpt-tune: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user-facing errors become one line, exit code 2
        if args.debug or not isinstance(err, UserError):
            traceback.print_exc()
        if not isinstance(err, UserError):
            return 1
        print(f"vpt-tune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
