"""Per-rank memory estimate: parameters, gradients, optimizer states and activations.

Placement (Megatron-Core): the L layers are split evenly over ``parallel.pp`` stages; the
embedding sits on the first stage, the final norm and lm_head on the last (with tied
embeddings and pp > 1 the last stage keeps its own copy of the embedding as output weight).
Projections, dense/shared FFNs and the (vocab-parallel) embedding are split over tp; norms,
the router and the GLA gate's first low-rank factor are replicated; routed experts are split
over ep and each expert over tp (Megatron's default expert_tensor_parallel_size = tp).

Bytes per parameter (``precision``; ``auto`` = bf16 unless ``device_type`` is ``cpu``):

- bf16: param 2 + grad 4 (sbtrain builds Megatron DDP with ``grad_reduce_in_fp32=True``) +
  optimizer 12
  (fp32 master copy 4 + Adam m 4 + v 4);
- fp32: param 4 + grad 4 + optimizer 8 (m, v; the params are their own master copy).

With ``optim.distributed_optimizer`` the optimizer bytes are sharded over the data-parallel
group: dp * sp for dense parameters, dp * sp / ep for experts (expert-data-parallel group).
Transient buffers (fp32 main-grad shard, communication buckets), the CUDA context and
allocator fragmentation are not included: keep a margin of a few GiB.

Activations: see ``activation_bytes_per_token``; a micro-batch of b sequences holds
``S * b / sp`` tokens per rank. Under 1F1B stage i (0-based) holds ``min(pp - i, m)``
micro-batches in flight (m = micro-batches per step), so the first stage holds pp.
"""

from __future__ import annotations

from dataclasses import dataclass

from sbtrain.config.schema import ModelConfig, RunConfig
from sbtrain.profiler.counting import EXPERT, REPLICATED, TP, expert_width, layer_blocks

GIB = 1024**3
GLA_CHUNK = 64
"""Chunk size of fla's chunk_gla; it saves a GLA_CHUNK-wide fp32 intra-chunk matrix per token
and head (the states are recomputed in its backward)."""
FP32_BYTES = 4
LOGITS_EXTRA_BYTES = 4
"""Megatron's vocab-parallel cross entropy keeps an fp32 copy of the logits for backward."""


@dataclass(frozen=True)
class Bytes:
    """Bytes per parameter (param, grad, optimizer state) and per activation element."""

    param: float
    grad: float
    optimizer: float
    activation: float


def resolve_bytes(precision: str, device_type: str = "cuda", bytes_per_param: float | None = None,
                  bytes_per_grad: float | None = None) -> Bytes:
    """Byte sizes for ``precision`` (``auto`` means bf16 on accelerators, fp32 on CPU)."""
    if precision == "auto":
        precision = "fp32" if device_type == "cpu" else "bf16"
    half = precision == "bf16"
    param = bytes_per_param if bytes_per_param is not None else (2 if half else 4)
    # Gradients live in fp32 main_grad buffers (trainer_setup: grad_reduce_in_fp32=True).
    grad = bytes_per_grad if bytes_per_grad is not None else 4
    # A fp32 master copy exists only when the model params are narrower than fp32.
    optimizer = 8 + (4 if param < 4 else 0)
    return Bytes(param=param, grad=grad, optimizer=optimizer, activation=2 if half else 4)


def activation_bytes_per_token(model: ModelConfig, mixer: str, ffn: str, policy: str,
                               act_bytes: float) -> dict[str, float]:
    """Bytes one layer keeps per token for backward, under ``none`` or ``selective``.

    What autograd saves on the GPU path (bf16: a = 2 bytes, fp32 tensors f = 4), with
    q = n_h*d, kv = n_g*d, r = gla.gate_rank, F = FFN width (Korthikanti et al. 2022 redone
    for GQA, SwiGLU, no dropout and flash-style attention: no S x S scores):

    - ``common``: both RMSNorms keep their input and the next projection their output, 4h;
    - ``*``/``W``: the fused q/k/v output (alive through v), RoPE'd q and k, the attention
      output, (3q + 3kv) a, plus the fp32 log-sum-exp n_h f; the same under ``selective``;
    - ``L``: relu'd q and k, the gate (bf16, kept by ``ops.gla_gate``), its low-rank input,
      k/v repeated to n_h heads for fla, the kernel output (kept by ``ops.rmsnorm``), the norm
      output, (5q + 2kv + r) a; fla's ``chunk_gla`` adds the fp32 cumulative gate (q f) and
      intra-chunk matrix (64 n_h f). ``selective`` keeps the q/k/v output, the gate and its
      input and the core's output, (2q + 3kv + r) a, and reruns the core in backward;
    - ``H``/``F``: both branches: (8q + 4kv) a + the fla terms + the log-sum-exp;
      ``selective`` reruns the linear branch: (4q + 3kv) a + n_h f;
    - ``-``: fc1's output (``ops.swiglu`` keeps only that) and the SwiGLU product, 3F a;
      ``selective`` drops the product until backward (``sbtrain.model.recompute``), 2F a;
    - ``E``: router logits E + k*(2h + 3F_e) (permuted input and output, expert FFN) + the
      shared expert as ``-``.

    Returns ``common`` (split over tp only with sequence parallelism) and ``tp_split``.
    """
    h, d, heads = model.hidden_size, model.kv_channels, model.num_attention_heads
    q, kv, rank = heads * d, model.num_query_groups * d, model.gla.gate_rank
    a, lse = act_bytes, heads * FP32_BYTES
    fla = (q + GLA_CHUNK * heads) * FP32_BYTES
    selective = policy == "selective"
    softmax = (3 * q + 3 * kv) * a + lse
    hybrid = (4 * q + 3 * kv) * a + lse if selective else (8 * q + 4 * kv) * a + fla + lse
    mixer_bytes = {
        "*": softmax, "W": softmax,
        "L": (2 * q + 3 * kv + rank) * a if selective else (5 * q + 2 * kv + rank) * a + fla,
        "H": hybrid, "F": hybrid,
    }[mixer]
    dense = (2 if selective else 3) * model.ffn_hidden_size
    if ffn == "-":
        ffn_elems = dense
    else:
        moe = model.moe
        ffn_elems = moe.num_experts + moe.top_k * (2 * h + 3 * expert_width(model))
        ffn_elems += dense if moe.shared_expert else 0
    return {"common": 4 * h * a, "tp_split": mixer_bytes + ffn_elems * a}


