"""Where a search runs: this machine, an existing Ray cluster, or one the Ray cluster launcher brings up.

- no address: a local Ray on this machine (or the cluster ``RAY_ADDRESS`` names);
- ``--address auto`` or ``HOST:PORT`` (a cluster's GCS): this process is the search driver, joined to
  that cluster; it must stay up for the whole search;
- ``--address http://HOST:8265`` (a cluster's job-submission address): the search is submitted as a
  Ray Job and runs on the cluster's head, so it survives this machine disconnecting; its log streams here;
- ``--cluster YAML``: ``ray up`` through Ray's cluster launcher SDK, then submitted as a Ray Job to its head.

Ray 2.60 clusters use token authentication by default: the token is read from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (``ray get-auth-token`` on the head prints it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from vpt_tune.errors import UserError
from vpt_tune.spec import Spec

log = logging.getLogger(__name__)

JOB_PORT = 8265
MLFLOW_PORT = 5000  # the MLflow server cluster/aws.yaml starts on the head
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
AGENT_WAIT_S = 60  # how long a submission waits for a freshly started cluster's job agents


class ClusterError(UserError):
    """A cluster that cannot be reached, launched or used; the message says what to do."""


def is_job_address(address: str) -> bool:
    """Whether ``address`` is a job-submission (dashboard) address rather than a GCS address."""
    return address.startswith(("http://", "https://"))


def auth_token() -> str | None:
    """This machine's Ray token, where Ray looks for it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_FILE).expanduser()
    return path.read_text().strip() if path.is_file() else None


def use_token_auth() -> None:
    """Send this machine's Ray token when joining a cluster by address (Ray only does so when told).

    Ray 2.60 reads the token only with ``RAY_AUTH_MODE=token``, once, when it is first used: call this
    before Ray connects. A cluster without authentication ignores the token.
    """
    if auth_token() and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def _job_client(address: str):
    """A job-submission client that sends the token itself (whatever mode this process's Ray has read)."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)


def join(address: str) -> None:
    """Make this process's search driver join the Ray cluster at ``address`` (``auto`` or ``HOST:PORT``)."""
    if is_job_address(address):
        raise ClusterError(f"--address {address}: a job-submission address is submitted to, not joined")
    if address != "auto":  # Ray itself retries for minutes before giving up on a wrong address
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise ClusterError(
                f"--address {address}: no Ray cluster answers there ({err}); give the head's HOST:PORT "
                "(6379 unless `ray start --port` said otherwise), or auto on the head"
            ) from None
    os.environ["RAY_ADDRESS"] = address
    use_token_auth()


@dataclass(frozen=True)
class Submission:
    """A search submitted as a Ray Job."""

    address: str
    job_id: str
    experiment: str
    mlflow_uri: str


def launcher_config(cluster_yaml: str | Path) -> dict:
    """The Ray cluster launcher config in ``cluster_yaml``, checked enough to say what is wrong."""
    path = Path(cluster_yaml).expanduser()
    if not path.is_file():
        raise ClusterError(f"--cluster {path}: file not found (see cluster/aws.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClusterError(f"--cluster {path}: not valid YAML: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("provider"), dict):
        raise ClusterError(f"--cluster {path}: not a Ray cluster launcher config (no `provider:`)")
    return config


