"""Spiking utilities: spike coding of integer counts, firing sparsity and energy (pure torch).

The neuron itself (threshold and counts) is the ``ops.spike`` op.
"""

from __future__ import annotations

from sbtrain.spiking.coding import (
    SCHEMES,
    decode,
    encode,
    energy_estimate,
    time_steps,
    window_sparsity,
)

__all__ = ["SCHEMES", "decode", "encode", "energy_estimate", "time_steps", "window_sparsity"]
