"""Layers shared by the models: nn.Conv with oneDNN convolutions on XLA:CPU."""

from __future__ import annotations

import functools

import flax.linen as nn

from jax_advprune.kernels.onednn import conv_general_dilated

# The same parameters and results as nn.Conv; plain float32 convolutions on the CPU run through
# oneDNN (jax_advprune.kernels.onednn), everything else through lax.conv_general_dilated.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
