"""Attacks as pure functions of a `logits_fn`; no Flax or data imports."""

from jax_advprune.attacks.deepfool import DeepFoolResult, deepfool
from jax_advprune.attacks.losses import cross_entropy, kl_to_clean, margin
from jax_advprune.attacks.pgd import pgd

__all__ = ["DeepFoolResult", "deepfool", "pgd", "cross_entropy", "kl_to_clean", "margin"]
