"""Train/valid datasets: synthetic random tokens, or Megatron GPT/Blended datasets on disk.

Samples are dicts in Megatron ``GPTDataset`` format (``create_attention_mask=False``):

- ``tokens``       [S] int64, input ids
- ``labels``       [S] int64, the next token of each position
- ``loss_mask``    [S] float32, ones
- ``position_ids`` [S] int64, ``arange(S)``

where S is ``train.seq_length``. A ``BlendedDataset`` (several paths) adds ``dataset_id``,
the index of the source path (a numpy integer).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from sbtrain.config.errors import ConfigError
from sbtrain.data.tokenizer import load_tokenizer
from sbtrain.errors import DataError, DataFileNotFound

if TYPE_CHECKING:
    from sbtrain.config.schema import RunConfig

VALID_SEED_OFFSET = 1_000_003
"""Added to ``train.seed`` for the synthetic validation set, so it differs from training data."""


class SyntheticDataset(torch.utils.data.Dataset):
    """Uniform random tokens; sample ``i`` depends only on ``(seed, i)``.

    Args:
        num_samples: dataset length.
        seq_length: S, tokens per sample.
        vocab_size: ids are drawn from ``[0, vocab_size)``.
        seed: base seed.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        if num_samples < 0 or seq_length < 1 or vocab_size < 1:
            raise ValueError(f"need num_samples >= 0, seq_length >= 1, vocab_size >= 1; got "
                             f"{num_samples}, {seq_length}, {vocab_size}")
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed
        # Shared by every sample, like GPTDataset's cached masks; cloned on return.
        self._loss_mask = torch.ones(seq_length, dtype=torch.float32)
        self._position_ids = torch.arange(seq_length, dtype=torch.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Sample ``idx`` as a dict of [S] tensors (see the module docstring)."""
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        # SeedSequence hashes (seed, idx) together, so neighbouring seeds/indices do not
        # produce correlated streams; it rejects negative entropy, hence the mask.
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, idx])
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1,
                                             dtype=np.int64))
        return {
            "tokens": text[:-1].clone(),
            "labels": text[1:].clone(),
            "loss_mask": self._loss_mask.clone(),
            "position_ids": self._position_ids.clone(),
        }


@dataclass(frozen=True)
class IndexedInfo:
    """Summary of a checked indexed dataset."""

    prefix: str
    sequences: int
    documents: int
    tokens: int
    dtype: str


def check_indexed_prefix(prefix: str) -> IndexedInfo:
    """Check that ``prefix.bin``/``prefix.idx`` exist and are readable and consistent.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: the ``.idx`` is corrupt or truncated, the ``.bin`` size does not match the
            index, or the dataset is empty (the message names the file).
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    hint = ""
    if prefix.endswith((".bin", ".idx")):
        hint = " (data.paths takes the prefix, without .bin/.idx)"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataFileNotFound(f"indexed dataset file not found: {path}{hint}")
    _check_idx_layout(idx_path)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as exc:  # megatron signals bad files via assert/ValueError/...
        raise DataError(f"{idx_path}: corrupt or truncated index file: "
                         f"{_describe_index_error(exc)}") from None
    lengths = dataset.sequence_lengths
    info = IndexedInfo(prefix=prefix, sequences=len(lengths),
                       documents=len(dataset.document_indices) - 1,
                       tokens=int(lengths.sum(dtype=np.int64)),
                       dtype=np.dtype(dataset.index.dtype).name)
    expected_bytes = info.tokens * np.dtype(dataset.index.dtype).itemsize
    del dataset
    if os.path.getsize(bin_path) != expected_bytes:
        raise DataError(f"{bin_path}: holds {os.path.getsize(bin_path)} bytes but {idx_path} "
                         f"describes {expected_bytes} ({info.tokens} {info.dtype} tokens); the "
                         f"pair is truncated or mismatched")
    if info.sequences == 0 or info.tokens == 0:
        raise DataError(f"{idx_path}: the dataset is empty")
    return info


# Megatron .idx layout: magic, u64 version (1), u8 dtype code, u64 sequence count, u64
# document count, then int32 lengths, int64 pointers and int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


def _check_idx_layout(idx_path: str) -> None:
    """Check the header and the file size before megatron maps the file, so the common
    failures get precise messages (and megatron's half-built reader is never created)."""
    size = os.path.getsize(idx_path)
    if size == 0:
        raise DataError(f"{idx_path}: empty index file")
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if head[:len(_IDX_MAGIC)] != _IDX_MAGIC:
        raise DataError(f"{idx_path}: not a Megatron .idx file (bad header)")
    if len(head) < _IDX_HEADER.size:
        raise DataError(f"{idx_path}: truncated index file ({size} bytes, header incomplete)")
    _, version, _, sequences, documents = _IDX_HEADER.unpack(head)
    if version != 1:
        raise DataError(f"{idx_path}: unsupported .idx version {version}")
    expected = _IDX_HEADER.size + sequences * (4 + 8) + documents * 8
    if size < expected:
        raise DataError(f"{idx_path}: truncated index file ({size} bytes; its header "
                         f"describes {sequences} sequences and {documents - 1} documents, "
                         f"needing {expected})")


def _describe_index_error(exc: Exception) -> str:
    message = str(exc)
    if isinstance(exc, AssertionError) and not message:
        return "inconsistent sequence and document counts"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass(frozen=True)
class _TokenizerInfo:
    """What ``GPTDatasetConfig`` reads from a tokenizer: ``eod``, ``vocab_size``, ``pad``,
    and ``unique_identifiers`` (hashed into the index cache names)."""

    eod: int
    vocab_size: int

    @property
    def pad(self) -> int:
        # -1 never occurs in token data, so no real token is masked as padding (Megatron's
        # own default when a tokenizer has no pad).
        return -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Path-free on purpose: moving the tokenizer must not invalidate the index cache, and
        # ranks that mount it at different paths must compute the same cache names.
        return OrderedDict(cls="sbtrain.data.datasets._TokenizerInfo", eod=self.eod,
                           vocab_size=self.vocab_size)


# Synthetic samples are uniform random ids, so id 0 splits them into ~vocab_size-token documents.
SYNTHETIC_EOD = 0


def default_cache_dir(cfg: RunConfig) -> str:
    """``data.cache_dir``, or ``data_cache`` beside the run directory."""
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    run_dir = os.path.abspath(cfg.train.run_dir)
    return os.path.join(os.path.dirname(run_dir), "data_cache")


def build_datasets(cfg: RunConfig, num_samples: tuple[int, int],
                   cache_dir: str = "") -> tuple[Any, Any]:
    """Build the train and valid datasets.

    Collective when ``torch.distributed`` is initialized: every rank must call it. Rank 0
    builds the index caches first, the others wait at a barrier and then load them, so
    ``cache_dir`` must be visible to all ranks (a shared filesystem across nodes).

    Args:
        cfg: the run config (``data``, ``train.seq_length``, ``train.seed``,
            ``model.vocab_size`` are used).
        num_samples: (train, valid) minimum sample counts; indexed data is repeated over
            epochs to reach them.
        cache_dir: where GPTDataset/BlendedDataset index caches go; empty means
            ``default_cache_dir(cfg)``.

    Returns:
        (train, valid). Indexed data gives ``GPTDataset`` (one path) or ``BlendedDataset``;
        valid is None when ``data.split`` gives the validation split no weight.
    """
    train_samples, valid_samples = num_samples
    if cfg.data.kind == "synthetic":
        args = (cfg.train.seq_length, cfg.model.vocab_size)
        return (SyntheticDataset(train_samples, *args, seed=cfg.train.seed),
                SyntheticDataset(valid_samples, *args, seed=cfg.train.seed + VALID_SEED_OFFSET))
    return _build_indexed(cfg, train_samples, valid_samples, cache_dir or default_cache_dir(cfg))


def document_eod(cfg: RunConfig) -> int:
    """The token id that ends a document: the tokenizer's EOD, or 0 for synthetic data."""
    if cfg.data.kind == "synthetic":
        return SYNTHETIC_EOD
    return _tokenizer_info(cfg).eod


def _build_indexed(cfg: RunConfig, train_samples: int, valid_samples: int,
                   cache_dir: str) -> tuple[Any, Any]:
    if not cfg.data.paths:
        raise ConfigError("indexed data needs at least one path", key="data.paths")
    infos = [check_indexed_prefix(path) for path in cfg.data.paths]
    tokenizer = _tokenizer_info(cfg)
    config = _gpt_config(cfg, tokenizer, cache_dir)
    _check_splits(infos, config.split_matrix, cfg.data.split)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0],
        # Every rank builds its own view; megatron orders rank 0 first when distributed.
        lambda: True, config)
    train, valid, _ = builder.build()
    return train, valid


