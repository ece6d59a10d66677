"""The commands the README and docs show keep working (issue 20 item 6).

- The README's first-run job runs as written (shortened to 4 steps, in a temporary run
  directory): it tokenizes the corpus, trains the SpikingBrain hybrid on 2 CPU ranks, prints
  eval loss, draws metrics.png, says where everything is, and shows no third-party warning.
  A config error under the same launch is printed once, not once per rank.
- The cheap commands of the README's "Using it" block (plan, config, preprocess, stages) run
  verbatim with their placeholders filled in, in-process.
- Every command a code block of README.md / docs/*.md shows is either run here or named in
  COVERED with the test that exercises it: a command added to the docs without a test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbtrain.cli import main as cli
from sbtrain.config import load_config
from sbtrain.config.load import from_dict
from sbtrain.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Documented commands exercised elsewhere (GPU-only ones by the lead's GPU tests).
COVERED = {
    "sbtrain train": "tests/examples/test_pretrain_76b_script.py",
    "sbtrain convert": "tests/model/test_convert.py",
    "sbtrain spikestats": "tests/spiking/test_spikestats.py",
    "sbtrain plot": "tests/profiler/test_observe.py",
    "sbtrain generate": "tests/model/test_hf_export.py",
    "torchrun": "tests/examples/test_pretrain_76b_script.py",
    "bash examples/pretrain_7b.sh": "tests/examples/test_pretrain_76b_script.py",
    "bash examples/pretrain_76b.sh": "tests/examples/test_pretrain_76b_script.py",
    "bash examples/train_tiny.sh": "tests/docs/test_docs_smoke.py",
    "bash scripts/setup_env.sh": "CI (the README's first command)",
    "bash scripts/gpu_check.sh": "GPU only",
    "bash bench/gpu_session.sh": "GPU only",
    "python3 -m pytest": "CI",
    "python3 bench/": "tests/examples/test_bench_layouts.py",
    "python3 scripts/tune_fla.py": "GPU only",
    "sbtrain plan": "tests/docs/test_docs_smoke.py",
    "sbtrain config": "tests/docs/test_docs_smoke.py",
    "sbtrain preprocess": "tests/docs/test_docs_smoke.py",
    "sbtrain stages": "tests/docs/test_docs_smoke.py",
    "sbtrain world-size": "tests/docs/test_docs_smoke.py",
}
COMMAND = re.compile(r"^\s*(?:\$ )?((?:sbtrain|bash|torchrun|python3?) \S+(?: \S+)?)", re.M)


def code_blocks(path: Path) -> list[str]:
    """Shell code blocks (``bash``, ``sh``, ``console`` or untagged); output blocks skipped."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S)
    return [body for lang, body in blocks if lang in ("bash", "sh", "console", "")]


def documented_commands() -> set[str]:
    return {m.group(1) for p in DOCS for block in code_blocks(p) for m in COMMAND.finditer(block)}


def env() -> dict:
    return {**os.environ, "SB_PLATFORM": "cpu", "OMP_NUM_THREADS": "1",
            "TORCH_COMPILE_DISABLE": "1"}


def test_every_documented_command_is_exercised():
    missing = sorted(c for c in documented_commands()
                     if not any(c.startswith(prefix) for prefix in COVERED))
    assert not missing, f"documented commands without a test (add one to COVERED): {missing}"
    for where in COVERED.values():
        assert not where.endswith(".py") or (REPO / where).is_file(), where


def readme_usage_lines(command: str) -> list[str]:
    block = next(b for b in code_blocks(REPO / "README.md") if "sbtrain plan" in b)
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.startswith(f"sbtrain {command}")]


def fill(line: str, tmp_path: Path) -> list[str]:
    """A documented line with its placeholders filled in and optional [...] parts dropped."""
    line = re.sub(r"\[[^\]]*\]", "", line)
    line = line.replace("CONFIG.yaml", "examples/configs/spikingbrain_7b_tiny.yaml")
    line = line.replace("docs.jsonl", "examples/data/sample_corpus.jsonl")
    line = line.replace("data/corpus", str(tmp_path / "corpus"))
    return line.split()[1:]


@pytest.mark.parametrize("command", ["plan", "config", "preprocess"])
def test_readme_usage_lines_run(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = readme_usage_lines(command)
    assert lines, f"README shows no `sbtrain {command}` line"
    for line in lines:
        args = fill(line, tmp_path)
        if command == "config":
            args += ["--stage", "long"]
        assert cli(args) == 0, line
    out = capsys.readouterr().out
    if command == "config":
        # the printed YAML is the resolved config: it loads back to the same RunConfig, and
        # the second stage starts its data after the first one's 10 x 8 x 64 tokens
        cfg = load_config("examples/configs/spikingbrain_7b_tiny.yaml", stage="long")
        assert from_dict(RunConfig, yaml.safe_load(out)) == cfg
        assert cfg.data.start_tokens == 5120
    if command == "preprocess":
        assert (tmp_path / "corpus.bin").stat().st_size > 0


def test_plan_checks_the_config_like_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli(["plan", "examples/configs/tiny.yaml", "--set", "parallel.tp=3"]) == 2
    assert "parallel.tp" in capsys.readouterr().err
    # an empty validation split with evaluation on: a config error, before any launch
    assert cli(["plan", "examples/configs/first_run.yaml", "--set", "data.split=100,0,0"]) == 2
    assert "data.split" in capsys.readouterr().err
    # the 7B YAML cuts its pattern for pp 2; a one-stage override still plans
    assert cli(["plan", "examples/configs/spikingbrain_7b.yaml", "--set", "parallel.pp=1"]) == 0
    assert cli(["world-size", "examples/configs/tiny.yaml", "--set", "parallel.dp=2"]) == 0


def test_stages_into_a_closed_pipe_says_nothing():
    proc = subprocess.run(
        f"{sys.executable} -m sbtrain.cli stages examples/configs/spikingbrain_7b.yaml | head -0",
        shell=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_first_run_as_documented(tmp_path):
    """README's first command (after setup): 4 steps instead of 60 to stay cheap."""
    run = tmp_path / "first_run"
    proc = subprocess.run(
        ["bash", "examples/train_tiny.sh", "--set", "train.train_iters=4",
         "--set", "train.eval_interval=2", "--set", "train.log_interval=2"],
        cwd=REPO, env={**env(), "RUN_DIR": str(run)}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "wrote 450 documents" in out
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in step_lines] == ["step 2/4", "step 4/4"]
    assert all("eval" in line and len(line) < 140 for line in step_lines)
    assert (run / "metrics.png").stat().st_size > 0 and (run / "metrics.jsonl").is_file()
    assert f"run directory {run}" in out
    # the run ends with a greedy sample from its checkpoint (sbtrain generate)
    assert f"[{run / 'checkpoints'} step 4] Simple risotto: you will need" in out
    setup_lines = proc.stdout + proc.stderr
    for said in ("platform cpu", "layout: 2 ranks", "model: 'L-W-HEFE'", "data: indexed",
                 "op gla -> backend"):
        assert said in setup_lines, said
    # no third-party warning reaches the console
    assert "Warning" not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
    # a config error under the same launch is printed once, not once per rank
    bad = subprocess.run(["bash", "examples/train_tiny.sh", "--set", "parallel.tp=3"], cwd=REPO,
                         env={**env(), "RUN_DIR": str(run)}, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and bad.stderr.count("config error:") == 1, bad.stderr[-2000:]
