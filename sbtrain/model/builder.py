"""Build the model chunk of this pipeline stage from a RunConfig."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from parallel.sequence import install_slice_rotary
from sbtrain.config.schema import RunConfig
from sbtrain.model.megatron_config import to_megatron_config
from sbtrain.model.recompute import install_ffn_activation_recompute
from sbtrain.model.sinks import SinkTokenGPTModel
from sbtrain.model.spec_provider import build_layer_specs


# Without sequence parallelism no exchange runs: any value serves.
NO_SP_EXCHANGES = {"window": "tails", "full": "tails"}


def build_model(cfg: RunConfig, pg_collection, params_dtype: torch.dtype, device: torch.device,
                softmax_exchanges: dict[str, str] | None = None):
    """Return (GPTModel of this pipeline stage, TransformerConfig).

    Layers are split evenly over pipeline stages; the stage is read from ``pg_collection.pp``.
    ``softmax_exchanges``: the SP exchange of each softmax layer kind (``window``, ``full``),
    needed under ``parallel.sp > 1``. The trainer passes what ``sbtrain plan`` counts
    (``sbtrain.profiler.comm.softmax_exchanges``, ``auto`` by bytes), so run and plan agree;
    the choice stays out of the model layer because it rests on the plan's cost model.
    """
    if softmax_exchanges is None:
        if cfg.parallel.sp > 1:
            raise ValueError("build_model under parallel.sp > 1 needs softmax_exchanges "
                             "(sbtrain.profiler.comm.softmax_exchanges(cfg))")
        softmax_exchanges = NO_SP_EXCHANGES
    config = to_megatron_config(cfg, params_dtype)
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    specs = build_layer_specs(cfg.model, cfg.spiking, softmax_exchanges)[offset: offset + count]
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=WrappedTorchNorm)
    model_class, extra = GPTModel, {}
    if cfg.model.sink_tokens:
        model_class, extra = SinkTokenGPTModel, {"sink_tokens": cfg.model.sink_tokens}
    model = model_class(
        config=config,
        transformer_layer_spec=block,
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rope_theta),
        pg_collection=pg_collection,
        **extra,
    )

    install_slice_rotary(model, cfg.model.sink_tokens, pg_collection.cp)
    if config.recompute_granularity == "selective":
        install_ffn_activation_recompute(model)
    return model.to(device), config
