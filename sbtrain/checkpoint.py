"""Megatron dist_checkpointing save/resume: resharding-safe, atomic, exact.

Layout of a save directory::

    save_dir/iter_0000010/      a complete dist_checkpointing directory
    save_dir/latest             "10", written last (atomically) once every rank has finished

A save is written to ``iter_XXXXXXX.partial`` and renamed only after every rank's shards are on
disk, so a crash mid-save leaves a ``.partial`` directory that nothing points at or loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import load_tensors_metadata
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.distributed import DistributedDataParallel
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from sbtrain.errors import CheckpointError, CheckpointNotFound


# The default distributed-optimizer format ("fully_sharded_model_space") raises on save in
# megatron-core 0.19.2; "fully_reshardable" saves and loads under any DP/TP/PP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
LATEST = "latest"


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def latest_step(load_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint in ``load_dir``, or None."""
    marker = Path(load_dir) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit() or not checkpoint_dir(load_dir, int(text)).is_dir():
        raise CheckpointError(f"{marker} names step {text!r}, which has no complete checkpoint dir")
    return int(text)


def _unwrap_ddp(model):
    # DDP's sharded_state_dict prefixes keys with "module." but its load_state_dict forwards
    # unprefixed, so save and load through the wrapped module itself.

    return model.module if isinstance(model, DistributedDataParallel) else model


def _state_dict(model, optimizer, scheduler, step: int, is_loading: bool) -> dict:
    model_sd = _unwrap_ddp(model).sharded_state_dict()
    state = {"model": model_sd, "step": step}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
        state["scheduler"] = scheduler.state_dict()
    return state


def save_checkpoint(save_dir: str | Path, step: int, model, optimizer, scheduler,
                    keep_last: int = 0, strategy=None) -> Path:
    """Save model, optimizer and scheduler at ``step``; returns the final directory.

    ``strategy``: a megatron save strategy (e.g. ``FullyParallelSaveStrategyWrapper``), None for
    megatron's default."""
    partial_dir = _prepare_partial(save_dir, step)
    state = _state_dict(model, optimizer, scheduler, step, is_loading=False)
    try:
        dist_checkpointing.save(state, str(partial_dir), sharded_strategy=strategy,
                                validate_access_integrity=True)
    except (Exception, DCPCheckpointException) as exc:  # e.g. a full disk, as a worker failure
        raise CheckpointError(_save_failure(partial_dir, exc)) from exc
    return commit_checkpoint(save_dir, step, keep_last)


def save_checkpoint_async(save_dir: str | Path, step: int, model, optimizer, scheduler,
                          keep_last: int = 0, strategy=None):
    """Start a save of ``step`` whose shards a forked writer process puts on disk; returns
    megatron's ``AsyncRequest``. Its finalize functions (run on every rank by
    ``AsyncCallsQueue.maybe_finalize_async_calls`` once every writer is done) write the
    metadata, then ``commit_checkpoint``: until then the save is only ``iter_N.partial``."""
    partial_dir = _prepare_partial(save_dir, step)
    state = _state_dict(model, optimizer, scheduler, step, is_loading=False)
    try:
        # "mcore": megatron-core's own writer (the default "nvrx" needs nvidia-resiliency-ext)
        request = dist_checkpointing.save(state, str(partial_dir), sharded_strategy=strategy,
                                          validate_access_integrity=True,
                                          async_sharded_save=True, async_strategy="mcore")
    except (Exception, DCPCheckpointException) as exc:
        raise CheckpointError(_save_failure(partial_dir, exc)) from exc
    request.add_finalize_fn(lambda: commit_checkpoint(save_dir, step, keep_last))
    return request


