"""bench/bench_layouts.py (the multi-GPU comparison of issues 8 and 18) runs its layouts against
one device and reports the loss drift, scaling and the DP reduction's share of the step, with
and without overlap; on CPU ranks (gloo, fp32) the drift is ~1e-6."""

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
    code = _bench().main([str(config), "--layouts", "sp2_ep2", "--overlap", "both",
                          "--steps", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert code == 0, results
    one, sp2_ep2, no_overlap = results
    assert one["name"] == "one" and one["devices"] == 1 and len(one["losses"]) == 2
    assert no_overlap["name"] == "sp2_ep2+no_overlap"
    for r in (sp2_ep2, no_overlap):
        assert r["devices"] == 2 and r["max_loss_diff"] < 1e-5
        # 2 ranks' tokens/s over 2 x one rank's, from the profiler's own medians
        expected = r["tokens_per_s"] / (2 * one["tokens_per_s"])
        assert abs(r["scaling_efficiency"] - expected) < 1e-12 and expected > 0
        assert 0 < r["grad_reduce_share"] < 1  # the DP reduction's share of the step


def test_sp_blocking_too_adds_a_blocking_run_of_every_sp_variant():
    bench = _bench()
    assert bench.variants("dp2", "both", True) == bench.variants("dp2", "both", False)
    runs = dict(bench.variants("sp2", "both", True))
    assert list(runs) == ["sp2", "sp2+no_overlap", "sp2+sp_blocking", "sp2+no_overlap+sp_blocking"]
    assert runs["sp2+no_overlap+sp_blocking"] == {**bench.NO_OVERLAP, "parallel.sp_early_exchange": "false"}
    assert runs["sp2+sp_blocking"] == {"parallel.sp_early_exchange": "false"}
