"""load_tokenizer: tokenizer.json files, directories, HF directories, eod choice, errors."""

from __future__ import annotations

import json

import pytest

from sbtrain.data.tokenizer import load_tokenizer

TEXT = "The café — crème brûlée.\n  Indented line, 42 tabs\there."


def test_load_file_and_directory_agree(tokenizer_path: str, assets_dir: str) -> None:
    from_file, from_dir = load_tokenizer(tokenizer_path), load_tokenizer(assets_dir)
    assert (from_file.eod, from_file.eod_token, from_file.vocab_size) == (0, "<|endoftext|>", 512)
    assert from_dir.encode(TEXT) == from_file.encode(TEXT)
    assert from_file.encode_batch([TEXT, "x"]) == [from_file.encode(TEXT), from_file.encode("x")]


def test_round_trip_and_no_special_tokens_added(tokenizer_path: str) -> None:
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(TEXT)
    assert tok.eod not in ids
    assert tok.decode(ids) == TEXT
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_missing_path_names_it(tmp_path) -> None:
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError):
        load_tokenizer("")


def test_bad_tokenizer_file(tmp_path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer file"):
        load_tokenizer(str(bad))


def test_hf_directory_without_tokenizer_json(tmp_path, tokenizer_path: str) -> None:
    from tokenizers import Tokenizer

    Tokenizer.from_file(tokenizer_path).model.save(str(tmp_path))  # vocab.json + merges.txt
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
              "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ref = load_tokenizer(str(tmp_path)), load_tokenizer(tokenizer_path)
    assert (hf.eod, hf.vocab_size) == (ref.eod, ref.vocab_size)
    assert hf.encode(TEXT) == ref.encode(TEXT)
    assert hf.decode(hf.encode(TEXT)) == TEXT


def _rename_eod(tmp_path, tokenizer_path: str, new: str) -> str:
    """A copy of the sample tokenizer whose id-0 special token is called ``new``."""
    data = json.loads(open(tokenizer_path, encoding="utf-8").read())
    data["added_tokens"][0]["content"] = new
    data["model"]["vocab"][new] = data["model"]["vocab"].pop("<|endoftext|>")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_eod_fallback_and_override(tmp_path, tokenizer_path: str) -> None:
    path = _rename_eod(tmp_path, tokenizer_path, "</s>")
    tok = load_tokenizer(path)
    assert (tok.eod_token, tok.eod) == ("</s>", 0)
    overridden = load_tokenizer(path, eod_token="a")
    assert overridden.eod == overridden.encode("a")[0]
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(path, eod_token="<|not-there|>")


def test_eod_from_tokenizer_config(tmp_path, tokenizer_path: str) -> None:
    _rename_eod(tmp_path, tokenizer_path, "<|custom_eos|>")
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path))
    # Older configs store the eos token as an AddedToken dict.
    config = {"eos_token": {"content": "<|custom_eos|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.eod_token, tok.eod) == ("<|custom_eos|>", 0)
