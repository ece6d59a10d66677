"""The test harness forks CPU launches from the rank server and gives GPU launches real torchrun."""

import subprocess

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
