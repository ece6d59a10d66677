"""Rules that span sections; each raises ConfigError naming one key."""

from __future__ import annotations

import logging

from sbtrain.config.errors import ConfigError
from sbtrain.config.schema import RunConfig

logger = logging.getLogger("sbtrain.config")


def validate(cfg: RunConfig, world_size: int, source: str = "") -> None:
    """Check ``cfg`` against itself and the launch's world size."""
    try:
        _check_parallel(cfg, world_size)
        _check_batch(cfg, world_size)
        _check_model(cfg)
        _check_split(cfg)
        _check_spiking(cfg)
    except ConfigError as exc:
        raise exc.with_source(source) if source else exc from None


def validate_layout(cfg: RunConfig, world_size: int, source: str = "") -> None:
    """Only the layout checks (parallel sizes, batch) for ``world_size`` ranks: ``sbtrain plan``."""
    try:
        _check_parallel(cfg, world_size)
        _check_batch(cfg, world_size)
    except ConfigError as exc:
        raise exc.with_source(source) if source else exc from None


def _check_parallel(cfg: RunConfig, world_size: int) -> None:
    p = cfg.parallel
    model_parallel = p.pp * p.tp * p.sp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by pp*tp*sp = {model_parallel}",
                          key="parallel")
    dp = p.resolved_dp(world_size)
    if dp * model_parallel != world_size:
        raise ConfigError(f"dp*pp*tp*sp = {dp}*{p.pp}*{p.tp}*{p.sp} = {dp * model_parallel} "
                          f"but the world size is {world_size}", key="parallel.dp")
    if (dp * p.sp) % p.ep:
        raise ConfigError(f"ep={p.ep} must divide dp*sp = {dp * p.sp}", key="parallel.ep")
    if p.ep > 1 and not cfg.model.has_moe:
        raise ConfigError("ep > 1 but model.pattern has no MoE ('E') layer", key="parallel.ep")
    if p.ep > 1 and cfg.model.moe.num_experts % p.ep:
        raise ConfigError(f"num_experts={cfg.model.moe.num_experts} must divide by ep={p.ep}",
                          key="model.moe.num_experts")
    _check_pipeline_cuts(cfg.model.pattern, p.pp)
    if cfg.model.num_layers % p.pp:
        raise ConfigError(f"{cfg.model.num_layers} layers do not split evenly over pp={p.pp}",
                          key="parallel.pp")
    if cfg.model.num_query_groups % p.tp or cfg.model.num_attention_heads % p.tp:
        raise ConfigError(f"attention heads and query groups must divide by tp={p.tp}",
                          key="parallel.tp")
    if p.tp > 1 and cfg.model.has_moe and not p.tp_sequence_parallel:
        raise ConfigError("MoE with tp > 1 needs tp_sequence_parallel: true", key="parallel.tp_sequence_parallel")
    if p.tp_sequence_parallel and any(mixer in "LHF" for mixer, _ in cfg.model.layers):
        # Linear attention runs on whole sequences; Megatron's TP sequence parallelism
        # would hand it a sequence shard per rank.
        raise ConfigError("linear-attention layers ('L', 'H', 'F') do not support "
                          "tp_sequence_parallel yet", key="parallel.tp_sequence_parallel")
    if p.tp_sequence_parallel and cfg.model.sink_tokens:
        # the sinks are prepended to the whole sequence, before any sequence split
        raise ConfigError("model.sink_tokens does not support tp_sequence_parallel yet",
                          key="parallel.tp_sequence_parallel")
    if cfg.train.loss_chunk_tokens != "auto" and cfg.train.loss_chunk_tokens > 0 and p.tp > 1:
        # the chunked loss needs the whole vocabulary on one rank (auto falls back to Megatron's)
        raise ConfigError("the chunked loss needs tp = 1 (vocab-parallel logits use Megatron's "
                          "cross-entropy): set 0 or auto", key="train.loss_chunk_tokens")
    if p.tp_sequence_parallel and p.tp == 1:
        raise ConfigError("tp_sequence_parallel needs tp > 1", key="parallel.tp_sequence_parallel")
    if p.sp > 1 and cfg.train.seq_length % p.sp:
        raise ConfigError(f"seq_length {cfg.train.seq_length} must divide by sp = {p.sp} "
                          "(every rank holds an equal contiguous slice)", key="train.seq_length")
    if p.sp > 1 and p.tp_sequence_parallel:
        # the two split the same sequence axis; their combination is not tested
        raise ConfigError("sp > 1 together with tp_sequence_parallel is not "
                          "supported yet", key="parallel.tp_sequence_parallel")
    if p.overlap_param_gather is True and not cfg.optim.distributed_optimizer:
        # Megatron gathers parameters only from the distributed optimizer's shards
        raise ConfigError("needs optim.distributed_optimizer: true", key="parallel.overlap_param_gather")


