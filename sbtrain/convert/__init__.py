"""``sbtrain convert``: HF Qwen2 / SpikingBrain-7B directories <-> sbtrain checkpoints.

    sbtrain convert hf-to-sbtrain --hf DIR --config YAML --out CKPT [--dtype bf16]
    sbtrain convert sbtrain-to-hf --config YAML --checkpoint CKPT --out DIR [--dtype bf16]
    sbtrain convert upcycle --dense CKPT --config MOE_YAML --out CKPT [--scheme paper|exact]

``hf-to-sbtrain`` reads a ``Qwen2ForCausalLM`` (or an exported ``GLAswaForCausalLM``)
directory and writes a weights-only sbtrain checkpoint; start training from it with
``checkpoint.pretrained: CKPT`` at any TP/PP/DP layout. ``sbtrain-to-hf`` writes a
self-contained HF directory (``sbtrain.convert.export``): the official SpikingBrain-7B layout
(``model_type: gla_swa``) when the pattern allows, else ``spikingbrain_hybrid`` (76B-style
mixers, sinks, MoE); the modeling code is ``sbtrain/hf``. ``upcycle`` turns a dense
checkpoint into the MoE model of a config (``sbtrain.convert.upcycle``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sbtrain.config import ConfigError, load_config
from sbtrain.convert.export import export_hf
from sbtrain.convert.hf_io import read_hf_dir
from sbtrain.convert.hf_layout import check_hybrid_matches, check_shapes, hf_to_sbtrain_state
from sbtrain.convert.mapping import check_hf_matches, hf_layout, hf_to_sbtrain as map_weights
from sbtrain.convert.session import load_tensors, model_tensors, one_process_model, save_weights
from sbtrain.convert.upcycle import main as upcycle_main


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_to_sbtrain(hf_dir: str, config: str, out: str, dtype: str = "fp32",
                  overrides: list[str] | None = None) -> Path:
    """Convert ``hf_dir`` into a sbtrain checkpoint for the model of ``config``."""
    cfg = load_config(config, overrides)
    hf_config, tensors = read_hf_dir(hf_dir)
    layout = hf_layout(hf_config, hf_dir)
    check_hf_matches(hf_config, cfg.model)
    print(f"read {len(tensors)} tensors ({layout}) from {hf_dir}", flush=True)
    if layout == "spikingbrain_hybrid":
        check_hybrid_matches(hf_config, cfg.model, hf_dir)
        state = hf_to_sbtrain_state(tensors, cfg.model, hf_dir)
    else:
        state = map_weights(tensors, cfg.model, layout, seed=cfg.train.seed)
    with one_process_model(cfg, DTYPES[dtype]) as model:
        check_shapes(state, model_tensors(model), cfg.model, hf_dir)
        load_tensors(model, state)
        path = save_weights(model, out)
    print(f"wrote sbtrain checkpoint {path} (pattern {cfg.model.pattern!r})", flush=True)
    return path


def sbtrain_to_hf(config: str, checkpoint: str, out: str, dtype: str = "bf16",
                  eod_id: int | None = None, overrides: list[str] | None = None) -> Path:
    """Export a sbtrain checkpoint to a self-contained HF directory (``sbtrain.convert.export``):
    the official SpikingBrain-7B layout (``gla_swa``) when the pattern allows, else
    ``spikingbrain_hybrid``; both load with ``trust_remote_code=True``."""
    cfg = load_config(config, overrides)
    step, count = export_hf(cfg, checkpoint, out, DTYPES[dtype], eod_id)
    print(f"wrote {count} tensors from step {step} to {out}", flush=True)
    return Path(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["upcycle"]:
        return upcycle_main(argv[1:])
    parser = argparse.ArgumentParser(prog="sbtrain convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    into = sub.add_parser("hf-to-sbtrain", help="HF directory -> sbtrain checkpoint")
    into.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors)")
    into.add_argument("--out", required=True, help="sbtrain checkpoint directory to write")
    into.add_argument("--dtype", choices=DTYPES, default="fp32", help="stored weight dtype")
    back = sub.add_parser("sbtrain-to-hf", help="sbtrain checkpoint -> official HF layout")
    back.add_argument("--checkpoint", required=True, help="sbtrain checkpoint directory")
    back.add_argument("--out", required=True, help="HF directory to write")
    back.add_argument("--dtype", choices=DTYPES, default="bf16", help="exported weight dtype")
    back.add_argument("--eod-id", type=int, default=None,
                      help="bos/eos/pad id (default: the EOD token of data.tokenizer)")
    for p in (into, back):
        p.add_argument("--config", required=True, help="sbtrain YAML describing the model")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value")
    args = parser.parse_args(argv)

    try:
        if args.direction == "hf-to-sbtrain":
            hf_to_sbtrain(args.hf, args.config, args.out, args.dtype, args.overrides)
        else:
            sbtrain_to_hf(args.config, args.checkpoint, args.out, args.dtype, args.eod_id,
                          args.overrides)
    except (ConfigError, ValueError, KeyError, FileNotFoundError, NotImplementedError) as exc:
        print(f"convert error: {exc}", file=sys.stderr)
        return 2
    return 0
