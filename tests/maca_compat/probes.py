"""Probes of stock megatron-core code paths, one per isolated process (used by test_patches.py).

Each probe drives one code path that a ``maca_compat.patches.PATCHES`` entry exists for, with
every entry applied except the one given by ``--without`` (megatron state is process-global,
so every probe runs in its own process)::

    python -m tests.maca_compat.probes rng_tracker --without rng_tracker
    torchrun --standalone --nproc_per_node=2 -m tests.maca_compat.probes moe_alltoall

``--restore MODULE:ATTR`` additionally undoes one rebinding of an applied entry (to show that a
part of a multi-part entry is needed). On success every rank prints one line
``PROBE_RESULT <rank> <json>`` with the numbers the test checks; on failure the stock
exception propagates (traceback on stderr, non-zero exit status).

``python -m tests.maca_compat.probes --serve`` runs single-process probes for the tests: it
imports torch and megatron-core once, applies nothing, and runs each job in a child forked from
that clean state (as isolated as a fresh interpreter, without ~4 s of imports per job).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("SB_PLATFORM", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from tests.forked_child import exit_code, flush_and_exit, redirect_stdio  # noqa: E402

RESULT_TAG = "PROBE_RESULT"
SEED = 1234
VOCAB = 128
SEQ = 16
MBS = 2


# --------------------------------------------------------------------------- setup helpers


def apply_all_but(without: str | None, restore: list[str]) -> list[str]:
    """Apply every PATCHES entry except ``without``; then undo the ``MODULE:ATTR`` rebindings."""
    from maca_compat import patches

    names = [p.name for p in patches.PATCHES]
    if without is not None and without not in names:
        raise SystemExit(f"unknown PATCHES entry {without!r}; known: {names}")
    wanted = [n for n in names if n != without]
    patches.apply_patches(wanted, vendor="cpu")
    assert patches.applied_patches() == wanted, (patches.applied_patches(), wanted)
    for item in restore:
        module_name, attr = item.split(":")
        hits = [
            (owner, leaf, original)
            for _, undo in patches._applied
            for owner, leaf, original in undo
            if leaf == attr and _owner_name(owner).endswith(module_name)
        ]
        if len(hits) != 1:
            raise SystemExit(f"--restore {item}: {len(hits)} applied rebindings match, want 1")
        owner, leaf, original = hits[0]
        setattr(owner, leaf, original)
    return wanted


def _owner_name(owner) -> str:
    """``pkg.module`` for a module, ``pkg.module.Class`` for a class."""
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return getattr(owner, "__name__", type(owner).__name__)


def init_groups(tp: int = 1, pp: int = 1, ep: int = 1):
    """The default process group (gloo) and megatron's model-parallel groups."""
    from parallel.groups import init_parallel_groups, init_process_group

    _, _, local_rank = init_process_group("gloo", "cpu", timeout_s=120)
    return init_parallel_groups(tp, pp, 1, ep, local_rank)


def seed_all(seed: int = SEED) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def run_config(pattern: str = "*-*-", **moe):
    """A tiny RunConfig (hidden 32, 2 layers) in sbtrain's own schema."""
    from sbtrain.config.schema import ModelConfig, MoEConfig, RunConfig, TrainConfig

    model = ModelConfig(
        pattern=pattern, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=64,
        moe=MoEConfig(num_experts=4, top_k=1, shared_expert=True, **moe),
    )
    return RunConfig(model=model, train=TrainConfig(seq_length=SEQ, micro_batch_size=MBS))


def build_gpt(groups, pattern: str = "*-*-", init_seed: int = SEED,
              dtype: torch.dtype = torch.float32, **moe):
    """A GPTModel built exactly as sbtrain.model.builder does, initialised layout-invariantly."""
    from parallel.init import init_parameters_globally
    from sbtrain.model.builder import build_model

    cfg = run_config(pattern, **moe)
    model, tconfig = build_model(cfg, groups.pg_collection, dtype, torch.device("cpu"))
    init_parameters_globally(model, init_seed, cfg.model.init_method_std, cfg.model.num_layers)
    return model, tconfig


def make_batch(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous(),
    }


def lm_loss(model, batch: dict) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().mean()


