"""build_datasets under an initialized gloo process group (world 1 in-process, world 2 forked).

Megatron builds the index caches on rank 0 first and the other ranks load them after a
barrier; every rank must end up with identical samples, equal to a non-distributed build.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from sbtrain.config.schema import RunConfig
from sbtrain.data.datasets import build_datasets

SAMPLES = (0, 3, 50, 150)


def _tokens(cfg: RunConfig, cache_dir: str) -> torch.Tensor:
    train, valid = build_datasets(cfg, (160, 8), cache_dir)
    return torch.stack([train[i]["tokens"] for i in SAMPLES] + [valid[0]["tokens"]])


def _rank_main(rank: int, world: int, init_file: str, cfg: RunConfig, cache_dir: str,
               out_dir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        try:
            torch.save(_tokens(cfg, cache_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_world_one_in_process(sample_prefix, indexed_cfg, tmp_path) -> None:
    cfg = indexed_cfg([sample_prefix])
    reference = _tokens(cfg, str(tmp_path / "ref_cache"))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        assert torch.equal(_tokens(cfg, str(tmp_path / "dist_cache")), reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method (cheap: megatron is already imported)")
def test_world_two_shared_cache(sample_prefix, indexed_cfg, tmp_path) -> None:
    second = str(tmp_path / "second")
    for ext in (".bin", ".idx"):
        os.link(sample_prefix + ext, second + ext)
    cfg = indexed_cfg([sample_prefix, second], weights=[0.5, 0.5])
    reference = _tokens(cfg, str(tmp_path / "ref_cache"))
    ctx = multiprocessing.get_context("fork")
    args = (str(tmp_path / "init"), cfg, str(tmp_path / "shared_cache"), str(tmp_path))
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, *args)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), reference)
