"""The tiny runs on a GPU (nccl) reproduce the CPU (gloo) runs; bf16 stays close.

Every GPU run of this file trains in ONE real torchrun launch and every CPU reference in one
forked launch (``harness.run_many``): a GPU launch costs tens of seconds of imports, CUDA start
and compilation (issue 23: ``pytest -m gpu`` within 8 minutes). Compilation is on for all of
them, since the fast paths (fla chunk_gla, flex_attention) need torch.compile.
"""

from __future__ import annotations

import pytest

from tests.parallel import harness

pytestmark = pytest.mark.gpu
MOE = {"model.pattern": harness.MOE_PATTERN}
# hidden 64 / 4 heads = head dim 16, the smallest that fla's and flex's kernels take.
HYBRID = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4, "data.document_mask": True,
          "model.vocab_size": 16, "model.hidden_size": 64}
# The tiny 76B shape (H/F parallel hybrids, sink tokens, MoE) at head dim 16.
SHAPE_76B = {"model.pattern": "H-F-HEFE", "model.sliding_window": 4, "model.sink_tokens": 4,
             "data.document_mask": True, "model.vocab_size": 16, "model.hidden_size": 64}
SHAPES = {"moe": MOE, "hybrid": HYBRID, "76b": SHAPE_76B}
GPU_ENV = {"SB_PLATFORM": "cuda", "TORCH_COMPILE_DISABLE": "0"}
GPU_RUNS = {"moe.fp32", "moe.bf16", "hybrid.fp32", "hybrid.bf16", "76b.fp32"}


def _runs(names) -> dict[str, dict]:
    return {name: {**SHAPES[name.split(".")[0]], "train.precision": name.split(".")[1]}
            for name in sorted(names)}


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> dict[str, list[dict]]:
    return harness.run_many(tmp_path_factory.mktemp("gpu_train"), 1, _runs(GPU_RUNS),
                            timeout=900, env=GPU_ENV)


@pytest.fixture(scope="module")
def cpu(tmp_path_factory) -> dict[str, list[dict]]:
    return harness.run_many(tmp_path_factory.mktemp("cpu_train"), 1,
                            _runs({"moe.fp32", "hybrid.fp32", "76b.fp32"}))


def test_gpu_fp32_matches_cpu(gpu, cpu):
    # Same math, different kernels (TF32 off by default for fp32 matmuls): rounding-level only.
    harness.assert_same_curve(cpu["moe.fp32"], gpu["moe.fp32"], tol=2e-4)


def test_gpu_bf16_trains_close_to_fp32(gpu):
    for a, b in zip(gpu["moe.fp32"], gpu["moe.bf16"]):
        # bf16 keeps 8 mantissa bits: relative error ~4e-3 per op, a few 1e-2 on the loss.
        assert abs(a["loss"] - b["loss"]) < 5e-2, (a, b)
    assert gpu["moe.bf16"][-1]["mfu"] is not None and gpu["moe.bf16"][-1]["mfu"] > 0


def test_gpu_hybrid_fast_paths_match_cpu_reference(gpu, cpu):
    # fla's chunk kernels use TF32 tensor-core dots even for fp32 inputs (~1e-3 relative).
    harness.assert_same_curve(cpu["hybrid.fp32"], gpu["hybrid.fp32"], tol=3e-3)


def test_gpu_hybrid_bf16_trains_close_to_fp32(gpu):
    for a, b in zip(gpu["hybrid.fp32"], gpu["hybrid.bf16"]):
        assert abs(a["loss"] - b["loss"]) < 5e-2, (a, b)


def test_gpu_76b_shape_fast_paths_match_cpu_reference(gpu, cpu):
    """fla (linear branch, sink prefix state) and flex (op attention with sinks) vs the CPU references."""
    harness.assert_same_curve(cpu["76b.fp32"], gpu["76b.fp32"], tol=3e-3)
