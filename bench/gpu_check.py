"""The GPU path in one command: is it correct, how fast is it, and how many trials does a GPU hold.

    python bench/gpu_check.py [--cpu]

1. Correctness: ``pytest -m cuda tests/test_gpu.py`` (bf16 autocast against fp32, every SDPA backend with
   VPT and E²VPT prompts at odd lengths, the prefix cache on the device, condensation and pruning scores,
   a checkpoint from the device loaded on the CPU and back).
2. Speed: ``bench/step.py``'s prompted/bare step ratio and images/s, ViT-B/16 at 224 px, batch 64 and
   128, bf16, for 10/50/200 deep prompts, with fused and plain attention (the faster one per device).
3. A real search on the GPU: a VTAB-layout task of generated 224-px images, ViT-B/16 (random weights:
   nothing from the internet), 8 trials packed on the GPU (``gpus_per_worker: auto``) and the same 8
   trials one per GPU, one after the other; GPU utilisation sampled with nvidia-smi during each, a
   trial's peak memory from the packing probe, trials per GPU-hour.

Without a GPU (or with ``--cpu``) it runs a reduced mode on the CPU: every test that has a CPU path,
a small model's step speed, a two-trial search; it lists what it skipped. Prints tables and, last,
one line of JSON; exits 1 when a correctness check fails. About 6 minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from step import measure

from vpt_tune.cli import log_to_terminal
from vpt_tune.search import runner
from vpt_tune.search.packing import largest_counts, trials_per_gpu
from vpt_tune.spec import validate
from vpt_tune.train.probe import probe_memory

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def correctness() -> dict:
    """Run the ``cuda`` tests; their counts, skip reasons and whether all that ran passed."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", result.stdout)}
    skipped = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", result.stdout)))
    if result.returncode not in (0, 5):
        print(result.stdout[-4000:])
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "skip_reasons": skipped, "ok": result.returncode == 0,
            "seconds": round(time.monotonic() - started, 1)}


def speed(device: torch.device, full: bool) -> list[dict]:
    """Step times of the bare and the prompted model for each batch, prompt count and attention path."""
    model, size, batches, prompts = (("vit_base_patch16_224", 224, (64, 128), (10, 50, 200)) if full
                                     else ("vit_small_patch14_dinov2", 56, (8,), (10, 50)))
    rows = []
    for batch in batches:
        for count in prompts:
            results = measure(model, size, count, batch, repeats=5 if full else 3, device=device)
            for attention, r in results.items():
                rows.append({"batch": batch, "prompts": count, "attention": attention,
                             "ratio": r["prompted"] / r["bare"], "images_per_s": batch / r["prompted"]})
    return rows


