"""The test harness forks CPU launches from the rank server and gives GPU launches real torchrun."""

import os
import subprocess
import time

from tests.parallel import harness


def test_gpu_launches_use_real_torchrun(monkeypatch, tmp_path):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append((cmd, kwargs["env"]["SB_PLATFORM"]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    monkeypatch.setattr(harness, "rank_server", lambda: (_ for _ in ()).throw(AssertionError("forked")))
    harness.launch(tmp_path / "run.yaml", 2, env={"SB_PLATFORM": "cuda"})
    assert seen[0][0][:3] == [harness.sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in seen[0][0] and seen[0][1] == "cuda"
    assert harness.gpu_launch({"SB_PLATFORM": "maca"}) and not harness.gpu_launch({"SB_PLATFORM": "cpu"})
    assert not harness.gpu_launch(None)


CHILD_SCRIPT = """
import multiprocessing, sys, time
if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,), daemon=False)
    child.start()
    open(sys.argv[1], "w").write(str(child.pid))
"""


def test_forked_rank_leaves_no_process_behind(tmp_path):
    """A rank ends with os._exit, which skips exit handlers: the processes it started (megatron's
    persistent async-save worker) are stopped by the server, not left orphaned."""
    script, pid_file = tmp_path / "starts_child.py", tmp_path / "child.pid"
    script.write_text(CHILD_SCRIPT)
    code, _, err = harness.rank_server().launch(1, [str(script)], [str(pid_file)], harness.launch_env(),
                                                str(harness.REPO), str(tmp_path), 120)
    assert code == 0, err
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid), f"the rank's child {pid} outlived it"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its (gone) parent is not alive
        return stat.read().split()[2] != "Z"
