"""Megatron's bucketed overlap of data-parallel communication (parallel.overlap_grad_reduce,
parallel.overlap_param_gather) changes no number: the overlapped runs of tests/parallel/plan.py
(OVERLAP_RUNS, several buckets each) reproduce their unoverlapped layouts and the one-process
run, and a run saved and resumed with overlap continues the uninterrupted unoverlapped curve.
They train inside the 2-rank planned launch (no launch of their own)."""

from __future__ import annotations

import pytest
import torch

from sbtrain.config import RunConfig, validate
from sbtrain.config.errors import ConfigError
from sbtrain.config.schema import ParallelConfig
from sbtrain.trainer_setup import ddp_options
from tests.parallel.harness import assert_same_curve


def test_overlapped_dp2_matches_unoverlapped_and_one_process(planned):
    runs = planned(2)
    # chunked loss (5-token chunks) against Megatron's loss: fp32 rounding only
    assert_same_curve(planned(1)["7b"], runs["7b.dp2_overlap"])
    assert_same_curve(runs["7b.dp2"], runs["7b.dp2_overlap"])


def test_overlapped_dp2_ep2_matches_unoverlapped_and_one_process(planned):
    runs = planned(2)
    overlapped = runs["76b.ep2_overlap"]
    assert_same_curve(runs["76b.ep2"], overlapped, tol=1e-6)
    assert_same_curve(planned(1)["76b"], overlapped)
    # the evaluation after step 2 gathered every bucket first; training went on unchanged
    assert overlapped[1]["eval_loss"] > 0 and "eval_loss" not in overlapped[2]


def test_overlapped_resume_is_exact(planned):
    runs = planned(2)
    resumed = runs["resume_76b_ep2_overlap.b"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(runs["resume_76b_ep2_overlap.a"], runs["resume_76b_ep2.full"][:2], tol=1e-6)
    assert_same_curve(runs["resume_76b_ep2.full"][2:], resumed, tol=1e-6)


@pytest.mark.parametrize("device,distributed,grad,gather", [
    ("cpu", True, False, False), ("cuda", True, True, True), ("cuda", False, True, False)])
def test_auto_overlaps_on_gpus_only(device, distributed, grad, gather):
    cfg = RunConfig()
    cfg.optim.distributed_optimizer = distributed
    options = ddp_options(cfg, torch.device(device))
    assert (options["overlap_grad_reduce"], options["overlap_param_gather"]) == (grad, gather)
    assert options["bucket_size"] is None  # Megatron's default


def test_explicit_overlap_and_bucket_size_are_passed_through():
    cfg = RunConfig()
    cfg.parallel.overlap_grad_reduce, cfg.parallel.overlap_param_gather = True, True
    cfg.parallel.bucket_size = 3000
    options = ddp_options(cfg, torch.device("cpu"))
    assert options["overlap_grad_reduce"] and options["overlap_param_gather"]
    assert options["bucket_size"] == 3000 and options["use_distributed_optimizer"]
    cfg.parallel.overlap_grad_reduce = False
    assert not ddp_options(cfg, torch.device("cuda"))["overlap_grad_reduce"]


@pytest.mark.parametrize("key,value,message", [
    ("overlap_grad_reduce", "yes", "expected true, false or auto"),
    ("bucket_size", -1, "must be >= 0")])
def test_overlap_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        ParallelConfig(**{key: value})
    assert err.value.key == f"parallel.{key}"


def test_param_gather_needs_the_distributed_optimizer():
    cfg = RunConfig()
    cfg.parallel.overlap_param_gather = True
    cfg.optim.distributed_optimizer = False
    with pytest.raises(ConfigError, match="distributed_optimizer") as err:
        validate(cfg, 1)
    assert err.value.key == "parallel.overlap_param_gather"
