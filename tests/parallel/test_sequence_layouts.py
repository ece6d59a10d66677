"""Sequence parallelism end to end (gloo, CPU): the tiny SpikingBrain-7B (GLA + sliding window,
packed documents) and 76B (H/F parallel hybrids, sink tokens, MoE) shapes trained with SP2, SP4,
SP2xDP2 and SP2xPP2 (76B: SP2xEP2) reproduce one process over 3 steps (7B SP2xDP2 and 76B SP4
with the chunked loss); a checkpoint taken under
SP2 resumes exactly; a staged 16 -> 32 -> 64 token schedule changes seq length and SP size per
stage from one YAML, each stage starting from the previous stage's weights.

Sequences of 16 tokens split 8/8 or 4/4/4/4: slices shorter than the window (4) only at SP4,
documents crossing slice boundaries, sinks replicated on every rank.
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import assert_same_curve, launch, metrics, run, write_config
from tests.parallel.test_76b_layouts import SHAPE_76B
from tests.parallel.test_checkpoint import STEPS, _interrupted
from tests.parallel.test_layouts import HYBRID

SHAPES = {"7b": HYBRID, "76b": SHAPE_76B}
LAYOUTS = {
    ("7b", "sp4"): (4, {"parallel.sp": 4}),
    # with the chunked loss (5 tokens per chunk: chunks that do not divide the 8-token
    # slices), which must train Megatron's output layer + cross-entropy curve
    ("7b", "sp2_dp2"): (4, {"parallel.sp": 2, "train.loss_chunk_tokens": 5}),
    ("7b", "sp2_pp2"): (4, {"parallel.sp": 2, "parallel.pp": 2}),
    ("76b", "sp2_ep2"): (2, {"parallel.sp": 2, "parallel.ep": 2}),
    ("76b", "sp4"): (4, {"parallel.sp": 4, "train.loss_chunk_tokens": 5}),
    ("76b", "sp2_dp2"): (4, {"parallel.sp": 2}),
    ("76b", "sp2_pp2"): (4, {"parallel.sp": 2, "parallel.pp": 2}),
}


@pytest.fixture(scope="module")
def baselines(one_process_curve):
    return {shape: one_process_curve(overrides) for shape, overrides in SHAPES.items()}


@pytest.mark.parametrize("shape,layout", sorted(LAYOUTS), ids=["-".join(k) for k in sorted(LAYOUTS)])
def test_sequence_parallel_layout_matches_single_process(shape, layout, baselines, tmp_path):
    nproc, overrides = LAYOUTS[shape, layout]
    got = run(tmp_path, layout, nproc, {**SHAPES[shape], **overrides})
    assert_same_curve(baselines[shape], got)


def test_baselines_train(baselines):
    # guards against a vacuous comparison: gradients flow and the weights change per step
    for curve in baselines.values():
        assert len(curve) == 3 and all(r["grad_norm"] > 0 for r in curve)
        assert len({r["loss"] for r in curve}) == 3


def test_resume_under_sp2_is_exact(tmp_path):
    common = {**SHAPE_76B, "parallel.sp": 2}
    full = run(tmp_path, "full", 2, {**STEPS, **common})
    resumed = _interrupted(tmp_path, "sp2", 2, {}, 2, {}, common)
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(full[2:], resumed, tol=1e-6)


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
    single = {"parallel.sp": 1, "train.run_dir": str(tmp_path / "single"),
              "checkpoint.save_dir": str(tmp_path / "single_ckpt")}
    launch(config, 1, ["--stage", "s64", *_sets(single)])
    assert_same_curve(staged, metrics(tmp_path / "single"))
    fresh = {**single, "train.run_dir": str(tmp_path / "fresh"), "checkpoint.pretrained": "''",
             "checkpoint.save_dir": str(tmp_path / "fresh_ckpt")}
    launch(config, 1, ["--stage", "s64", *_sets(fresh)])
    assert abs(metrics(tmp_path / "fresh")[0]["loss"] - staged[0]["loss"]) > 1e-4


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]