def stage_layers(cfg: RunConfig) -> list[list[tuple[str, str]]]:
    """Layers of each pipeline stage: an even split in pattern order."""
    layers, pp = cfg.model.layers, cfg.parallel.pp
    return [layers[i * len(layers) // pp:(i + 1) * len(layers) // pp] for i in range(pp)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stage_parameters(cfg: RunConfig, stage: int) -> dict[str, int]:
    """Parameters one rank of ``stage`` holds: ``dense`` (sharded over dp*sp) and ``expert``."""
    model, p = cfg.model, cfg.parallel
    by_role = {TP: 0, REPLICATED: 0, EXPERT: 0}
    for mixer, ffn in stage_layers(cfg)[stage]:
        for blocks in layer_blocks(model, mixer, ffn).values():
            for block in blocks:
                by_role[block.role] += block.total
    vocab_weights = model.vocab_size * model.hidden_size
    if stage == 0:
        by_role[TP] += vocab_weights
        by_role[REPLICATED] += model.sink_tokens * model.hidden_size
    if stage == p.pp - 1:
        by_role[REPLICATED] += model.hidden_size
        if model.untie_embeddings or p.pp > 1:
            by_role[TP] += vocab_weights
    dense = _ceil_div(by_role[TP], p.tp) + by_role[REPLICATED]
    return {"dense": dense, "expert": _ceil_div(by_role[EXPERT], p.ep * p.tp)}


def micro_batches_per_step(cfg: RunConfig, dp: int) -> int:
    return max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp))


def stage_activation_bytes(cfg: RunConfig, stage: int, act_bytes: float,
                           policy: str) -> tuple[float, float]:
    """(bytes per in-flight micro-batch, bytes held once) of one rank of ``stage``.

    ``none``/``selective``: every layer keeps ``activation_bytes_per_token``. ``full``: a layer
    keeps only its input (h per token) and one layer's ``none`` set is live while it is
    recomputed. The last stage adds the final norm (2h per token) and the logits
    (``_logits_bytes``), once (its only in-flight micro-batch).
    """
    model, p = cfg.model, cfg.parallel
    # every layer also carries the sink tokens' positions (on every sequence-parallel rank;
    # the logits do not)
    tokens = (cfg.train.seq_length / p.sp + model.sink_tokens) * cfg.train.micro_batch_size
    common_split = p.tp if p.tp_sequence_parallel else 1

    def per_layer(mixer: str, ffn: str, kept: str) -> float:
        per_token = activation_bytes_per_token(model, mixer, ffn, kept, act_bytes)
        return tokens * (per_token["common"] / common_split + per_token["tp_split"] / p.tp)

    layers = stage_layers(cfg)[stage]
    once = 0.0
    if policy == "full":
        per_microbatch = tokens * len(layers) * model.hidden_size / common_split * act_bytes
        once += max((per_layer(m, f, "none") for m, f in layers), default=0.0)
    elif policy in ("none", "selective"):
        per_microbatch = sum(per_layer(m, f, policy) for m, f in layers)
    else:
        raise ValueError(f"recompute policy {policy!r} must be none, selective or full "
                         "(resolve auto first: sbtrain.profiler.recompute)")
    if stage == p.pp - 1:
        # the final norm keeps its input and the output layer its output
        once += 2 * tokens * model.hidden_size / common_split * act_bytes
        once += _logits_bytes(cfg, act_bytes)
    if any(ffn == "E" for _, ffn in layers):
        once += grouped_experts_transient_bytes(cfg, act_bytes)
    return per_microbatch, once