def build_ddp_optimizer(groups, tconfig, model, lr: float = 1e-3, weight_decay: float = 0.0,
                        distributed: bool = True, bf16: bool = False, **ddp_options):
    """Megatron DDP + Adam (distributed by default), configured like sbtrain.trainer_setup
    (``ddp_options``: e.g. overlap_grad_reduce, bucket_size)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed,
        **{"overlap_grad_reduce": False, **ddp_options}
    )
    ddp = DistributedDataParallel(tconfig, ddp_config, module=model,
                                  pg_collection=groups.pg_collection)
    oconfig = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(oconfig, [ddp], use_gloo_process_groups=False,
                                       pg_collection=groups.pg_collection)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return ddp, optimizer


def make_scheduler(optimizer, lr: float = 1e-3):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
        wd_incr_style="constant",
    )


def train_step(ddp, optimizer, batch: dict) -> tuple[float, float]:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(ddp, batch)
    loss.backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    return loss.item(), float(grad_norm)


def torch_adam_states(optimizer) -> list[dict]:
    from sbtrain.checkpoint import _torch_optimizers

    return [state for opt in _torch_optimizers(optimizer) for state in opt.state.values()]


# --------------------------------------------------------------------------- probes


def probe_rng_tracker(args) -> dict:
    """model_parallel_cuda_manual_seed + forks of the tracker on the CPU generator.

    Returns the draws only (no assertions): a tracker that silently fails to set or restore the
    generator shows up as wrong numbers, not as an exception.
    """
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    init_groups()
    seed_all(SEED)
    default_draw = torch.rand(4)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    after_fork = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    torch.set_rng_state(before)
    no_fork = torch.rand(4)
    return {
        "tracked_states": sorted(tracker.get_states()),
        # The default stream is the data-parallel seed ...
        "default_draw": default_draw.tolist(),
        "expected_default_draw": torch.rand(4, generator=torch.Generator().manual_seed(SEED)).tolist(),
        # ... the model-parallel one seed + 2718 + tp_rank, advancing across forks ...
        "fork_draws": torch.cat([first, second]).tolist(),
        "expected_fork_draws": torch.rand(
            8, generator=torch.Generator().manual_seed(SEED + 2718)).tolist(),
        # ... and a fork leaves the default stream exactly where it was.
        "after_fork": after_fork.tolist(),
        "without_fork": no_fork.tolist(),
    }


def probe_model_device_allocations(args) -> dict:
    """RotaryEmbedding forward and a tiny GPTModel (attention + MoE layer) fwd/bwd at world 1."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    groups = init_groups()
    seed_all()
    dim, base = 8, 10000
    rope = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=base)
    emb = rope(SEQ)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(SEQ, dtype=torch.float32), inv_freq)
    expected = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    model, _ = build_gpt(groups, pattern="*-*E")
    loss = lm_loss(model, make_batch(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return {
        "rope_shape": list(emb.shape),
        "rope_max_err": float((emb.float() - expected).abs().max()),
        "loss": loss.item(),
        "grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "num_grads": len(grads),
    }


def probe_moe_alltoall(args) -> dict:
    """EP2 over gloo: the alltoall dispatcher gives the allgather dispatcher's loss and grads."""
    import torch.distributed as dist

    groups = init_groups(ep=2)
    assert dist.get_world_size() == 2, "run this probe with torchrun --nproc_per_node=2"
    seed_all()
    rank = dist.get_rank()
    batch = make_batch(100 + rank)  # different tokens per rank: tokens cross the EP group
    results = {}
    for dispatcher in ("alltoall", "allgather"):
        model, _ = build_gpt(groups, pattern="*E", dispatcher=dispatcher)
        loss = lm_loss(model, batch)
        loss.backward()
        results[dispatcher] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_a2a, grads_a2a), (loss_ag, grads_ag) = results["alltoall"], results["allgather"]
    assert grads_a2a.keys() == grads_ag.keys()
    expert_grads = [n for n in grads_a2a if "local_experts" in n]
    return {
        "loss_alltoall": loss_a2a,
        "loss_allgather": loss_ag,
        "max_grad_diff": max(float((grads_a2a[n] - grads_ag[n]).abs().max()) for n in grads_a2a),
        "expert_grad_norm": math.sqrt(sum(float(grads_a2a[n].norm()) ** 2 for n in expert_grads)),
        "num_local_experts_params": len(expert_grads),
    }


def probe_pipeline_schedules(args) -> dict:
    """forward_backward_no_pipelining (world 1, 2 micro-batches) equals a plain fwd/bwd."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    groups = init_groups()
    seed_all()
    model, _ = build_gpt(groups)
    batches = [make_batch(10), make_batch(11)]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        return chunk(b["tokens"], b["position_ids"], None, labels=b["labels"]), loss_func

    schedule = get_forward_backward_func()
    assert schedule is forward_backward_no_pipelining, schedule
    losses = schedule(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    sched_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    direct = [lm_loss(model, b) for b in batches]
    (sum(direct) / 2).backward()
    return {
        "schedule_losses": [float(x["lm loss"]) for x in losses],
        "direct_losses": [x.item() for x in direct],
        "max_grad_diff": max(float((sched_grads[n] - p.grad).abs().max())
                             for n, p in model.named_parameters()),
        "grad_norm": math.sqrt(sum(float(g.norm()) ** 2 for g in sched_grads.values())),
    }


def probe_ddp_and_optimizer(args) -> dict:
    """DDP + Adam at world 1, one step each: fp32 distributed optimizer (grad norm and the exact
    first Adam update), then bf16 with the non-distributed Float16OptimizerWithFloat16Params."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
    from megatron.core.transformer.module import Float16Module

    from sbtrain.checkpoint import _torch_optimizers

    groups = init_groups()
    seed_all()
    batch = make_batch(0)
    model, tconfig = build_gpt(groups)
    lr = 1e-3
    ddp, optimizer = build_ddp_optimizer(groups, tconfig, model, lr=lr)
    assert [type(o) for o in optimizer.chained_optimizers] == [DistributedOptimizer]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(ddp, batch)
    loss.backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    ref_norm = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads.values()))
    ok, grad_norm, _ = optimizer.step()
    clip = min(1.0, 1.0 / (ref_norm + 1e-6))
    # First Adam step, no weight decay: update = -lr * g / (|g| + eps) ~ -lr * sign(g).
    worst, checked, zero_grad_moved = 0.0, 0, 0
    for n, p in model.named_parameters():
        delta = p.detach() - before[n]
        g = grads[n] * clip
        big = g.abs() > 1e-4
        if big.any():
            worst = max(worst, float((delta[big] + lr * g[big].sign()).abs().max()))
        checked += int(big.sum())
        zero_grad_moved += int((delta[g == 0] != 0).sum())
    with torch.no_grad():
        loss_after = lm_loss(ddp, batch).item()

    # bf16 params, non-distributed optimizer: megatron's Float16OptimizerWithFloat16Params.
    bf_model, bf_config = build_gpt(groups, dtype=torch.bfloat16)
    bf_ddp, bf_opt = build_ddp_optimizer(groups, bf_config, Float16Module(bf_config, bf_model),
                                         lr=lr, distributed=False, bf16=True)
    assert [type(o) for o in bf_opt.chained_optimizers] == [Float16OptimizerWithFloat16Params]
    bf_loss, bf_norm = train_step(bf_ddp, bf_opt, batch)
    with torch.no_grad():
        bf_loss_after = lm_loss(bf_ddp, batch).item()
    return {
        "loss": loss.item(),
        "loss_after_step": loss_after,
        "update_successful": bool(ok),
        "grad_norm": float(grad_norm),
        "reference_grad_norm": ref_norm,
        "max_update_err": worst,
        "checked_entries": checked,
        "zero_grad_entries_moved": zero_grad_moved,
        "lr": lr,
        "adam_steps": sorted({float(s["step"]) for o in _torch_optimizers(optimizer)
                              for s in o.state.values()}),
        "bf16_loss": bf_loss,
        "bf16_loss_after_step": bf_loss_after,
        "bf16_grad_norm": bf_norm,
    }


