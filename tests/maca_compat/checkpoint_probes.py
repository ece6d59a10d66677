"""Probes for the checkpoint entries of maca_compat.patches that need more than one rank.

Run through ``tests.maca_compat.probes`` (``empty_shard_step``); each function gets that module
as ``p`` for its helpers (tiny GPT, DDP + distributed optimizer).
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch
import torch.distributed as dist


def _shared_tmpdir() -> tempfile.TemporaryDirectory | None:
    """Rank 0 creates the directory; every rank gets its name."""
    tmp = tempfile.TemporaryDirectory() if dist.get_rank() == 0 else None
    name = [tmp.name if tmp is not None else None]
    dist.broadcast_object_list(name, src=0)
    return tmp, name[0]


def _adam_steps(optimizer) -> list[float]:
    return sorted({float(state["step"]) for member in optimizer.chained_optimizers
                   for state in member.optimizer.state.values() if "step" in state})


def probe_empty_shard_step(args, p) -> dict:
    """PP2 with the only MoE layer on stage 1, its experts marked expert-parallel: stage 0's
    expert optimizer has one empty group.
    One optimizer step on made-up gradients (the schedule is not what this is about), save
    (fully_reshardable), load into fresh optimizers: every Adam state must be at step 1."""
    from parallel.init import init_parameters_globally
    from sbtrain.checkpoint import load_checkpoint, save_checkpoint
    from sbtrain.model.builder import build_model

    groups = p.init_groups(pp=2)
    p.seed_all()

    def fresh():
        cfg = p.run_config("*-*E")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=2))
        model, tconfig = build_model(cfg, groups.pg_collection, torch.float32, torch.device("cpu"))
        init_parameters_globally(model, p.SEED, cfg.model.init_method_std, cfg.model.num_layers)
        for name, param in model.named_parameters():
            if ".experts." in name:
                # what megatron's linears set under EP > 1 (tensor_parallel/layers.py: allreduce
                # = not use_expert_pgs): their own optimizer, on 2 ranks instead of 4
                param.allreduce = False
        ddp, optimizer = p.build_ddp_optimizer(groups, tconfig, model)
        return ddp, optimizer, p.make_scheduler(optimizer)

    ddp, optimizer, scheduler = fresh()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for param in ddp.module.parameters():
        param.main_grad.fill_(1e-2)
    ok, _, _ = optimizer.step()
    scheduler.step(increment=1)
    tmp, directory = _shared_tmpdir()
    try:
        save_checkpoint(directory, 1, ddp, optimizer, scheduler)
        ddp2, optimizer2, scheduler2 = fresh()
        loaded_step = load_checkpoint(directory, ddp2, optimizer2, scheduler2)
        dist.barrier()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "stepped": bool(ok),
        "member_params": [sum(len(g["params"]) for g in member.optimizer.param_groups)
                          for member in optimizer.chained_optimizers],
        "loaded_step": loaded_step,
        "steps_before": _adam_steps(optimizer),
        "steps_after_load": _adam_steps(optimizer2),
        "params_equal": all(torch.equal(a, b) for a, b in
                            zip(ddp.module.parameters(), ddp2.module.parameters())),
    }
