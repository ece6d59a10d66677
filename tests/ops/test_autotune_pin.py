"""ops/autotune_pin.py: the pinned config is the smallest, and the pin reaches every autotuner."""

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402

from ops import autotune_pin  # noqa: E402


def config(stages: int, warps: int, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def test_smallest_config_orders_by_stages_then_blocks_then_warps():
    configs = [config(3, 1, BK=16, BV=16), config(2, 8, BK=64, BV=64), config(2, 4, BK=32, BV=32),
               config(2, 2, BK=32, BV=32)]
    assert autotune_pin.smallest_config(configs) is configs[3]
    assert autotune_pin.smallest_config([config(4, 8), config(2, 8), config(2, 4)]).num_warps == 4


def test_pin_reduces_every_autotuner_to_one_config_only_when_requested(monkeypatch):
    seen = []

    class Tuner:
        configs = [config(3, 4, BK=64), config(2, 4, BK=32), config(2, 4, BK=64)]

    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: seen.append(list(self.configs)) or "ran")
    monkeypatch.setattr(autotune_pin, "_installed", False)
    monkeypatch.setenv(autotune_pin.PIN_ENV, "0")
    assert autotune_pin.install_autotune_pin() is False
    monkeypatch.setenv(autotune_pin.PIN_ENV, "1")
    assert autotune_pin.install_autotune_pin() is True
    tuner = Tuner()
    assert Autotuner.run(tuner, 1, x=2) == "ran"
    assert [c.kwargs for c in seen[0]] == [{"BK": 32}]
    assert autotune_pin.install_autotune_pin() is True  # idempotent: not wrapped twice
