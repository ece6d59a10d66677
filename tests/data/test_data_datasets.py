"""build_datasets / check_indexed_prefix / SyntheticDataset."""

from __future__ import annotations

import shutil

import pytest
import torch

from sbtrain.config.errors import ConfigError
from sbtrain.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from sbtrain.data.datasets import SyntheticDataset, build_datasets, check_indexed_prefix

KEYS = {"tokens", "labels", "loss_mask", "position_ids"}


def _check_sample(sample: dict, seq_length: int, vocab_size: int) -> None:
    assert KEYS <= set(sample)
    for key in KEYS:
        assert sample[key].shape == (seq_length,), key
    assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
    assert sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(seq_length))
    assert torch.all(sample["loss_mask"] == 1)
    assert int(sample["tokens"].min()) >= 0 and int(sample["labels"].min()) >= 0
    assert int(sample["tokens"].max()) < vocab_size and int(sample["labels"].max()) < vocab_size


def _copy_prefix(prefix: str, dst) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(dst) + ext)
    return str(dst)


def test_gpt_dataset_shapes_and_determinism(sample_prefix, indexed_cfg, tmp_path) -> None:
    cfg = indexed_cfg([sample_prefix])
    train, valid = build_datasets(cfg, (200, 10), str(tmp_path / "cache_a"))
    assert type(train).__name__ == "GPTDataset" and len(train) >= 200 and len(valid) >= 10
    assert set(train[0]) == KEYS
    for i in (0, 7, len(train) - 1):
        _check_sample(train[i], 32, 512)
    _check_sample(valid[0], 32, 512)
    # Fresh cache and cache hit must both reproduce the same samples.
    again, _ = build_datasets(cfg, (200, 10), str(tmp_path / "cache_b"))
    cached, _ = build_datasets(cfg, (200, 10), str(tmp_path / "cache_a"))
    for i in (0, 5, 123):
        assert torch.equal(train[i]["tokens"], again[i]["tokens"])
        assert torch.equal(train[i]["tokens"], cached[i]["tokens"])
    other_seed, _ = build_datasets(indexed_cfg([sample_prefix], seed=7), (200, 10),
                                   str(tmp_path / "cache_a"))
    assert not all(torch.equal(train[i]["tokens"], other_seed[i]["tokens"]) for i in range(4))


def test_more_samples_than_one_epoch(sample_prefix, indexed_cfg, tmp_path) -> None:
    train, _ = build_datasets(indexed_cfg([sample_prefix]), (3000, 0), str(tmp_path))
    assert len(train) >= 3000
    _check_sample(train[2999], 32, 512)


def test_blended_two_prefixes(sample_prefix, indexed_cfg, tmp_path) -> None:
    second = _copy_prefix(sample_prefix, tmp_path / "second")
    cfg = indexed_cfg([sample_prefix, second], weights=[0.25, 0.75])
    train, valid = build_datasets(cfg, (400, 20), str(tmp_path / "cache"))
    assert type(train).__name__ == "BlendedDataset"
    assert (len(train), len(valid)) == (400, 20)
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert 0.15 < ids.count(0) / len(ids) < 0.35
    _check_sample(train[0], 32, 512)
    # Empty weights mean equal weights (not "in proportion to size").
    equal, _ = build_datasets(indexed_cfg([sample_prefix, second]), (400, 20), str(tmp_path))
    assert [int(equal[i]["dataset_id"]) for i in range(400)].count(0) == 200


def test_missing_files_name_the_path(sample_prefix, indexed_cfg, tmp_path) -> None:
    prefix = _copy_prefix(sample_prefix, tmp_path / "ds")
    (tmp_path / "ds.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.idx"):
        check_indexed_prefix(prefix)
    with pytest.raises(FileNotFoundError, match=r"ds\.idx"):
        build_datasets(indexed_cfg([sample_prefix, prefix]), (10, 2), str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"without \.bin/\.idx"):
        check_indexed_prefix(sample_prefix + ".bin")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"garbage" * 20, "bad header"),
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b[:20], "header incomplete"),
    (lambda b: b"", "empty index file"),
])
def test_corrupt_idx_names_the_file(sample_prefix, tmp_path, damage, message) -> None:
    prefix = _copy_prefix(sample_prefix, tmp_path / "ds")
    idx = tmp_path / "ds.idx"
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        check_indexed_prefix(prefix)
    assert str(idx) in str(info.value)


def test_truncated_bin_names_the_file(sample_prefix, tmp_path) -> None:
    prefix = _copy_prefix(sample_prefix, tmp_path / "ds")
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"ds\.bin.*truncated"):
        check_indexed_prefix(prefix)


def test_check_reports_counts(sample_prefix, corpus_path) -> None:
    info = check_indexed_prefix(sample_prefix)
    with open(corpus_path, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    assert info.documents == info.sequences == lines and info.dtype == "uint16"


def test_config_errors(sample_prefix, indexed_cfg, tmp_path) -> None:
    cfg = indexed_cfg([sample_prefix])
    cfg.model.vocab_size = 256
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_datasets(cfg, (10, 2), str(tmp_path))
    cfg = indexed_cfg([sample_prefix])
    cfg.data.tokenizer = ""
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_datasets(cfg, (10, 2), str(tmp_path))
    # 0.1% of 450 documents rounds to none: a clear error instead of megatron looping forever.
    with pytest.raises(ConfigError, match="valid part of split"):
        build_datasets(indexed_cfg([sample_prefix], split="999,1,0"), (10, 2), str(tmp_path))


def test_no_valid_split_gives_none(sample_prefix, indexed_cfg, tmp_path) -> None:
    train, valid = build_datasets(indexed_cfg([sample_prefix], split="1,0,0"), (10, 2),
                                  str(tmp_path))
    assert valid is None and len(train) >= 10


def test_synthetic_dataset_format_and_determinism() -> None:
    ds = SyntheticDataset(num_samples=20, seq_length=16, vocab_size=50, seed=3)
    assert len(ds) == 20
    sample = ds[4]
    assert set(sample) == KEYS
    _check_sample(sample, 16, 50)
    # Sample i depends only on (seed, i): not on the order of access or the dataset length.
    fresh = SyntheticDataset(num_samples=1000, seq_length=16, vocab_size=50, seed=3)
    assert all(torch.equal(fresh[4][k], sample[k]) for k in KEYS)
    assert torch.equal(ds[-1]["tokens"], ds[19]["tokens"])
    assert not torch.equal(ds[4]["tokens"], ds[5]["tokens"])
    assert not torch.equal(SyntheticDataset(20, 16, 50, seed=4)[4]["tokens"], sample["tokens"])
    with pytest.raises(IndexError):
        ds[20]
    assert len(list(torch.utils.data.DataLoader(ds, batch_size=4))) == 5


def test_synthetic_build_datasets() -> None:
    cfg = RunConfig(model=ModelConfig(vocab_size=100), train=TrainConfig(seq_length=8, seed=1),
                    data=DataConfig(kind="synthetic"))
    train, valid = build_datasets(cfg, (12, 3), "")
    assert (len(train), len(valid)) == (12, 3)
    _check_sample(train[0], 8, 100)
    assert not torch.equal(train[0]["tokens"], valid[0]["tokens"])
    again, _ = build_datasets(cfg, (12, 3), "")
    assert torch.equal(train[11]["tokens"], again[11]["tokens"])
