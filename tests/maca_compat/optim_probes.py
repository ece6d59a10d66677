"""Probes for the optimizer-path and gradient-accumulation entries of maca_compat.patches.

Run through ``tests.maca_compat.probes`` (``fused_optim`` and ``wgrad_fusion``); each function
gets that module as ``p`` for its helpers (tiny GPT, DDP + distributed optimizer, one step).
"""

from __future__ import annotations

import collections
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

# The per-tensor ops of megatron's local fallbacks and the foreach ops replacing them.
COUNTED_OPS = ("aten::linalg_vector_norm", "aten::_foreach_norm",
               "aten::mul", "aten::_foreach_mul_", "aten::copy_", "aten::_foreach_copy_")


def count_ops(fn) -> tuple[object, dict[str, int]]:
    """Run ``fn()`` under the CPU profiler; returns its result and how often it called each of
    COUNTED_OPS from Python (top-level ops: CPU's foreach kernels loop over per-tensor ops
    inside) plus ``host_syncs``, every ``aten::_local_scalar_dense`` at any depth."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    events = prof.events()
    top = collections.Counter(e.name for e in events if e.cpu_parent is None)
    counts = {name: top.get(name, 0) for name in COUNTED_OPS}
    counts["host_syncs"] = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return out, counts


def _grad_lists(n_tensors: int = 18) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    sizes = [7, 300, 64, 1, 1000, 33]
    return [torch.randn(sizes[i % len(sizes)], generator=gen) for i in range(n_tensors)]


def norm_and_scale(p) -> dict:
    """get_grad_norm_fp32, clip_grad_by_total_norm_fp32 and the fp32 -> bf16 list copy."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.optimizer import _multi_tensor_copy_this_to_that

    from maca_compat.cpu_shims import cpu_tensors_report_cuda_types

    grads = _grad_lists()
    norm, norm_ops = count_ops(lambda: clip_grads.get_grad_norm_fp32(grads))
    reference = float(torch.linalg.vector_norm(torch.cat(grads).double()))

    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    max_norm = 1.0
    with cpu_tensors_report_cuda_types():
        _, clip_ops = count_ops(
            lambda: clip_grads.clip_grad_by_total_norm_fp32(params, max_norm, norm))
    coeff = max_norm / (norm + 1.0e-6)
    clip_exact = all(torch.equal(q.grad, g * coeff) for q, g in zip(params, grads))

    this = [g * 3.0 for g in grads]
    that = [torch.empty_like(g, dtype=torch.bfloat16) for g in grads]
    _, copy_ops = count_ops(
        lambda: _multi_tensor_copy_this_to_that(this, that, torch.zeros(1, dtype=torch.int)))
    copy_exact = all(torch.equal(b, a.to(torch.bfloat16)) for a, b in zip(this, that))
    return {
        "num_tensors": len(grads), "grad_norm": float(norm), "reference_norm": reference,
        "norm_ops": norm_ops, "clip_ops": clip_ops, "clip_exact": clip_exact,
        "clip_coeff": coeff, "copy_ops": copy_ops, "copy_exact": copy_exact,
    }


def _adam_flags(optimizer) -> list[dict]:
    from sbtrain.checkpoint import _torch_optimizers

    return [{"class": type(opt).__name__, "fused": group.get("fused"),
             "foreach": group.get("foreach")}
            for opt in _torch_optimizers(optimizer) for group in opt.param_groups]


def _step_placement(p, optimizer, model) -> list[list]:
    device = str(next(model.parameters()).device)
    return sorted({(str(s["step"].dtype), str(s["step"].device) == device)
                   for s in p.torch_adam_states(optimizer)})


