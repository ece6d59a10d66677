"""The tiny SpikingBrain-76B shape (H/F parallel hybrids, sink tokens, dense + MoE FFNs): its
EP2, DP2xEP2 and PP2xEP2 parity checks are in tests/parallel/test_layouts.py (the runs in
tests/parallel/plan.py); here resume under EP2 is exact and a checkpoint of 4 ranks resumes
on 2."""

from __future__ import annotations

from tests.parallel.harness import assert_same_curve
from tests.parallel.plan import SHAPE_76B  # noqa: F401  (re-exported: tests/examples)


def test_76b_resume_under_ep2_is_exact(planned):
    runs = planned(2)
    resumed = runs["resume_76b_ep2.b"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(runs["resume_76b_ep2.full"][2:], resumed, tol=1e-6)


def test_76b_checkpoint_of_pp2_ep2_on_4_ranks_resumes_under_ep2_on_2(planned):
    """Saved after step 2 under PP2xEP2 (4 ranks: pipeline stages, experts and data split
    differently), resumed under EP2 on 2 ranks: the uninterrupted EP2 curve continues."""
    runs = planned(2)
    resumed = runs["reshard_76b_4to2.b"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same_curve(runs["resume_76b_ep2.full"][2:], resumed, tol=1e-5)
