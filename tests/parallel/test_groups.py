"""Rebuilding the model-parallel groups (each stage of ``--stage all``, each run of a multi-run
launch, each in-process test) leaves no process group, and no gloo thread, behind."""

from __future__ import annotations

import os

import torch.distributed as dist

from parallel.groups import destroy_parallel_groups, init_parallel_groups, init_process_group


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_rebuilt_groups_leave_no_groups_or_threads_behind():
    init_process_group("gloo", "cpu")  # a one-rank world (or the one an earlier test left)
    init_parallel_groups(1, 1, 1, 1, 0)
    assert len(dist.distributed_c10d._world.pg_map) > 10  # megatron made its groups
    destroy_parallel_groups(keep_default_group=True)
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    assert groups == 1  # the default group only
    for _ in range(3):
        init_parallel_groups(1, 1, 1, 1, 0)
        destroy_parallel_groups(keep_default_group=True)
    # stock megatron-core: +20 groups and +60 gloo threads per rebuild
    assert len(dist.distributed_c10d._world.pg_map) == groups
    assert _threads() <= threads


def test_one_process_model_leaves_no_groups_behind():
    """The in-process builder (conversion, export, many tests) rebuilds groups per model."""
    from sbtrain.config.schema import ModelConfig, RunConfig
    from sbtrain.convert.session import one_process_model

    cfg = RunConfig(model=ModelConfig(pattern="*-", hidden_size=16, num_attention_heads=2,
                                      num_query_groups=1, ffn_hidden_size=32, vocab_size=32,
                                      max_position_embeddings=16))
    with one_process_model(cfg):
        pass
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    for _ in range(2):
        with one_process_model(cfg):
            pass
    assert len(dist.distributed_c10d._world.pg_map) == groups == 1
    assert _threads() <= threads
