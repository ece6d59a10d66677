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


SAVE = {"checkpoint.save_dir": "{tmp}/ckpt", "checkpoint.save_interval": 2,
        "checkpoint.async_save": True}
TRACED = {"profiler.trace_steps": [2, 3], "profiler.memory_snapshot": True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four runs in ONE GPU launch (issue 23: a launch costs tens of seconds): the
    uninterrupted run, the same stopped after step 2 and resumed in the same process, and the
    traced run."""
    tmp = tmp_path_factory.mktemp("gpu_observe")
    curves = harness.run_many(tmp, 1, {
        "full": STEPS, "first": {**STEPS, **SAVE, "train.exit_at_step": 2},
        "second": {**STEPS, **SAVE}, "traced": {**STEPS, **TRACED}}, timeout=900, env=GPU)
    return tmp, curves


def test_gpu_async_save_resume_equals_uninterrupted(runs):
    tmp, curves = runs
    resumed = curves["second"]
    assert [r["step"] for r in resumed] == [3, 4]
    harness.assert_same_curve(curves["full"][2:], resumed, tol=1e-6)
    assert (tmp / "ckpt" / "latest").read_text().strip() == "4"


def test_gpu_trace_and_memory_snapshot(runs):
    run_dir = runs[0] / "traced"
    events = json.loads((run_dir / "traces" / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernels in the trace"
    snapshot = pickle.loads((run_dir / "memory" / "rank0_end.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"][0]
