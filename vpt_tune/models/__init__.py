"""Prompted vision transformers over frozen timm backbones."""

from vpt_tune.models.backbone import BackboneError, create_backbone, normalisation
from vpt_tune.models.prompted_vit import PromptedViT
from vpt_tune.models.prompts import PLACEMENTS, prompt_counts, tokens_per_block

__all__ = [
    "BackboneError", "PLACEMENTS", "PromptedViT", "create_backbone", "normalisation", "prompt_counts",
    "tokens_per_block",
]
