"""Resume equals the uninterrupted run; checkpoints reshard across layouts; saves are atomic."""

from __future__ import annotations

import subprocess
import sys

from tests.parallel.harness import REPO, assert_same_curve, run
from tests.parallel.plan import STEPS


def _interrupted(tmp, name, nproc_first, first, nproc_second, second, common):
    save = {"checkpoint.save_dir": str(tmp / f"{name}_ckpt")}
    run(tmp, f"{name}_a", nproc_first, {**STEPS, **common, **first, **save, "train.exit_at_step": 2})
    return run(tmp, f"{name}_b", nproc_second, {**STEPS, **common, **second, **save})


def test_resume_is_exact(tmp_path, one_process_curve):
    """The one resume in a fresh launch (the planned resumes run inside one launch)."""
    full = one_process_curve(STEPS)
    resumed = _interrupted(tmp_path, "r", 1, {}, 1, {}, {})
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(full[2:], resumed, tol=1e-6)


def test_checkpoint_reshards_dp2_to_pp2(planned):
    resumed = planned(2)["reshard_dp2_pp2.b"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(planned(1)["steps"][2:], resumed, tol=1e-5)


# MoE resume under EP2: tests/parallel/test_76b_layouts.py (MoE with sinks and H/F mixers).


def test_moe_optimizer_state_ep1_to_ep2_fails_clearly(tmp_path):
    """megatron-core 0.19.2 cannot reshard MoE optimizer state EP1 -> EP2 (its chained expert
    optimizer renames the state): the resume stops with the reason and the way out."""
    from tests.parallel.harness import MOE_PATTERN, launch, write_config

    common = {**STEPS, "model.pattern": MOE_PATTERN, "checkpoint.save_dir": str(tmp_path / "ckpt")}
    run(tmp_path, "ep1", 1, {**common, "train.exit_at_step": 2})
    proc = launch(write_config(tmp_path, "ep2", {**common, "parallel.ep": 2}), 2, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cannot reshard MoE optimizer state between EP1 and EP>1" in output, output[-3000:]
    assert "checkpoint.load_optimizer=false" in output


CRASH_SCRIPT = r"""
import sys
from megatron.core import dist_checkpointing
from sbtrain.config import load_config
from sbtrain.trainer import Trainer
from sbtrain.checkpoint import latest_step
from pathlib import Path

cfg = load_config(sys.argv[1])
trainer = Trainer(cfg)
trainer.setup()
trainer.train()                       # trains 2 steps and saves step 2
real_save = dist_checkpointing.save

def crash(state, directory, **kw):
    real_save(state, directory, **kw)  # shards are on disk ...
    # ... but the job dies before the save completes: not an error the save's failure path
    # sees (that one removes its .partial), the way a killed process leaves one behind
    raise SystemExit("node lost")

dist_checkpointing.save = crash
try:
    trainer.save(4, blocking=True)
except SystemExit:
    pass
save_dir = Path(cfg.checkpoint.save_dir)
print("LATEST", latest_step(save_dir))
print("DIRS", sorted(p.name for p in save_dir.iterdir()))
"""


def test_crash_during_save_leaves_no_complete_looking_checkpoint(tmp_path):
    from tests.parallel.harness import write_config

    config = write_config(tmp_path, "crash", {"train.train_iters": 2,
                                              "checkpoint.save_dir": str(tmp_path / "ck")})
    out = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={"TORCH_COMPILE_DISABLE": "1", "SB_PLATFORM": "cpu",
                              "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LATEST 2" in out.stdout
    assert "'iter_0000004'" not in out.stdout and "iter_0000004.partial" in out.stdout
    # A relaunch resumes from the last complete checkpoint, step 2.
    resumed = run(tmp_path, "after_crash", 1, {"train.train_iters": 3,
                                               "checkpoint.save_dir": str(tmp_path / "ck")})
    assert [r["step"] for r in resumed] == [3]
