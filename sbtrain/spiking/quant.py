"""W8ASpike weights: symmetric INT8 group-wise fake quantisation (report Sec. 3.3).

SpikingBrain's W8ASpike model keeps the spiking neuron on the activations and stores the
weight of every spiked projection as INT8 codes with one scale per (output row, group of
128 input columns), ``W8ASpike/quant_linear.py`` (``w_group_size=128``)::

    scale = max|w_group| / 127        per output row and group of ``group_size`` columns
    code  = clamp(round(w / scale), -127, 127)
    w_q   = code * scale              (fake quantisation: back to the float dtype)

Only the projections that the neuron spikes are quantised (see :func:`spiked_weights`);
embeddings, the LM head, the MoE router, norms and GLA's rank-16 gate up-projection keep
their float weights, as in the official code. This is an evaluation mode: the weights are
overwritten in place and nothing is trained through the quantiser.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sbtrain.config.schema import WEIGHT_QUANT as WEIGHT_QUANT_SCHEMES
from sbtrain.spiking.layers import declared_sites, is_spiking_linear

INT8_MAX = 127


def _grouped(w: Tensor, group_size: int) -> tuple[Tensor, int]:
    """``[out, in]`` fp32 view as ``[out, groups, group_size]``, the tail group zero-padded.

    Zero padding is safe: it never raises a group's max|w| and its codes are dropped again.
    """
    if w.dim() != 2:
        raise ValueError(f"group-wise quantisation needs a 2-D [out, in] weight, got shape "
                         f"{tuple(w.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    cols = w.shape[1]
    pad = (-cols) % group_size
    padded = torch.nn.functional.pad(w.float(), (0, pad))
    return padded.view(w.shape[0], -1, group_size), cols


def quantize_int8_groupwise(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """INT8 codes and per-group scales of a weight.

    Args:
        w: ``[out, in]`` floating weight. ``in`` need not divide by ``group_size``: the last
            group of each row is shorter (its scale comes from its own columns).
        group_size: input columns per scale.

    Returns:
        ``codes``: int8 ``[out, in]`` in [-127, 127]; ``scales``: fp32 ``[out, ceil(in / group_size)]``.
        An all-zero group gets scale 0 and codes 0.
    """
    groups, cols = _grouped(w, group_size)
    scales = groups.abs().amax(-1, keepdim=True) / INT8_MAX
    # A zero group would divide 0 by 0; any positive divisor gives its (zero) codes.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / safe).clamp(-INT8_MAX, INT8_MAX)
    codes = codes.view(w.shape[0], -1)[:, :cols].to(torch.int8)
    return codes, scales.squeeze(-1)


def dequantize_int8_groupwise(codes: Tensor, scales: Tensor, group_size: int = 128,
                              dtype: torch.dtype = torch.float32) -> Tensor:
    """``codes * scale`` per group: the inverse of :func:`quantize_int8_groupwise`."""
    cols = codes.shape[1]
    groups, _ = _grouped(codes.float(), group_size)
    if scales.shape != groups.shape[:2]:
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not match {groups.shape[1]} "
                         f"groups of {group_size} per row for codes {tuple(codes.shape)}")
    w = groups * scales.float().unsqueeze(-1)
    return w.view(codes.shape[0], -1)[:, :cols].to(dtype)


def fake_quant_int8_groupwise(w: Tensor, group_size: int = 128) -> Tensor:
    """``w`` rounded to its symmetric INT8 group-wise grid, same shape and dtype.

    Every element moves by at most half its group's scale (``max|w_group| / 254``).
    """
    codes, scales = quantize_int8_groupwise(w, group_size)
    return dequantize_int8_groupwise(codes, scales, group_size, w.dtype)


def spiked_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights of the projections whose input the neuron spikes, by parameter name.

    These are the spiking Column/RowParallelLinear layers (attention q/k/v and o of every
    mixer, dense MLP, routed and shared experts) and GLA's gate down-projection, whose input
    the GLA mixer spikes itself. Empty when the model was built without spiking.
    """
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if is_spiking_linear(module):
            found[f"{prefix}weight"] = module.weight
        for site, projection in declared_sites(module).items():
            if projection is not None:
                found[f"{prefix}{site}.weight"] = projection.weight
    return found


def apply_weight_quant(model: torch.nn.Module, scheme: str) -> list[str]:
    """Fake-quantise the spiked projections' weights of ``model`` in place (for evaluation).

    Under tensor parallelism a row-parallel layer's groups run along its local input shard,
    which equals the full-row grouping whenever the shard width divides by the group size.

    Returns:
        The names of the quantised parameters (empty for scheme ``none``).
    """
    if scheme not in WEIGHT_QUANT_SCHEMES:
        raise ValueError(f"unknown weight quantisation {scheme!r}; expected one of "
                         f"{sorted(WEIGHT_QUANT_SCHEMES)}")
    group_size = WEIGHT_QUANT_SCHEMES[scheme]
    if not group_size:
        return []
    weights = spiked_weights(model)
    if not weights:
        raise ValueError("the model has no spiked projections to quantise; build it with "
                         "spiking.enabled: true")
    with torch.no_grad():
        for weight in weights.values():
            weight.copy_(fake_quant_int8_groupwise(weight, group_size))
    return sorted(weights)
