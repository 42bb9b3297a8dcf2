"""Attacks as pure functions of a `logits_fn`; no Flax or data imports."""

from jax_advprune.attacks.deepfool import DeepFoolResult, deepfool
from jax_advprune.attacks.objectives import cross_entropy, cw_margin, kl_to_clean
from jax_advprune.attacks.pgd import pgd

__all__ = ["DeepFoolResult", "deepfool", "pgd", "cross_entropy", "kl_to_clean", "cw_margin"]
