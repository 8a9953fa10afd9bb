"""VPT (Jia et al., ECCV 2022): prompt tokens in the sequence of the blocks a placement names.

The prompt entries of the spec's ``space`` (``num_prompts``, ``placement``, ``depth``, ``layers``,
``prompt_dropout``) are shared by every prompt method and belong to the core; VPT adds nothing to them.
"""

from __future__ import annotations

from vpt_tune.methods.base import Method


class VPT(Method):
    name = "vpt"
    summary = "Visual Prompt Tuning: fresh prompt tokens in the sequence of the placed blocks"
    main = True
