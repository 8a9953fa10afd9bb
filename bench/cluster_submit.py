"""A search submitted to a running Ray cluster as a Ray Job: how long submission and the first trial take,
and which nodes trained.

Start a cluster first, e.g. two raylets on this machine (token authentication on, as Ray 2.60 does):

    ray get-auth-token --generate
    RAY_AUTH_MODE=token ray start --head --port 6390 --num-cpus 1 --resources '{"vpt_driver": 100}' \\
        --include-dashboard true --dashboard-port 8270
    RAY_AUTH_MODE=token ray start --address 127.0.0.1:6390 --num-cpus 1
    python bench/cluster_submit.py --address http://127.0.0.1:8270
    ray stop

It runs ``vpt-tune search`` (the small random-weights spec of the tests, 4 trials) with ``--address`` and
times: the ``vpt-tune`` command to "submitted" (spec checks + job submission), submission to the first
finished trial, and the whole job. Prints a table and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

SPEC = {
    "name": "bench-cluster",
    "backbone": {"model": "vit_tiny_patch16_224", "weights": "random", "img_size": 32},
    "data": {"root": None, "tasks": ["digits"]},
    "space": {"num_prompts": {"int": [1, 8]}, "placement": {"choice": ["shallow", "deep"]},
              "base_lr": {"float": [0.05, 0.5], "log": True}},
    "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0},
    "search": {"sampler": "random", "trials_per_task": 4, "seed": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="job-submission address, e.g. http://127.0.0.1:8270")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vpt-bench-cluster-"))
    spec = {**SPEC, "storage": str(work / "results"),
            "tracking": {"mlflow_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"}}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vpt_tune.cli", "search", str(work / "spec.yaml"), "--name", "b",
                             "--address", args.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    submitted = first = None
    for line in proc.stdout:
        now = time.monotonic() - started
        if submitted is None and line.startswith("submitted Ray Job"):
            submitted = now
        if first is None and "1/4 trials" in line:
            first = now
        print(line, end="", flush=True)
    total = time.monotonic() - started
    if proc.wait() != 0 or submitted is None or first is None:
        sys.exit(f"the submitted search failed (exit {proc.returncode}); see its log above")
    client = MlflowClient(spec["tracking"]["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    nodes = sorted({n for r in runs for n in r.data.tags.get("ray_nodes", "").split(",") if n})
    figures = {"to_submitted_s": round(submitted, 1), "submitted_to_first_trial_s": round(first - submitted, 1),
               "job_total_s": round(total, 1), "trials": 4, "nodes_trained_on": len(nodes)}
    print(f"\n{'vpt-tune command to submitted':<40}{submitted:8.1f} s")
    print(f"{'submitted to first finished trial':<40}{first - submitted:8.1f} s")
    print(f"{'whole job (4 trials, 2 epochs)':<40}{total:8.1f} s")
    print(f"{'nodes the trials trained on':<40}{len(nodes):8d}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
