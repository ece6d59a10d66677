"""A run plan: parameters, FLOPs per token, per-rank memory and sequence-parallel traffic of a
config, before launching."""

from __future__ import annotations

from sbtrain.config.schema import RunConfig
from sbtrain.profiler.comm import MIXER_BRANCHES, sp_comm_per_rank
from sbtrain.profiler.counting import count_parameters
from sbtrain.profiler.flops import flops_per_token
from sbtrain.profiler.memory import estimate_memory_per_rank
from sbtrain.profiler.recompute import DEFAULT_DEVICE_GIB, resolve_recompute


def default_world_size(cfg: RunConfig) -> int:
    """dp * pp * tp * sp, with ``parallel.dp = 0`` (infer from the launch) taken as 1."""
    p = cfg.parallel
    return (p.dp or 1) * p.pp * p.tp * p.sp


def make_plan(cfg: RunConfig, world_size: int | None = None,
              device_memory_gib: list[float] | None = None, device_type: str = "cuda") -> dict:
    """Combine parameter counts, model FLOPs and the memory estimate into one JSON-able dict.

    ``device_memory_gib`` lists device sizes to check the worst rank against (``fits`` means
    the estimate, which leaves out framework overhead, is at most the device size).
    ``device_type`` resolves ``precision: auto`` (bf16 unless ``cpu``). ``sp_comm`` is
    ``sp_comm_per_rank``'s result (``enabled`` is false when sp == 1). ``recompute`` is
    ``resolve_recompute``'s report (every policy's memory and recomputed FLOPs; ``auto`` is
    chosen for ``profiler.device_memory_gib``, else the largest of ``device_memory_gib``); the
    memory and traffic sections use the chosen policy.
    """
    world = world_size or default_world_size(cfg)
    recompute_gib = cfg.profiler.device_memory_gib or max(device_memory_gib or [DEFAULT_DEVICE_GIB])
    cfg, recompute = resolve_recompute(cfg, world, recompute_gib, device_type)
    params = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, cfg.train.seq_length, training=True)
    memory = estimate_memory_per_rank(cfg, world, device_type=device_type)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    fits = [
        {"device_gib": size, "fits": memory["total_gib"] <= size,
         "headroom_gib": size - memory["total_gib"]}
        for size in device_memory_gib or []
    ]
    return {
        "pattern": cfg.model.pattern,
        "world_size": world,
        "parallel": {"dp": memory["dp"], "pp": cfg.parallel.pp, "tp": cfg.parallel.tp,
                     "ep": cfg.parallel.ep, "sp": cfg.parallel.sp},
        "seq_length": cfg.train.seq_length,
        "tokens_per_step": tokens_per_step,
        "parameters": params,
        "flops_per_token": flops,
        "flops_per_step": flops["total"] * tokens_per_step,
        "memory": memory,
        "recompute": recompute,
        "fits": fits,
        "sp_comm": sp_comm_per_rank(cfg, world, device_type=device_type),
    }


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _params_section(plan: dict) -> list[str]:
    params = plan["parameters"]
    lines = [
        f"parameters  total {_num(params['total'])} ({params['total'] / 1e9:.2f} B)"
        f" | active {_num(params['active'])} ({params['active'] / 1e9:.2f} B)"
        f" | embedding {_num(params['embedding'])} | lm_head {_num(params['lm_head'])}",
        f"  {'layer':<6}{'count':>6}{'total/layer':>18}{'active/layer':>18}{'all layers':>20}",
    ]
    for code, info in params["layers"].items():
        lines.append(f"  {code:<6}{info['count']:>6}{_num(info['total']):>18}"
                     f"{_num(info['active']):>18}{_num(info['total_all']):>20}")
    return lines


def _flops_section(plan: dict) -> list[str]:
    flops = plan["flops_per_token"]
    lines = [
        f"model FLOPs per token (training, seq {plan['seq_length']:,})  total {flops['total']:.4g}"
        f" | matmul {flops['matmul']:.4g} | attention {flops['attention']:.4g}"
        f" | logits {flops['logits']:.4g} | 6N {flops['dense_6n']:.4g}",
        f"  {'layer':<6}{'count':>6}{'matmul/layer':>16}{'attn/layer':>16}{'all layers':>16}",
    ]
    for code, info in flops["layers"].items():
        lines.append(f"  {code:<6}{info['count']:>6}{info['matmul']:>16.4g}"
                     f"{info['attention']:>16.4g}{info['total']:>16.4g}")
    lines.append(f"  per step: {plan['tokens_per_step']:,} tokens, {plan['flops_per_step']:.4g} FLOPs")
    return lines


