"""Data: local tokenizers, jsonl -> Megatron indexed datasets, and train/valid datasets.

Names are resolved lazily (PEP 562) so ``import sbtrain.data`` does not pull in torch or
megatron.core (the latter takes seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tokenizer": "sbtrain.data.tokenizer",
    "load_tokenizer": "sbtrain.data.tokenizer",
    "preprocess": "sbtrain.data.preprocess",
    "PreprocessStats": "sbtrain.data.preprocess",
    "IndexedInfo": "sbtrain.data.datasets",
    "SyntheticDataset": "sbtrain.data.datasets",
    "build_datasets": "sbtrain.data.datasets",
    "check_indexed_prefix": "sbtrain.data.datasets",
    "default_cache_dir": "sbtrain.data.datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