def adam_steps(p, groups) -> dict:
    """Three steps of the tiny GPT with the distributed optimizer; save after two, resume into
    a fresh model, and take the third step there too."""
    from sbtrain.checkpoint import load_checkpoint, save_checkpoint

    p.seed_all()

    def fresh(init_seed: int):
        model, tconfig = p.build_gpt(groups, init_seed=init_seed)
        ddp, optimizer = p.build_ddp_optimizer(groups, tconfig, model, weight_decay=0.1)
        return model, ddp, optimizer, p.make_scheduler(optimizer)

    out: dict = {}
    model, ddp, opt, sched = fresh(p.SEED)
    out["flags"] = _adam_flags(opt)
    losses = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(3):
            if step == 2:
                save_checkpoint(tmp, 2, ddp, opt, sched)
            losses.append(p.train_step(ddp, opt, p.make_batch(step))[0])
            sched.step(increment=1)
        out["losses"] = losses
        out["params"] = [float(t.double().sum()) for t in model.parameters()]
        out["step_placement"] = _step_placement(p, opt, model)

        model2, ddp2, opt2, sched2 = fresh(p.SEED + 1)
        load_checkpoint(tmp, ddp2, opt2, sched2)
        out["flags_after_load"] = _adam_flags(opt2)
        out["step_placement_after_load"] = _step_placement(p, opt2, model2)
        out["loss_resumed"] = p.train_step(ddp2, opt2, p.make_batch(2))[0]
        out["params_equal_after_resume"] = all(
            torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    return out


def probe_fused_optim(args, p) -> dict:
    """CPU's own choice is torch's default loop; re-apply the entry (when it is applied) with
    SB_ADAM_IMPL=fused so that torch's fused Adam, which CPU has too, is what runs."""
    from maca_compat import patches

    if "platform_adam" in patches.applied_patches():
        patches.revert_patches(["platform_adam"])
        os.environ["SB_ADAM_IMPL"] = "fused"
        patches.apply_patches(["platform_adam"], vendor="cpu")
    groups = p.init_groups()
    return {**norm_and_scale(p), **adam_steps(p, groups)}


# --------------------------------------------------------------------------- wgrad fusion


def _linear_pair(groups, fusion: bool, dtype: torch.dtype):
    """ColumnParallelLinear(16 -> 24) then RowParallelLinear(24 -> 16), as in an MLP."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1,
                               gradient_accumulation_fusion=fusion, params_dtype=dtype,
                               bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    torch.manual_seed(3)
    init = torch.nn.init.normal_
    tp = groups.pg_collection.tp
    column = ColumnParallelLinear(16, 24, config=config, init_method=init, bias=True,
                                  gather_output=False, tp_group=tp)
    row = RowParallelLinear(24, 16, config=config, init_method=init, bias=True,
                            input_is_parallel=True, skip_bias_add=False, tp_group=tp)
    for layer in (column, row):
        for param in layer.parameters():  # what megatron DDP gives each parameter
            param.main_grad = torch.zeros_like(param, dtype=torch.float32)
            param.grad_added_to_main_grad = False
    return column, row


def _ddp_hook(layers) -> None:
    """DDP's post-accumulate hook: add param.grad into main_grad unless the layer already did."""
    for layer in layers:
        for param in layer.parameters():
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad.float())
            param.grad = None


def _run_pair(groups, fusion: bool, dtype: torch.dtype) -> dict:
    column, row = _linear_pair(groups, fusion, dtype)
    gen = torch.Generator().manual_seed(11)
    outputs, input_grads = [], []
    for _ in range(2):  # two micro-batches accumulate into main_grad
        x = torch.randn(5, 2, 16, generator=gen).to(dtype).requires_grad_()
        hidden, _ = column(x)
        out, _ = row(hidden)
        out.float().pow(2).sum().backward()
        _ddp_hook((column, row))
        outputs.append(out.detach())
        input_grads.append(x.grad)
    main_grads = {f"{name}.{pn}": param.main_grad.clone()
                  for name, layer in (("column", column), ("row", row))
                  for pn, param in layer.named_parameters()}
    added = [column.weight.grad_added_to_main_grad, row.weight.grad_added_to_main_grad]
    return {"outputs": outputs, "input_grads": input_grads, "main_grads": main_grads,
            "added": added}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compare_layers(groups, dtype: torch.dtype) -> dict:
    fused = _run_pair(groups, True, dtype)
    plain = _run_pair(groups, False, dtype)
    return {
        "forward_equal": all(torch.equal(a, b) for a, b in zip(fused["outputs"], plain["outputs"])),
        "input_grad_equal": all(torch.equal(a, b)
                                for a, b in zip(fused["input_grads"], plain["input_grads"])),
        "main_grad_rel_err": {k: _max_rel(fused["main_grads"][k], v)
                              for k, v in plain["main_grads"].items()},
        "fused_added_to_main_grad": fused["added"],
        "plain_added_to_main_grad": plain["added"],
    }


