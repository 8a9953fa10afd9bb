"""The papers' comparison on the demo: VPT with T prompts, VPT trained directly with the condensed
count, Prompt Condensation from T to that count, E²VPT (without pruning, and pruned with the authors'
and with our scoring and rewind: ``e2vpt.prune_scoring``), SPT init, VFPT and CVPT with the condensed
count, and the reference points: linear probe, SSF and full fine-tuning (each at the middle lr of its
default grid, the prompt methods at ``--base-lr``).

Every method trains the same demo backbone on the same demo task for the same total number of
epochs (PC: training + condensation fine-tuning; E²VPT pruning: training + retraining), over
several seeds; the table gives mean ± std of val accuracy, the prompt tokens and GFLOPs of the final
model. Runs :func:`vpt_tune.train.job.run` directly (no Ray), one run at a time.

    python bench/methods.py [--prompts 16] [--keep 4] [--epochs 3] [--seeds 0 1 2] [--task digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vpt_tune.data.cache import cache_dir
from vpt_tune.data.demo import materialise
from vpt_tune.methods import METHODS
from vpt_tune.train.job import Job, run

CPU = torch.device("cpu")


def methods(prompts: int, keep: int, epochs: int) -> dict[str, dict]:
    """Method name -> (trial params, job fields); every method totals ``epochs`` epochs."""
    ratio = 1 - keep / prompts
    pruned = {"num_prompts": prompts, "kv_prompts": keep, "token_prune_ratio": ratio, "segment_prune_ratio": 0.25}
    return {
        f"VPT T={prompts}": ({"num_prompts": prompts}, {}),
        f"VPT T={keep}": ({"num_prompts": keep}, {}),
        f"PC {prompts}->{keep}": (
            {"num_prompts": prompts, "condensation_ratio": ratio}, {"epochs": epochs - 1, "options": {"condensation": {"epochs": 1}}}),
        f"SPT init T={keep}": ({"num_prompts": keep, "prompt_init": "spt_random"}, {}),
        f"E2VPT T={keep} kv={keep}": ({"num_prompts": keep, "kv_prompts": keep}, {"method": "e2vpt"}),
        f"VFPT T={keep} fourier 0.5": ({"num_prompts": keep, "fourier_fraction": 0.5}, {"method": "vfpt"}),
        f"CVPT P={keep}": ({"num_prompts": keep}, {"method": "cvpt"}),
        **{name: ({"num_prompts": 0, "base_lr": METHODS[method].options().base_lrs[1]}, {"method": method})
           for name, method in (("linear probe", "linear"), ("SSF", "ssf"), ("full fine-tuning", "full"))},
        **{f"E2VPT T={prompts} kv={keep} pruned->{keep} {scoring}": (
            pruned, {"epochs": epochs - 1, "method": "e2vpt",
                     "options": {"e2vpt": {"prune_epochs": 1, "prune_scoring": scoring}}})
           for scoring in ("authors", "ours")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="T, the uncondensed prompt count per block")
    parser.add_argument("--keep", type=int, default=4, help="prompts per block after condensation / pruning")
    parser.add_argument("--epochs", type=int, default=3, help="total epochs of every method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--img-size", type=int, default=42)
    parser.add_argument("--base-lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    task_dir = materialise(args.task, cache_dir() / "datasets" / "demo")

    rows = []
    for name, (params, fields) in methods(args.prompts, args.keep, args.epochs).items():
        accs, started = [], time.monotonic()
        for seed in args.seeds:
            job = Job(
                model="vit_small_patch14_dinov2", weights="demo", img_size=args.img_size, task_dir=str(task_dir),
                params={"placement": "deep", "base_lr": args.base_lr, "prompt_dropout": 0.1, **params},
                batch_size=16, warmup_epochs=0.2, seed=seed, **{"epochs": args.epochs, **fields},
            )
            _, metrics = run(job, CPU)
            accs.append(metrics["val_acc"])
        rows.append({
            "method": name, "val_acc": statistics.mean(accs), "std": statistics.pstdev(accs),
            "prompt_tokens": metrics["prompt_tokens"], "kv_tokens": metrics["kv_tokens"],
            "gflops": metrics["gflops"], "trainable_params": metrics["trainable_params"],
            "seconds_per_run": (time.monotonic() - started) / len(args.seeds),
        })
        print(f"{name:40s} val_acc {rows[-1]['val_acc']:.3f} ± {rows[-1]['std']:.3f}", flush=True)

    print(f"\n{args.task}, {args.img_size} px, {args.epochs} epochs per method, seeds {args.seeds}")
    print(f"{'method':40s} {'val_acc':>13s} {'tokens':>7s} {'kv':>4s} {'GFLOPs':>7s} {'params':>8s} {'s/run':>6s}")
    for r in rows:
        print(f"{r['method']:40s} {r['val_acc']:.3f} ± {r['std']:.3f} {r['prompt_tokens']:7.2f} {r['kv_tokens']:4.0f} "
              f"{r['gflops']:7.3f} {r['trainable_params']:8d} {r['seconds_per_run']:6.1f}")
    print(json.dumps({"task": args.task, "epochs": args.epochs, "seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
