"""Speed-up of the frozen-prefix cache by first prompted block k, with the logits-equality check.

For k in {0, L/4, L/2, 3L/4}: prompts in blocks k..L-1 (last_k placement), one training epoch on the
same random images with and without the cache, timed side by side (alternating, median of
--repeats). The cache's one-time cost (the frozen forward of blocks < k) is reported separately:
it is paid once per trial, the epoch speed-up every epoch. Target: speed-up >= 0.9 * L / (L - k).

    python bench/prefix_cache.py [--model vit_small_patch14_dinov2] [--img-size 84] [--images 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vpt_tune.data.vtab import ImageSplit
from vpt_tune.models.backbone import create_backbone
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import TrainConfig, train
from vpt_tune.train.prefix_cache import cached_prefix

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    vit = create_backbone(args.model, "random", args.img_size)
    depth = len(vit.blocks)
    split = ImageSplit(
        images=torch.randint(0, 256, (args.images, 3, args.img_size, args.img_size), dtype=torch.uint8),
        labels=torch.randint(0, 10, (args.images,)),
        mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25),
    )
    cfg = TrainConfig(epochs=1, batch_size=args.batch, base_lr=0.05, weight_decay=0.0)
    rows = []
    for k in (0, depth // 4, depth // 2, 3 * depth // 4):
        model = PromptedViT(vit, 10, prompt_counts(args.prompts, "last_k", depth, depth=depth - k))
        started = time.perf_counter()
        net, (cached,) = cached_prefix(model, [split], args.batch, CPU)
        precompute = time.perf_counter() - started
        with torch.no_grad():
            model.eval()
            images, _ = next(split.batches(8))
            tokens, _ = next(cached.batches(8))
            max_diff = (net(tokens) - model(images)).abs().max().item()
        times = {"uncached": [], "cached": []}
        for _ in range(args.repeats):
            for name, module, data in (("uncached", model, split), ("cached", net, cached)):
                started = time.perf_counter()
                train(module, data, data, cfg, CPU)
                times[name].append(time.perf_counter() - started)
        uncached, cached_s = statistics.median(times["uncached"]), statistics.median(times["cached"])
        rows.append({
            "k": k, "uncached_epoch_s": round(uncached, 3), "cached_epoch_s": round(cached_s, 3),
            "speedup": round(uncached / cached_s, 3), "target": round(0.9 * depth / (depth - k), 3),
            "precompute_s": round(precompute, 3), "max_logit_diff": max_diff,
        })

    print(f"{args.model} @ {args.img_size}px, {args.images} images, {args.prompts} prompts in blocks k..{depth - 1}")
    print(f"{'k':>3} {'uncached s':>11} {'cached s':>9} {'speed-up':>9} {'target':>7} {'prefix s':>9} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['k']:>3} {r['uncached_epoch_s']:>11.3f} {r['cached_epoch_s']:>9.3f} {r['speedup']:>9.2f} "
              f"{r['target']:>7.2f} {r['precompute_s']:>9.3f} {r['max_logit_diff']:>13.2e}")
    print(json.dumps({"model": args.model, "img_size": args.img_size, "depth": depth, "rows": rows}))


if __name__ == "__main__":
    main()
