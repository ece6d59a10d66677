"""A one-process Megatron model for conversion, export and checks (no torchrun needed).

Conversion works on full tensors, so the model is built with every parallel size 1; the
checkpoint it writes is a dist_checkpointing directory that any TP/PP/DP layout loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from maca_compat.platform import get_platform
from maca_compat.runtime import setup as setup_platform
from parallel.groups import destroy_parallel_groups, init_parallel_groups, init_process_group
from parallel.init import seed_all
from sbtrain.checkpoint import load_checkpoint, save_checkpoint
from sbtrain.config.schema import ParallelConfig, RunConfig
from sbtrain.model.builder import build_model


@contextlib.contextmanager
def one_process_model(cfg: RunConfig, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> Iterator[torch.nn.Module]:
    """Yield ``cfg``'s model built in this process with all parallel sizes 1."""
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    platform = get_platform()
    setup_platform(platform)
    _, world, local_rank = init_process_group(platform.comm_backend, platform.device_type)
    if world != 1:
        raise RuntimeError(f"conversion runs in one process, not under a launcher of {world}")
    groups = init_parallel_groups(1, 1, 1, 1, local_rank)
    try:
        seed_all(cfg.train.seed)
        model, _ = build_model(cfg, groups.pg_collection, dtype, torch.device(device))
        yield model
    finally:
        # The default process group stays up, so a process can build several models in turn
        # (and no model-parallel group, or its gloo threads, stays behind)
        destroy_parallel_groups(keep_default_group=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (not Megatron's ``_extra_state`` entries) by state-dict name."""
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``; every parameter must be given, nothing extra."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise KeyError(f"state mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                       f", unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    with torch.no_grad():
        for key, target in expected.items():
            source = tensors[key]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {tuple(source.shape)} != model's "
                                 f"{tuple(target.shape)}")
            target.copy_(source)


def save_weights(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write a weights-only sbtrain checkpoint (step 0) that any layout can load."""
    return save_checkpoint(out_dir, 0, model, None, None)


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> int:
    """Load the newest checkpoint's weights in ``ckpt_dir``; returns its step."""
    return load_checkpoint(ckpt_dir, model, None, None)