def _check_pipeline_cuts(pattern: str, pp: int) -> None:
    """Explicit '|' cuts must give pp stages of whole, equal numbers of layers."""
    if "|" not in pattern:
        return
    if pp == 1:
        # one stage: a YAML written for pp > 1 (e.g. spikingbrain_7b.yaml) still runs with
        # --set parallel.pp=1; the cuts only mark where stages would begin
        logger.info("model.pattern: the '|' pipeline cuts are ignored with pp = 1")
        return
    pieces = ["".join(piece.split()) for piece in pattern.split("|")]
    if len(pieces) != pp or any(len(piece) % 2 for piece in pieces):
        raise ConfigError(f"'|' cuts must split the pattern into pp={pp} stages of whole layers",
                          key="model.pattern")
    if len({len(piece) for piece in pieces}) != 1:
        raise ConfigError("stages cut by '|' must hold equal numbers of layers (uneven "
                          "pipeline stages are not supported)", key="model.pattern")


def _check_batch(cfg: RunConfig, world_size: int) -> None:
    dp = cfg.parallel.resolved_dp(world_size)
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size {cfg.train.global_batch_size} is not a multiple of "
                          f"micro_batch_size*dp = {per_step}", key="train.global_batch_size")


def _check_split(cfg: RunConfig) -> None:
    """``data.split`` is ``train,valid,test`` weights; evaluation needs a validation share."""
    try:
        weights = [float(x) for x in cfg.data.split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"expected comma-separated weights such as 98,2,0, got "
                          f"{cfg.data.split!r}", key="data.split") from None
    if len(weights) > 3 or min(weights) < 0 or not sum(weights) > 0:
        raise ConfigError(f"expected up to three non-negative weights train,valid,test, got "
                          f"{cfg.data.split!r}", key="data.split")
    valid = weights[1] if len(weights) > 1 else 0.0  # Megatron pads missing weights with 0
    if cfg.data.kind == "indexed" and cfg.train.eval_interval and valid == 0:
        raise ConfigError("evaluation is on (train.eval_interval) but the split gives the "
                          "validation part nothing", key="data.split")


def _check_model(cfg: RunConfig) -> None:
    if cfg.train.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError("seq_length exceeds model.max_position_embeddings", key="train.seq_length")
    if cfg.data.kind == "indexed" and not cfg.data.paths:
        raise ConfigError("indexed data needs at least one path", key="data.paths")
    if cfg.data.kind == "indexed" and not cfg.data.tokenizer:
        raise ConfigError("indexed data needs a tokenizer", key="data.tokenizer")


def _check_spiking(cfg: RunConfig) -> None:
    if cfg.spiking.weight_quant != "none":
        # The fake-quantiser overwrites weights in place and has no gradient rule, so a
        # training run would silently train float weights from a quantised start.
        raise ConfigError("weight fake-quantisation is an evaluation mode (sbtrain spikestats); "
                          "training keeps float weights: use none", key="spiking.weight_quant")
