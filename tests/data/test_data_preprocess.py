"""preprocess: jsonl -> .bin/.idx, round trip against the tokenizer, and clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sbtrain.data.preprocess import main, preprocess
from sbtrain.data.tokenizer import load_tokenizer


def _texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_sample_corpus_round_trips(sample_prefix: str, corpus_path: str,
                                   tokenizer_path: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts, tok = _texts(corpus_path), load_tokenizer(tokenizer_path)
    dataset = IndexedDataset(sample_prefix)
    assert len(dataset) == len(texts)
    assert len(dataset.document_indices) - 1 == len(texts)
    assert dataset.index.dtype == np.uint16  # Megatron's choice for a 512-id vocabulary
    for i in (0, 1, len(texts) // 2, len(texts) - 1):
        stored = dataset[i].tolist()
        assert stored == tok.encode(texts[i]) + [tok.eod]
        assert tok.decode(stored[:-1]) == texts[i]


def test_no_eod_and_json_key(tmp_path, tokenizer_path: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"body": "hello world"}), "",
                                               json.dumps({"body": ""}),
                                               json.dumps({"body": "second doc"})])
    stats = preprocess(src, str(tmp_path / "out" / "ds"), tokenizer_path, json_key="body",
                       append_eod=False, log_every=1)
    assert (stats.documents, stats.skipped_empty) == (2, 1)
    dataset = IndexedDataset(str(tmp_path / "out" / "ds"))
    tok = load_tokenizer(tokenizer_path)
    assert dataset[0].tolist() == tok.encode("hello world")
    assert dataset[1].tolist() == tok.encode("second doc")
    assert stats.tokens == len(dataset[0]) + len(dataset[1])


def test_bad_json_line_names_line_number(tmp_path, tokenizer_path: str) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": "ok"}), "",
                                               '{"text": "broken'])
    prefix = str(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"in\.jsonl:3: invalid JSON"):
        preprocess(src, prefix, tokenizer_path)
    # No half-written dataset (or temporary file) is left behind.
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("line, message", [
    (json.dumps({"txt": "x"}), r":2: missing key 'text'"),
    (json.dumps({"text": 5}), r":2: key 'text' holds int, expected a string"),
    (json.dumps(["text"]), r":2: expected a JSON object, got list"),
])
def test_bad_records(tmp_path, tokenizer_path: str, line: str, message: str) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": "ok"}), line])
    with pytest.raises(ValueError, match=message):
        preprocess(src, str(tmp_path / "ds"), tokenizer_path)


def test_missing_inputs(tmp_path, tokenizer_path: str) -> None:
    missing = str(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        preprocess(missing, str(tmp_path / "ds"), tokenizer_path)
    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": "ok"})])
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        preprocess(src, str(tmp_path / "ds"), str(tmp_path / "no_tokenizer"))


def test_cli(tmp_path, tokenizer_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": "one"}),
                                               json.dumps({"text": "two"})])
    prefix = str(tmp_path / "ds")
    assert main(["--input", src, "--output-prefix", prefix, "--tokenizer", tokenizer_path]) == 0
    assert "wrote 2 documents" in capsys.readouterr().out
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    assert main(["--input", str(tmp_path / "x.jsonl"), "--output-prefix", prefix,
                 "--tokenizer", tokenizer_path]) == 1
    assert "x.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n", '{"text": ""}\n{"text": ""}\n'])
def test_input_without_documents_is_an_error(tmp_path, tokenizer_path: str, content: str) -> None:
    """reliability.md SILENT 6: an empty dataset was written with exit 0."""
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: no documents to write"):
        preprocess(str(path), str(tmp_path / "out"), tokenizer_path)
    assert not list(tmp_path.glob("out*"))
