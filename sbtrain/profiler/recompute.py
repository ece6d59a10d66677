"""``train.recompute``: what each policy costs (memory per rank, recomputed FLOPs) and the
``auto`` choice, the cheapest policy whose memory plan fits the device.

Policies, cheapest first (``sbtrain.model.megatron_config.recompute_fields`` maps them):

- ``none``: nothing is recomputed;
- ``selective``: the cores of the GLA / parallel-hybrid mixers (feature maps, gate, fla kernel,
  head norms) and the SwiGLU product of dense FFNs and shared experts are recomputed:
  elementwise work plus one linear-attention kernel forward per ``L``/``H``/``F`` layer;
- ``full``: every layer runs its forward twice.

``auto`` takes the first of these whose estimated peak (``memory.estimate_memory_per_rank``,
which leaves out the CUDA context, allocator fragmentation and transient buffers) is at most
``AUTO_MEMORY_FRACTION`` of the device; if none fits it takes ``full``, the smallest.
"""

from __future__ import annotations

import dataclasses

from sbtrain.config.schema import ModelConfig, RunConfig
from sbtrain.profiler.flops import flops_per_token, gla_flops
from sbtrain.profiler.memory import estimate_memory_per_rank

POLICIES = ("none", "selective", "full")
"""Concrete policies, cheapest in recomputed FLOPs first."""
AUTO_MEMORY_FRACTION = 0.9
"""Share of the device the estimate may fill: the rest is left for what it does not count."""
DEFAULT_DEVICE_GIB = 80.0
"""Device size ``sbtrain plan`` resolves ``auto`` against when neither
``profiler.device_memory_gib`` nor ``--device-gib`` gives one."""


def recompute_flops_per_token(model: ModelConfig, seq_length: int, policy: str) -> float:
    """Forward FLOPs recomputed in backward per token (``flops.py`` conventions: matmul-like
    work only, so the elementwise ops of ``selective`` count nothing)."""
    if policy == "none":
        return 0.0
    if policy == "selective":
        return sum(gla_flops(model) for mixer, _ in model.layers if mixer in "LHF")
    if policy == "full":
        forward = flops_per_token(model, seq_length, training=False)
        return forward["forward"] - forward["logits"]
    raise ValueError(f"unknown recompute policy {policy!r}; known: {', '.join(POLICIES)}")


def policy_table(cfg: RunConfig, world_size: int, device_type: str = "cuda") -> list[dict]:
    """Per concrete policy: the worst rank's ``total_gib`` and ``activations_gib``, the
    recomputed FLOPs per token and their share of the model's training FLOPs."""
    model_flops = flops_per_token(cfg.model, cfg.train.seq_length, training=True)["total"]
    rows = []
    for policy in POLICIES:
        memory = estimate_memory_per_rank(cfg, world_size, device_type=device_type, policy=policy)
        flops = recompute_flops_per_token(cfg.model, cfg.train.seq_length, policy)
        rows.append({"policy": policy, "total_gib": memory["total_gib"],
                     "activations_gib": memory["activations_gib"],
                     "recompute_flops_per_token": flops,
                     "recompute_overhead": flops / model_flops})
    return rows


def choose_policy(rows: list[dict], device_gib: float) -> tuple[str, str]:
    """(policy, why): the cheapest row that fits ``AUTO_MEMORY_FRACTION * device_gib``."""
    budget = AUTO_MEMORY_FRACTION * device_gib
    ranked = sorted(rows, key=lambda r: (r["recompute_flops_per_token"], POLICIES.index(r["policy"])))
    sizes = ", ".join(f"{r['policy']} {r['total_gib']:.1f}" for r in rows)
    for row in ranked:
        if row["total_gib"] <= budget:
            skipped = [r["policy"] for r in ranked[:ranked.index(row)]]
            over = f"; {', '.join(skipped)} would not fit" if skipped else ""
            return row["policy"], (f"cheapest policy that fits {budget:.1f} GiB "
                                   f"({AUTO_MEMORY_FRACTION:.0%} of {device_gib:g} GiB): "
                                   f"{sizes} GiB{over}")
    return "full", (f"no policy fits {budget:.1f} GiB ({AUTO_MEMORY_FRACTION:.0%} of "
                    f"{device_gib:g} GiB): {sizes} GiB; full is the smallest")


def resolve_recompute(cfg: RunConfig, world_size: int, device_gib: float,
                      device_type: str = "cuda") -> tuple[RunConfig, dict]:
    """``cfg`` with ``train.recompute: auto`` replaced by its choice for a ``device_gib``
    device (other policies are kept), and ``{"requested", "policy", "reason", "device_gib",
    "budget_gib", "policies"}``."""
    requested = cfg.train.recompute
    rows = policy_table(cfg, world_size, device_type)
    if requested == "auto":
        policy, reason = choose_policy(rows, device_gib)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute=policy))
    else:
        policy, reason = requested, "set in the config"
    return cfg, {"requested": requested, "policy": policy, "reason": reason,
                 "device_gib": device_gib, "budget_gib": AUTO_MEMORY_FRACTION * device_gib,
                 "policies": rows}


__all__ = ["AUTO_MEMORY_FRACTION", "DEFAULT_DEVICE_GIB", "POLICIES", "choose_policy",
           "policy_table", "recompute_flops_per_token", "resolve_recompute"]
