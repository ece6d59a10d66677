"""Preemption (issue 17, item 2): SIGTERM to torchrun mid-training makes every rank finish its
step, save and exit 0; the relaunch resumes and matches the uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.parallel.harness import REPO, launch, launch_env, metrics, torchrun_cmd, write_config

# The same config as tests/parallel/test_checkpoint.py: its one-process curve is trained once.
STEPS = {"train.train_iters": 4, "optim.decay_iters": 4}


def _read_steps(run_dir) -> int:
    try:
        return len(metrics(run_dir))
    except (FileNotFoundError, ValueError):
        return 0  # not written yet, or a line half-written


def test_sigterm_saves_and_relaunch_resumes_exactly(tmp_path, one_process_curve):
    save = {"checkpoint.save_dir": str(tmp_path / "ckpt")}
    config = write_config(tmp_path, "job", {**STEPS, **save})
    proc = subprocess.Popen(torchrun_cmd(2, ["-m", "sbtrain.train", str(config)]), cwd=REPO,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while _read_steps(tmp_path / "job") < 1 and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached step 1"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    first = metrics(tmp_path / "job")
    stopped = first[-1]["step"]
    assert 1 <= stopped < STEPS["train.train_iters"], (stopped, out[-2000:], err[-3000:])
    assert f"stopping after step {stopped}: SIGTERM received" in out, out[-2000:]
    assert f"saved checkpoint {tmp_path / 'ckpt'}/iter_{stopped:07d}" in out
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(stopped)

    launch(config, 2)
    resumed = metrics(tmp_path / "job")[len(first):]
    assert resumed[0]["resumed_from"] == stopped
    full = one_process_curve(STEPS)
    assert [r["step"] for r in resumed] == [r["step"] for r in full[stopped:]]
    for ref, got in zip(full[stopped:], resumed):
        assert abs(ref["loss"] - got["loss"]) <= 1e-6, (ref, got)
