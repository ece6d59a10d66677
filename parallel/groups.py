"""Create the process groups once and hand them around explicitly."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass
class ParallelGroups:
    """The process groups of this rank and where it sits in the layout."""

    pg_collection: ProcessGroupCollection
    """tp, pp, cp, ep, dp, dp_cp, expt_dp, ..."""
    world_size: int
    rank: int
    local_rank: int

    @property
    def dp_rank(self) -> int:
        return self.pg_collection.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.pg_collection.dp.size()

    @property
    def pp_rank(self) -> int:
        return self.pg_collection.pp.rank()

    @property
    def pp_size(self) -> int:
        return self.pg_collection.pp.size()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str, device_type: str, timeout_s: float = 600) -> tuple[int, int, int]:
    """Join (or create, for a plain ``python`` launch) the default process group.

    Returns (rank, world_size, local_rank). Under torchrun the env:// variables are used.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type != "cpu":
        getattr(torch, device_type).set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank


def init_parallel_groups(tp: int, pp: int, sp: int, ep: int, local_rank: int,
                         timeout_minutes: float = 10.0) -> ParallelGroups:
    """Build Megatron's model-parallel groups for (tp, pp, cp=sp, ep) and collect them;
    their collectives time out after ``timeout_minutes`` (``parallel.timeout_minutes``)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=sp,
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(pg_collection=pgc, world_size=dist.get_world_size(),
                          rank=dist.get_rank(), local_rank=local_rank)


def destroy_parallel_groups(keep_default_group: bool = False) -> None:
    """Drop Megatron's model-parallel groups and, unless kept, the default process group."""
    parallel_state.destroy_model_parallel()
    # the MoE metrics tracker is process-global and sized by the first model's layer count: a
    # later model in the process (a stage, an in-process test) with more layers would index past it
    destroy_moe_metrics_tracker()
    if not dist.is_initialized():
        return
    # megatron only drops its references: each of the ~20 groups it made stays registered in
    # torch with its gloo threads (3 per group) until destroyed, so every rebuild (a stage of
    # --stage all, an in-process test) would add ~60 threads for good
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)
    if not keep_default_group:
        dist.destroy_process_group()
