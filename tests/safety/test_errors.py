"""Known causes are one ``error:`` line with a non-zero exit and no traceback (issue 17 item 4)."""

from __future__ import annotations

import subprocess
import sys

from sbtrain.checkpoint import _load_failure, _save_failure
from tests.parallel.harness import REPO, launch_env, write_config


def test_checkpoint_load_failure_names_checkpoint_cause_and_older_ones(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"iter_{step:07d}").mkdir()
    gathered = RuntimeError("CheckpointException ranks:dict_keys([0])\nTraceback (most recent "
                            "call last):\n  File x\nEOFError: Ran out of input")
    line = _load_failure(tmp_path / "iter_0000015", tmp_path, 15, gathered)
    assert line.startswith(f"cannot load checkpoint {tmp_path / 'iter_0000015'}: RuntimeError: "
                           "EOFError: Ran out of input")
    assert "older complete checkpoints: [5, 10]" in line and "\n" not in line


def test_checkpoint_save_failure_names_checkpoint_and_free_space(tmp_path):
    partial = tmp_path / "iter_0000003.partial"
    (partial / "shard").mkdir(parents=True)
    (partial / "shard" / "0.distcp").write_bytes(b"half")
    line = _save_failure(partial, OSError(28, "No space left on device"))
    assert line.startswith(f"cannot save checkpoint {partial} (removed): "
                           "OSError: [Errno 28] No space left on device (")
    assert not partial.exists()  # no half checkpoint left holding the disk
    assert "GiB free on its disk; the previous complete checkpoint is kept)" in line


def test_missing_load_dir_is_one_line_and_exit_1(tmp_path):
    config = write_config(tmp_path, "run", {"checkpoint.load_dir": str(tmp_path / "absent")})
    proc = subprocess.run([sys.executable, "-m", "sbtrain.train", str(config)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint.load_dir {tmp_path / 'absent'} has no complete checkpoint")
