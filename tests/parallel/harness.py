"""Launch real training jobs (torchrun, gloo, several CPU processes) and read their metrics."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.parallel.rank_server import RankServer

REPO = Path(__file__).resolve().parents[2]

# A tiny model: 4 layers so that pp=2 splits 2/2; MoE layers for the EP layouts.
TINY = {
    "model": {"pattern": "*-*-*-*-", "hidden_size": 32, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 64, "vocab_size": 128,
              "max_position_embeddings": 64,
              "moe": {"num_experts": 4, "top_k": 1, "shared_expert": True}},
    "train": {"seq_length": 16, "micro_batch_size": 1, "global_batch_size": 4,
              "train_iters": 3, "log_interval": 1},
    "optim": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_iters": 1, "clip_grad": 1.0},
    "data": {"kind": "synthetic"},
}
MOE_PATTERN = "*-*E*-*E"


def write_config(tmp: Path, name: str, overrides: dict) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for dotted, value in overrides.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    cfg.setdefault("train", {})["run_dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# rendezvous variables an in-process test's plain-python group leaves in os.environ (with its
# TCPStore still bound to MASTER_PORT): a child must not inherit them
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_env(env: dict | None = None) -> dict:
    """The environment of a CPU/gloo launch: no compilation, one thread, the repo importable."""
    inherited = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return {**inherited, "TORCH_COMPILE_DISABLE": "1", "SB_PLATFORM": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(env or {})}


def gpu_launch(env: dict | None) -> bool:
    """A launch that asks for a GPU platform runs under real torchrun, never forked from the rank
    server: the server imported torch, Triton and megatron-core in the CPU launch environment
    (compilation off, ``SB_PLATFORM=cpu``), and CUDA is not fork-safe once anything touched it."""
    return (env or {}).get("SB_PLATFORM", "cpu") != "cpu"


def torchrun_cmd(nproc: int, entry: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"] + entry


def launch(config: Path, nproc: int, extra: list[str] | None = None, timeout: int = 300,
           check: bool = True, env: dict | None = None, entry: list[str] | None = None,
           torchrun: bool = False) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``sbtrain.train config extra`` (or ``entry`` instead of
    ``-m sbtrain.train``), forked from the session's pre-imported rank server
    (``tests/parallel/rank_server.py``); ``torchrun=True``: a real
    ``torchrun --standalone --nproc_per_node=nproc`` launch (for tests of torchrun's behaviour,
    and for every GPU launch, see ``gpu_launch``)."""
    args = [str(config)] + (extra or [])
    entry = entry or ["-m", "sbtrain.train"]
    if torchrun or gpu_launch(env):
        cmd = torchrun_cmd(nproc, entry + args)
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(env), capture_output=True,
                              text=True, timeout=timeout)
    else:
        cmd = [f"<{nproc} forked ranks>"] + entry + args
        code, out, err = rank_server().launch(nproc, entry, args, launch_env(env), str(REPO),
                                              _launch_logs(), timeout)
        proc = subprocess.CompletedProcess(cmd, code, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-6000:]}")
    return proc


_SERVER: list[RankServer] = []


def rank_server() -> RankServer:
    """The session's rank server, started on first use, closed at exit."""
    if not (_SERVER and _SERVER[0].alive()):
        log = os.path.join(_launch_logs(), "server.log")
        _SERVER[:] = [RankServer(launch_env(), str(REPO), log)]
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def _launch_logs() -> str:
    """Where the forked ranks' output files go (one temporary folder per session)."""
    if not _LOG_DIR:
        _LOG_DIR.append(tempfile.mkdtemp(prefix="sbtrain_ranks_"))
        atexit.register(shutil.rmtree, _LOG_DIR[0], True)
    return _LOG_DIR[0]


_LOG_DIR: list[str] = []


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run(tmp: Path, name: str, nproc: int, overrides: dict, extra: list[str] | None = None,
        env: dict | None = None):
    config = write_config(tmp, name, overrides)
    launch(config, nproc, extra, env=env)
    return metrics(tmp / name)


def run_many(tmp: Path, nproc: int, runs: dict[str, dict], timeout: int = 600,
             env: dict | None = None) -> dict[str, list[dict]]:
    """Train every ``{name: overrides}`` run, in order, in ONE ``nproc``-rank launch
    (``tests/parallel/multi_run.py``); returns each run's metrics. A run may resume from the
    checkpoint an earlier one in the same dict saved (``{tmp}`` in a string value is ``tmp``).
    ``env``: as for :func:`launch` (a GPU platform launches under real torchrun); one
    environment for every run of the launch."""
    def fill(value):
        return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value

    configs = [str(write_config(tmp, name, {k: fill(v) for k, v in overrides.items()}))
               for name, overrides in runs.items()]
    proc = launch(configs[0], nproc, configs[1:], timeout=timeout, check=False, env=env,
                  entry=[str(REPO / "tests/parallel/multi_run.py")])
    if proc.returncode != 0:
        raise AssertionError(f"{nproc}-rank launch of {list(runs)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {name: metrics(tmp / name) for name in runs}


def assert_same_curve(ref: list[dict], got: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in ref] == [g["step"] for g in got]
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= tol, (r["step"], r["loss"], g["loss"])
        assert abs(r["grad_norm"] - g["grad_norm"]) <= tol * max(1.0, r["grad_norm"]), (
            r["step"], r["grad_norm"], g["grad_norm"])
