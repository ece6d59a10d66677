"""Two GPUs (NCCL) reproduce one GPU: every parallel layout of the tiny SpikingBrain-7B and
-76B shapes, checkpoints moved across GPU layouts, and the staged 76B example.

``pytest -m multigpu tests/gpu/test_multigpu_layouts.py`` (skipped without 2 GPUs). Runs are
trained together to keep launches few (a launch costs seconds of imports and CUDA start per
rank): ONE 2-rank torchrun trains every layout in bf16 and fp32 plus the checkpoint saves and
the 2-GPU resumes; ONE 1-rank torchrun trains the references and the 1-GPU resumes; the
example's two stages are two more launches. Real torchrun (not the CPU suite's forked ranks):
the ranks must start CUDA themselves. ``SB_PLATFORM=cuda`` overrides the CPU default that
tests/conftest.py sets for the suite, and torch.compile is on (fla / flex fast paths).

Tolerances (max |loss difference| per step over 10 steps, grad norms relative):
- bf16: 2e-4. Measured 2026-11-30 (76B shape): DP2xEP2 4.1e-5, PP2 6.9e-5, SP2xEP2 7.6e-5.
  Layouts change reduction orders and kernel shapes, and bf16 keeps 8 mantissa bits.
- fp32: 1e-5 for DP2 / DP2xEP2 / PP2 (only reduction orders change); 5e-5 under SP2, where
  fla's chunk kernels (TF32 dots even for fp32, tests/gpu/test_gpu_train.py) see other
  sequence lengths per call.
The measured maxima are written to ``runs/multigpu_layouts.json`` for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sbtrain.checkpoint import latest_step
from tests.parallel import harness

# gpu too: the CPU suite's -m "not gpu" deselects these; -m multigpu selects them
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

STEPS = 10
GPU_ENV = {"SB_PLATFORM": "cuda", "TORCH_COMPILE_DISABLE": "0"}
# hidden 64 / 4 heads = head dim 16, the smallest that fla's and flex's kernels take; 4 layers
# (pp 2 splits 2/2), window 4 < the 8-token slices of SP2 < seq 16. DP communication is
# overlapped (the GPU default) in buckets of 3000 elements: several per model, as at scale.
COMMON = {"model.hidden_size": 64, "model.vocab_size": 16, "model.sliding_window": 4,
          "data.document_mask": True, "train.train_iters": STEPS, "optim.decay_iters": STEPS,
          "parallel.bucket_size": 3000}
SHAPES = {"7b": {**COMMON, "model.pattern": "L-W-L-W-"},
          "76b": {**COMMON, "model.pattern": "H-F-HEFE", "model.sink_tokens": 4}}
LAYOUTS = {  # the SpikingBrain-7B is dense: no expert-parallel layouts for it
    "dp2": {}, "pp2": {"parallel.pp": 2}, "sp2": {"parallel.sp": 2},
    "dp2_ep2": {"parallel.ep": 2}, "sp2_ep2": {"parallel.sp": 2, "parallel.ep": 2},
    # the softmax halo by send/recv (NCCL P2P) instead of the all-gather
    "sp2_ep2_halo": {"parallel.sp": 2, "parallel.ep": 2, "parallel.sp_softmax_exchange": "halo"},
    # Ulysses: NCCL all-to-all over heads (4 heads, 2 kv heads over sp 2) in H and F layers
    "sp2_ep2_ulysses": {"parallel.sp": 2, "parallel.ep": 2, "parallel.sp_softmax_exchange": "ulysses"},
}
PRECISIONS = ("bf16", "fp32")
TOLERANCE = {"bf16": 2e-4, "fp32": 1e-5, "fp32_sp": 5e-5}
CASES = [(shape, layout, precision) for shape in SHAPES for layout in LAYOUTS
         for precision in PRECISIONS if shape == "76b" or "ep" not in layout]
SAVE_AT = 5


def _two_gpu_runs() -> dict[str, dict]:
    runs = {f"{s}.{layout}.{p}": {**SHAPES[s], **LAYOUTS[layout], "train.precision": p}
            for s, layout, p in CASES}
    # checkpoints: the dense 7B under DP2 (optimizer state reshards across layouts), the 76B
    # under DP2xEP2 (weights only: megatron-core 0.19.2 cannot reshard MoE optimizer state
    # across expert-parallel sizes, docs/architecture.md "Known limits")
    runs["ck7b.save"] = {**runs["7b.dp2.bf16"], "checkpoint.save_dir": "{tmp}/ck7b",
                         "train.exit_at_step": SAVE_AT}
    runs["ck76b.save"] = {**runs["76b.dp2_ep2.bf16"], "checkpoint.save_dir": "{tmp}/ck76b",
                          "train.exit_at_step": SAVE_AT}
    runs["ck7b.pp2"] = _resumed("ck7b", "ck7b_pp2", {"parallel.pp": 2})
    runs["ck76b.pp2"] = _weights_from("ck76b", {"parallel.pp": 2})
    return runs


def _one_gpu_runs() -> dict[str, dict]:
    runs = {f"{s}.one.{p}": {**SHAPES[s], "train.precision": p}
            for s in SHAPES for p in PRECISIONS}
    runs["ck7b.one"] = _resumed("ck7b", "ck7b_one", {})
    runs["ck76b.one"] = _weights_from("ck76b", {})
    return runs


def _resumed(ck: str, save: str, layout: dict) -> dict:
    """Resume the 7B (weights, optimizer, schedule, data position) under ``layout`` to STEPS,
    saving elsewhere (``save``) so that ``ck``'s latest stays SAVE_AT."""
    return {**SHAPES["7b"], **layout, "train.precision": "bf16",
            "checkpoint.load_dir": f"{{tmp}}/{ck}", "checkpoint.save_dir": f"{{tmp}}/{save}"}