def _bf16_against_fp64(groups) -> dict:
    """bf16 layers: fused main_grad (fp32 accumulation of the exact bf16 products) vs the
    stock bf16-rounded wgrad, both against the same computation in fp64."""
    fused = _run_pair(groups, True, torch.bfloat16)
    plain = _run_pair(groups, False, torch.bfloat16)
    column, row = _linear_pair(groups, False, torch.bfloat16)
    gen = torch.Generator().manual_seed(11)
    ref = {"column.weight": 0.0, "row.weight": 0.0}
    for _ in range(2):
        x = torch.randn(5, 2, 16, generator=gen).to(torch.bfloat16).reshape(10, 16)
        h = (x.float() @ column.weight.float().t() + column.bias.float()).to(torch.bfloat16)
        o = (h.float() @ row.weight.float().t() + row.bias.float()).to(torch.bfloat16)
        go = (2 * o.float()).to(torch.bfloat16)
        gh = (go.float() @ row.weight.float()).to(torch.bfloat16)
        ref["row.weight"] = ref["row.weight"] + go.double().t() @ h.double()
        ref["column.weight"] = ref["column.weight"] + gh.double().t() @ x.double()
    return {name: {"fused": _max_rel(fused["main_grads"][name], want),
                   "plain": _max_rel(plain["main_grads"][name], want)}
            for name, want in ref.items()}


def _gpt_main_grads(p, groups, fusion: bool, tied: bool) -> tuple[float, int, dict]:
    """The tiny GPT under megatron DDP, two micro-batches; ``tied``: embedding == output weight
    (megatron then zeroes the fused layer's dummy wgrad so the embedding's gradient is kept)."""
    import dataclasses

    import sbtrain.model.megatron_config as megatron_config
    from parallel.init import init_parameters_globally
    from sbtrain.model.builder import build_model

    cfg = p.run_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, untie_embeddings=not tied))
    enabled = megatron_config.grad_accum_fusion_enabled
    megatron_config.grad_accum_fusion_enabled = lambda platform: fusion
    try:
        model, tconfig = build_model(cfg, groups.pg_collection, torch.float32, torch.device("cpu"))
    finally:
        megatron_config.grad_accum_fusion_enabled = enabled
    init_parameters_globally(model, p.SEED, cfg.model.init_method_std, cfg.model.num_layers)
    assert tconfig.gradient_accumulation_fusion == fusion
    assert model.share_embeddings_and_output_weights == tied
    ddp, _ = p.build_ddp_optimizer(groups, tconfig, model)
    ddp.zero_grad_buffer()
    loss = sum(p.lm_loss(ddp, p.make_batch(s)) for s in range(2))  # two micro-batches
    loss.backward()
    ddp.finish_grad_sync()
    fused = sum(bool(getattr(q, "grad_added_to_main_grad", False)) for q in model.parameters())
    return float(loss), fused, {n: q.main_grad.clone() for n, q in model.named_parameters()}


