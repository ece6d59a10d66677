"""Everything the loop needs, built in one documented order from a RunConfig.

platform + shims -> process groups -> seeds -> model (layout-invariant init) -> bf16 wrap ->
Megatron DDP -> distributed optimizer + LR schedule -> datasets -> resume -> profiler.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from maca_compat.platform import get_platform, resolve_peak_flops
from maca_compat.runtime import setup as setup_platform
from parallel.groups import init_parallel_groups, init_process_group
from parallel.init import init_parameters_globally, seed_all
from parallel.param_gather import install_param_gather_waits
from sbtrain.checkpoint import latest_step, load_checkpoint
from sbtrain.config import RunConfig, validate
from sbtrain.data.datasets import build_datasets
from sbtrain.errors import CheckpointNotFound
from sbtrain.model.builder import build_model
from sbtrain.profiler.comm import softmax_exchanges
from sbtrain.profiler.flops import flops_per_token
from sbtrain.profiler.recompute import resolve_recompute
from sbtrain.profiler.tracker import ThroughputTracker

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from torch.utils.data import Dataset

    from maca_compat.platform import Platform
    from parallel.groups import ParallelGroups

logger = logging.getLogger("sbtrain.train")


@dataclasses.dataclass
class TrainState:
    cfg: RunConfig
    platform: Platform
    groups: ParallelGroups
    device: torch.device
    model: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    train_ds: Dataset
    valid_ds: Dataset | None
    tracker: ThroughputTracker
    start_step: int
    params_dtype: torch.dtype

    @property
    def is_logging_rank(self) -> bool:
        return self.groups.rank == self.groups.world_size - 1


def resolve_dtype(precision: str, platform) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and platform.is_gpu):
        return torch.bfloat16
    return torch.float32


def build_train_state(cfg: RunConfig, source: str = "") -> TrainState:
    platform = get_platform()
    setup_platform(platform)
    p = cfg.parallel
    _, world, local_rank = init_process_group(platform.comm_backend, platform.device_type,
                                              timeout_s=60 * p.timeout_minutes)
    validate(cfg, world, source)
    groups = init_parallel_groups(p.tp, p.pp, p.sp, p.ep, local_rank, p.timeout_minutes)
    device = platform.device(local_rank)
    cfg = resolve_recompute_at_start(cfg, world, device, report=groups.rank == 0)
    seed_all(cfg.train.seed)
    dtype = resolve_dtype(cfg.train.precision, platform)
    model, tconfig = _build_wrapped_model(cfg, groups, dtype, device)
    optimizer, scheduler = _build_optimizer(cfg, model, groups, dtype)
    _wire_schedule_hooks(tconfig, model, optimizer, groups)
    train_ds, valid_ds = _build_data(cfg, groups)
    start = _maybe_resume(cfg, model, optimizer, scheduler)
    tracker = _build_tracker(cfg, platform, groups)
    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    return TrainState(cfg, platform, groups, device, model, optimizer, scheduler, train_ds,
                      valid_ds, tracker, start, dtype)


def resolve_recompute_at_start(cfg: RunConfig, world: int, device: torch.device,
                               report: bool) -> RunConfig:
    """``train.recompute: auto`` -> the cheapest policy whose memory plan fits this device
    (``profiler.device_memory_gib`` if set); the choice is printed once (``report``)."""
    if cfg.train.recompute != "auto":
        return cfg
    device_gib = cfg.profiler.device_memory_gib or device_memory_gib(device)
    cfg, choice = resolve_recompute(cfg, world, device_gib, device.type)
    if report:
        print(f"train.recompute auto -> {choice['policy']}: {choice['reason']}", flush=True)
    return cfg


def device_memory_gib(device: torch.device) -> float:
    """Total memory of ``device`` (CUDA / MACA) or of the host (CPU), in GiB."""
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def _build_wrapped_model(cfg: RunConfig, groups, dtype: torch.dtype, device: torch.device):
    model, tconfig = build_model(cfg, groups.pg_collection, dtype, device,
                                 softmax_exchanges(cfg, device.type))
    init_parameters_globally(model, cfg.train.seed, cfg.model.init_method_std,
                             cfg.model.num_layers)
    if dtype == torch.bfloat16:
        model = Float16Module(tconfig, model)
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(**ddp_options(cfg, device)),
                                  module=model, pg_collection=groups.pg_collection)
    install_param_gather_waits(ddp)
    return ddp, tconfig


def ddp_options(cfg: RunConfig, device: torch.device) -> dict:
    """Megatron DDP's options for this run: fp32 gradient reduction, the distributed optimizer,
    and the bucketed overlap of the gradient reduce-scatter with backward and of the parameter
    all-gather with the next forward (``parallel.overlap_*``, ``auto`` = on GPUs)."""
    p, on_gpu = cfg.parallel, device.type != "cpu"
    distributed = cfg.optim.distributed_optimizer
    return {
        "grad_reduce_in_fp32": True,
        "use_distributed_optimizer": distributed,
        "overlap_grad_reduce": p.resolved_overlap("overlap_grad_reduce", on_gpu),
        # the gather sends the distributed optimizer's updated shards: nothing to gather without
        "overlap_param_gather": distributed and p.resolved_overlap("overlap_param_gather", on_gpu),
        "bucket_size": p.bucket_size or None,
    }


def _build_optimizer(cfg: RunConfig, model, groups, dtype: torch.dtype):
    o, t = cfg.optim, cfg.train
    oconfig = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=o.distributed_optimizer,
        overlap_param_gather=model.ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(oconfig, [model], use_gloo_process_groups=False,
                                       pg_collection=groups.pg_collection)
    decay = o.decay_iters or t.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(decay, o.warmup_iters + 1),
        lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def _wire_schedule_hooks(tconfig, model, optimizer, groups) -> None:
    """The hooks Megatron's schedules call: grad-sync control, loss scaling, grad finalize."""
    tconfig.no_sync_func = model.no_sync
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = partial(finalize_model_grads,
                                                pg_collection=groups.pg_collection)


