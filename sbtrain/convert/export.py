"""``sbtrain convert sbtrain-to-hf``: a self-contained HF directory from a sbtrain checkpoint.

The directory holds sharded safetensors (with an index when more than one shard),
``config.json`` with ``auto_map``, the modeling code (``sbtrain/hf/*.py`` copied verbatim),
``generation_config.json`` and the run's tokenizer with bos/eos/pad ids filled in, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(dir)`` work offline and without sbtrain installed.

Memory: the model is built in the export dtype (bf16 by default: 2 bytes per parameter, never
a whole fp32 copy) and converted one tensor at a time into shards of at most
``max_shard_bytes``; the peak is about model bytes (export dtype) + one shard + one tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sbtrain.config.schema import RunConfig
from sbtrain.convert.hf_io import write_hf_shards
from sbtrain.convert.hf_layout import hf_config, iter_hf_tensors
from sbtrain.convert.session import load_weights, model_tensors, one_process_model
from sbtrain.data.tokenizer import load_tokenizer


HF_CODE_DIR = Path(__file__).resolve().parent.parent / "hf"
MODELING_FILES = ("configuration_spikingbrain.py", "modeling_spikingbrain.py",
                  "spikingbrain_attention.py")
SHARD_BYTES = 2 * 1024**3


def export_hf(cfg: RunConfig, checkpoint: str, out: str | Path, dtype: torch.dtype,
              eod_id: int | None = None, max_shard_bytes: int = SHARD_BYTES) -> tuple[int, int]:
    """Write the HF directory; returns (checkpoint step, number of tensors)."""
    if cfg.spiking.enabled:
        raise ValueError("spiking.enabled: the HF classes have no spiking neurons; export with "
                         "--set spiking.enabled=false to drop them (outputs then differ)")
    out = Path(out)
    token_ids = write_tokenizer(cfg, out, eod_id)
    config = hf_config(cfg.model, dtype, token_ids)   # refuses layouts it cannot hold, first
    with one_process_model(cfg, dtype) as model:
        step = load_weights(model, checkpoint)
        state = model_tensors(model)
        count = write_hf_shards(out, iter_hf_tensors(state, cfg.model, dtype), max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(HF_CODE_DIR / name, out / name)
    write_generation_config(out, token_ids)
    return step, count


def write_tokenizer(cfg: RunConfig, out: Path, eod_id: int | None) -> dict[str, int]:
    """Save ``data.tokenizer`` as HF tokenizer files in ``out``; bos/eos/pad = its EOD token.
    Without a tokenizer only ``--eod-id`` (if given) fills the ids."""
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.tokenizer:
        if eod_id is None:
            print("note: no data.tokenizer in the config and no --eod-id: the directory has no "
                  "tokenizer and no bos/eos ids", flush=True)
            return {}
        return {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}

    tok = load_tokenizer(cfg.data.tokenizer)
    hf_tok = _hf_tokenizer(cfg.data.tokenizer, tok.eod_token)
    hf_tok.save_pretrained(str(out))
    eod = tok.eod if eod_id is None else eod_id
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}


def _hf_tokenizer(path: str, eod_token: str):
    # deferred: transformers is optional and slow to import; only the tokenizer copy needs it
    import transformers

    special = dict(bos_token=eod_token, eos_token=eod_token, pad_token=eod_token)
    file = Path(path) if Path(path).is_file() else Path(path) / "tokenizer.json"
    if file.is_file() and not (Path(path).is_dir() and (Path(path) / "tokenizer_config.json").is_file()):
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), **special)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    for key, value in special.items():
        if getattr(tok, key) is None:
            setattr(tok, key, value)
    return tok


def write_generation_config(out: Path, token_ids: dict[str, int]) -> None:
    config = {**token_ids, "do_sample": False, "max_new_tokens": 64,
              "_from_model_config": False}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")
