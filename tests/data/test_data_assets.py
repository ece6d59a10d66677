"""The shipped sample corpus and tokenizer are reproducible from make_sample_assets."""

from __future__ import annotations

import json

from sbtrain.data.make_sample_assets import train_tokenizer, write_corpus


def test_corpus_regenerates_identically(tmp_path, corpus_path: str) -> None:
    out = tmp_path / "corpus.jsonl"
    count = write_corpus(str(out))
    assert out.read_bytes() == open(corpus_path, "rb").read()
    assert 300 <= count <= 600
    assert len(out.read_bytes()) < 300_000
    texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(set(texts)) > 0.9 * len(texts)


def test_tokenizer_retrains_identically(tmp_path, corpus_path: str, tokenizer_path: str) -> None:
    out = tmp_path / "tokenizer.json"
    train_tokenizer(corpus_path, str(out))
    assert out.read_bytes() == open(tokenizer_path, "rb").read()