def _build_data(cfg: RunConfig, groups):
    t = cfg.train
    train_samples = cfg.data.first_sample(t.seq_length) + t.train_iters * t.global_batch_size
    eval_rounds = (t.train_iters // t.eval_interval) if t.eval_interval else 0
    valid_samples = max(eval_rounds * t.eval_iters * t.global_batch_size, t.global_batch_size)
    cache = cfg.data.cache_dir or str(Path(t.run_dir) / "data_cache")
    return build_datasets(cfg, (train_samples, valid_samples), cache)


def _maybe_resume(cfg: RunConfig, model, optimizer, scheduler) -> int:
    """Resume from load_dir (or save_dir); else start from ``pretrained`` weights; else fresh."""
    ck = cfg.checkpoint
    load_dir = ck.load_dir or ck.save_dir
    if not load_dir or latest_step(load_dir) is None:
        if ck.load_dir:
            raise CheckpointNotFound(f"checkpoint.load_dir {ck.load_dir} has no complete "
                                     "checkpoint")
        if ck.pretrained:
            if latest_step(ck.pretrained) is None:
                raise CheckpointNotFound(
                    f"checkpoint.pretrained {ck.pretrained} has no complete checkpoint (in a "
                    "staged run the previous stage writes it: run that stage first)")
            load_checkpoint(ck.pretrained, model, None, None)
            logger.info("weights from checkpoint.pretrained %s (step %d), fresh optimizer",
                        ck.pretrained, latest_step(ck.pretrained))
        return 0
    if ck.load_optimizer:
        step = load_checkpoint(load_dir, model, optimizer, scheduler)
        logger.info("resumed from %s at step %d (weights, optimizer, LR schedule)", load_dir, step)
        return step
    load_checkpoint(load_dir, model, None, None)
    logger.info("weights from %s (step %d), fresh optimizer (checkpoint.load_optimizer false)",
                load_dir, latest_step(load_dir))
    return 0


def _build_tracker(cfg: RunConfig, platform, groups):
    peak, source = resolve_peak_flops(platform, cfg.profiler.peak_flops)
    fpt = flops_per_token(cfg.model, cfg.train.seq_length, training=True)["total"]
    return ThroughputTracker(flops_per_token=fpt, peak_flops_per_device=peak, peak_source=source,
                             num_devices=groups.world_size, device_type=platform.device_type)