def grouped_experts_transient_bytes(cfg: RunConfig, weight_bytes: float) -> float:
    """Peak transient of one MoE layer's grouped experts (``sbtrain.model.experts``).

    The per-expert weights are stacked per call, not kept: the peak is in fc1's backward,
    which holds the re-stacked ``[E_local, 2F_e, h]`` weight and its stacked gradient at
    once (before Megatron's hooks move each expert's slice into its fp32 main grad).
    """
    model, p = cfg.model, cfg.parallel
    local_experts = model.moe.num_experts // p.ep
    return 2 * local_experts * 2 * expert_width(model) / p.tp * model.hidden_size * weight_bytes


def _logits_bytes(cfg: RunConfig, act_bytes: float) -> float:
    """Logits of one micro-batch: all of them (Megatron's loss), or with
    ``train.loss_chunk_tokens`` (``auto`` resolved as on a GPU) what ``ops.loss``'s Triton
    backend, the GPU default, holds: one chunk's logits in the activation dtype (kept from
    forward to backward when the micro-batch is one chunk, then overwritten by their gradient),
    the fp32 sum of the output weight's gradient and its cast to the activation dtype. (The torch
    backend, without Triton, also holds each chunk's fp32 copy and fp32 gradient.)"""
    model, p = cfg.model, cfg.parallel
    logit_tokens = cfg.train.seq_length * cfg.train.micro_batch_size / p.sp
    chunk = cfg.train.resolved_loss_chunk_tokens(p.tp, "cuda")
    if not chunk:
        return logit_tokens * model.vocab_size / p.tp * (act_bytes + LOGITS_EXTRA_BYTES)
    return (min(chunk, logit_tokens) * model.vocab_size * act_bytes
            + model.vocab_size * model.hidden_size * (FP32_BYTES + act_bytes))


def _stage_estimate(cfg: RunConfig, stage: int, dp: int, nbytes: Bytes, policy: str) -> dict:
    p = cfg.parallel
    params = stage_parameters(cfg, stage)
    count = params["dense"] + params["expert"]
    dense_shard = dp * p.sp if cfg.optim.distributed_optimizer else 1
    expert_shard = max(1, dp * p.sp // p.ep) if cfg.optim.distributed_optimizer else 1
    optimizer = nbytes.optimizer * (params["dense"] / dense_shard + params["expert"] / expert_shard)
    inflight = min(p.pp - stage, micro_batches_per_step(cfg, dp))
    per_mb, once = stage_activation_bytes(cfg, stage, nbytes.activation, policy)
    activations = per_mb * inflight + once
    parts = {
        "params_gib": count * nbytes.param / GIB,
        "grads_gib": count * nbytes.grad / GIB,
        "optimizer_gib": optimizer / GIB,
        "activations_gib": activations / GIB,
    }
    return {
        "stage": stage,
        "layers": len(stage_layers(cfg)[stage]),
        "params": count,
        **parts,
        "activation_per_microbatch_gib": per_mb / GIB,
        "inflight_microbatches": inflight,
        "total_gib": sum(parts.values()),
    }


def estimate_memory_per_rank(cfg: RunConfig, world_size: int, bytes_per_param: float | None = None,
                             bytes_per_grad: float | None = None,
                             device_type: str = "cuda", policy: str | None = None) -> dict:
    """Memory of one rank of every pipeline stage, and the worst one, in GiB, under recompute
    ``policy`` (default ``train.recompute``; ``auto`` must be resolved first).

    Returns the byte sizes used, ``dp``, ``num_microbatches``, ``stages`` (per stage: layers,
    params on the rank, ``params_gib``, ``grads_gib``, ``optimizer_gib``, ``activations_gib``,
    ``activation_per_microbatch_gib``, ``inflight_microbatches``, ``total_gib``) and, copied
    to the top level, the components of the worst stage with ``worst_stage``.
    """
    nbytes = resolve_bytes(cfg.train.precision, device_type, bytes_per_param, bytes_per_grad)
    dp = max(1, cfg.parallel.resolved_dp(world_size))
    policy = policy or cfg.train.recompute
    stages = [_stage_estimate(cfg, s, dp, nbytes, policy) for s in range(cfg.parallel.pp)]
    worst = max(stages, key=lambda s: s["total_gib"])
    keys = ("params", "params_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib")
    return {
        "world_size": world_size,
        "dp": dp,
        "bytes_per_param": nbytes.param,
        "bytes_per_grad": nbytes.grad,
        "optimizer_bytes_per_param": nbytes.optimizer,
        "activation_bytes": nbytes.activation,
        "num_microbatches": micro_batches_per_step(cfg, dp),
        "recompute": policy,
        "stages": stages,
        "worst_stage": worst["stage"],
        **{key: worst[key] for key in keys},
    }