def size_for_cluster(spec: Spec, cluster_yaml: str | Path) -> Spec:
    """``spec`` with ``search.max_concurrent_trials`` set (unless it is) to the trials that the launcher
    config's nodes hold at most once its autoscaler has started them all: a new cluster has no worker
    nodes yet, and only pending trials make the autoscaler start some. Refuses, before any cluster starts,
    a trial whose workers fit on none of the config's node types."""
    config = launcher_config(cluster_yaml)
    if spec.search.max_concurrent_trials:
        return spec
    res = spec.resources
    need = res.per_worker()
    head, workers, types = config.get("head_node_type"), 0, []  # types: (workers each holds, max count)
    for name, node_type in (config.get("available_node_types") or {}).items():
        declared = (node_type or {}).get("resources") or {}
        if not all(kind in declared for kind in need):
            continue  # resources left to Ray to detect (e.g. from an AWS instance type): not counted
        fit = res.workers_on(declared)
        if name == head:
            workers += fit
        else:
            types.append((fit, node_type.get("max_workers", config.get("max_workers", 0))))
    nodes_left = config.get("max_workers", sum(count for _, count in types))  # worker nodes, all types
    for fit, count in sorted(types, reverse=True):  # the roomiest types first
        taken = min(count, nodes_left)
        workers, nodes_left = workers + fit * taken, nodes_left - taken
    trials = workers // res.workers_per_trial
    if trials < 1:
        each = ", ".join(f"{amount:g} {kind}" for kind, amount in need.items())
        raise ClusterError(f"--cluster {cluster_yaml}: no node type declares room for a trial's "
                           f"{res.workers_per_trial} worker(s) of {each} (`resources:` of available_node_types); "
                           "declare them, or set search.max_concurrent_trials")
    log.info("trials at once: %d (what %s's nodes hold at most; set search.max_concurrent_trials to change)",
             trials, cluster_yaml)
    return spec.model_copy(update={"search": spec.search.model_copy(update={"max_concurrent_trials": trials})})


def teardown_command(cluster_yaml: str | Path) -> str:
    """The command that stops the cluster ``launch`` started."""
    if launcher_config(cluster_yaml)["provider"].get("type") == "fake_multinode":
        return "ray stop"  # its nodes are processes on this machine
    return shlex.join(["ray", "down", str(cluster_yaml)])


def launch(cluster_yaml: str | Path) -> str:
    """Bring up (or update) the cluster of a Ray cluster launcher YAML; its job-submission address."""
    path = Path(cluster_yaml).expanduser()
    config = launcher_config(path)
    provider = config["provider"].get("type")
    if provider == "fake_multinode":
        return _start_fake_cluster(path, config)
    if provider == "aws":
        try:
            import boto3  # noqa: F401 - Ray's AWS launcher imports it; a clear line now, not its traceback later
        except ImportError:
            raise ClusterError(f"--cluster {path}: Ray's AWS launcher needs boto3, which is not installed; "
                               "pip install 'vpt-tune[aws]'") from None
    from ray.autoscaler import sdk

    log.info("bringing up the Ray cluster of %s (ray up; minutes on first start)...", path)
    try:
        sdk.create_or_update_cluster(str(path), no_restart=True)
        head = sdk.get_head_node_ip(str(path))
    except Exception as err:  # noqa: BLE001 - the launcher raises many kinds; the user needs the message
        raise ClusterError(f"--cluster {path}: `ray up` failed: {err}; fix the config or your cloud "
                           "credentials, or start the cluster yourself and pass --address") from None
    return f"http://{head}:{JOB_PORT}"


def _start_fake_cluster(path: Path, config: dict) -> str:
    """Start the head of a ``fake_multinode`` config on this machine (or reuse the one running), the way
    Ray starts that provider: ``ray up`` cannot, as its nodes are processes the head's autoscaler starts."""
    address = f"http://127.0.0.1:{JOB_PORT}"
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
        log.info("reusing the Ray cluster running on this machine (%s)", address)
        return address
    except OSError:
        pass
    resources = dict(config["available_node_types"][config["head_node_type"]].get("resources") or {})
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--autoscaling-config={path.resolve()}",
               f"--dashboard-port={JOB_PORT}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--num-cpus={resources.pop('CPU', 0):g}", f"--num-gpus={resources.pop('GPU', 0):g}",
               f"--resources={json.dumps(resources)}"]
    log.info("starting the head of %s on this machine (Ray's fake multi-node provider)...", path)
    done = subprocess.run(command, env={**os.environ, "RAY_FAKE_CLUSTER": "1"}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"--cluster {path}: `ray start --head` failed: {last[0]}; is another Ray running "
                           "here (`ray stop` ends it)?")
    return address