def _moe_chunked_main_grads(p, groups, fusion: bool, tied: bool) -> dict:
    """A tiny MoE GPT under megatron DDP whose loss is the trainer's chunked output step
    (``ops.loss``) and whose routed experts run the fast backends' grouped autograd function
    (per-expert GEMMs on the CPU; the registry sends CPU tensors to the reference, which leaves
    gradients to DDP): two micro-batches, the main grads, which weights our ops fused, and the
    experts' main-grad region in DDP's real buffer."""
    import dataclasses
    from functools import partial

    import ops.grouped_mlp as grouped_mlp
    import sbtrain.model.megatron_config as megatron_config
    from ops.main_grad import ExpertMainGrads
    from parallel.init import init_parameters_globally
    from sbtrain.model.builder import build_model
    from sbtrain.trainer import _chunked_loss
    from tests.ops.test_grad_accum_fusion import LOOP_GEMMS

    cfg = p.run_config("*E")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, untie_embeddings=not tied))
    enabled, linear = megatron_config.grad_accum_fusion_enabled, grouped_mlp.grouped_linear
    megatron_config.grad_accum_fusion_enabled = lambda platform: fusion
    grouped_mlp.grouped_linear = lambda x, counts, w, grad_accum_fusion=False: (
        grouped_mlp._GroupedLinearFn.apply(x, counts, LOOP_GEMMS, grad_accum_fusion, *w))
    try:
        model, tconfig = build_model(cfg, groups.pg_collection, torch.float32, torch.device("cpu"))
        init_parameters_globally(model, p.SEED, cfg.model.init_method_std, cfg.model.num_layers)
        ddp, _ = p.build_ddp_optimizer(groups, tconfig, model)
        ddp.zero_grad_buffer()
        loss = 0.0
        for s in range(2):  # two micro-batches
            batch = p.make_batch(s)
            per_token = ddp(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                            output_processor=partial(_chunked_loss, 5))
            micro_loss = per_token.float().mean()
            micro_loss.backward()
            loss += float(micro_loss)
        ddp.finish_grad_sync()
    finally:
        megatron_config.grad_accum_fusion_enabled, grouped_mlp.grouped_linear = enabled, linear
    names = {q: n for n, q in model.named_parameters()}
    experts = next(m for m in model.modules() if type(m).__name__ == "GroupedExperts")
    fc1 = [e.linear_fc1.weight for e in experts.local_experts]
    region = ExpertMainGrads.of(fc1, True).region
    output = model.shared_embedding_or_output_weight() if tied else model.output_layer.weight
    return {"loss": loss, "main_grads": {n: q.main_grad.clone() for n, q in model.named_parameters()},
            "fused": sorted(names[q] for q in model.parameters() if q.grad_added_to_main_grad),
            "output_fused": bool(output.grad_added_to_main_grad), "experts": len(fc1),
            "region_step": None if region is None else region.step,
            "expert_numel": fc1[0].numel() + experts.local_experts[0].linear_fc2.weight.numel()}


def probe_wgrad_fusion(args, p) -> dict:
    groups = p.init_groups()
    p.seed_all()
    out = {"fp32": _compare_layers(groups, torch.float32),
           "bf16": _compare_layers(groups, torch.bfloat16),
           "bf16_vs_fp64": _bf16_against_fp64(groups)}
    for name, tied in (("gpt", False), ("gpt_tied", True)):
        loss_f, fused_f, grads_f = _gpt_main_grads(p, groups, True, tied)
        loss_p, fused_p, grads_p = _gpt_main_grads(p, groups, False, tied)
        out[name] = {
            "fused_params": fused_f, "plain_fused_params": fused_p,
            "loss_equal": loss_f == loss_p, "num_grads": len(grads_p),
            "main_grad_rel_err": max(_max_rel(grads_f[n], g) for n, g in grads_p.items()),
            "grads_nonzero": all(bool(g.abs().sum() > 0) for g in grads_f.values()),
        }
    for name, tied in (("moe_chunked", False), ("moe_chunked_tied", True)):
        fused = _moe_chunked_main_grads(p, groups, True, tied)
        plain = _moe_chunked_main_grads(p, groups, False, tied)
        out[name] = {
            "loss_equal": fused["loss"] == plain["loss"],
            "main_grad_rel_err": max(_max_rel(fused["main_grads"][n], g)
                                     for n, g in plain["main_grads"].items()),
            "grads_nonzero": sum(bool(g.abs().sum() > 0) for g in fused["main_grads"].values()),
            "num_grads": len(plain["main_grads"]),
            "fused": fused["fused"], "plain_fused": plain["fused"],
            "output_fused": fused["output_fused"], "experts": fused["experts"],
            "region_step": fused["region_step"], "expert_numel": fused["expert_numel"],
        }
    return out
