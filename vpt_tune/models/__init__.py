"""Prompted vision transformers over frozen timm backbones (import the submodules)."""
