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
                 device: torch.device, stream: str | None = None) -> torch.Tensor:
    """The whole tensor ``key`` (or the part of it named ``stream``): its kind from ``key``,
    its values from a generator seeded by ``seed`` and ``stream`` (default ``key``)."""
    kind = _init_kind(key)
    if kind == "ones":
        return torch.ones(shape, device=device)
    if kind == "zeros":
        return torch.zeros(shape, device=device)
    if kind == "scaled":
        # GPT-2/Megatron output-layer scaling: residual branches sum over 2 * num_layers.
        std = std / math.sqrt(2.0 * num_layers)
    # Drawn on the CPU whatever the device, so CPU and GPU runs start from the same model.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32((stream or key).encode()))
    return (torch.randn(shape, generator=gen) * std).to(device)


def _sharded_tensors(state: object):
    # deferred: the rest of this module is plain torch (see seed_all)
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
        # Prepended axes (the expert index of MoE weights) hold one independent tensor per
        # global index: each is drawn on its own, keyed by that index, so a rank never draws
        # the other experts (drawing the whole stack per expert cost num_experts times more).
        lead = tuple(sh.global_offset[:sh.prepend_axis_num])
        stream = sh.key + "".join(f"[{i}]" for i in lead)
        shape = tuple(sh.global_shape[sh.prepend_axis_num:])
        full = _full_tensor(sh.key, shape, seed, std, num_layers, sh.data.device, stream)
        offsets = sh.global_offset[sh.prepend_axis_num:]
        index = tuple(slice(o, o + n) for o, n in zip(offsets, sh.data.shape))
        sh.data.copy_(full[index].to(sh.data.dtype))
        count += 1
    return count


def seed_all(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (every build of a model)."""
    # deferred: the rest of this module is plain torch, and megatron-core costs seconds to import
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
