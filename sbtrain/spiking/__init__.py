"""Spiking utilities: spike coding of integer counts, firing sparsity and energy (pure torch).

The neuron itself (threshold and counts) is the ``ops.spike`` op; its place in the model is
``sbtrain.spiking.layers``, W8ASpike weight quantisation ``sbtrain.spiking.quant`` and the
``sbtrain spikestats`` report ``sbtrain.spiking.spikestats``.
"""

from __future__ import annotations

from sbtrain.spiking.coding import (
    SCHEMES,
    decode,
    encode,
    energy_estimate,
    histogram_window_sparsity,
    time_steps,
    window_sparsity,
)

__all__ = ["SCHEMES", "decode", "encode", "energy_estimate", "histogram_window_sparsity",
           "time_steps", "window_sparsity"]
