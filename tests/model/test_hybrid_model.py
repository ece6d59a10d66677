"""The 7B-style hybrid (GLA + sliding-window) model against an independent reference.

One-process models (gloo world of 1, CPU, fp32). The official-layout export feeds
``official_reference`` so the model, the mapping and the numerics are checked together.
"""

from __future__ import annotations

import torch

from parallel.init import init_parameters_globally
from sbtrain.config import RunConfig
from sbtrain.config.schema import GLAConfig, ModelConfig
from sbtrain.convert.mapping import official_config, sbtrain_to_official
from sbtrain.convert.session import model_tensors, one_process_model
from ops.documents import segment_ids_from_tokens
from tests.model.official_reference import official_logits

SEQ = 24


def tiny_cfg(pattern: str = "L-W-L-W-", window: int = 5, **gla) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern=pattern, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=48, vocab_size=64,
                            max_position_embeddings=64, sliding_window=window,
                            gla=GLAConfig(**gla))
    return cfg


def logits(model, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, segment_ids)


def random_model(model, cfg: RunConfig, seed: int = 3) -> None:
    init_parameters_globally(model, seed, 0.2, cfg.model.num_layers)
    # Random gate biases and norm weights so that nothing sits at its neutral value.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_weight", "bias")):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen)
                            if "norm" in name else torch.randn(param.shape, generator=gen))


def test_hybrid_matches_official_reference():
    cfg = tiny_cfg()
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        ours = logits(model, tokens)
        official = sbtrain_to_official(model_tensors(model), cfg.model)
    hf_cfg = official_config(cfg.model, torch.float32)
    ref = torch.stack([official_logits(t, {k: v.double() for k, v in official.items()}, hf_cfg)
                       for t in tokens]).float()
    assert ours.shape == ref.shape == (2, SEQ, 64)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err


def test_sliding_window_limits_context():
    """A token more than `window` positions back no longer reaches a pure-SWA model."""
    cfg = tiny_cfg(pattern="W-W-", window=3)
    tokens = torch.randint(0, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 2] = (tokens[0, 2] + 1) % 64
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        a, b = logits(model, tokens), logits(model, changed)
    diff = (a - b).abs().amax(-1)[0]
    # Two layers of window 3: position 2 reaches up to position 2 + 2 * 3 = 8.
    assert diff[2:9].min() > 1e-6 and diff[9:].max() == 0.0, diff


def test_document_mask_isolates_packed_documents():
    """With segment ids, each document's logits equal those of the document run alone."""
    cfg = tiny_cfg()
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(1, 64, (9,), generator=gen), torch.randint(1, 64, (SEQ - 10,),
                                                                              generator=gen)
    packed = torch.cat([first, torch.tensor([0]), second])[None]
    segments = segment_ids_from_tokens(packed, eod=0)
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        together = logits(model, packed, segments)
        alone = logits(model, second[None])
        unmasked = logits(model, packed)
    assert segments[0, 9] == 0 and segments[0, 10] == 1
    torch.testing.assert_close(together[0, 10:], alone[0], rtol=1e-5, atol=1e-5)
    # Without the mask the second document sees the first (so the mask did something).
    assert (unmasked[0, 10:] - alone[0]).abs().max() > 1e-3
