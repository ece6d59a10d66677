"""Layout-invariant parameter initialisation.

Megatron draws each rank's shard from that rank's RNG stream, so the same seed gives different
weights under TP2 than TP1, and pipeline stages consume the stream in a different order. Here
every parameter is drawn whole from a generator keyed by (seed, its global checkpoint key) and
this rank keeps its slice, so any DP/TP/PP/EP layout starts from the same model.
"""

from __future__ import annotations

import math
import zlib

import torch


def _init_kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if "norm" in leaf or key.endswith("norm.weight"):
        return "ones"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "zeros"
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "scaled"
    return "normal"


def _full_tensor(key: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int,
                 device: torch.device) -> torch.Tensor:
    kind = _init_kind(key)
    if kind == "ones":
        return torch.ones(shape, device=device)
    if kind == "zeros":
        return torch.zeros(shape, device=device)
    if kind == "scaled":
        # GPT-2/Megatron output-layer scaling: residual branches sum over 2 * num_layers.
        std = std / math.sqrt(2.0 * num_layers)
    # Drawn on the CPU whatever the device, so CPU and GPU runs start from the same model.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return (torch.randn(shape, generator=gen) * std).to(device)


def _sharded_tensors(state: object):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(state, dict):
        for value in state.values():
            yield from _sharded_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _sharded_tensors(value)
    elif isinstance(state, ShardedTensorFactory):
        yield from _sharded_tensors(state.build())
    elif isinstance(state, ShardedTensor):
        yield state


@torch.no_grad()
def init_parameters_globally(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> int:
    """Overwrite every parameter of ``model`` with its slice of the keyed global draw.

    Returns the number of sharded tensors initialised.
    """
    count = 0
    for sh in _sharded_tensors(model.sharded_state_dict()):
        assert sh.flattened_range is None, "flattened shards only appear in optimizer state"
        full = _full_tensor(sh.key, tuple(sh.global_shape), seed, std, num_layers, sh.data.device)
        local_shape = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local_shape))
        sh.data.copy_(full[index].reshape(sh.data.shape).to(sh.data.dtype))
        count += 1
    return count
