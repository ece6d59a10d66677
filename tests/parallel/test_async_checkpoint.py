"""Asynchronous checkpoint saves (checkpoint.async_save): a kill -9 while a save is in flight
leaves ``latest`` at the previous complete checkpoint, the writer process dies with its rank,
and the relaunch (2 ranks, async, fully parallel) resumes exactly: its curve equals the
uninterrupted one-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.parallel.harness import REPO, assert_same_curve, launch_env, run, write_config

STEPS = {"train.train_iters": 4, "optim.decay_iters": 4}

# One process trains 4 steps saving every 2 asynchronously; the writer of the step-4 save
# is made to hang (as a slow file system would), so that save is in flight when the test
# kills the process with SIGKILL.
HANGING_WRITER = r"""
import sys, time
import sbtrain.checkpoint_writer as writer
from sbtrain.config import load_config
from sbtrain.trainer import Trainer

real = writer.save_checkpoint_async

def save_with_hanging_writer(save_dir, step, *args, **kwargs):
    request = real(save_dir, step, *args, **kwargs)
    if step == 4:
        def hang(*a, **k):
            time.sleep(600)
        request = request._replace(async_fn=hang)
    return request

writer.save_checkpoint_async = save_with_hanging_writer
Trainer(load_config(sys.argv[1])).train()
"""


def _start_and_kill_during_save(config: Path) -> tuple[list[int], list[int]]:
    """Run HANGING_WRITER until the step-4 save is in flight, SIGKILL it; returns the pids of
    its forked children (the checkpoint writer) and of the others (megatron-core's results
    queue Manager, spawned, and its resource tracker) at that moment."""
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(config)], cwd=REPO,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "checkpoint step 4: writing in the background" in line:
                break
        else:
            raise AssertionError("the step-4 save never started:\n" + "".join(seen[-40:]))
        children = psutil.Process(proc.pid).children(recursive=True)
        spawned = [c.pid for c in children if "multiprocessing" in " ".join(c.cmdline())]
        forked = [c.pid for c in children if c.pid not in spawned]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "saved checkpoint" in "".join(seen) and "iter_0000002" in "".join(seen)
    return forked, spawned


def _alive(pids: list[int]) -> list[int]:
    deadline = time.time() + 10
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_kill_during_async_save_then_exact_async_resume(tmp_path, one_process_curve):
    full = one_process_curve(STEPS)
    save_dir = tmp_path / "ckpt"
    common = {**STEPS, "checkpoint.save_dir": str(save_dir), "checkpoint.save_interval": 2,
              "checkpoint.async_save": True, "checkpoint.keep_last": 1}

    writers, others = _start_and_kill_during_save(write_config(tmp_path, "killed", common))
    assert writers, "no checkpoint writer process was running during the save"
    assert _alive(writers) == [], "the checkpoint writer outlived its killed rank"
    # Known leftover (as with synchronous saves): megatron-core's results-queue Manager does
    # not notice its rank's SIGKILL; end it here so the suite leaves nothing behind.
    for pid in others:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
    assert (save_dir / "latest").read_text().strip() == "2"
    assert (save_dir / "iter_0000004.partial").is_dir()
    assert not (save_dir / "iter_0000004").exists()

    resumed = run(tmp_path, "resumed", 2, common)
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed[0]["resumed_from"] == 2
    assert_same_curve(full[2:], resumed, tol=1e-5)
    # the relaunch's own async saves were committed before it exited; keep_last pruned after
    assert (save_dir / "latest").read_text().strip() == "4"
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000004"]
    assert all(r["time_checkpoint_s"] >= 0 for r in resumed)
