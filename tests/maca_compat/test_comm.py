"""maca_compat.comm reaches the process: multi-node is detected from the launcher's variables,
the tuning is in os.environ before the first process group is created, and the NCCL/MCCL
settings in effect are logged once, by rank 0."""

from __future__ import annotations

import os

import pytest

from maca_compat import comm, runtime
from maca_compat.comm import apply_comm_env, comm_settings, is_multi_node
from sbtrain.config import RunConfig
from tests.maca_compat.test_platform import make_platform

MCCL_MULTI_NODE = ("MCCL_NET_GDR_LEVEL", "MCCL_CROSS_NIC", "TORCH_NCCL_AVOID_RECORD_STREAMS")


@pytest.mark.parametrize("environ,multi", [
    ({}, False),  # plain python: one process
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "1"}, False),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, True),  # torchrun --nnodes 2
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2"}, True),
    ({"GROUP_WORLD_SIZE": "4"}, True),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "SLURM_NNODES": "1"}, False),
    ({"WORLD_SIZE": "2", "SLURM_NNODES": "2"}, True),  # srun, one task per node
    ({"WORLD_SIZE": "x", "LOCAL_WORLD_SIZE": ""}, False),
])
def test_multi_node_from_the_launcher(environ, multi):
    assert is_multi_node(environ) is multi


def test_apply_detects_multi_node_when_not_told():
    environ = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "3"}
    applied = apply_comm_env(make_platform("maca", "MetaX C550"), environ)
    assert applied["MCCL_CROSS_NIC"] == "1" and applied["MCCL_NET_GDR_LEVEL"] == "SYS"
    one_node = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "RANK": "3"}
    assert "MCCL_CROSS_NIC" not in apply_comm_env(make_platform("maca", "MetaX C550"), one_node)


def test_settings_in_effect_are_logged_once_by_rank_0(monkeypatch, caplog):
    monkeypatch.setattr(comm, "_logged", set())
    caplog.set_level("INFO", logger="sbtrain.maca_compat")
    environ = {"NCCL_IB_HCA": "mlx5_0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    for rank in ("1", "0", "0"):
        apply_comm_env(make_platform("maca", "MetaX C550"), {**environ, "RANK": rank})
    lines = [r.getMessage() for r in caplog.records if "comm backend" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "(multi-node)" in lines[0]
    assert ("in effect: MCCL_CROSS_NIC=1 MCCL_NET_GDR_LEVEL=SYS NCCL_IB_HCA=mlx5_0 "
            "TORCH_NCCL_AVOID_RECORD_STREAMS=1") in lines[0]
    assert comm_settings({"NCCL_DEBUG": "WARN", "PATH": "/bin"}) == {"NCCL_DEBUG": "WARN"}


class _ProcessGroupReached(Exception):
    pass


def test_tuning_is_in_the_environment_before_the_process_group(monkeypatch):
    """build_train_state on a (simulated) 2-node MetaX job: init_process_group sees the MCCL
    multi-node variables."""
    import sbtrain.trainer_setup as trainer_setup

    for name in MCCL_MULTI_NODE:  # set-then-delete: monkeypatch removes what setup sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(comm, "_logged", set())
    monkeypatch.setattr(trainer_setup, "get_platform", lambda: make_platform("maca", "MetaX C550"))
    monkeypatch.setattr(runtime, "apply_patches", lambda vendor: [])
    monkeypatch.setattr(runtime, "check_megatron_version", lambda: None)
    seen = {}

    def init_process_group(*args, **kwargs):
        seen.update(os.environ)
        raise _ProcessGroupReached

    monkeypatch.setattr(trainer_setup, "init_process_group", init_process_group)  # the name it calls
    with pytest.raises(_ProcessGroupReached):
        trainer_setup.build_train_state(RunConfig())
    assert {k: seen.get(k) for k in MCCL_MULTI_NODE} == {
        "MCCL_NET_GDR_LEVEL": "SYS", "MCCL_CROSS_NIC": "1", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
