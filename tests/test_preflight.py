"""The checks a search runs before Ray starts or anything is written: weights files, MLflow URIs,
resources against the nodes, experiment names (issue 12). test_bad_input runs them through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vpt_tune.models.backbone import ModelError, check_weights, create_backbone
from vpt_tune.search import runner
from vpt_tune.search.runner import check_resources, check_tracking, experiment_dir_of
from vpt_tune.spec import SpecError, validate
from test_search import small_spec

MODEL = "vit_tiny_patch16_224"


def spec_of(tmp_path: Path, **resources):
    return validate(small_spec(tmp_path, resources=resources))


def test_weights_of_the_model_pass_and_load(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model(MODEL, num_classes=0).state_dict(), path)
    check_weights(MODEL, path)
    torch.save({"model": timm.create_model(MODEL, num_classes=0).state_dict()}, tmp_path / "ckpt.pth")
    check_weights(MODEL, tmp_path / "ckpt.pth")  # a training checkpoint wrapping the state dict


@pytest.mark.parametrize("content, expect", [
    ({"cls_token": torch.zeros(1, 1, 384)}, "mis-shaped cls_token [1, 1, 384] (model: [1, 1, 192])"),
    ({"epoch": 3}, "holds values that are not tensors (epoch)"),
    ((torch.zeros(1),), "holds a Python tuple, not a state dict"),
])
def test_weights_that_do_not_fit_are_refused(tmp_path, content, expect):
    path = tmp_path / "vit.pth"
    torch.save(content, path)
    with pytest.raises(ModelError, match="vit.pth: ") as err:
        check_weights(MODEL, path)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_trials_load_through_the_same_check(tmp_path):
    """A trial building the backbone gets the one-line error too, not a load_state_dict traceback."""
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), path)
    with pytest.raises(ModelError, match=f"does not fit {MODEL} \\(mis-shaped cls_token"):
        create_backbone(MODEL, path, 32)


def test_a_python_object_in_a_torch_file_names_the_global(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"args": Path("x")}, path)
    with pytest.raises(ModelError, match=r"not a readable torch \(weights_only=True\) file \(UnpicklingError: "
                                            r"Unsupported global: GLOBAL pathlib.PosixPath"):
        check_weights(MODEL, path)


@pytest.mark.parametrize("uri", ["mlruns", "/abs/mlruns", "file:///abs/mlruns"])
def test_file_stores_are_refused_unless_mlflow_allows_them(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(SpecError, match="is a file store .* MLflow 3 refuses; use a sqlite file"):
        check_tracking(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking(uri)


def test_tracking_schemes(tmp_path):
    with pytest.raises(SpecError, match="use a sqlite file \\(sqlite:///mlflow.db\\)"):
        check_tracking("mlflow.db")
    with pytest.raises(SpecError, match="MLflow has no tracking store for htp://"):
        check_tracking("htp://localhost:5000")
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    check_tracking("postgresql+psycopg2://user@db/mlflow")  # a database URL: MLflow connects later


def test_resources_per_worker_and_per_trial(tmp_path):
    machine = [{"CPU": 2.0}]
    with pytest.raises(SpecError, match="resources.cpus_per_worker: a worker asks for 64 CPUs but this machine "
                                        "has 2 .*; set resources.cpus_per_worker: 2 or less"):
        check_resources(spec_of(tmp_path, cpus_per_worker=64), machine, cluster=False)
    with pytest.raises(SpecError, match="resources.workers_per_trial: 8 workers of 1 CPU each do not fit on this "
                                        "machine \\(2 CPU: 2 at once\\); set workers_per_trial: 2 or less"):
        check_resources(spec_of(tmp_path, workers_per_trial=8), machine, cluster=False)
    check_resources(spec_of(tmp_path, workers_per_trial=10, cpus_per_worker=0.1), [{"CPU": 1.0}], cluster=False)


def test_resources_on_a_cluster_fit_each_worker_on_one_node(tmp_path):
    nodes = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    check_resources(spec_of(tmp_path, workers_per_trial=2, cpus_per_worker=4, gpus_per_worker=1), nodes, cluster=True)
    with pytest.raises(SpecError, match="cpus_per_worker: a worker asks for 12 CPUs but the largest node of the "
                                        "Ray cluster has 8"):
        check_resources(spec_of(tmp_path, cpus_per_worker=12), nodes, cluster=True)
    with pytest.raises(SpecError, match="gpus_per_worker: a worker asks for 2 GPUs but the largest node"):
        check_resources(spec_of(tmp_path, gpus_per_worker=2), nodes, cluster=True)
    with pytest.raises(SpecError, match="3 workers of 4 CPU, 1 GPU each do not fit on the Ray cluster "
                                        "\\(20 CPU, 2 GPU: 2 at once\\)"):
        check_resources(spec_of(tmp_path, workers_per_trial=3, cpus_per_worker=4, gpus_per_worker=1), nodes,
                        cluster=True)


def test_cluster_resources_are_checked_before_the_tracker(tmp_path, monkeypatch):
    """On a cluster the nodes are known once joined: still refused before mlflow.db or the experiment dir."""
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 16.0})
    monkeypatch.setattr(runner.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0}},
                                                       {"Alive": False, "Resources": {"CPU": 64.0}}])
    monkeypatch.setattr(runner, "task_dirs", lambda spec: {})
    monkeypatch.setattr(os, "environ", os.environ.copy())  # _run sets Ray's variables for the search
    spec = spec_of(tmp_path, cpus_per_worker=12)
    with pytest.raises(SpecError, match="cpus_per_worker: a worker asks for 12 CPUs but the largest node"):
        runner.run_search(spec, name="cluster")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".", "", "tab\there", "new\n"])
def test_names_that_are_not_one_folder_are_refused(tmp_path, name):
    with pytest.raises(SpecError, match="an experiment name is one folder name"):
        experiment_dir_of(spec_of(tmp_path), name, None)


def test_a_name_linking_outside_storage_is_refused(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gone").symlink_to(tmp_path / "nowhere")  # dangling: mkdir would follow it
    with pytest.raises(SpecError, match="is a link to .*nowhere, outside the storage folder"):
        experiment_dir_of(spec_of(tmp_path), "gone", None)
    assert experiment_dir_of(spec_of(tmp_path), "v1.2_run-3", None) == tmp_path / "results" / "v1.2_run-3"
