"""`resources.gpus_per_worker: auto`: trials per GPU from simulated memory figures, and the out-of-memory
message (no GPU needed)."""

from __future__ import annotations

import pytest

from vpt_tune.search import packing
from vpt_tune.spec import SpecError, validate
from vpt_tune.train.probe import MemoryProbe, out_of_memory_message

GIB = 1024**3


def _probe(total_gib: float, peak_gib: float, rates: dict[int, float]) -> MemoryProbe:
    return MemoryProbe(int(total_gib * GIB), int(peak_gib * GIB), rates)


def test_memory_bounds_the_trials_per_gpu():
    rising = {1: 100.0, 2: 190.0, 4: 350.0, 8: 600.0, 16: 900.0}
    # 80 GiB, 10 % kept free: 72 GiB for trials of 9.4 GiB + a 0.6 GiB CUDA context each -> 7
    assert packing.trials_per_gpu(_probe(80, 9.4, rising), context_bytes=int(0.6 * GIB)) == 7
    assert packing.trials_per_gpu(_probe(24, 30, rising)) == 1  # does not even fit once: one, and its error says so


def test_throughput_that_stops_rising_caps_the_trials_per_gpu():
    assert packing.trials_per_gpu(_probe(80, 1, {1: 100.0, 2: 190.0, 4: 200.0, 8: 400.0})) == 2  # +5 % at 4
    assert packing.trials_per_gpu(_probe(80, 1, {1: 100.0, 2: 105.0})) == 1  # one trial already fills the SMs
    assert packing.trials_per_gpu(_probe(80, 1, {1: 100.0})) == 1


@pytest.mark.parametrize("trials", [1, 2, 3, 6, 7])
def test_a_gpu_share_adds_up_to_at_most_one_gpu_in_rays_units(trials):
    share = packing.gpu_share(trials)
    assert round(share * 10_000) * trials <= 10_000 and 1 / share < trials + 1
    assert packing.gpu_share(1) == 1.0 and packing.gpu_share(3) == 0.3333


def _spec(gpus):
    return validate({"name": "p", "backbone": {"weights": "random"}, "resources": {"gpus_per_worker": gpus},
                     "space": {"num_prompts": {"choice": [4, 16]}, "placement": "deep", "base_lr": 0.1}})


def test_auto_is_decided_from_the_probe_and_is_cpu_without_gpus():
    calls = []

    def probe(spec):
        calls.append(spec)
        return _probe(24, 4.4, {1: 100.0, 2: 180.0, 4: 300.0})

    assert packing.resolve_gpus(_spec("auto"), 0, probe).resources.gpus_per_worker == 0.0 and not calls
    assert packing.resolve_gpus(_spec("auto"), 2, probe).resources.gpus_per_worker == 0.25  # 21.6 GiB / 5 GiB: 4
    assert packing.resolve_gpus(_spec(0.5), 2, probe).resources.gpus_per_worker == 0.5 and len(calls) == 1
    # a cluster with no GPU node up yet: the probe asks for one (its autoscaler may start it), not CPU
    assert packing.resolve_gpus(_spec("auto"), 0, probe, cluster=True).resources.gpus_per_worker == 0.25
    assert packing.largest_counts(_spec("auto")) == [16] * 12  # the probe measures the most prompts


def test_gpus_per_worker_takes_a_number_or_auto():
    assert _spec("auto").resources.gpus == 0.0 and _spec(0.5).resources.gpus == 0.5
    with pytest.raises(SpecError, match="resources.gpus_per_worker"):
        _spec("many")


def test_out_of_memory_says_what_to_set():
    shared = out_of_memory_message(int(7.5 * GIB), 24 * GIB, 0.25, 64)
    assert "7.5 GiB" in shared and "0.25 of a 24 GiB GPU" in shared
    assert "resources.gpus_per_worker: 0.3333" in shared and "train.batch_size (now 64)" in shared
    assert "gpus_per_worker: 1 " in out_of_memory_message(GIB, 24 * GIB, 0.5, 64)
    whole = out_of_memory_message(30 * GIB, 24 * GIB, 1.0, 128)
    assert "gpus_per_worker" not in whole and "lower train.batch_size (now 128)" in whole