def submit_search(spec: Spec, address: str, name: str | None, storage: str | None, mlflow_uri: str | None,
                  launched: bool = False) -> Submission:
    """Submit a whole search as a Ray Job. Paths must mean the same on the cluster as here: storage and
    data root absolute, MLflow a server (default on a launched cluster: the head's) or an
    absolute sqlite file, since a job's working directory is temporary."""
    storage = storage or spec.storage
    if not _shared(storage):
        raise ClusterError(f"storage: {storage!r} is relative, and a Ray Job's working directory is temporary; "
                           "give an absolute path that every node shares (NFS, EFS: --storage /mnt/vpt/vpt_results)")
    if spec.data.root is not None and not _shared(spec.data.root):
        raise ClusterError(f"data.root: {spec.data.root!r} is relative; give the datasets' absolute path "
                           "on the cluster's nodes")
    head_mlflow = f"http://127.0.0.1:{MLFLOW_PORT}" if launched else None  # the job runs on the head
    mlflow_uri = mlflow_uri or spec.tracking.mlflow_uri or head_mlflow
    if mlflow_uri is None or (mlflow_uri.startswith("sqlite:") and not _shared(mlflow_uri.removeprefix("sqlite:///"))):
        raise ClusterError("tracking.mlflow_uri: a search on a cluster needs an MLflow server (--mlflow-uri "
                           "http://HEAD:5000) or an absolute sqlite:////path/mlflow.db on the head")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec_text = yaml.safe_dump(spec.model_dump(by_alias=True, exclude_none=True))
    argv = ["search", "-", "--name", name, "--storage", storage, "--mlflow-uri", mlflow_uri]
    job_id = submit(address, argv, name, spec_text)
    return Submission(address, job_id, f"{storage.rstrip('/')}/{name}", mlflow_uri)


def submit_resume(address: str, experiment: str, overrides: list[str]) -> Submission:
    """Submit ``vpt-tune resume EXPERIMENT`` (a path on the cluster) as a Ray Job."""
    if not _shared(experiment):
        raise ClusterError(f"{experiment}: give the experiment's absolute path on the cluster")
    argv = ["resume", experiment, *[arg for override in overrides for arg in ("--set", override)]]
    job_id = submit(address, argv, "resume-" + Path(experiment).name)
    return Submission(address, job_id, experiment, "")


def _shared(path: str) -> bool:
    """Whether ``path`` means the same on every machine: absolute, or a URI."""
    return "://" in path or Path(path).expanduser().is_absolute()


def submit(address: str, argv: list[str], name: str, stdin: str | None = None) -> str:
    """Submit ``vpt-tune ARGV`` as a Ray Job (``stdin``: text piped to it, e.g. a spec for ``search -``); the job id.

    The job runs ``python -m vpt_tune.cli`` with the cluster's Python, where vpt-tune must be installed. The
    spec travels in the command line rather than in a ``working_dir``: a job's working directory would be
    shipped to every trial's workers, and the search needs no files but the spec.
    """
    try:
        client = _job_client(address)
    except Exception as err:  # noqa: BLE001 - connection, HTTP and authentication errors alike
        raise ClusterError(
            f"--address {address}: no Ray job server answers ({err}); is the cluster up and the dashboard port "
            f"reachable (`ray dashboard CLUSTER.yaml` forwards it)? With token authentication, put the "
            f"cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
        ) from None
    from vpt_tune.search.driver import RAY_TRAIN_POLL

    command = shlex.join(["python", "-m", "vpt_tune.cli", *argv])
    if stdin is not None:
        command = f"printf %s {shlex.quote(stdin)} | {command}"
    submission_id = f"vpt-tune-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=command,
                submission_id=submission_id,
                runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **RAY_TRAIN_POLL}},
            )
        except RuntimeError as err:  # a cluster that just started: its nodes' job agents are not up yet
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(address: str, job_id: str, echo: Callable[[str], None]) -> str | None:
    """Stream the job's log to ``echo`` until the job ends; its final status, or None on Ctrl-C (which
    stops following, not the job)."""
    client = _job_client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            echo(lines)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        return None
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1)
    return str(status.value)
