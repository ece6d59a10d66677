"""The tiny run on a GPU (nccl) reproduces the CPU (gloo) run; bf16 stays close."""

from __future__ import annotations

import pytest

from tests.parallel import harness

pytestmark = pytest.mark.gpu
MOE = {"model.pattern": harness.MOE_PATTERN}


def _run(tmp, name, platform, overrides):
    return harness.run(tmp, name, 1, {**MOE, **overrides}, env={"SB_PLATFORM": platform})


def test_gpu_fp32_matches_cpu(tmp_path):
    cpu = _run(tmp_path, "cpu", "cpu", {"train.precision": "fp32"})
    gpu = _run(tmp_path, "gpu", "cuda", {"train.precision": "fp32"})
    # Same math, different kernels (TF32 off by default for fp32 matmuls): rounding-level only.
    harness.assert_same_curve(cpu, gpu, tol=2e-4)


def test_gpu_bf16_trains_close_to_fp32(tmp_path):
    fp32 = _run(tmp_path, "fp32", "cuda", {"train.precision": "fp32"})
    bf16 = _run(tmp_path, "bf16", "cuda", {"train.precision": "bf16"})
    for a, b in zip(fp32, bf16):
        # bf16 keeps 8 mantissa bits: relative error ~4e-3 per op, a few 1e-2 on the loss.
        assert abs(a["loss"] - b["loss"]) < 5e-2, (a, b)
    assert bf16[-1]["mfu"] is not None and bf16[-1]["mfu"] > 0


# hidden 64 / 4 heads = head dim 16, the smallest that fla's and flex's kernels take.
HYBRID = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4, "data.document_mask": True,
          "model.vocab_size": 16, "model.hidden_size": 64}
# The fast paths (fla chunk_gla, flex_attention) need torch.compile, which the harness turns off.
FAST = {"TORCH_COMPILE_DISABLE": "0"}


def test_gpu_hybrid_fast_paths_match_cpu_reference(tmp_path):
    cpu = harness.run(tmp_path, "cpu", 1, {**HYBRID, "train.precision": "fp32"},
                      env={"SB_PLATFORM": "cpu"})
    gpu = harness.run(tmp_path, "gpu", 1, {**HYBRID, "train.precision": "fp32"},
                      env={"SB_PLATFORM": "cuda", **FAST})
    # fla's chunk kernels use TF32 tensor-core dots even for fp32 inputs (~1e-3 relative).
    harness.assert_same_curve(cpu, gpu, tol=3e-3)


def test_gpu_hybrid_bf16_trains_close_to_fp32(tmp_path):
    runs = {p: harness.run(tmp_path, p, 1, {**HYBRID, "train.precision": p},
                           env={"SB_PLATFORM": "cuda", **FAST}) for p in ("fp32", "bf16")}
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert abs(a["loss"] - b["loss"]) < 5e-2, (a, b)


# The tiny 76B shape (H/F parallel hybrids, sink tokens, MoE) at head dim 16.
SHAPE_76B = {"model.pattern": "H-F-HEFE", "model.sliding_window": 4, "model.sink_tokens": 4,
             "data.document_mask": True, "model.vocab_size": 16, "model.hidden_size": 64}


def test_gpu_76b_shape_fast_paths_match_cpu_reference(tmp_path):
    """fla (linear branch, sink prefix state) and flex (op attention with sinks) vs the CPU references."""
    cpu = harness.run(tmp_path, "cpu", 1, {**SHAPE_76B, "train.precision": "fp32"},
                      env={"SB_PLATFORM": "cpu"})
    gpu = harness.run(tmp_path, "gpu", 1, {**SHAPE_76B, "train.precision": "fp32"},
                      env={"SB_PLATFORM": "cuda", **FAST})
    harness.assert_same_curve(cpu, gpu, tol=3e-3)
