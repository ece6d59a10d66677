"""Single-process reference curves, trained once per test session and shared by every module
that compares a layout against the same config (each launch costs seconds of imports)."""

from __future__ import annotations

import json

import pytest

from tests.parallel.harness import run


@pytest.fixture(scope="session")
def one_process_curve(tmp_path_factory):
    """``one_process_curve(overrides)``: the metrics of a one-rank run of the tiny config."""
    cache: dict[str, list[dict]] = {}

    def curve(overrides: dict) -> list[dict]:
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            cache[key] = run(tmp_path_factory.mktemp("one_process"), "one", 1, overrides)
        return cache[key]

    return curve