def generated_task(root: Path, img_size: int, sizes: dict[str, int], classes: int = 4) -> Path:
    """A VTAB-1k-layout task of generated images: class c is a bright band at height c over noise."""
    task = root / "bands"
    (task / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    index = 0
    for split in ("train800", "val200", "test"):
        lines = []
        for i in range(sizes[split]):
            label = i % classes
            pixels = rng.integers(0, 120, (img_size, img_size, 3), dtype=np.uint8)
            band = img_size // classes
            pixels[label * band:(label + 1) * band] += 120
            Image.fromarray(pixels).save(task / "images" / f"{index}.png")
            lines.append(f"images/{index}.png {label}")
            index += 1
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    train, val = (task / "train800.txt").read_text(), (task / "val200.txt").read_text()
    (task / "train800val200.txt").write_text(train + val)
    return task


class GpuSampler:
    """Samples GPU utilisation and memory with ``nvidia-smi`` every half second while in a ``with`` block."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False).stdout
            for line in out.strip().splitlines()[:1]:
                util, memory = (float(v) for v in line.split(","))
                self.samples.append((util, memory))

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean": float(np.mean(util)), "gpu_util_median": float(np.median(util)),
                "gpu_memory_peak_gib": max(m for _, m in self.samples) / 1024}


def search(task_root: Path, gpus, full: bool, trials: int, tmp: Path, label: str) -> dict:
    """One real search on the generated task; wall time, trials per GPU-hour and GPU utilisation."""
    spec = validate({
        "name": f"gpu-check-{label}",
        "backbone": ({"model": "vit_base_patch16_224", "weights": "random", "img_size": 224} if full
                     else {"model": "vit_tiny_patch16_224", "weights": "random", "img_size": 32}),
        "data": {"root": str(task_root), "tasks": ["bands"]},
        "space": {"num_prompts": {"choice": [10, 50]}, "placement": "deep",
                  "base_lr": {"float": [0.05, 1.0], "log": True}},
        "train": {"epochs": 1, "batch_size": 64 if full else 16, "warmup_epochs": 0, "reuse_base": False},
        "search": {"sampler": "random", "trials_per_task": trials},
        "resources": {"cpus_per_worker": 1, "gpus_per_worker": gpus},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow-{label}.db"},
        "storage": str(tmp / "results"),
    })
    sampler = GpuSampler() if torch.cuda.is_available() else None
    started = time.monotonic()
    if sampler:
        with sampler:
            table = runner.run_search(spec, name=label).table
    else:
        table = runner.run_search(spec, name=label).table
    wall = time.monotonic() - started
    import ray

    ray.shutdown()  # each search starts its own Ray (the packed one decides its share there)
    finished = int((table["status"] == "finished").sum()) if "status" in table else len(table)
    gpu_hours = wall / 3600 * max(1, torch.cuda.device_count())
    return {"label": label, "trials": len(table), "finished": finished, "wall_s": wall,
            "trials_per_gpu_hour": finished / gpu_hours if torch.cuda.is_available() else None,
            "mean_train_s": float(table["train_seconds"].mean()), **(sampler.summary() if sampler else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU mode even where a GPU is present")
    args = parser.parse_args()
    full = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if full else "cpu")
    skipped = [] if full else ["the cuda tests' CUDA runs (their CPU runs ran)",
                               "ViT-B/16 224-px step speed (a small model on CPU)",
                               "GPU utilisation and memory sampling", "packed vs one-trial-per-GPU search"]
    report: dict = {"device": torch.cuda.get_device_name() if full else "cpu", "mode": "gpu" if full else "cpu"}

    report["correctness"] = correctness()
    c = report["correctness"]
    print(f"\ncorrectness (pytest -m cuda): {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped "
          f"({c['seconds']} s)")
    for reason in c["skip_reasons"]:
        print(f"  skipped: {reason}")

    rows = speed(device, full)
    report["speed"] = rows
    print(f"\n{'batch':>6} {'prompts':>8} {'attention':>10} {'prompted/bare':>14} {'images/s':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['prompts']:>8} {r['attention']:>10} {r['ratio']:>14.3f} {r['images_per_s']:>10.1f}")
    faster = {}
    for r in rows:
        key = (r["batch"], r["prompts"])
        if key not in faster or r["images_per_s"] > faster[key][1]:
            faster[key] = (r["attention"], r["images_per_s"])
    report["faster_attention"] = sorted({name for name, _ in faster.values()})
    print(f"faster attention here: {', '.join(report['faster_attention'])}")

    log_to_terminal()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        sizes = {"train800": 400, "val200": 100, "test": 100} if full else {"train800": 48, "val200": 16, "test": 16}
        task = generated_task(tmp / "data", 224 if full else 32, sizes)
        searches = []
        if full:
            spec_like = validate({"name": "probe", "backbone": {"model": "vit_base_patch16_224", "weights": "random",
                                                              "img_size": 224},
                                  "space": {"num_prompts": {"choice": [10, 50]}, "placement": "deep", "base_lr": 0.1}})
            probe = probe_memory("vit_base_patch16_224", 224, largest_counts(spec_like), 4, 64)
            torch.cuda.empty_cache()  # the searches' trials need the memory
            report["probe"] = {"peak_gib": probe.peak_bytes / GIB, "total_gib": probe.total_bytes / GIB,
                               "images_per_s": probe.images_per_s, "trials_per_gpu": trials_per_gpu(probe)}
            print(f"\none trial's peak memory {probe.peak_bytes / GIB:.2f} GiB of {probe.total_bytes / GIB:.0f} GiB; "
                  f"throughput at k trials' batches {probe.images_per_s}; auto packs {trials_per_gpu(probe)}")
            searches.append(search(task.parent, "auto", full, 8, tmp, "packed"))
            searches.append(search(task.parent, 1, full, 8, tmp, "one-per-gpu"))
        else:
            searches.append(search(task.parent, "auto", full, 2, tmp, "cpu"))
    report["searches"] = searches
    print(f"\n{'search':<12} {'trials':>7} {'finished':>9} {'wall s':>8} {'trials/GPU-h':>13} {'GPU util %':>11} "
          f"{'GPU mem GiB':>12}")
    for s in searches:
        per_hour = f"{s['trials_per_gpu_hour']:.0f}" if s["trials_per_gpu_hour"] else "-"
        util = f"{s['gpu_util_mean']:.0f}" if "gpu_util_mean" in s else "-"
        memory = f"{s['gpu_memory_peak_gib']:.1f}" if "gpu_memory_peak_gib" in s else "-"
        print(f"{s['label']:<12} {s['trials']:>7} {s['finished']:>9} {s['wall_s']:>8.0f} {per_hour:>13} {util:>11} "
              f"{memory:>12}")
    if len(searches) == 2 and all(s["trials_per_gpu_hour"] for s in searches):
        report["packed_over_one_per_gpu"] = searches[0]["trials_per_gpu_hour"] / searches[1]["trials_per_gpu_hour"]
        print(f"packed / one per GPU, trials per GPU-hour: {report['packed_over_one_per_gpu']:.2f}")
    search_ok = all(s["finished"] == s["trials"] for s in searches)
    report["skipped"] = skipped
    for part in skipped:
        print(f"skipped on CPU: {part}")
    report["ok"] = c["ok"] and search_ok
    print(json.dumps(report, default=float))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
