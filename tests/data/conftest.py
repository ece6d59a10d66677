"""Shared fixtures for the data tests: the shipped sample assets and a preprocessed copy."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from sbtrain.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
ASSETS = os.path.join(REPO, "examples", "data")
CORPUS = os.path.join(ASSETS, "sample_corpus.jsonl")
TOKENIZER = os.path.join(ASSETS, "tokenizer.json")


@pytest.fixture(scope="session")
def assets_dir() -> str:
    """``examples/data``: the shipped corpus and tokenizer."""
    return ASSETS


@pytest.fixture(scope="session")
def corpus_path() -> str:
    return CORPUS


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return TOKENIZER


@pytest.fixture(scope="session")
def sample_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped corpus preprocessed with the shipped tokenizer (read-only for tests)."""
    from sbtrain.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("indexed") / "sample")
    preprocess(CORPUS, prefix, TOKENIZER, log_every=0)
    return prefix


@pytest.fixture
def indexed_cfg() -> Callable[..., RunConfig]:
    """Build a RunConfig for indexed data over the given prefixes."""

    def make(paths: list[str], weights: list[float] | None = None, split: str = "90,10,0",
             seq_length: int = 32, seed: int = 1234) -> RunConfig:
        return RunConfig(
            model=ModelConfig(vocab_size=512),
            train=TrainConfig(seq_length=seq_length, seed=seed),
            data=DataConfig(kind="indexed", paths=list(paths), weights=list(weights or []),
                            split=split, tokenizer=TOKENIZER),
        )

    return make
