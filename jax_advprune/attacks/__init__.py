"""Attacks as pure functions of a `logits_fn`; no Flax or data imports.

Each public attack compiles once per `logits_fn` object, settings and input
shapes and reuses the program (see `attacks.dispatch`); inside the caller's own
trace it is inlined instead.
"""

from jax_advprune.attacks.apgd import apgd
from jax_advprune.attacks.autoattack import AutoAttackResult, autoattack
from jax_advprune.attacks.deepfool import DeepFoolResult, deepfool
from jax_advprune.attacks.fab import FabResult, fab, fab_target
from jax_advprune.attacks.objectives import cross_entropy, cw_margin, kl_to_clean
from jax_advprune.attacks.pgd import pgd
from jax_advprune.attacks.square import SquareResult, square

__all__ = [
    "pgd",
    "apgd",
    "deepfool",
    "fab",
    "fab_target",
    "square",
    "autoattack",
    "DeepFoolResult",
    "FabResult",
    "SquareResult",
    "AutoAttackResult",
    "cross_entropy",
    "kl_to_clean",
    "cw_margin",
]
