"""End to end: `sbtrain preprocess` output feeds a 2-rank training run through GPTDataset."""

from __future__ import annotations

from sbtrain.data.preprocess import preprocess
from tests.parallel.harness import REPO, assert_same_curve, run


def test_train_on_preprocessed_corpus(tmp_path):
    tokenizer = str(REPO / "examples/data/tokenizer.json")
    prefix = str(tmp_path / "corpus")
    preprocess(str(REPO / "examples/data/sample_corpus.jsonl"), prefix, tokenizer)
    data = {"data.kind": "indexed", "data.paths": [prefix], "data.tokenizer": tokenizer,
            "data.split": "90,10,0", "model.vocab_size": 512, "train.eval_interval": 3,
            "data.cache_dir": str(tmp_path / "cache")}
    single = run(tmp_path, "single", 1, data)
    dp2 = run(tmp_path, "dp2", 2, data)
    # Real text is far from uniform: the loss starts near ln(512) and the runs agree exactly.
    assert abs(single[0]["loss"] - 6.24) < 0.3 and "eval_loss" in single[-1]
    assert_same_curve(single, dp2)