def _weights_from(ck: str, layout: dict) -> dict:
    """One step from the 76B checkpoint's weights under ``layout`` (ep 1), at the data position
    of step SAVE_AT + 1: its loss is the uninterrupted run's step SAVE_AT + 1 loss."""
    return {**SHAPES["76b"], **layout, "train.precision": "bf16", "train.train_iters": 1,
            "checkpoint.pretrained": f"{{tmp}}/{ck}",
            "data.start_tokens": SAVE_AT * harness.TINY["train"]["global_batch_size"]
            * harness.TINY["train"]["seq_length"]}


def _launch(tmp: Path, nproc: int, runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Every run in order in ONE real torchrun of ``nproc`` GPU ranks (multi_run.py)."""
    return harness.run_many(tmp, nproc, runs, timeout=900, env=GPU_ENV)


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("multigpu")
    two = _launch(tmp, 2, _two_gpu_runs())  # first: the 1-GPU resumes read its checkpoints
    return {**two, **_launch(tmp, 1, _one_gpu_runs())}


@pytest.fixture(scope="module")
def measured():
    found: dict[str, float] = {}
    yield found
    out = harness.REPO / "runs" / "multigpu_layouts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(found, indent=1, sort_keys=True))


def _max_difference(ref: list[dict], got: list[dict]) -> float:
    assert [r["step"] for r in ref] == [g["step"] for g in got]
    return max(abs(r["loss"] - g["loss"]) for r, g in zip(ref, got))


@pytest.mark.parametrize("shape,layout,precision", CASES, ids=["-".join(c) for c in CASES])
def test_two_gpus_reproduce_one(shape, layout, precision, curves, measured):
    ref, got = curves[f"{shape}.one.{precision}"], curves[f"{shape}.{layout}.{precision}"]
    tol = TOLERANCE["fp32_sp" if precision == "fp32" and "sp" in layout else precision]
    measured[f"{shape}.{layout}.{precision}"] = _max_difference(ref, got)
    harness.assert_same_curve(ref, got, tol=tol)
    assert len(ref) == STEPS and len({r["loss"] for r in ref}) > 1  # it trained


def test_bf16_is_bf16(curves):
    """Guards against comparing fp32 twice: bf16 and fp32 runs differ."""
    assert _max_difference(curves["76b.one.fp32"], curves["76b.one.bf16"]) > 1e-6


@pytest.mark.parametrize("where", ["one", "pp2"])
def test_dp2_checkpoint_resumes_on_one_gpu_and_under_pp2(where, curves, measured):
    full, resumed = curves["7b.dp2.bf16"], curves[f"ck7b.{where}"]
    assert [r["step"] for r in curves["ck7b.save"]] == list(range(1, SAVE_AT + 1))
    assert [r["step"] for r in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    measured[f"resume.7b.dp2->{where}"] = _max_difference(full[SAVE_AT:], resumed)
    harness.assert_same_curve(full[SAVE_AT:], resumed, tol=TOLERANCE["bf16"])


@pytest.mark.parametrize("where", ["one", "pp2"])
def test_dp2_ep2_checkpoint_weights_continue_on_one_gpu_and_under_pp2(where, curves, measured):
    full, first = curves["76b.dp2_ep2.bf16"], curves[f"ck76b.{where}"]
    assert len(first) == 1
    measured[f"weights.76b.dp2_ep2->{where}"] = abs(first[0]["loss"] - full[SAVE_AT]["loss"])
    assert abs(first[0]["loss"] - full[SAVE_AT]["loss"]) <= TOLERANCE["bf16"], (first, full)


def test_pretrain_76b_example_both_stages_on_two_gpus(tmp_path):
    """examples/pretrain_76b.sh with its tiny config (short stage: DP2xEP2, 10 steps; long
    stage: SP2xEP2, 6 steps, from the short stage's checkpoint); bash picks the world size per
    stage and launches torchrun twice."""
    sets = ["--set", f"train.run_dir={tmp_path}/run", "--set", f"checkpoint.save_dir={tmp_path}/ck"]
    proc = subprocess.run(["bash", "examples/pretrain_76b.sh", *sets], cwd=harness.REPO,
                          env=harness.launch_env(GPU_ENV), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("torchrun with 2 ranks") == 2, proc.stdout[-3000:]
    steps = {}
    for stage in ("short", "long"):
        records = harness.metrics(tmp_path / "run" / stage)
        assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records), records
        steps[stage] = [r["step"] for r in records]
        assert latest_step(tmp_path / "ck" / stage) == len(records), stage  # saved at its end
    assert steps == {"short": list(range(1, 11)), "long": list(range(1, 7))}, steps
