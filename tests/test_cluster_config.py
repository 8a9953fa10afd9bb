"""cluster/aws.yaml against Ray's own cluster-config schema, and the KubeRay RayJob example (offline)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
DRIVER = "vpt_driver"
SHARED = "/mnt/vpt"  # the shared file system, at this path on every node


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _check(config: dict) -> dict:
    """What `ray up` does before touching AWS: fill in defaults, then validate (raises if invalid)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _workers(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_aws_config_passes_ray_validation():
    prepared = _check(_aws())
    assert prepared["provider"]["type"] == "aws"


def _misspelled_key(c):
    c["head_start_ray_comands"] = c.pop("head_start_ray_commands")


def _no_node_config(c):
    del c["available_node_types"]["gpu"]["node_config"]


def _unknown_head(c):
    c["head_node_type"] = "cpu_head"


def _fractional_resource(c):
    c["available_node_types"]["head"]["resources"][DRIVER] = 0.5


@pytest.mark.parametrize(
    "break_it, error",
    [
        (_misspelled_key, jsonschema.ValidationError),
        (_no_node_config, jsonschema.ValidationError),
        (_fractional_resource, jsonschema.ValidationError),
        (_unknown_head, ValueError),
    ],
)
def test_broken_aws_config_fails_validation(break_it, error):
    config = _aws()
    break_it(config)
    with pytest.raises(error):
        _check(config)


def test_head_carries_the_driver_resource_and_keeps_its_cpus():
    config = _aws()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"][DRIVER] >= 1
    assert head["resources"].get("CPU", 1) > 0  # CPUs detected from the instance type, left to the drivers
    assert head.get("min_workers", 0) == 0 and "InstanceMarketOptions" not in head["node_config"]


def test_gpu_workers_have_gpus_and_no_driver_resource():
    config = _aws()
    workers = _workers(config)
    assert workers
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] >= 1
        assert DRIVER not in node_type["resources"]
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1


def test_token_auth_and_services():
    config = _aws()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "mlflow server --host 0.0.0.0 --port 5000" in head_start
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in worker_start


def _commands_run_on(prepared: dict, node_type: str) -> list[str]:
    """The commands `ray up` (head) or the autoscaler (workers) runs on a node of ``node_type`` before
    Ray starts: initialization commands, then setup commands (already merged by prepare_config), each
    replaced by the node type's own list where it has one."""
    own = prepared["available_node_types"][node_type]
    if node_type == prepared["head_node_type"]:
        return prepared["initialization_commands"] + prepared["head_setup_commands"]
    return own.get("initialization_commands", prepared["initialization_commands"]) + own.get(
        "worker_setup_commands", prepared["worker_setup_commands"])


def test_every_node_mounts_the_shared_file_system():
    prepared = _check(_aws())
    for node_type in prepared["available_node_types"]:
        commands = _commands_run_on(prepared, node_type)
        mounts = [c for c in commands if re.search(rf"mount -t nfs4 .*:/ {SHARED}(\s|\)|$)", c)]
        assert mounts, f"{node_type}: no command mounts the shared file system at {SHARED}"
        assert all(c.startswith(f"mountpoint -q {SHARED} ||") for c in mounts)  # skipped when mounted


def test_state_lives_on_the_shared_file_system():
    config = _aws()
    head_start = " ".join(config["head_start_ray_commands"])
    assert f"--backend-store-uri sqlite:///{SHARED}/" in head_start
    assert f"--artifacts-destination {SHARED}/" in head_start
    text = (CLUSTER / "aws.yaml").read_text()
    assert re.search(rf"storage: {SHARED}/vpt_results\b", text)
    assert not re.search(r"storage:\s*s3://", text)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_aws_commands_are_valid_bash():
    config = _aws()
    keys = [k for k in config if k.endswith("_commands")]
    for key in keys:
        for command in config[key]:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command}\n{result.stderr}"


def test_readme_uses_shared_storage_not_uris():
    readme = (CLUSTER / "README.md").read_text()
    multi_machine = "\n".join(line for line in readme.splitlines() if "cluster/local.yaml" not in line)  # one machine
    storages = re.findall(r"--storage\s+(\S+)", multi_machine)
    assert storages and all(s.startswith(f"{SHARED}/") for s in storages), storages
    assert not re.search(r"--storage\s+\S*://", readme)
    resumes = re.findall(r"vpt-tune resume\s+(\S+)", readme)
    assert resumes and all(r.startswith(f"{SHARED}/") or r == "..." for r in resumes), resumes
    assert "Experiment storage on object stores (s3://) is not supported yet: use a shared file system." in readme


