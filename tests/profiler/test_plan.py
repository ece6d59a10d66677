from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sbtrain.cli import main as cli_main
from sbtrain.config.schema import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from sbtrain.profiler import format_plan, make_plan


def spikingbrain_7b_run(**train) -> RunConfig:
    model = ModelConfig(pattern="L-W-" * 14, hidden_size=3584, num_attention_heads=28,
                        num_query_groups=4, ffn_hidden_size=18944, vocab_size=152064,
                        max_position_embeddings=131072)
    return RunConfig(model=model, parallel=ParallelConfig(dp=8, pp=4),
                     train=TrainConfig(seq_length=8192, micro_batch_size=2, global_batch_size=512,
                                       **train))


def test_plan_world_size_and_fits():
    plan = make_plan(spikingbrain_7b_run(recompute="full"), device_memory_gib=[16, 64])
    assert plan["world_size"] == 32
    assert plan["parameters"]["total"] == 7_616_542_976
    assert [f["fits"] for f in plan["fits"]] == [False, True]
    assert plan["tokens_per_step"] == 512 * 8192
    json.dumps(plan)


def test_plan_dp_zero_means_one():
    plan = make_plan(RunConfig(parallel=ParallelConfig(dp=0, pp=2)))
    assert plan["world_size"] == 2 and plan["parallel"]["dp"] == 1


def test_report_mfu_implies_plausible_metax_peak():
    # Report §5.4: TGS 1,558 at MFU 23.4% on C550 -> peak = flops * TGS / MFU, ~240-300 TFLOP/s.
    flops = make_plan(spikingbrain_7b_run())["flops_per_token"]["total"]
    assert 240e12 < flops * 1558 / 0.234 < 320e12


def test_format_plan_lists_layers_and_stages():
    text = format_plan(make_plan(spikingbrain_7b_run(), device_memory_gib=[64]))
    assert "L-" in text and "W-" in text
    assert "<- worst" in text and "64 GiB device" in text


def test_import_is_cheap_and_device_free():
    code = "import sys, sbtrain.profiler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_refuses_an_impossible_layout(capsys):
    """reliability.md SILENT 7: a layout that cannot launch was printed with exit 0."""
    tiny = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"
    code = cli_main(["plan", str(tiny), "--world-size", "3",
                     "--set", "parallel.pp=2"])
    assert code == 2
    assert "'parallel': world size 3 is not divisible by pp*tp*sp = 2" in capsys.readouterr().err
