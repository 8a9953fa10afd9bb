"""Speed-up of the frozen-prefix cache by first prompted block k, with the logits-equality check.

For k in {0, L/4, L/2, 3L/4}: prompts in blocks k..L-1 (last_k placement), one training epoch on the
same random images with and without the cache, timed side by side (alternating, median of
--repeats). Target: speed-up >= 0.9 * L / (L - k). "expected" is what a training epoch can gain: only
the forward of blocks < k is saved (the backward never reached them), and a backward through frozen
blocks costs about one forward (input gradients only, no weight gradients), so uncached = L + (L - k)
and cached = 2(L - k) block-forwards; the target's L / (L - k) holds for inference, not training.
The one-time cost, the frozen forward of blocks < k, is reported separately ("prefix s", in memory
only), and across trials on a node: the first
trial computes and stores the tokens ("1st trial s": key digests, forward, write), a second trial
with a freshly built model maps them from the node store ("2nd trial s": digests, load and one read
of every token, from the page cache as on a node that just wrote them); "x" is their ratio.

    python bench/prefix_cache.py [--model vit_small_patch14_dinov2] [--img-size 84] [--images 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from vpt_tune.data.splits import ImageSplit
from vpt_tune.models.backbone import create_backbone
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import TrainConfig, train
from vpt_tune.train.prefix_cache import PREFIX, backbone_digest, cached_prefix, prefix_key


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def _trial(model: PromptedViT, split: ImageSplit, batch: int, device: torch.device) -> tuple[float, float]:
    """Seconds to get the cached tokens of ``split`` through the node store, every token read once, and the
    largest logit difference to the uncached model on the first batch."""
    def run():
        net, (cached,) = cached_prefix(model, [split], batch, device, store=PREFIX)
        float(cached.tokens.sum())
        return net, cached

    seconds, (net, cached) = _timed(run, device)
    with torch.no_grad():
        images, _ = next(split.batches(8))
        tokens, _ = next(cached.batches(8))
        return seconds, (net(tokens.to(device)) - model(images.to(device))).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=84)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    store_dir = tempfile.TemporaryDirectory(prefix="vpt-tune-bench-")
    os.environ["VPT_TUNE_CACHE"] = store_dir.name  # an empty node store, deleted at exit

    torch.manual_seed(0)
    vit = create_backbone(args.model, "random", args.img_size).to(device)
    depth = len(vit.blocks)
    split = ImageSplit(
        images=torch.randint(0, 256, (args.images, 3, args.img_size, args.img_size), dtype=torch.uint8),
        labels=torch.randint(0, 10, (args.images,)),
        mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25),
    )
    cfg = TrainConfig(epochs=1, batch_size=args.batch, base_lr=0.05, weight_decay=0.0)
    rows = []
    for k in (0, depth // 4, depth // 2, 3 * depth // 4):
        counts = prompt_counts(args.prompts, "last_k", depth, depth=depth - k)
        model = PromptedViT(vit, 10, counts).to(device)
        precompute, (net, (cached,)) = _timed(lambda: cached_prefix(model, [split], args.batch, device, None), device)
        with torch.no_grad():
            model.eval()
            images, _ = next(split.batches(8))
            tokens, _ = next(cached.batches(8))
            max_diff = (net(tokens.to(device)) - model(images.to(device))).abs().max().item()
        cross = {}
        if k > 0:
            first, _ = _trial(model, split, args.batch, device)
            torch.manual_seed(1)
            fresh = PromptedViT(vit, 10, counts).to(device).eval()  # a second trial: same backbone, new prompts
            second, hit_diff = _trial(fresh, split, args.batch, device)
            digest = _timed(lambda: prefix_key(backbone_digest(fresh, k), split, k, torch.float32, device), device)[0]
            cross = {"first_trial_s": round(first, 3), "second_trial_s": round(second, 3),
                     "load_speedup": round(first / second, 2), "digest_s": round(digest, 3),
                     "hit_max_logit_diff": hit_diff}
        times = {"uncached": [], "cached": []}
        for _ in range(args.repeats):
            for name, module, data in (("uncached", model, split), ("cached", net, cached)):
                times[name].append(_timed(lambda: train(module, data, data, cfg, device), device)[0])
        uncached, cached_s = statistics.median(times["uncached"]), statistics.median(times["cached"])
        rows.append({
            "k": k, "uncached_epoch_s": round(uncached, 3), "cached_epoch_s": round(cached_s, 3),
            "speedup": round(uncached / cached_s, 3), "target": round(0.9 * depth / (depth - k), 3),
            "expected": round((2 * depth - k) / (2 * (depth - k)), 3),
            "precompute_s": round(precompute, 3), "max_logit_diff": max_diff, **cross,
        })

    print(f"{args.model} @ {args.img_size}px on {device.type}, {args.images} images, {args.prompts} prompts in "
          f"blocks k..{depth - 1}")
    print(f"{'k':>3} {'uncached s':>11} {'cached s':>9} {'speed-up':>9} {'target':>7} {'expected':>9} {'prefix s':>9} "
          f"{'max |dlogit|':>13} {'1st trial s':>12} {'2nd trial s':>12} {'x':>7}")
    for r in rows:
        cross = (f"{r['first_trial_s']:>12.3f} {r['second_trial_s']:>12.3f} {r['load_speedup']:>7.1f}"
                 if "first_trial_s" in r else f"{'-':>12} {'-':>12} {'-':>7}")
        print(f"{r['k']:>3} {r['uncached_epoch_s']:>11.3f} {r['cached_epoch_s']:>9.3f} {r['speedup']:>9.2f} "
              f"{r['target']:>7.2f} {r['expected']:>9.2f} {r['precompute_s']:>9.3f} {r['max_logit_diff']:>13.2e} "
              f"{cross}")
    print(json.dumps({"model": args.model, "img_size": args.img_size, "device": device.type, "depth": depth,
                      "images": args.images, "rows": rows}))


if __name__ == "__main__":
    main()
