"""bench/bench_model.py without launching: the cases its flags make and the table's ratio columns."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_model", REPO / "bench/bench_model.py")
bench_model = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_model", bench_model)  # dataclasses look their module up there
_spec.loader.exec_module(bench_model)


def test_layout_cases_per_platform_with_global_batch_and_recompute(tmp_path: Path):
    args = bench_model.parse_args(["--seqs", "8192", "--platforms", "default", "maca", "--global-batch", "8",
                                   "--recompute", "selective", "--set", "train.log_interval=2"])
    cases = bench_model.layout_cases(args)
    assert [c.key for c in cases] == ["hybrid_8192", "hybrid_8192_maca", "softmax_8192", "softmax_8192_maca"]
    sets = bench_model.launch_sets(cases[0], args, tmp_path)
    assert (sets["train.global_batch_size"], sets["train.micro_batch_size"], sets["train.recompute"],
            sets["train.log_interval"]) == (8, 1, "selective", "2")
    assert bench_model._environment("maca")["SB_PLATFORM"] == "maca"
    assert "SB_PLATFORM" not in bench_model._environment("default")
    assert bench_model.parse_args(["--platform", "maca"]).platforms == ["maca"]


def test_config_cases_take_the_first_stage_and_load_nothing():
    args = bench_model.parse_args(["--config", str(REPO / "examples/configs/spikingbrain_7b.yaml"), "--nproc", "2"])
    (case,) = bench_model.config_cases(args)
    assert (case.name, case.stage, case.nproc) == ("spikingbrain_7b", "cpt-8k", 2)
    assert case.sets["data.kind"] == "synthetic" and case.sets["checkpoint.pretrained"] == "''"
    assert "train.recompute" not in case.sets  # the config's own policy


def test_table_ratios():
    def run(name, platform, tokens, mfu):
        return {"name": name, "seq": 8192, "spiking": False, "platform": platform, "tokens_per_s": tokens,
                "tgs": tokens, "mfu": mfu, "peak_gib": 40.0, "step_s": 8192 / tokens, "first_step_s": 20.0,
                "launch_to_step1_s": 50.0}

    rows = bench_model.table([run("hybrid", "default", 30000, 0.40), run("hybrid", "maca", 24000, 0.30),
                              run("softmax", "default", 20000, 0.35)]).splitlines()[2:]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert all(len(c) == 14 for c in cells)
    assert cells[0][11] == "1.50x" and cells[0][13] == ""  # hybrid/softmax tokens/s on the default platform
    assert cells[1][13] == "0.75x"  # maca MFU vs default
