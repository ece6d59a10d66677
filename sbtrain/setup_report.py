"""The INFO lines a run says once at start (``sbtrain.console`` shows them on the logging rank):
layout, model size, data and how MFU is measured. Platform, shims and op backends are logged
where they are decided (``maca_compat.runtime``, ``ops.backends``); resume and pretrained
starts by ``trainer_setup``."""

from __future__ import annotations

import logging

from sbtrain.config import RunConfig
from sbtrain.profiler.counting import count_parameters

logger = logging.getLogger("sbtrain.train")


def setup_lines(cfg: RunConfig, state) -> list[str]:
    """The start-of-run summary of ``state`` (a ``trainer_setup.TrainState``), one line each."""
    p, t, g = cfg.parallel, cfg.train, state.groups
    dp = p.resolved_dp(g.world_size)
    counts = count_parameters(cfg.model)
    lines = [
        f"layout: {g.world_size} ranks = dp {dp} x pp {p.pp} x tp {p.tp} x sp {p.sp}, ep {p.ep}; "
        f"{state.device.type} {str(state.params_dtype).removeprefix('torch.')}",
        f"model: {cfg.model.pattern!r}, {cfg.model.num_layers} layers, hidden "
        f"{cfg.model.hidden_size}, {_millions(counts['total'])} parameters "
        f"({_millions(counts['active'])} active), recompute {t.recompute}",
        f"data: {_describe_data(cfg, state)}",
        f"batch: {t.global_batch_size} x {t.seq_length} tokens per step, "
        f"{t.train_iters} steps from step {state.start_step}",
        f"data-parallel communication: {describe_dp_comm(state.model)}",
        state.tracker.describe_peak(),
    ]
    return lines


def describe_dp_comm(ddp) -> str:
    """How Megatron DDP reduces gradients and gathers parameters (``parallel.overlap_*``)."""
    c = ddp.ddp_config
    buckets = len(ddp.bucket_groups) + len(ddp.expert_parallel_bucket_groups)
    overlapped = [name for name, on in (("gradient reduce with backward", c.overlap_grad_reduce),
                                        ("parameter gather with forward", c.overlap_param_gather))
                  if on]
    if not overlapped:
        return f"after backward, {buckets} bucket group(s), not overlapped"
    return f"{' and '.join(overlapped)} overlapped, {buckets} bucket group(s)"


def report_setup(cfg: RunConfig, state) -> None:
    for line in setup_lines(cfg, state):
        logger.info("%s", line)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _describe_data(cfg: RunConfig, state) -> str:
    d = cfg.data
    valid = len(state.valid_ds) if state.valid_ds is not None else 0
    sizes = f"{len(state.train_ds):,} train / {valid:,} valid samples"
    if d.kind == "synthetic":
        return f"synthetic uniform tokens (nothing to learn), {sizes}"
    return f"indexed {', '.join(d.paths)} (split {d.split}), tokenizer {d.tokenizer}, {sizes}"
