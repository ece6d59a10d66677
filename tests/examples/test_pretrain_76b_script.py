"""examples/pretrain_76b.sh works both ways the issue names: under torchrun (which runs it with
Python on every rank) and under bash (which launches torchrun with the YAML's world size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.parallel.harness import REPO, metrics

SCRIPT = REPO / "examples" / "pretrain_76b.sh"


def _config(tmp: Path, parallel: dict) -> Path:
    """The tiny 76B config with short stages and every output under ``tmp``."""
    cfg = yaml.safe_load((REPO / "examples/configs/spikingbrain_76b_tiny.yaml").read_text())
    cfg["parallel"].update(parallel)
    cfg["train"]["run_dir"] = str(tmp / "run")
    cfg["checkpoint"]["save_dir"] = str(tmp / "ckpt")
    for stage, iters in zip(cfg["stages"], (2, 1)):
        stage["overrides"]["train.train_iters"] = iters
    path = tmp / "tiny76b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    return {**os.environ, "TORCH_COMPILE_DISABLE": "1", "SB_PLATFORM": "cpu",
            "OMP_NUM_THREADS": "1"}


def _ranks(run_dir: Path) -> float:
    """World size of a finished run: tokens/s over tokens/s per GPU."""
    profile = json.loads((run_dir / "profile.json").read_text())
    return profile["tokens_per_s"]["median"] / profile["tgs"]["median"]


def _check(proc: subprocess.CompletedProcess, tmp: Path, ranks: dict[str, int]) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for stage, steps in (("short", 2), ("long", 1)):
        assert [r["step"] for r in metrics(tmp / "run" / stage)] == list(range(1, steps + 1))
        assert (tmp / "ckpt" / stage / f"iter_{steps:07d}").is_dir()
        assert round(_ranks(tmp / "run" / stage)) == ranks[stage]


def test_torchrun_runs_the_script_with_python(tmp_path):
    config = _config(tmp_path, {"dp": 2, "ep": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(config)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    _check(proc, tmp_path, ranks={"short": 2, "long": 2})   # long: dp 1 x sp 2


def test_bash_launches_the_world_size_of_the_yaml(tmp_path):
    # short: dp 1 = one rank (without a YAML world size the script would start 2 on a CPU);
    # long: dp 1 x sp 2 = two ranks, one torchrun per stage with its own world size
    config = _config(tmp_path, {"dp": 1, "ep": 1})
    proc = subprocess.run(["bash", str(SCRIPT), str(config)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    _check(proc, tmp_path, ranks={"short": 1, "long": 2})
    assert "torchrun with 1 ranks (1 per node)" in proc.stdout
    assert "torchrun with 2 ranks (2 per node)" in proc.stdout
