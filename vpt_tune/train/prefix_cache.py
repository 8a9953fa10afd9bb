"""Frozen-prefix cache: blocks before the first prompted block are a fixed function of the image.

When no prompt (visual or key/value) enters before block k, the tokens after block k-1 never
change during training: compute them once for the training and evaluation splits and start every
forward at block k. Same logits as the uncached model (tested to 1e-5 in fp32), and the backward
never reached those blocks anyway, so a trial with late prompts gets up to L/(L-k) faster.

The tokens are also kept on the node (:data:`PREFIX`, ``VPT_TUNE_PREFIX_CACHE_GB``, default 16; 0
turns it off), so a later trial with the same backbone, data and k maps them from disk instead of
recomputing. The key hashes all they depend on: the backbone's tensors and module settings outside
blocks k.., the images (their decoded-cache key, else their bytes) and normalisation, k, dtype and
the device kind and matmul precision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vpt_tune.data.cache import Store
from vpt_tune.data.splits import Batched, ImageSplit
from vpt_tune.models.prompted_vit import PromptedViT

MAX_CACHE_BYTES = 4 * 1024**3  # per trial, train + eval; larger splits run uncached
VERSION = "prefix-v1"  # change when what an entry holds changes
PREFIX = Store("prefix", "VPT_TUNE_PREFIX_CACHE_GB", 16.0)


@dataclass
class TokenSplit(Batched):
    """Cached block inputs (N, tokens, D) and labels, batched like :class:`ImageSplit`."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tokens[indices]


class FromBlock(nn.Module):
    """``model`` run from block ``start`` on cached tokens: input (B, tokens, D), output logits."""

    def __init__(self, model: PromptedViT, start: int):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from(tokens, self.start)


@torch.no_grad()
def precompute(model: PromptedViT, split: ImageSplit, start: int, batch_size: int, device: torch.device) -> TokenSplit:
    """The inputs of block ``start`` for every image of ``split``."""
    model.eval()
    parts = [model.frozen_prefix(images.to(device), start).cpu() for images, _ in split.batches(batch_size)]
    return TokenSplit(torch.cat(parts), split.labels)


def _scalar(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_scalar(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _update(digest, tensor: torch.Tensor) -> None:
    data = tensor.detach().cpu().contiguous()
    digest.update(f" {data.dtype} {tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())


def backbone_digest(model: PromptedViT, start: int) -> str:
    """Digest of what the inputs of block ``start`` depend on: every tensor and module setting (type, heads,
    eps, image size...) of ``model.backbone`` outside blocks ``start``.."""
    vit = model.backbone
    later = tuple(f"blocks.{i}." for i in range(start, len(vit.blocks)))
    digest = hashlib.sha256(VERSION.encode())
    for name, module in vit.named_modules():
        if f"{name}.".startswith(later):
            continue
        settings = sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"
                          and _scalar(v))
        digest.update(f"\n{name} {type(module).__module__}.{type(module).__qualname__} {settings}".encode())
    for name, tensor in vit.state_dict().items():
        if not name.startswith(later):
            digest.update(f"\n{name}".encode())
            _update(digest, tensor)
    return digest.hexdigest()[:32]


def prefix_key(backbone: str, split: ImageSplit, start: int, dtype: torch.dtype, device: torch.device) -> str:
    """Store key of the inputs of block ``start`` for ``split``; ``backbone``: :func:`backbone_digest`."""
    images = split.images
    digest = hashlib.sha256(
        f"{VERSION} {backbone} {start} {dtype} {device.type} {torch.get_float32_matmul_precision()} "
        f"{torch.backends.cuda.matmul.allow_tf32} {torch.backends.cudnn.allow_tf32} "
        f"{tuple(images.shape)} {images.dtype}".encode()
    )
    if split.key is not None:
        digest.update(f" key {split.key}".encode())
    else:
        digest.update(b" content")
        _update(digest, images)
    for stat in (split.mean, split.std):
        _update(digest, stat.float())
    return digest.hexdigest()[:32]


def _tokens(
    model: PromptedViT, split: ImageSplit, start: int, batch_size: int, device: torch.device, store: Store | None,
    backbone: str,
) -> TokenSplit:
    if store is None or not isinstance(split, ImageSplit):
        return precompute(model, split, start, batch_size, device)
    dtype = next(model.backbone.parameters()).dtype
    key = prefix_key(backbone, split, start, dtype, device)
    array = store.load(key, mmap=True)
    if (array is not None and array.dtype == np.float32 and array.ndim == 3 and array.shape[0] == len(split)
            and array.shape[2] == model.backbone.embed_dim):
        return TokenSplit(torch.from_numpy(array), split.labels)
    tokens = precompute(model, split, start, batch_size, device)
    if tokens.tokens.dtype == torch.float32:
        store.save(key, tokens.tokens.numpy())
    return tokens


def cached_prefix(
    model: PromptedViT, splits: list[ImageSplit], batch_size: int, device: torch.device, store: Store | None = PREFIX
) -> tuple[nn.Module, list[ImageSplit | TokenSplit]]:
    """The module and splits to train on: from the first prompted block on cached tokens when that
    saves work, fits in :data:`MAX_CACHE_BYTES` and no split is augmented (FGVC training: new crops
    every epoch), else ``model`` and ``splits`` unchanged. Tokens come from ``store`` when it holds
    them and are put there otherwise (None: computed for this call only)."""
    start = model.first_prompted_block
    vit = model.backbone
    tokens = vit.num_prefix_tokens + vit.patch_embed.num_patches
    needed = sum(len(s) for s in splits) * tokens * vit.embed_dim * 4
    if start == 0 or needed > MAX_CACHE_BYTES or any(s.augmented for s in splits):
        return model, splits
    if store is not None and store.limit_bytes() <= 0:
        store = None
    backbone = backbone_digest(model, start) if store is not None else ""
    return FromBlock(model, start), [_tokens(model, s, start, batch_size, device, store, backbone) for s in splits]