def _load_manually(directory: str, model, optimizer, scheduler) -> int:
    """sbtrain.checkpoint.load_checkpoint with its unshare_adam_step guard disabled."""
    import sbtrain.checkpoint as ck

    guard = ck.unshare_adam_step
    ck.unshare_adam_step = lambda opt: 0
    try:
        return ck.load_checkpoint(directory, model, optimizer, scheduler)
    finally:
        ck.unshare_adam_step = guard


def probe_checkpoint(args) -> dict:
    """Save model + distributed optimizer (fully_reshardable) at world 1, load into a fresh one.

    Also measures the Adam ``step`` sharing of DistributedOptimizer.load_state_dict and the
    sbtrain.checkpoint.unshare_adam_step guard.
    """
    from sbtrain.checkpoint import _state_dict, load_checkpoint, save_checkpoint, unshare_adam_step

    groups = init_groups()
    seed_all()
    batch = make_batch(0)

    def fresh(init_seed: int):
        model, tconfig = build_gpt(groups, init_seed=init_seed)
        ddp, optimizer = build_ddp_optimizer(groups, tconfig, model)
        return model, ddp, optimizer, make_scheduler(optimizer)

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, ddp, opt, sched = fresh(SEED)
        train_step(ddp, opt, batch)
        sched.step(increment=1)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        saved_states = [{k: v.clone() for k, v in s.items()} for s in torch_adam_states(opt)]
        save_checkpoint(tmp, 1, ddp, opt, sched)

        model2, ddp2, opt2, sched2 = fresh(SEED + 1)
        out["differs_before_load"] = any(
            not torch.equal(p, saved[n]) for n, p in model2.named_parameters())
        out["loaded_step"] = load_checkpoint(tmp, ddp2, opt2, sched2)
        out["weights_equal"] = all(torch.equal(p, saved[n]) for n, p in model2.named_parameters())
        out["num_weights"] = len(saved)
        states2 = torch_adam_states(opt2)
        out["adam_state_equal"] = len(states2) == len(saved_states) and all(
            torch.equal(a[k], b[k])
            for a, b in zip(states2, saved_states) for k in ("exp_avg", "exp_avg_sq"))
        out["scheduler_steps"] = sched2.num_steps
        # Same next step as the uninterrupted run.
        loss_cont, _ = train_step(ddp, opt, batch)
        loss_resumed, _ = train_step(ddp2, opt2, batch)
        out["loss_continued"], out["loss_resumed"] = loss_cont, loss_resumed
        out["params_equal_after_step"] = all(
            torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
        out["steps_after_one_step"] = [float(s["step"]) for s in torch_adam_states(opt2)]
        train_step(ddp2, opt2, batch)
        out["steps_after_two_steps"] = [float(s["step"]) for s in torch_adam_states(opt2)]

        # The other guard first: a fresh torch Adam has no state, and megatron cannot build
        # the load state dict until materialize_optimizer_state gives it one.
        model3, ddp3, opt3, sched3 = fresh(SEED + 2)
        try:
            _state_dict(ddp3, opt3, sched3, 1, is_loading=True)
            out["fresh_state_dict_error"] = ""
        except Exception as exc:  # noqa: BLE001 - the upstream failure is what is measured
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            out["fresh_state_dict_error"] = (
                f"{type(exc).__name__}: {exc} at {frame.filename}:{frame.lineno}: {frame.line}")

        # The upstream bug unshare_adam_step handles: load_state_dict shares one step tensor.
        _load_manually(tmp, ddp3, opt3, sched3)
        out["distinct_step_tensors_after_load"] = len(
            {id(s["step"]) for s in torch_adam_states(opt3)})
        out["num_adam_states"] = len(torch_adam_states(opt3))
        out["unshared"] = unshare_adam_step(opt3)
        out["unshared_again"] = unshare_adam_step(opt3)
        out["distinct_step_tensors_after_unshare"] = len(
            {id(s["step"]) for s in torch_adam_states(opt3)})

        model4, ddp4, opt4, sched4 = fresh(SEED + 3)
        _load_manually(tmp, ddp4, opt4, sched4)
        train_step(ddp4, opt4, batch)
        out["steps_after_one_step_unguarded"] = sorted(
            {float(s["step"]) for s in torch_adam_states(opt4)})
    return out


def probe_bucketed_checkpoint(args) -> dict:
    """Save and load the distributed optimizer (fully_reshardable) of a DDP with several
    buckets (overlap_grad_reduce, 1000-element buckets, each padded at its end), world 1."""
    from sbtrain.checkpoint import load_checkpoint, save_checkpoint

    groups = init_groups()
    seed_all()
    batch = make_batch(0)

    def fresh(init_seed: int):
        model, tconfig = build_gpt(groups, init_seed=init_seed)
        ddp, optimizer = build_ddp_optimizer(groups, tconfig, model, overlap_grad_reduce=True,
                                             bucket_size=1000)
        return model, ddp, optimizer, make_scheduler(optimizer)

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, ddp, opt, sched = fresh(SEED)
        out["buckets"] = len(ddp.bucket_groups)
        train_step(ddp, opt, batch)
        sched.step(increment=1)
        saved_states = [{k: v.clone() for k, v in s.items()} for s in torch_adam_states(opt)]
        save_checkpoint(tmp, 1, ddp, opt, sched)
        model2, ddp2, opt2, sched2 = fresh(SEED + 1)
        load_checkpoint(tmp, ddp2, opt2, sched2)
        states2 = torch_adam_states(opt2)
        out["adam_state_equal"] = len(states2) == len(saved_states) and all(
            torch.equal(a[k], b[k])
            for a, b in zip(states2, saved_states) for k in ("exp_avg", "exp_avg_sq"))
        loss_cont, _ = train_step(ddp, opt, batch)
        loss_resumed, _ = train_step(ddp2, opt2, batch)
        out["loss_continued"], out["loss_resumed"] = loss_cont, loss_resumed
        out["params_equal_after_step"] = all(
            torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    return out


# Imported before the revert probe's snapshot, so that applying the patches imports nothing new.
PRE_IMPORT = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)


def _megatron_bindings() -> dict[tuple, object]:
    """Every module-global and class attribute of the imported megatron modules."""
    snap: dict[tuple, object] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.") or module is None:
            continue
        for key, value in list(vars(module).items()):
            snap[(name, key)] = value
            if isinstance(value, type) and value.__module__ == name:
                for attr, member in list(vars(value).items()):
                    snap[(name, key, attr)] = member
    return snap


def _is_patch_artefact(value: object) -> bool:
    """The CPU torch stand-in, or a wrapper function defined in maca_compat/patches.py."""
    from maca_compat import patches
    from maca_compat.cpu_shims import CPU_TORCH

    if value is CPU_TORCH:
        return True
    func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    code = getattr(func, "__code__", None)
    return code is not None and code.co_filename == patches.__file__


def probe_revert_identity(args) -> dict:
    """apply_patches() rebinds; revert_patches() puts back the very same objects."""
    import importlib
    import logging

    from maca_compat import patches

    for name in PRE_IMPORT:
        importlib.import_module(name)
    rng_log = logging.getLogger("megatron.core.tensor_parallel.random")
    filters_before = list(rng_log.filters)
    snap = _megatron_bindings()
    modules_before = {n for n in sys.modules if n.startswith("megatron.")}

    applied = patches.apply_patches(vendor="cpu")
    records = [(entry, owner, attr, original)
               for entry, undo in patches._applied for owner, attr, original in undo]
    bindings = {}
    for entry, owner, attr, original in records:
        bindings.setdefault((id(owner), attr), []).append(entry)
    rebound = [  # only the logging filter list is changed in place, not rebound
        f"{entry}: {_owner_name(owner)}.{attr}" for entry, owner, attr, original in records
        if attr != "filters" and (vars(owner)[attr] if isinstance(owner, type)
                                  else getattr(owner, attr)) is not original
    ]
    noisy = logging.LogRecord("x", logging.WARNING, "", 0, "CPU RNG state changed within GPU RNG "
                              "context", None, None)
    silenced_while_applied = not rng_log.filter(noisy)
    patches.apply_patches(vendor="cpu")  # idempotent
    applied_twice = patches.applied_patches()

    # Partial revert: only the named entry goes back.
    random_module = sys.modules["megatron.core.tensor_parallel.random"]
    patches.revert_patches(["rng_tracker"])
    partial = {
        "applied": patches.applied_patches(),
        "random_torch_restored": random_module.torch is torch,
        "schedules_torch_still_shimmed": _is_patch_artefact(
            sys.modules["megatron.core.pipeline_parallel.schedules"].torch),
    }
    patches.revert_patches()

    after = _megatron_bindings()
    changed = [".".join(key) for key, value in snap.items() if after.get(key) is not value]
    artefacts = [".".join(key) for key, value in after.items() if _is_patch_artefact(value)]
    originals_back = [
        f"{_owner_name(owner)}.{attr}" for _, owner, attr, original in records
        if attr != "filters" and (vars(owner).get(attr, patches.MISSING) if isinstance(owner, type)
                                  else getattr(owner, attr, patches.MISSING)) is not original
    ]
    return {
        "applied": applied,
        "applied_twice": applied_twice,
        "applied_after_revert": patches.applied_patches(),
        "num_records": len(records),
        "entries_with_records": sorted({r[0] for r in records}),
        "rebound_while_applied": len(rebound),
        "num_filter_records": sum(attr == "filters" for _, _, attr, _ in records),
        "shared_bindings": [f"{k[1]}: {v}" for k, v in bindings.items() if len(v) > 1],
        "new_modules_on_apply": sorted(
            {n for n in sys.modules if n.startswith("megatron.")} - modules_before),
        "num_bindings_checked": len(snap),
        "changed_after_revert": changed,
        "artefacts_after_revert": artefacts,
        "originals_not_back": originals_back,
        "silenced_while_applied": silenced_while_applied,
        "filters_restored": list(rng_log.filters) == filters_before,
        "passes_filter_after_revert": bool(rng_log.filter(noisy)),
        "partial": partial,
    }


def probe_import_is_inert(args) -> dict:
    """Importing maca_compat (and its lazy names) applies nothing and imports no megatron."""
    import maca_compat
    import maca_compat.patches
    import maca_compat.runtime  # noqa: F401 - the module that applies, when called

    maca_compat.get_platform  # noqa: B018 - lazy attribute access imports the platform module
    maca_compat.COMM_BACKENDS  # noqa: B018
    return {
        "applied": maca_compat.patches.applied_patches(),
        "megatron_modules": sorted(n for n in sys.modules if n.startswith("megatron")),
    }


def _in_optim_probes(name: str):
    """A probe defined in optim_probes.py (kept apart for file size); it gets this module."""

    def run(args) -> dict:
        from tests.maca_compat import optim_probes

        return getattr(optim_probes, name)(args, sys.modules[__name__])

    return run


def _in_checkpoint_probes(name: str):
    """A probe defined in checkpoint_probes.py (kept apart for file size); it gets this module."""

    def run(args) -> dict:
        from tests.maca_compat import checkpoint_probes

        return getattr(checkpoint_probes, name)(args, sys.modules[__name__])

    return run


def probe_moe_ep1_host_reads(args) -> dict:
    """EP1 MoE forward + backward (alltoall dispatcher): the host reads of counts / split sizes
    the dispatcher makes (copies handed to maybe_move_tensor_to_cpu, ``tolist()`` calls in
    moe_utils), and the loss and gradients, so a test can compare with and without the entry."""
    from megatron.core.transformer.moe import token_dispatcher

    groups = init_groups()
    seed_all()
    model, _ = build_gpt(groups, pattern="*E")
    counts = {"dtoh_copies": 0, "moe_utils_tolist": 0}
    to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def counting_to_cpu(tensor, *a, **kw):
        counts["dtoh_copies"] += isinstance(tensor, torch.Tensor)
        return to_cpu(tensor, *a, **kw)

    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        counts["moe_utils_tolist"] += sys._getframe(1).f_code.co_filename.endswith("moe_utils.py")
        return tolist(self)

    token_dispatcher.maybe_move_tensor_to_cpu = counting_to_cpu
    torch.Tensor.tolist = counting_tolist
    try:
        loss = lm_loss(model, make_batch(100))
        loss.backward()
    finally:
        token_dispatcher.maybe_move_tensor_to_cpu = to_cpu
        torch.Tensor.tolist = tolist
    grads = {n: p.grad.double().sum().item() for n, p in model.named_parameters() if p.grad is not None}
    return {**counts, "loss": loss.item(), "grad_sums": grads}


NO_APPLY = {"revert_identity", "import_is_inert"}

PROBES = {
    "rng_tracker": probe_rng_tracker,
    "model_device_allocations": probe_model_device_allocations,
    "moe_alltoall": probe_moe_alltoall,
    "pipeline_schedules": probe_pipeline_schedules,
    "ddp_and_optimizer": probe_ddp_and_optimizer,
    "checkpoint": probe_checkpoint,
    "bucketed_checkpoint": probe_bucketed_checkpoint,
    "revert_identity": probe_revert_identity,
    "import_is_inert": probe_import_is_inert,
    "fused_optim": _in_optim_probes("probe_fused_optim"),
    "wgrad_fusion": _in_optim_probes("probe_wgrad_fusion"),
    "moe_ep1": probe_moe_ep1_host_reads,
    "empty_shard_step": _in_checkpoint_probes("probe_empty_shard_step"),
}


# Modules the probes use, imported by the fork server before it forks any job.
SERVER_IMPORTS = PRE_IMPORT + (
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.transformer.module",
    "megatron.core.tensor_parallel.random",
    "maca_compat.patches",
    "parallel.groups",
    "parallel.init",
    "sbtrain.model.builder",
    "sbtrain.checkpoint",
)


def _run_forked_job(job: dict) -> None:
    """In the forked child: output to the job's files, run ``main(argv)``, never return."""
    code = 1
    try:
        redirect_stdio(job["stdout"], job["stderr"], append=False)
        main(job["argv"])
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # noqa: BLE001 - report whatever the probe raised, like python would
        traceback.print_exc()
    finally:
        flush_and_exit(code)


def serve(workers: int, timeout_s: float) -> None:
    """Run jobs read from stdin, at most ``workers`` at a time, each in a forked child.

    One JSON job per stdin line: ``{"id", "argv", "stdout", "stderr"}`` (output file paths).
    One JSON line per finished job on stdout: ``{"id", "returncode", "seconds"}``; a job over
    ``timeout_s`` is killed (returncode -9). Returns at end of input once all jobs are done.
    """
    import collections
    import importlib
    import select
    import signal
    import time

    for name in SERVER_IMPORTS:
        importlib.import_module(name)
    stdin = sys.stdin.fileno()
    pending: collections.deque = collections.deque()
    running: dict[int, tuple[dict, float]] = {}
    buffer, eof = b"", False
    while not (eof and not pending and not running):
        if not eof:
            ready, _, _ = select.select([stdin], [], [], 0.05)
            if ready:
                chunk = os.read(stdin, 65536)
                eof = not chunk
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                pending.extend(json.loads(line) for line in lines if line.strip())
        else:
            time.sleep(0.05)
        while pending and len(running) < workers:
            job = pending.popleft()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_forked_job(job)
            running[pid] = (job, time.monotonic())
        for pid, (job, start) in list(running.items()):
            if time.monotonic() - start > timeout_s:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del running[pid]
                print(json.dumps({"id": job["id"], "returncode": os.waitstatus_to_exitcode(status),
                                  "seconds": time.monotonic() - start}), flush=True)


def main(argv: list[str] | None = None) -> None:
    if argv and argv[0] == "--serve":
        server = argparse.ArgumentParser(description="fork server for single-process probes")
        server.add_argument("--serve", action="store_true")
        server.add_argument("--workers", type=int, default=2)
        server.add_argument("--timeout", type=float, default=300.0)
        opts = server.parse_args(argv)
        serve(opts.workers, opts.timeout)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--without", default=None, help="the PATCHES entry to leave out")
    parser.add_argument("--restore", action="append", default=[],
                        help="MODULE:ATTR rebinding of an applied entry to undo")
    args = parser.parse_args(argv)
    if args.probe not in NO_APPLY:
        apply_all_but(args.without, args.restore)
    result = PROBES[args.probe](args)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    # One write call per line: ranks share the stdout file, and print() writes the text and
    # the newline separately, so two ranks' results could land on one line (seen in CI).
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{RESULT_TAG} {rank} {json.dumps(result)}\n".encode())
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
