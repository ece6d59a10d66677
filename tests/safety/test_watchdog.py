"""Hangs and orphans (issue 17, item 3 and reliability.md SILENT 3), 2 CPU ranks each."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from sbtrain.safety import EXIT_HANG
from tests.parallel.harness import REPO, launch, launch_env, metrics, torchrun_cmd, write_config

HANG_S = 3.0


def test_stuck_rank_is_reported_with_stacks_by_every_rank(tmp_path):
    config = write_config(tmp_path, "hang", {"train.hang_timeout_minutes": HANG_S / 60,
                                             "train.train_iters": 4})
    start = time.monotonic()
    proc = launch(config, 2, entry=["tests/safety/hang_run.py"], check=False, timeout=200,
                  torchrun=True)  # its exit code is what torchrun reports
    assert proc.returncode != 0
    # the waiting rank sits in a collective, the stuck one in its sleep; both say so and exit
    err = proc.stderr
    for rank in (0, 1):
        assert f"error: rank {rank}: no training step finished in" in err, err[-4000:]
    assert "in stuck_train_step" in err and "in finish_grad_sync" in err, err[-4000:]
    assert f"exitcode  : {EXIT_HANG}" in err or f"exitcode: {EXIT_HANG}" in err, err[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "hang")] == [1]
    assert time.monotonic() - start < 150  # far below the process-group timeout (10 min)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _descendants(pid: int) -> list[int]:
    children = _children(pid) if _alive(pid) else []
    return children + [d for c in children for d in _descendants(c)]


def test_workers_stop_when_torchrun_is_killed(tmp_path):
    """Workers and the checkpoint writer's processes they started all end within seconds."""
    config = write_config(tmp_path, "orphan", {"train.train_iters": 100000,
                                               "optim.decay_iters": 10,
                                               "checkpoint.save_dir": str(tmp_path / "ckpt"),
                                               "checkpoint.save_interval": 1})
    proc = subprocess.Popen(torchrun_cmd(2, ["-m", "sbtrain.train", str(config)]), cwd=REPO,
                            env=launch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 200
    while not (tmp_path / "ckpt" / "latest").exists():  # the writer has started its processes
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2
    workers += [d for w in workers for d in _descendants(w)]
    assert len(workers) > 2, "expected megatron's checkpoint-writer processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    while any(_alive(w) for w in workers) and time.monotonic() - killed_at < 10:
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, "workers or their checkpoint-writer processes outlived torchrun"
    assert "the launcher (pid" in proc.stderr.read()
