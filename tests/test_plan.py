"""`vpt-tune plan`: a search's work from the cost model, its time, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vpt_tune.cost import ViTShape, block_macs, prompted_cost
from vpt_tune.data.benchmarks import BENCHMARKS
from vpt_tune.data.demo import DEMO_SIZES
from vpt_tune.data.tasks import task_size
from vpt_tune.search import plan
from vpt_tune.search.driver import FINAL
from vpt_tune.search.jobs import make_job
from vpt_tune.spec import load_spec, validate

SPEED = plan.Speed(2e12, 5e12, "test")  # a given speed: no calibration in these tests


def _spec(**overrides) -> object:
    raw = {
        "name": "p",
        "backbone": {"model": "vit_base_patch16_224", "weights": "random", "img_size": 224},
        "data": {"root": "/nonexistent/vtab", "tasks": ["cifar100", "kitti"]},
        "space": {"num_prompts": 50, "placement": "deep", "base_lr": 0.1, "weight_decay": {"choice": [0.0, 0.001]}},
        "train": {"epochs": 9, "batch_size": 64},
        "search": {"trials_per_task": 4},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate(raw)


def _plan(spec) -> plan.Plan:
    return plan.make_plan(spec, plan.planned_tasks(spec), at_once=2, speed=SPEED)


def test_one_trials_flops_are_the_cost_model_times_images_times_epochs():
    spec = _spec()
    result = _plan(spec)
    shape = ViTShape.for_model("vit_base_patch16_224", 224)
    forward = prompted_cost(shape, [50] * 12, 100).gflops * 1e9  # cifar100: 100 classes
    cifar = result.tasks[0]
    assert (cifar.task, cifar.trials, cifar.train_images, cifar.eval_images) == ("cifar100", 4, 800, 200)
    one_trial = cifar.search_most * (1 / cifar.trials)
    # deep prompts enter at block 0: backward goes through every block (about a forward), not the patch embedding
    embedding = plan.prefix_macs(shape, 0)
    assert embedding == 196 * 768 * 3 * 16 * 16
    assert math.isclose(one_trial.train_macs, (2 * forward - embedding) * 800 * 9, rel_tol=1e-9)
    assert math.isclose(one_trial.eval_macs, forward * 200 * 9, rel_tol=1e-9)
    assert one_trial.epochs == 9 and cifar.search == cifar.search_most  # no early stopping: expected = most
    assert cifar.final_retrains == 0 and cifar.final.train_macs == 0  # no final.seeds


def test_the_frozen_prefix_is_paid_once_with_the_cache_and_every_epoch_without():
    spec = _spec(space={"placement": "last_k", "depth": 4})
    shape = ViTShape.for_model("vit_base_patch16_224", 224)
    job = make_job(spec, "", {"num_prompts": 50, "placement": "last_k", "depth": 4, "base_lr": 0.1})
    forward = prompted_cost(shape, job.counts(12), 10).gflops * 1e9
    prefix = plan.prefix_macs(shape, 8)
    assert prefix == 196 * 768 * 3 * 256 + 8 * block_macs(197, shape)
    cached = plan.trial_work(job, shape, 10, (800, 200), cached=True)[1]
    uncached = plan.trial_work(job, shape, 10, (800, 200), cached=False)[1]
    assert math.isclose(cached.train_macs, 9 * 800 * 2 * (forward - prefix), rel_tol=1e-9)
    assert math.isclose(cached.eval_macs, 9 * 200 * (forward - prefix) + 1000 * prefix, rel_tol=1e-9)
    assert math.isclose(uncached.train_macs, 9 * 800 * (2 * forward - prefix), rel_tol=1e-9)
    assert math.isclose(uncached.eval_macs, 9 * 200 * forward, rel_tol=1e-9)


def test_early_stopping_expects_asha_rates_and_at_most_every_epoch():
    expected, finishing = plan.reach([1, 3], 9, 3)
    assert math.isclose(expected, 1 + 2 / 3 + 6 / 9) and math.isclose(finishing, 1 / 9)
    assert plan.reach([], 9, 3) == (9, 1)
    spec = _spec(search={"early_stopping": {"rule": "mo_asha", "min_epochs": 1, "reduction_factor": 3}},
                 space={"condensation_ratio": 0.5}, condensation={"epochs": 3})
    task = _plan(spec).tasks[0]
    assert math.isclose(task.search.epochs / task.trials, expected + 3 / 9)  # condensation: finished trials only
    assert task.search_most.epochs / task.trials == 12
    assert task.seconds < task.seconds_most


def test_condensed_epochs_run_at_the_condensed_cost():
    spec = _spec(space={"condensation_ratio": 0.5}, condensation={"epochs": 2}, train={"prefix_cache": False})
    shape = ViTShape.for_model("vit_base_patch16_224", 224)
    task = _plan(spec).tasks[0]
    base, condensed = (prompted_cost(shape, [n] * 12, 100).gflops * 1e9 for n in (50, 25))
    one = task.search_most * (1 / task.trials)
    assert math.isclose(one.eval_macs, 200 * (9 * base + 2 * condensed), rel_tol=1e-9)


def test_final_retrains_are_the_expected_front_times_seeds_on_the_final_splits():
    assert plan.expected_front(1) == 1 and math.isclose(plan.expected_front(2), 1.75)
    assert plan.expected_front(8) < 8
    spec = _spec(final={"seeds": [1, 2, 3]})
    task = _plan(spec).tasks[1]  # kitti: 1000 final training images, 711 test images
    assert task.task == "kitti" and math.isclose(task.final_retrains, 3 * plan.expected_front(4))
    final_job = make_job(spec, "", {FINAL: {"num_prompts": 50, "placement": "deep", "base_lr": 0.1, "seed": 1}})
    assert not final_job.evaluate_every_epoch and final_job.eval_split == "test"
    one = task.final * (1 / task.final_retrains)
    shape = ViTShape.for_model("vit_base_patch16_224", 224)
    forward = prompted_cost(shape, [50] * 12, 4).gflops * 1e9
    assert math.isclose(one.train_macs, (2 * forward - plan.prefix_macs(shape, 0)) * 1000 * 9, rel_tol=1e-9)
    assert math.isclose(one.eval_macs, forward * 711, rel_tol=1e-9)  # tested once, after training


def test_time_is_the_work_over_the_speed_plus_start_up_spread_over_the_trials_at_once():
    spec = _spec()
    result = _plan(spec)
    task = result.tasks[0]
    work = task.search
    assert math.isclose(task.seconds, work.train_macs / 2e12 + work.eval_macs / 5e12 + 4 * plan.SLOT_TRIAL_OVERHEAD_S)
    expected = result.wall_seconds[0]  # the slots start once, then each trial pays its hand-over
    assert math.isclose(expected, sum(t.seconds for t in result.tasks) / 2 + plan.SLOT_START_S + plan.SEARCH_OVERHEAD_S)
    own_runs = _plan(_spec(resources={"slots": False}))  # a Ray Train run per trial: its start-up every trial
    assert math.isclose(own_runs.tasks[0].seconds - task.seconds, 4 * (plan.TRIAL_OVERHEAD_S - plan.SLOT_TRIAL_OVERHEAD_S))
    assert math.isclose(own_runs.wall_seconds[0] - expected, (own_runs.tasks[0].seconds - task.seconds
                                                              + own_runs.tasks[1].seconds - result.tasks[1].seconds) / 2
                        - plan.SLOT_START_S)
    assert result.device == "CPU" and result.device_hours[0] == sum(t.seconds for t in result.tasks) / 3600


def test_trials_at_once_follow_the_resources():
    gpu = _spec(resources={"gpus_per_worker": 0.25, "workers_per_trial": 2})
    assert plan.trials_at_once(gpu, {"CPU": 64, "GPU": 4}) == 8
    assert plan.trials_at_once(_spec(resources={"cpus_per_worker": 2}), {"CPU": 7}) == 3
    assert plan.trials_at_once(_spec(search={"max_concurrent_trials": 5}), {"CPU": 1}) == 5
    assert plan.trials_at_once(gpu, {"CPU": 8}) == 0
    assert plan.trials_at_once(_spec(resources={"gpus_per_worker": "auto"}), {"CPU": 16, "GPU": 2}) == 2


def test_a_stated_gpu_speed_comes_from_its_peak_and_an_unknown_gpu_is_refused():
    speed = plan.stated_speed("a100", workers=2)
    assert speed.train_macs_per_s == 312e12 / 2 * plan.GPU_UTILISATION * 2 and "a100" in speed.source
    with pytest.raises(Exception, match="--gpu v100: .*a10g"):
        plan.stated_speed("v100", 1)


def test_sizes_come_from_the_folder_when_there_is_one(tmp_path):
    bench = BENCHMARKS["vtab-1k"]
    assert set(bench.sizes) == set(bench.tasks) and set(BENCHMARKS["fgvc"].sizes) == set(BENCHMARKS["fgvc"].tasks)
    from vpt_tune.data.demo import materialise

    digits = materialise("digits", tmp_path)
    counted = task_size("vtab-1k", "digits", digits)
    assert counted.classes == 10 and counted.images == DEMO_SIZES["digits"]  # the demo's stated sizes hold
    assert task_size("vtab-1k", "pets", None).images["test"] == 3669  # an alias, not downloaded
    with pytest.raises(Exception, match="my_task.*no folder"):
        task_size("vtab-1k", "my_task", None)


def test_a_measured_plan_of_the_demo_fits_the_terminal():
    spec = load_spec("demo")
    result = plan.make_plan(spec, plan.planned_tasks(spec), at_once=2)
    assert result.speed.source.startswith("measured on cpu") and result.speed.train_macs_per_s > 0
    lines = plan.plan_lines(result)
    assert all(len(line) < 100 for line in lines), lines
    assert lines[2].split()[:2] == ["digits", "10"]  # 8 trials and 2 reference points


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "vpt_tune.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)


def test_plan_of_vtab_pc_before_its_data_exists(monkeypatch):
    monkeypatch.delenv("VTAB_ROOT", raising=False)
    result = _cli("plan", "search_spaces/vtab_pc.yaml", "--cluster", "cluster/aws.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["tasks"]) == 19 and data["trials"] == 19 * 32 and data["at_once"] == 8
    assert data["device"] == "GPU" and 0 < data["gpu_hours"] < data["gpu_hours_most"]
    table = _cli("plan", "search_spaces/vtab_pc.yaml")
    assert table.returncode == 0 and "published split sizes" in table.stdout and "GPU-hours" in table.stdout


def test_plan_of_auto_gpus_here_without_gpus_is_a_cpu_plan():
    result = _cli("plan", "demo", "--set", "resources.gpus_per_worker=auto")
    assert result.returncode == 0, result.stderr
    assert "auto: no GPUs here, the trials train on CPU" in result.stdout and "CPU-hours" in result.stdout


def test_plan_bad_input_is_one_line_and_exit_2():
    result = _cli("plan", "demo", "--gpu", "v100")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--gpu v100" in result.stderr
    result = _cli("plan", "demo", "--set", "data.tasks=[mnist]")
    assert result.returncode == 2 and "mnist" in result.stderr and "data.root" in result.stderr


def test_reference_points_count_as_trials_and_retrains():
    plain = _plan(_spec(final={"seeds": [0, 1]})).tasks[0]
    spec = _spec(final={"seeds": [0, 1]}, search={"trials_per_task": 4, "references": ["linear", "full"]},
                 linear={"base_lrs": [0.1, 1.0]}, full={"base_lrs": [0.001]})
    task = _plan(spec).tasks[0]
    assert task.trials == plain.trials + 3 and task.final_retrains == pytest.approx(plain.final_retrains + 2 * 2)
    assert task.search.train_macs > plain.search.train_macs and task.seconds > plain.seconds
