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


class ModelError(UserError, ValueError):
    """A model name that is not a timm ViT with a class token, or weights that cannot be loaded into it."""


def create_backbone(model: str, weights: str | Path | None, img_size: int) -> VisionTransformer:
    """Create the timm ViT ``model`` at ``img_size`` with the given weights, frozen and in eval mode."""
    probe = architecture(model)
    if weights is None:
        vit = timm.create_model(model, pretrained=True, num_classes=0, img_size=img_size)
    else:
        vit = timm.create_model(model, pretrained=False, num_classes=0)
        if str(weights) != "random":
            vit.load_state_dict(_read_state_dict(Path(weights), probe, model), strict=True)
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


def check_weights(model: str, weights: str | Path) -> None:
    """Read the weights file once, as :func:`create_backbone` does, and check it is a state dict that
    fits ``model`` (keys and shapes; the model is built on the meta device only)."""
    _read_state_dict(Path(weights), architecture(model), model)


def architecture(model: str, img_size: int | None = None) -> VisionTransformer:
    """``model`` (at ``img_size``, default its own) built on the meta device: no weights, no download,
    instant; refused unless a timm ViT with a class token."""
    if not timm.is_model(model):
        raise ModelError(f"unknown timm model {model!r}; use a timm ViT name such as vit_base_patch16_224 "
                         "(python -c \"import timm; print(timm.list_models('vit_*'))\" lists them)")
    size = {} if img_size is None else {"img_size": img_size}
    with torch.device("meta"):
        try:
            probe = timm.create_model(model, pretrained=False, num_classes=0, **size)
        except TypeError:  # an architecture without img_size: not a ViT
            probe = None
    if not isinstance(probe, VisionTransformer) or probe.cls_token is None:
        raise ModelError(f"{model!r} is not a timm VisionTransformer with a class token; "
                         "use one such as vit_base_patch16_224 or vit_small_patch14_dinov2")
    return probe


def _read_state_dict(path: Path, probe: VisionTransformer, model: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, checked against the keys and shapes of ``probe`` (``model``'s architecture)."""
    if not path.is_file():
        raise ModelError(f"backbone weights file {str(path)!r} does not exist")
    fix = f"give a .safetensors file or a torch.save()d state dict of timm's {model} (num_classes=0)"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any content can be in the file; each loader fails its own way
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (weights_only=True)"
        raise ModelError(f"{path}: not a readable {kind} file ({_reason(err)}); {fix}") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))  # training checkpoints wrap it
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a Python {type(state).__name__}, not a state dict (name -> tensor); {fix}")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"{path}: holds values that are not tensors ({_few(not_tensors)}), not a state dict; {fix}")
    expected = probe.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(state[k].shape)} (model: {list(v.shape)})" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_few(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise ModelError(f"{path}: does not fit {model} ({'; '.join(problems)}); {fix}")
    return state


def _few(items: list[str], shown: int = 3) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _reason(err: Exception) -> str:
    """The telling sentence of a loader's error (torch's weights-only message is a paragraph)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    sentence = line.split(". ")[0].removeprefix("WeightsUnpickler error: ")
    return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__