def _tokenizer_info(cfg: RunConfig) -> _TokenizerInfo:
    if not cfg.data.tokenizer:
        raise ConfigError("indexed data needs a tokenizer (for the end-of-document id)",
                          key="data.tokenizer")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"{cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"{cfg.data.tokenizer} ({tokenizer.vocab_size} ids)",
                          key="model.vocab_size")
    return _TokenizerInfo(eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)


def _gpt_config(cfg: RunConfig, tokenizer: _TokenizerInfo, cache_dir: str) -> Any:
    paths = [os.path.abspath(p) for p in cfg.data.paths]
    # Megatron's "no weights" means "weight by dataset size"; sbtrain's means "equal". One path
    # keeps weights None so megatron returns a plain GPTDataset rather than a 1-way blend.
    weights = None
    if len(paths) > 1:
        weights = [float(w) for w in cfg.data.weights] or [1.0] * len(paths)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=(paths, weights),
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # sbtrain never reads the test split; not building it saves time and avoids megatron's
    # endless epoch loop when a small dataset leaves the test split without documents.
    config.split_matrix[Split.test.value] = None
    return config


def _check_splits(infos: list[IndexedInfo], split_matrix: list, split: str) -> None:
    """Fail early where megatron would loop forever: a used split with no documents."""
    for info in infos:
        for name, bounds in zip(("train", "valid"), split_matrix):
            if bounds is None:
                continue
            begin = int(round(bounds[0] * info.sequences))
            end = int(round(bounds[1] * info.sequences))
            if end <= begin:
                raise ConfigError(f"the {name} part of split {split!r} gets none of the "
                                  f"{info.sequences} documents of {info.prefix}; use more data "
                                  f"or change the split", key="data.split")
