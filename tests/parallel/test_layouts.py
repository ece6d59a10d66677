"""Every parallel layout reproduces the single-process run (loss and grad norm per step)."""

from __future__ import annotations

import pytest

from tests.parallel.harness import MOE_PATTERN, assert_same_curve, run

DENSE_LAYOUTS = {
    "dp2": (2, {"parallel.pp": 1}),
    "pp2": (2, {"parallel.pp": 2}),
    "tp2": (2, {"parallel.tp": 2}),
    "dp2_pp2": (4, {"parallel.pp": 2}),
}
# The 7B-style hybrid (GLA + sliding window 4 < seq 16) with packed-document masking.
HYBRID = {"model.pattern": "L-W-L-W-", "model.sliding_window": 4, "data.document_mask": True,
          "model.vocab_size": 16}
HYBRID_LAYOUTS = {
    "dp2": (2, {}),
    "pp2": (2, {"parallel.pp": 2}),
    "tp2": (2, {"parallel.tp": 2}),
}
MOE_LAYOUTS = {
    "ep2": (2, {"parallel.ep": 2}),
    "pp2_ep2": (4, {"parallel.pp": 2, "parallel.ep": 2}),
}


@pytest.fixture(scope="module")
def baselines(one_process_curve):
    return {
        "dense": one_process_curve({}),
        "moe": one_process_curve({"model.pattern": MOE_PATTERN}),
        "hybrid": one_process_curve(HYBRID),
    }


@pytest.mark.parametrize("name", sorted(DENSE_LAYOUTS))
def test_dense_layout_matches_single_process(name, baselines, tmp_path):
    nproc, overrides = DENSE_LAYOUTS[name]
    assert_same_curve(baselines["dense"], run(tmp_path, name, nproc, overrides))


@pytest.mark.parametrize("name", sorted(MOE_LAYOUTS))
def test_moe_layout_matches_single_process(name, baselines, tmp_path):
    nproc, overrides = MOE_LAYOUTS[name]
    overrides = {"model.pattern": MOE_PATTERN, **overrides}
    assert_same_curve(baselines["moe"], run(tmp_path, name, nproc, overrides))


@pytest.mark.parametrize("name", sorted(HYBRID_LAYOUTS))
def test_hybrid_layout_matches_single_process(name, baselines, tmp_path):
    nproc, overrides = HYBRID_LAYOUTS[name]
    assert_same_curve(baselines["hybrid"], run(tmp_path, name, nproc, {**HYBRID, **overrides}))


def test_baseline_learns(baselines):
    # Guards against a vacuous comparison: the runs being compared actually train.
    for curve in baselines.values():
        assert len(curve) == 3
        assert all(r["grad_norm"] > 0 for r in curve)
