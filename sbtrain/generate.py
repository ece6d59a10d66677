"""``sbtrain generate``: print a continuation of a prompt, for a quick look at a trained run.

    sbtrain generate --checkpoint CKPT --config YAML --prompt "Once upon a time"
    sbtrain generate --hf DIR --prompt "..."          # a directory from convert sbtrain-to-hf

The checkpoint path builds the model of ``sbtrain.hf`` in memory from the checkpoint (no files
written) and uses ``data.tokenizer``; both paths decode with the recurrent cache of
``sbtrain.hf.modeling_spikingbrain`` (greedy by default, ``--temperature`` > 0 samples).
"""

from __future__ import annotations

import argparse
import sys

import torch

from sbtrain.config import ConfigError, load_config
from sbtrain.convert.hf_layout import hf_config, iter_hf_tensors
from sbtrain.convert.session import load_weights, model_tensors, one_process_model
from sbtrain.data.tokenizer import load_tokenizer
from sbtrain.hf.configuration_spikingbrain import GLAswaConfig, SpikingBrainConfig
from sbtrain.hf.modeling_spikingbrain import GLAswaForCausalLM, SpikingBrainForCausalLM


def model_from_checkpoint(cfg, checkpoint: str, dtype: torch.dtype):
    """(HF model with the checkpoint's weights, step), built in this process."""
    with one_process_model(cfg, dtype) as model:
        step = load_weights(model, checkpoint)
        tensors = dict(iter_hf_tensors(model_tensors(model), cfg.model, dtype))
    config = {k: v for k, v in hf_config(cfg.model, dtype, {}).items()
              if k not in ("auto_map", "architectures", "model_type", "torch_dtype")}
    official = hf_config(cfg.model, dtype, {})["model_type"] == "gla_swa"
    config_cls, model_cls = ((GLAswaConfig, GLAswaForCausalLM) if official
                             else (SpikingBrainConfig, SpikingBrainForCausalLM))
    hf = model_cls(config_cls(**config)).to(dtype)
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"checkpoint {checkpoint}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf.eval(), step


def generate_text(model, encode, decode, prompt: str, max_new_tokens: int, temperature: float,
                  eos_id: int | None, seed: int = 0) -> str:
    device = next(model.parameters()).device
    ids = torch.tensor([encode(prompt)], device=device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                             pad_token_id=eos_id, **sampling)
    new = out[0, ids.shape[1]:].tolist()
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id)]
    return decode(new)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sbtrain generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="sbtrain checkpoint directory (needs --config)")
    source.add_argument("--hf", help="exported HF directory (sbtrain convert sbtrain-to-hf)")
    parser.add_argument("--config", help="the run's YAML (model and data.tokenizer)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        model, encode, decode, eos_id, label = _load(args)
        text = generate_text(model, encode, decode, args.prompt, args.max_new_tokens,
                             args.temperature, eos_id, args.seed)
    except (ConfigError, ValueError, KeyError, FileNotFoundError, OSError) as exc:
        print(f"generate error: {exc}", file=sys.stderr)
        return 2
    print(f"[{label}] {args.prompt}{text}", flush=True)
    return 0


def _load(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.hf:
        # deferred: transformers is optional and slow to import; only generation needs it
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.hf, trust_remote_code=True, dtype=dtype, local_files_only=True).to(device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
        return (model, lambda s: tok(s, add_special_tokens=False)["input_ids"], tok.decode,
                tok.eos_token_id, args.hf)
    if not args.config:
        raise ValueError("--checkpoint needs --config (the run's YAML)")
    cfg = load_config(args.config, args.overrides)
    if cfg.spiking.enabled:
        raise ValueError("spiking.enabled: generation runs without spiking neurons; pass "
                         "--set spiking.enabled=false to look at the model without them")
    tok = load_tokenizer(cfg.data.tokenizer)
    model, step = model_from_checkpoint(cfg, args.checkpoint, dtype)
    return model.to(device), tok.encode, tok.decode, tok.eod, f"{args.checkpoint} step {step}"