def _memory_section(plan: dict) -> list[str]:
    mem = plan["memory"]
    lines = [
        f"memory per rank (GiB; bytes/param {mem['bytes_per_param']:g} + grad "
        f"{mem['bytes_per_grad']:g} + optimizer {mem['optimizer_bytes_per_param']:g}, "
        f"{mem['num_microbatches']} micro-batches/step, recompute {mem['recompute']})",
        f"  {'stage':<6}{'layers':>7}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}"
        f"{'in-flight':>10}{'total':>9}",
    ]
    for st in mem["stages"]:
        mark = " <- worst" if st["stage"] == mem["worst_stage"] else ""
        lines.append(f"  {st['stage']:<6}{st['layers']:>7}{st['params_gib']:>9.2f}"
                     f"{st['grads_gib']:>9.2f}{st['optimizer_gib']:>9.2f}"
                     f"{st['activations_gib']:>9.2f}{st['inflight_microbatches']:>10}"
                     f"{st['total_gib']:>9.2f}{mark}")
    for fit in plan["fits"]:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        lines.append(f"  {fit['device_gib']:g} GiB device: {verdict} "
                     f"(headroom {fit['headroom_gib']:+.2f} GiB, before framework overhead)")
    return lines


def _recompute_section(plan: dict) -> list[str]:
    rec = plan.get("recompute")
    if not rec:
        return []
    lines = [f"recompute {rec['policy']}" + (" (auto)" if rec["requested"] == "auto" else "")
             + f": {rec['reason']}",
             f"  {'policy':<11}{'total GiB':>10}{'activ GiB':>10}{'recompute FLOPs/token':>23}"
             f"{'overhead':>10}"]
    for row in rec["policies"]:
        mark = " <- used" if row["policy"] == rec["policy"] else ""
        lines.append(f"  {row['policy']:<11}{row['total_gib']:>10.2f}{row['activations_gib']:>10.2f}"
                     f"{row['recompute_flops_per_token']:>23.4g}"
                     f"{row['recompute_overhead']:>9.1%}{mark}")
    return lines


def _bytes(value: float) -> str:
    """Binary units: 512 B, 4.25 KiB, 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:,.2f} TiB"


BRANCH_ROWS = {"linear": "GLA state", "window": "window {}", "full": "full K/V {}"}
"""Row label of each communicating branch; a softmax branch names its exchange."""
EXCHANGE_ROWS = {"tails": "all-gather", "halo": "send/recv", "ulysses": "all-to-all"}


def _comm_row(code: str, exchanges: dict[str, str]) -> str:
    """``W`` -> ``window send/recv`` (halo) or ``window all-gather`` (tails); ``H`` ->
    ``GLA state + window ...``."""
    return " + ".join(BRANCH_ROWS[branch].format(EXCHANGE_ROWS.get(exchanges.get(branch), ""))
                      for branch in MIXER_BRANCHES[code])


def _comm_section(plan: dict) -> list[str]:
    comm = plan.get("sp_comm") or {}
    if not comm.get("enabled"):
        return []
    lines = [
        f"sequence-parallel traffic per rank (sp {comm['sp']}, slice {comm['slice_tokens']:,} "
        f"tokens; ring collectives, each rank sends and receives this much)",
        f"  {'layer':<6}{'count':>6}  {'what':<31}{'forward':>12}{'backward':>12}"
        f"{'recompute':>12}{'per layer/mb':>14}",
    ]
    for code, info in comm["layers"].items():
        lines.append(f"  {code:<6}{info['count']:>6}  {_comm_row(code, info['exchange']):<31}"
                     f"{_bytes(info['forward_bytes']):>12}{_bytes(info['backward_bytes']):>12}"
                     f"{_bytes(info['recompute_bytes']):>12}{_bytes(info['total_bytes']):>14}")
    worst = comm["stages"][comm["worst_stage"]]
    lines.append(f"  per step: {_bytes(comm['step_bytes'])} sent and received (stage "
                 f"{worst['stage']}: {worst['layers']} layers x {comm['num_microbatches']} "
                 f"micro-batches, {_bytes(worst['bytes_per_microbatch'])} each)")
    uly = comm["ulysses"]
    for kind, costs in comm["exchange_bytes"].items():
        options = ", ".join(f"{name} {_bytes(total)}" + (" <- used" if name == comm["exchanges"][kind] else "")
                            for name, total in costs.items())
        lines.append(f"  {kind}-attention layer/mb by exchange: {options}")
    if comm["exchange_bytes"] and uly["blocker"]:
        lines.append(f"  (ulysses not eligible: {uly['blocker']})")
    return lines


def format_plan(plan: dict) -> str:
    """Human-readable tables of a ``make_plan`` result."""
    par = plan["parallel"]
    head = (f"plan: pattern {plan['pattern']} | world {plan['world_size']} = dp {par['dp']} x "
            f"pp {par['pp']} x tp {par['tp']} x sp {par['sp']} (ep {par['ep']})")
    sections = [[head], _params_section(plan), _flops_section(plan), _memory_section(plan),
                _recompute_section(plan), _comm_section(plan)]
    return "\n".join(line for section in sections for line in section)