def test_driver_resource_name_matches_the_code():
    from vpt_tune.search.driver import DRIVER_RESOURCE

    assert DRIVER_RESOURCE == DRIVER


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("vpt-tune search /specs/") and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head_resources = json.loads(json.loads(cluster["headGroupSpec"]["rayStartParams"]["resources"]))
    assert head_resources[DRIVER] >= 1
    for group in cluster["workerGroupSpecs"]:
        assert DRIVER not in group["rayStartParams"].get("resources", "")
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_kuberay_storage_is_one_shared_volume_on_every_pod():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    (storage,) = re.findall(r"--storage\s+(\S+)", job["spec"]["entrypoint"])
    assert storage.startswith(f"{SHARED}/")
    cluster = job["spec"]["rayClusterSpec"]
    claims = set()
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED]
        assert not mount.get("readOnly")
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1  # the same claim everywhere (ReadWriteMany)


def test_aws_launch_without_boto3_names_the_extra(tmp_path, monkeypatch, capsys):
    """`vpt-tune search --cluster cluster/aws.yaml` on a plain install: one line naming the extra, exit 2,
    nothing started or written."""
    import sys

    from vpt_tune.cli import main

    monkeypatch.setitem(sys.modules, "boto3", None)  # as on an install without the aws extra
    monkeypatch.chdir(tmp_path)
    assert main(["search", "demo", "--cluster", str(CLUSTER / "aws.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Ray's AWS launcher needs boto3" in err and "pip install 'vpt-tune[aws]'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_local_config_is_a_valid_fake_multinode_cluster():
    """cluster/local.yaml passes Ray's schema; its head holds no CPUs (Train workers go to autoscaled nodes)
    but the driver resource, as aws.yaml's head does. (`ray up`'s own preparation cannot read this
    provider's defaults in Ray 2.60: vpt-tune starts its head with `ray start`, see test_cluster.py.)"""
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"][DRIVER] > 0
    assert all(t["resources"]["CPU"] >= 1 and DRIVER not in t["resources"] for t in _workers(config).values())


@pytest.mark.parametrize("config, resources, trials", [
    ("aws.yaml", {"cpus_per_worker": 4, "gpus_per_worker": 1}, 8),  # 8 g5.xlarge, a trial each; the head: none
    ("aws.yaml", {"cpus_per_worker": 2, "gpus_per_worker": 0.5}, 16),  # two trials share a GPU worker
    ("aws.yaml", {"cpus_per_worker": 1, "gpus_per_worker": 1, "workers_per_trial": 2}, 4),  # DDP over 2 nodes
    ("local.yaml", {"cpus_per_worker": 1}, 2),  # two 1-CPU fake workers; the head has no CPUs
    ("local.yaml", {"cpus_per_worker": 0.1}, 20),  # ten a node, in Ray's units (1 // 0.1 == 9 in floats)
])
def test_a_launched_cluster_runs_as_many_trials_as_its_largest_size_holds(config, resources, trials):
    """A new cluster has no worker nodes yet: `--cluster` sets search.max_concurrent_trials from the launcher
    config's node types (their declared resources x max_workers), unless the spec sets it."""
    from vpt_tune.cluster import size_for_cluster
    from vpt_tune.spec import load_spec

    spec = load_spec("demo", [f"resources.{key}={value}" for key, value in resources.items()])
    assert size_for_cluster(spec, CLUSTER / config).search.max_concurrent_trials == trials
    chosen = spec.model_copy(update={"search": spec.search.model_copy(update={"max_concurrent_trials": 3})})
    assert size_for_cluster(chosen, CLUSTER / config).search.max_concurrent_trials == 3


def test_a_trial_no_node_type_holds_is_refused_before_the_cluster_starts(tmp_path, monkeypatch, capsys):
    from vpt_tune.cli import main

    monkeypatch.chdir(tmp_path)
    local = str(CLUSTER / "local.yaml")
    assert main(["search", "demo", "--cluster", local, "--set", "resources.cpus_per_worker=2"]) == 2
    err = capsys.readouterr().err
    assert "no node type declares room for a trial's 1 worker(s) of 2 CPU" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_search_prints_the_teardown_of_its_cluster():
    from vpt_tune.cluster import teardown_command

    assert teardown_command(CLUSTER / "aws.yaml") == f"ray down {CLUSTER / 'aws.yaml'}"
    assert teardown_command(CLUSTER / "local.yaml") == "ray stop"