def _prepare_partial(save_dir: str | Path, step: int) -> Path:
    """An empty ``iter_N.partial`` directory, made by rank 0 and seen by all ranks."""
    partial_dir = checkpoint_dir(save_dir, step).with_name(f"iter_{step:07d}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    dist.barrier()
    return partial_dir


def commit_checkpoint(save_dir: str | Path, step: int, keep_last: int) -> Path:
    """Once every rank's shards are on disk: ``iter_N.partial`` -> ``iter_N``, then ``latest``,
    then pruning to ``keep_last`` (so ``latest`` never names an incomplete save)."""
    final = checkpoint_dir(save_dir, step)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(final.with_name(final.name + ".partial"), final)
        _write_atomic(Path(save_dir) / LATEST, str(step))
        _prune(Path(save_dir), keep_last)
    dist.barrier()
    return final


def _save_failure(partial: Path, exc: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(partial.parent).free / 2**30:.2f} GiB free on its disk; "
    except OSError:
        free = ""
    # a half-written save is never loaded (nothing points at it), but on a full disk its
    # shards hold the space the next save needs: remove it
    shutil.rmtree(partial, ignore_errors=True)
    return (f"cannot save checkpoint {partial} (removed): {type(exc).__name__}: {_cause(exc)} "
            f"({free}the previous complete checkpoint is kept)")


def _cause(exc: BaseException) -> str:
    """The first line of an error, or the last of a gathered one ("ranks: ...", traceback)."""
    lines = str(exc).strip().splitlines() or [""]
    return (lines[-1] if "Traceback" in str(exc) else lines[0])[:300]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(save_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in save_dir.glob("iter_*") if p.is_dir() and p.suffix != ".partial")
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(load_dir: str | Path, model, optimizer, scheduler, step: int | None = None) -> int:
    """Load the checkpoint at ``step`` (default: latest) in place; returns its step.

    ``optimizer=None`` loads weights only.
    """
    step = latest_step(load_dir) if step is None else step
    if step is None:
        raise CheckpointNotFound(f"no complete checkpoint in {load_dir} (missing '{LATEST}')")
    directory = checkpoint_dir(load_dir, step)
    if optimizer is not None:
        materialize_optimizer_state(optimizer)
    state = _state_dict(model, optimizer, scheduler, step, is_loading=True)
    if optimizer is not None:
        check_optimizer_layout(directory, state["optimizer"])
    try:
        loaded = dist_checkpointing.load(state, str(directory))
        _unwrap_ddp(model).load_state_dict(loaded["model"])
    # torch's CheckpointException (a BaseException) carries the ranks' errors as text
    except (Exception, DCPCheckpointException) as exc:  # truncated shard, other model shape, ...
        raise CheckpointError(_load_failure(directory, load_dir, step, exc)) from exc
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_step(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["step"])


def _load_failure(directory: Path, load_dir: str | Path, step: int, exc: Exception) -> str:
    """One line: which checkpoint failed, why (first line of the cause), what else exists."""
    cause = _cause(exc)
    older = sorted(int(p.name[5:]) for p in Path(load_dir).glob("iter_???????")
                   if p.name[5:].isdigit() and int(p.name[5:]) < step)
    offer = (f"; older complete checkpoints: {older[-3:]} (write one of them to "
             f"{Path(load_dir) / LATEST} to resume there)" if older else "")
    return (f"cannot load checkpoint {directory}: {type(exc).__name__}: {cause} (a truncated "
            f"shard, or a model config that differs from the saved one){offer}")


def _is_chained(keys) -> bool:
    return any(key.startswith("chained_") for key in keys)


def check_optimizer_layout(directory: str | Path, optimizer_state: dict) -> None:
    """Refuse, with the reason, optimizer state that megatron-core cannot map onto this run.

    Upstream limitation (megatron-core 0.19.2): with expert parallelism > 1 the expert
    parameters get their own optimizer, and a ChainedOptimizer names every state tensor
    ``chained_<i>.optimizer.state.*``; with one optimizer (EP1, or no MoE) the names are
    ``optimizer.state.*``. A checkpoint saved under one layout cannot load its optimizer
    state under the other (the load fails deep inside dist_checkpointing with a KeyError).
    """
    saved = [k for k in load_tensors_metadata(str(directory)) if ".state." in k]
    wanted = [v.key for v in nested_values(optimizer_state)
              if isinstance(v, ShardedBase) and ".state." in v.key]
    if saved and wanted and _is_chained(saved) != _is_chained(wanted):
        layouts = {True: "separate expert optimizer (expert parallelism > 1)",
                   False: "one optimizer (expert parallelism 1)"}
        raise CheckpointError(
            f"{directory}: its optimizer state was saved with {layouts[_is_chained(saved)]}, this "
            f"run has {layouts[_is_chained(wanted)]}; megatron-core 0.19.2 cannot reshard MoE "
            "optimizer state between EP1 and EP>1 (its ChainedOptimizer renames the state to "
            "chained_<i>.*). Resume with the saved expert-parallel layout, or set "
            "checkpoint.load_optimizer=false to load the weights with a fresh optimizer.")


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


def materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam zero state so megatron can build its load state dict.

    Upstream (0.19.2, no Apex/TE): ``DistributedOptimizer.state_dict()`` asserts exactly one
    distinct ``step`` among the states, which fails while the torch optimizer has none yet.
    """
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for param in group["params"]:
                if opt.state.get(param):
                    continue
                opt.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }


def unshare_adam_step(optimizer) -> int:
    """Give every parameter its own Adam ``step`` tensor; returns how many were shared.

    Upstream bug (0.19.2, no Apex/TE): ``DistributedOptimizer.load_state_dict`` assigns ONE
    step tensor to every parameter's state; torch Adam increments it in place once per
    parameter, so the bias correction after resume is wrong. Cloning restores independence.
    """
    shared = 0
    for opt in _torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in opt.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    shared += 1
                state["step"] = step.clone()
                seen.add(id(step))
    return shared
