"""Frozen timm ViT backbones: creation by name, weight loading, freezing, data config.

Weights come from one of three places:
- ``None``: the timm hub weights for the model name (downloaded by timm on first use);
- ``"random"``: random initialisation (unit tests, smoke runs);
- a path to a local ``.safetensors`` / ``.pth`` file holding the model's state dict
  (the demo backbone is such a file, produced by ``vpt_tune.data.assets``).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vpt_tune.errors import UserError


class BackboneError(UserError, ValueError):
    """A backbone that cannot be created or loaded as asked."""


def create_backbone(model: str, weights: str | Path | None, img_size: int) -> VisionTransformer:
    """Create the timm ViT ``model`` at ``img_size`` with the given weights, frozen and in eval mode."""
    if not timm.is_model(model):
        raise BackboneError(f"unknown timm model {model!r}: see timm.list_models('vit_*') for names")
    with torch.device("meta"):  # architecture only: no weights, no download
        probe = timm.create_model(model, pretrained=False, num_classes=0)
    if not isinstance(probe, VisionTransformer) or probe.cls_token is None:
        raise BackboneError(f"{model!r} is not a timm VisionTransformer with a class token")
    if weights is None:
        vit = timm.create_model(model, pretrained=True, num_classes=0, img_size=img_size)
    else:
        vit = timm.create_model(model, pretrained=False, num_classes=0)
        if str(weights) != "random":
            vit.load_state_dict(_read_state_dict(Path(weights)), strict=True)
        # Resamples the position table when the checkpoint was made for another size.
        vit.set_input_size(img_size=(img_size, img_size))
    return freeze(vit)


def freeze(vit: VisionTransformer) -> VisionTransformer:
    """Stop gradients to every backbone parameter and put it in eval mode (no dropout, ever)."""
    for param in vit.parameters():
        param.requires_grad_(False)
    return vit.eval()


def normalisation(vit: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone was pretrained with."""
    cfg = timm.data.resolve_data_config({}, model=vit)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"backbone weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state))
