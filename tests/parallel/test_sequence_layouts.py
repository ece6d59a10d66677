"""Sequence parallelism end to end (gloo, CPU): the tiny SpikingBrain-7B (GLA + sliding window,
packed documents) and 76B (H/F parallel hybrids, sink tokens, MoE) shapes trained with SP2, SP4,
SP2xDP2 and SP2xPP2 (76B: SP2xEP2) reproduce one process over 3 steps (7B SP2xDP2 and 76B SP4
with the chunked loss; the runs are in tests/parallel/plan.py); a checkpoint taken under
SP2 resumes exactly; a staged 16 -> 32 -> 64 token schedule changes seq length and SP size per
stage from one YAML, each stage starting from the previous stage's weights.

Sequences of 16 tokens split 8/8 or 4/4/4/4: slices shorter than the window (4) only at SP4,
documents crossing slice boundaries, sinks replicated on every rank.
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import assert_same_curve, launch, metrics, write_config
from tests.parallel.plan import HYBRID, LAYOUTS

SEQUENCE = sorted(k for k in LAYOUTS if k[1].startswith("sp"))


@pytest.mark.parametrize("shape,layout", SEQUENCE, ids=["-".join(k) for k in SEQUENCE])
def test_sequence_parallel_layout_matches_single_process(shape, layout, planned):
    nproc, _ = LAYOUTS[shape, layout]
    assert_same_curve(planned(1)[shape], planned(nproc)[f"{shape}.{layout}"])


# The baselines' guard against a vacuous comparison: tests/parallel/test_layouts.py.


def test_resume_under_sp2_is_exact(planned):
    runs = planned(2)
    resumed = runs["resume_76b_sp2.b"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(runs["resume_76b_sp2.full"][2:], resumed, tol=1e-6)


STAGES = [
    {"name": "s16", "overrides": {"train.seq_length": 16}},
    {"name": "s32", "overrides": {"train.seq_length": 32, "parallel.sp": 2}},
    {"name": "s64", "overrides": {"train.seq_length": 64, "parallel.sp": 4}},
]


def test_staged_long_context_schedule(tmp_path):
    """One YAML, one 4-rank launch of every stage (dp 4 -> 2 -> 1 as sp grows), then the last
    stage again on one process from the same starting checkpoint: the same curve. A fresh
    start of that stage gives another first loss, so the stages do hand their weights on."""
    config = write_config(tmp_path, "staged", {
        **HYBRID, "train.train_iters": 2, "model.max_position_embeddings": 64,
        "checkpoint.save_dir": str(tmp_path / "ckpt"), "stages": STAGES})
    launch(config, 4, ["--stage", "all"])
    staged = metrics(tmp_path / "staged" / "s64")
    # --set run_dir/save_dir are bases the stage extends with its name; the starting
    # checkpoint is named explicitly: the staged run's s32
    single = {"parallel.sp": 1, "train.run_dir": str(tmp_path / "single"),
              "checkpoint.save_dir": str(tmp_path / "single_ckpt"),
              "checkpoint.pretrained": str(tmp_path / "ckpt" / "s32")}
    launch(config, 1, ["--stage", "s64", *_sets(single)])
    assert_same_curve(staged, metrics(tmp_path / "single" / "s64"))
    fresh = {**single, "train.run_dir": str(tmp_path / "fresh"), "checkpoint.pretrained": "''",
             "checkpoint.save_dir": str(tmp_path / "fresh_ckpt")}
    launch(config, 1, ["--stage", "s64", *_sets(fresh)])
    assert abs(metrics(tmp_path / "fresh" / "s64")[0]["loss"] - staged[0]["loss"]) > 1e-4


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]

