"""Layers shared by the models: nn.Conv, with oneDNN convolutions on XLA:CPU where they pay off.

The models' convolutions are `conv_general_dilated`; `describe_convolutions()`
says which ones a run gets (the run log prints it). The oneDNN custom call
(jax_advprune/kernels) is plugged in by the one marked line below: delete it and
every model uses XLA's convolutions, with the same parameters and results.
`choose_convolutions(model)` decides per model and host instruction set (below).
"""

from __future__ import annotations

import functools

import flax.linen as nn
from jax import lax

from jax_advprune.kernels import onednn

conv_general_dilated, describe_convolutions = lax.conv_general_dilated, lambda: "XLA"
conv_general_dilated, describe_convolutions = (
    onednn.conv_general_dilated,
    onednn.describe,
)  # oneDNN on XLA:CPU; delete for XLA only

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

# A TRADES-10 train step with oneDNN's convolutions over the same step with XLA's own, by host instruction set and model
# family (benchmarks/train_step.py: 4 XLA:CPU devices on 2 cores, images/s of each side's median; results in
# benchmarks/results/train_step.json, and train_step_avx2.json from the same Xeon with every library capped at AVX2).
# A test checks these against the JSON files. Where oneDNN gains less than MIN_GAIN, JAX_ADVPRUNE_CONV=auto gives that
# model XLA's convolutions: a native kernel is not worth its risk for less.
MEASURED_GAIN = {
    "AVX-512": {"small_cnn": 1.37, "preact_resnet18": 1.21, "wide_resnet": 1.13},
    "AVX2": {"small_cnn": 0.99, "preact_resnet18": 0.80, "wide_resnet": 0.75},
}
MIN_GAIN = 1.10
MODEL_FAMILIES = {"wrn28_10": "wide_resnet", "wrn34_10": "wide_resnet", "wrn70_16": "wide_resnet"}


def choose_convolutions(model_name: str) -> str:
    """Picks the convolutions of a run of `model_name` and says which, for the run log.

    With JAX_ADVPRUNE_CONV=auto (the default) on a host whose measured gain for the model's family
    (MEASURED_GAIN) is below MIN_GAIN, or whose instruction set was not measured, XLA's convolutions; otherwise
    what `describe_convolutions` says. A model family that was not measured (a user's) keeps oneDNN."""
    family = MODEL_FAMILIES.get(model_name, model_name)
    if onednn.get_backend() == "auto" and onednn.available():
        isa = onednn.host_isa()
        if isa not in MEASURED_GAIN:  # neither measured nor fuzzed on this instruction set
            onednn.set_backend("xla", "chosen for this host (see the 'convolutions:' line)")
            return (
                "XLA (oneDNN was neither measured nor fuzzed on a host without AVX2; "
                "JAX_ADVPRUNE_CONV=onednn uses it anyway)"
            )
        gain = MEASURED_GAIN[isa].get(family)
        if gain is not None and gain < MIN_GAIN:
            onednn.set_backend("xla", "chosen for this host (see the 'convolutions:' line)")
            return (
                f"XLA (oneDNN's gain for {family} on an {isa} host was {gain:.2f}x, below {MIN_GAIN:.2f}x; "
                "JAX_ADVPRUNE_CONV=onednn uses it anyway)"
            )
    return describe_convolutions()
