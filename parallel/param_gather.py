"""Waiting for overlapped parameter all-gathers where Megatron's hooks do not.

With ``parallel.overlap_param_gather`` the distributed optimizer's updated shards are
all-gathered bucket by bucket during the next forward, and Megatron DDP waits for a module's
own parameters in that module's forward pre-hook. Two sbtrain forwards use parameters of
modules whose forward they never call:

- ``GroupedExperts`` (``sbtrain.model.experts``): the expert linears' weights go into one
  grouped GEMM; ``install_param_gather_waits`` gives each such module a pre-hook that waits
  for all of its (recursive) parameters;
- the chunked loss (``train.loss_chunk_tokens``): the output layer's (or tied embedding's)
  weight goes to ``ops.loss``; the trainer calls ``wait_for_params`` on it first.

Without these waits a rank would compute with its stale copy of the other ranks' shards
(never gathered, if nothing else dispatches that bucket). Waiting right where the parameters
are used keeps the buckets' all-gathers in forward order, as Megatron's own hooks do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def wait_for_params(ddp, params: Iterable[torch.nn.Parameter]) -> None:
    """Finish the parameter all-gather of every bucket holding one of ``params`` (a no-op
    without ``overlap_param_gather``, or once the bucket's gather has been waited for)."""
    ddp_config = getattr(ddp, "ddp_config", None)  # a bare model (conversion, tests): no DDP
    if ddp_config is None or not ddp_config.overlap_param_gather:
        return
    buckets = ddp.param_to_bucket_group  # param -> its bucket group (megatron DDP)
    for group in {id(buckets[p]): buckets[p] for p in params if p in buckets}.values():
        group.finish_param_sync(skip_next_bucket_dispatch=ddp_config.align_param_gather)


def install_param_gather_waits(ddp) -> int:
    """Pre-hooks on the modules that use their children's parameters without calling the
    children's forwards (``uses_child_params_directly = True``); returns how many."""
    if not ddp.ddp_config.overlap_param_gather:
        return 0
    count = 0
    for module in ddp.module.modules():
        if getattr(module, "uses_child_params_directly", False):
            module.register_forward_pre_hook(
                lambda mod, args: wait_for_params(ddp, mod.parameters()))
            count += 1
    return count
