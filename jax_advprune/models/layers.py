"""Layers shared by the models: nn.Conv, with oneDNN convolutions on XLA:CPU.

The models' convolutions are `conv_general_dilated`; `describe_convolutions()`
says which ones a run gets (the run log prints it). The oneDNN custom call
(jax_advprune/kernels) is plugged in by the one marked line below: delete it and
every model uses XLA's convolutions, with the same parameters and results.
"""

from __future__ import annotations

import functools

import flax.linen as nn
from jax import lax

from jax_advprune.kernels import onednn

conv_general_dilated, describe_convolutions = lax.conv_general_dilated, lambda: "XLA"
conv_general_dilated, describe_convolutions = onednn.conv_general_dilated, onednn.describe  # oneDNN on XLA:CPU; delete for XLA only

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
