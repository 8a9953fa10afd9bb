"""Prompted training step vs the bare frozen timm forward+backward on the same number of tokens.

The bare step runs timm's own ``blocks`` on ``[cls, patches, T extra tokens]`` with the extra
tokens learnable (so backward goes through every block, as with prompts); the prompted step is
``PromptedViT`` with T deep prompts (fresh prompts spliced in before every block). Both with fused
(``F.scaled_dot_product_attention``) and plain attention. Steps alternate and the median of
``--repeats`` is taken, so machine noise hits both sides alike. Prints a table, then one JSON line.

    python bench/step.py [--model vit_small_patch14_dinov2] [--img-size 112] [--prompts 16] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from vpt_tune.models.backbone import create_backbone
from vpt_tune.models.placement import prompt_counts
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.train.loop import autocast


class BareStep(nn.Module):
    """timm's forward on the same tokens: T learnable tokens appended once, no per-block splicing."""

    def __init__(self, model: PromptedViT, num_tokens: int):
        super().__init__()
        self.model = model
        self.extra = nn.Parameter(torch.zeros(num_tokens, model.backbone.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.model.backbone
        x = self.model.embed(images)
        x = torch.cat([x, self.extra.expand(x.shape[0], -1, -1)], dim=1)
        return self.model.head(vit.norm(vit.blocks(x))[:, 0])


def step_seconds(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    started = time.perf_counter()
    with autocast(images.device):  # bf16 on CUDA, as trials train
        loss = nn.functional.cross_entropy(module(images).float(), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - started


def set_fused(model: PromptedViT, fused: bool) -> None:
    for block in model.backbone.blocks:
        block.attn.fused_attn = fused


def measure(model: str, img_size: int, prompts: int, batch: int, repeats: int,
            device: torch.device = torch.device("cpu")) -> dict[str, dict[str, float]]:
    """Median seconds of the bare and the prompted step, with fused and with plain attention."""
    torch.manual_seed(0)
    vit = create_backbone(model, "random", img_size)
    prompted = PromptedViT(vit, 10, prompt_counts(prompts, "deep", len(vit.blocks))).to(device).train()
    bare = BareStep(prompted, prompts).to(device).train()
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    results = {}
    for fused in (True, False):
        set_fused(prompted, fused)
        times = {"bare": [], "prompted": []}
        for _ in range(2):  # warm-up
            step_seconds(bare, images, labels), step_seconds(prompted, images, labels)
        for _ in range(repeats):
            times["bare"].append(step_seconds(bare, images, labels))
            times["prompted"].append(step_seconds(prompted, images, labels))
        results["fused" if fused else "plain"] = {k: statistics.median(v) for k, v in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on CUDA, as trials train)")
    args = parser.parse_args()

    results = measure(args.model, args.img_size, args.prompts, args.batch, args.repeats, torch.device(args.device))
    vit = create_backbone(args.model, "random", args.img_size)
    tokens = vit.num_prefix_tokens + vit.patch_embed.num_patches + args.prompts
    print(f"{args.model} @ {args.img_size}px, {tokens} tokens, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'attention':<10} {'bare s':>9} {'prompted s':>11} {'ratio':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['bare']:>9.4f} {r['prompted']:>11.4f} {r['prompted'] / r['bare']:>7.3f}")
    faster = min(results, key=lambda name: results[name]["prompted"])
    print(f"faster attention path here: {faster} "
          f"({results['plain']['prompted'] / results['fused']['prompted']:.2f}x plain/fused)")
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "prompts": args.prompts, "batch": args.batch,
        "device": args.device,
        "ratio_fused": round(results["fused"]["prompted"] / results["fused"]["bare"], 3),
        "ratio_plain": round(results["plain"]["prompted"] / results["plain"]["bare"], 3),
        "plain_over_fused": round(results["plain"]["prompted"] / results["fused"]["prompted"], 3),
        "faster": faster,
    }))


if __name__ == "__main__":
    main()
