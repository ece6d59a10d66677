"""Staged training continues the data stream (issue 20 item 5): stage k's training samples start
after the tokens every earlier stage trained on, through the trainer's own batch path, unless
the stage sets ``data.start_tokens: 0``. No launch: the trainer's batch generator runs on a
dataset whose samples carry their index."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sbtrain.config import ConfigError, load_config
from sbtrain.trainer import Trainer

STAGED = """
model: {{pattern: "L-W-", hidden_size: 64, vocab_size: 512, max_position_embeddings: 256}}
train: {{seq_length: 64, micro_batch_size: 2, global_batch_size: 8, train_iters: 5,
        run_dir: {run}}}
checkpoint: {{save_dir: {run}/ckpt}}
stages:
  - name: a
    overrides: {{train.train_iters: 3}}
  - name: b
    overrides: {{train.train_iters: 4}}
  - name: c
    overrides: {{train.seq_length: 128}}
  - name: again
    overrides: {{data.start_tokens: 0}}
"""


class IndexedSamples:
    """Sample i holds i in every token, so a batch shows which samples it read."""

    def __init__(self, n: int, seq: int) -> None:
        self.n, self.seq = n, seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        tokens = torch.full((self.seq,), i, dtype=torch.long)
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def samples_read(cfg, dp_size: int = 2) -> list[int]:
    """Sample indices every dp rank's micro-batches hold over the whole run, in order, from
    Trainer._device_batches (the path training takes)."""
    t = cfg.train
    one_rank = SimpleNamespace(rank=lambda: 0, size=lambda: 1)
    seen = []
    for step in range(t.train_iters):
        for dp_rank in range(dp_size):
            trainer = Trainer(cfg)
            trainer.state = SimpleNamespace(
                train_ds=IndexedSamples(10_000, t.seq_length), device=torch.device("cpu"),
                groups=SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size,
                                       pg_collection=SimpleNamespace(cp=one_rank)))
            for batch in trainer._device_batches(step, "train"):
                seen += batch["tokens"][:, 0].tolist()
    return seen


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED.format(run=tmp_path / "run"))
    return path


def test_each_stage_starts_where_the_earlier_ones_ended(staged):
    a, b, c, again = (load_config(staged, stage=name) for name in ("a", "b", "c", "again"))
    assert a.data.start_tokens == 0
    assert b.data.start_tokens == 3 * 8 * 64
    assert c.data.start_tokens == (3 + 4) * 8 * 64
    assert again.data.start_tokens == 0  # the stage asks to start over
    read_a, read_b = samples_read(a), samples_read(b)
    # same sequence length: b reads exactly the samples after a's, none twice
    assert read_a == list(range(24)) and read_b == list(range(24, 56))
    # c has twice the sequence length: its first sample starts at token 56 * 64
    assert samples_read(c)[0] == 28 and c.data.first_sample(128) * 128 == 56 * 64
    assert samples_read(again)[:8] == list(range(8))


def test_overrides_of_earlier_stages_move_the_start(staged):
    # --set applies to every stage: stage a then trains 2 steps, so b starts at sample 16
    b = load_config(staged, ["train.train_iters=2"], stage="b")
    assert b.data.start_tokens == 2 * 8 * 64 and samples_read(b)[0] == 16


def test_unstaged_run_starts_at_zero_and_bad_values_are_errors(staged):
    cfg = load_config(staged, ["data.start_tokens=640"])
    assert cfg.data.first_sample(64) == 10 and samples_read(cfg)[0] == 10
    with pytest.raises(ConfigError, match="data.start_tokens"):
        load_config(staged, ["data.start_tokens=-5"])
