"""bench/bench_layouts.py (issue 8's multi-GPU comparison) runs its layouts against one device
and reports the loss drift and scaling; on CPU ranks (gloo, fp32) the drift is ~1e-6."""

from __future__ import annotations

import importlib.util
import json

from tests.parallel.harness import REPO, write_config
from tests.parallel.test_76b_layouts import SHAPE_76B


def _bench():
    spec = importlib.util.spec_from_file_location("bench_layouts", REPO / "bench/bench_layouts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_layouts_compares_layouts_with_one_device(tmp_path, monkeypatch):
    for key, value in {"SB_PLATFORM": "cpu", "OMP_NUM_THREADS": "1",
                       "TORCH_COMPILE_DISABLE": "1"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    config = write_config(tmp_path, "tiny76b", SHAPE_76B)   # hidden 32, 16 tokens, sinks, MoE
    code = _bench().main([str(config), "--layouts", "sp2_dp2", "--steps", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert code == 0, results
    one, sp2_dp2 = results
    assert one["name"] == "one" and one["devices"] == 1 and len(one["losses"]) == 2
    assert sp2_dp2["devices"] == 4 and sp2_dp2["max_loss_diff"] < 1e-5
    # 4 ranks' tokens/s over 4 x one rank's, from the profiler's own medians
    expected = sp2_dp2["tokens_per_s"] / (4 * one["tokens_per_s"])
    assert abs(sp2_dp2["scaling_efficiency"] - expected) < 1e-12 and expected > 0
