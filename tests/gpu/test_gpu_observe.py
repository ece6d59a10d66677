"""On a GPU: an asynchronous save (D2H preload, forked writer, CUDA finalize) resumes exactly,
and a traced, memory-snapshotted run writes its CUDA trace and allocator snapshot."""

from __future__ import annotations

import json
import pickle

import pytest

from tests.parallel import harness

pytestmark = pytest.mark.gpu
GPU = {"SB_PLATFORM": "cuda"}
STEPS = {"train.train_iters": 4, "optim.decay_iters": 4, "train.precision": "fp32"}


def test_gpu_async_save_resume_equals_uninterrupted(tmp_path):
    full = harness.run(tmp_path, "full", 1, STEPS, env=GPU)
    save = {"checkpoint.save_dir": str(tmp_path / "ckpt"), "checkpoint.save_interval": 2,
            "checkpoint.async_save": True}
    harness.run(tmp_path, "first", 1, {**STEPS, **save, "train.exit_at_step": 2}, env=GPU)
    resumed = harness.run(tmp_path, "second", 1, {**STEPS, **save}, env=GPU)
    assert [r["step"] for r in resumed] == [3, 4]
    harness.assert_same_curve(full[2:], resumed, tol=1e-6)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "4"


def test_gpu_trace_and_memory_snapshot(tmp_path):
    harness.run(tmp_path, "traced", 1, {**STEPS, "profiler.trace_steps": [2, 3],
                                        "profiler.memory_snapshot": True}, env=GPU)
    run_dir = tmp_path / "traced"
    events = json.loads((run_dir / "traces" / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernels in the trace"
    snapshot = pickle.loads((run_dir / "memory" / "rank0_end.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"][0]
