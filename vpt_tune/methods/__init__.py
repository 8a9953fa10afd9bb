"""The registry of prompt-tuning methods: one module each (see :mod:`vpt_tune.methods.base`).

Main methods are chosen by the spec's ``method:``; add-ons (initialisation, condensation) combine
with the main methods they name. The order is the order of their space entries in a spec and of
their stages in a trial (E²VPT's pruning before condensation).
"""

from __future__ import annotations

from vpt_tune.methods.base import Method, Options, SpaceEntry, StageContext
from vpt_tune.methods.condensation import Condensation
from vpt_tune.methods.cvpt import CVPT
from vpt_tune.methods.e2vpt import E2VPT
from vpt_tune.methods.full import Full
from vpt_tune.methods.linear import Linear
from vpt_tune.methods.spt import SPT
from vpt_tune.methods.ssf import SSF
from vpt_tune.methods.vfpt import VFPT
from vpt_tune.methods.vpt import VPT

METHODS: dict[str, Method] = {m.name: m for m in (VPT(), SPT(), E2VPT(), Condensation(), VFPT(), CVPT(),
                                                  Linear(), SSF(), Full())}
MAIN_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.main)
REFERENCES: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.reference)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a ValueError listing the known ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "MAIN_METHODS", "REFERENCES", "Method", "Options", "SpaceEntry", "StageContext", "get_method"]
