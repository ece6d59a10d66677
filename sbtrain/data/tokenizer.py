"""Local tokenizer loading: a ``tokenizer.json`` (``tokenizers`` library) or a HF directory.

Only local files are read; nothing is downloaded. The wrapper exposes what preprocessing and
the GPT datasets need: ``encode``, ``decode``, ``eod`` and ``vocab_size``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from sbtrain.errors import DataError, DataFileNotFound

EOD_TOKEN = "<|endoftext|>"
"""Preferred end-of-document token (GPT-2 / Qwen convention)."""

FALLBACK_EOD_TOKENS = ("</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
"""Tried in order when the vocabulary has no ``<|endoftext|>`` and no declared eos token."""


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer. Texts are encoded without special tokens (no BOS); documents are
    separated by appending ``eod`` during preprocessing.

    Attributes:
        path: the file or directory it was loaded from.
        eod: end-of-document token id.
        eod_token: the token string of ``eod``.
        vocab_size: number of ids, added/special tokens included (every id is < vocab_size).
    """

    path: str
    eod: int
    eod_token: str
    vocab_size: int
    _encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (parallel inside ``tokenizers`` when available)."""
        return self._encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens such as ``eod`` are kept as their strings."""
        return self._decode(list(ids))


def load_tokenizer(path: str, eod_token: str | None = None) -> Tokenizer:
    """Load a local tokenizer.

    Args:
        path: a ``tokenizer.json`` file, a directory containing one, or a Hugging Face
            tokenizer directory (e.g. ``vocab.json`` + ``merges.txt``) loaded with
            ``transformers.AutoTokenizer`` in offline mode.
        eod_token: override the end-of-document token string. By default ``<|endoftext|>`` if
            the vocabulary has it, else the eos token declared in ``tokenizer_config.json`` (or
            by the HF tokenizer), else the first of ``FALLBACK_EOD_TOKENS`` present.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the tokenizer cannot be loaded or has no usable end-of-document token.
    """
    if not path:
        raise DataFileNotFound("no tokenizer path given (set data.tokenizer)")
    if not os.path.exists(path):
        raise DataFileNotFound(f"tokenizer not found: {path}")
    if os.path.isfile(path):
        return _load_tokenizer_json(path, path, eod_token)
    json_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(json_path):
        return _load_tokenizer_json(json_path, path, eod_token)
    return _load_hf_directory(path, eod_token)


def _load_tokenizer_json(json_path: str, path: str, eod_token: str | None) -> Tokenizer:
    # deferred: tokenizers is optional (synthetic data needs no tokenizer)
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(json_path)
    except Exception as exc:  # the Rust side raises a bare Exception on bad files
        raise DataError(f"cannot load tokenizer file {json_path}: {exc}") from None
    declared_eos = _declared_eos(os.path.dirname(json_path))
    token, eod = _pick_eod(tok.token_to_id, eod_token, declared_eos, json_path)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    return Tokenizer(path=path, eod=eod, eod_token=token,
                     vocab_size=tok.get_vocab_size(with_added_tokens=True),
                     _encode_batch=encode_batch, _decode=decode)


def _load_hf_directory(path: str, eod_token: str | None) -> Tokenizer:
    # deferred: transformers is optional and slow to import
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on the files
        raise DataError(f"directory {path} has no tokenizer.json and transformers cannot load "
                         f"it as a tokenizer: {exc}") from None
    vocab = tok.get_vocab()
    token, eod = _pick_eod(vocab.get, eod_token, tok.eos_token, path)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [tok.encode(text, add_special_tokens=False) for text in texts]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    # len(tok) counts added tokens; the base vocab_size attribute does not.
    return Tokenizer(path=path, eod=eod, eod_token=token, vocab_size=len(tok),
                     _encode_batch=encode_batch, _decode=decode)


def _declared_eos(directory: str) -> str | None:
    """The eos token named in a sibling ``tokenizer_config.json``, if any."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            eos: Any = json.load(f).get("eos_token")
    except (OSError, ValueError):
        return None
    # Older configs store AddedToken dicts instead of plain strings.
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _pick_eod(token_to_id: Callable[[str], int | None], override: str | None,
              declared_eos: str | None, where: str) -> tuple[str, int]:
    if override is not None:
        candidates: tuple[str, ...] = (override,)
    else:
        candidates = (EOD_TOKEN, *([declared_eos] if declared_eos else []), *FALLBACK_EOD_TOKENS)
    for token in candidates:
        token_id = token_to_id(token)
        if token_id is not None:
            return token, token_id
    raise DataError(f"tokenizer {where} has no end-of-document token; tried {list(candidates)}")
